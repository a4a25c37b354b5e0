"""Input decoding without a server: resizing, grey images, JPEG, malformed raw BYTES."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from runtime.preprocess import InputError, decode, deserialize_bytes, serialize_bytes


class Typed:
    """Stands in for InferTensorContents (only the fields decode reads)."""

    def __init__(self, **fields):
        self.fp32_contents = fields.get("fp32", [])
        self.uint_contents = fields.get("uint", [])
        self.bytes_contents = fields.get("bytes", [])


def test_uint8_images_of_any_size_are_resized_to_the_model_input():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 40, 24, 3), dtype=np.uint8)
    x = decode("UINT8", images.shape, images.tobytes(), None, 3, 16, 16, max_batch=8)
    assert x.shape == (2, 3, 16, 16) and x.dtype == np.float32
    want = cv2.resize(images[1], (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    np.testing.assert_allclose(x[1], want.transpose(2, 0, 1), atol=1e-6)


def test_grey_images_fill_three_channels():
    grey = np.arange(16 * 16, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = decode("UINT8", grey.shape, grey.tobytes(), None, 3, 16, 16, max_batch=8)
    assert np.array_equal(x[0, 0], x[0, 1]) and np.array_equal(x[0, 1], x[0, 2])
    np.testing.assert_allclose(x[0, 0], grey[0, :, :, 0] / 255, atol=1e-6)


def test_jpeg_bytes_decode_to_rgb_model_input():
    image = np.zeros((64, 48, 3), np.uint8)
    image[:, :, 2] = 255  # pure red in OpenCV's BGR order
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    x = decode("BYTES", [1], serialize_bytes([jpeg]), None, 3, 16, 16, max_batch=8)
    assert x.shape == (1, 3, 16, 16)
    assert x[0, 0].mean() > 0.95 and x[0, 1].mean() < 0.05 and x[0, 2].mean() < 0.05  # red is channel 0 (RGB)


def test_malformed_inputs_are_explained():
    with pytest.raises(InputError, match="truncated"):
        deserialize_bytes(b"\x05\x00")
    with pytest.raises(InputError, match="claims 100 bytes"):
        deserialize_bytes(b"\x64\x00\x00\x00abc")
    with pytest.raises(InputError, match="needs 768 fp32_contents, got 3"):
        decode("FP32", [1, 3, 16, 16], None, Typed(fp32=[0.1, 0.2, 0.3]), 3, 16, 16, max_batch=8)
    with pytest.raises(InputError, match="above 255"):
        decode("UINT8", [1, 1, 1, 3], None, Typed(uint=[1, 2, 300]), 3, 16, 16, max_batch=8)
    with pytest.raises(InputError, match="exceeds the model's max_batch_size 8"):
        decode("FP32", [9, 3, 16, 16], b"", None, 3, 16, 16, max_batch=8)
    with pytest.raises(InputError, match=r"\[N\] \(or \[N, 1\]\)"):
        decode("BYTES", [2, 2], b"", None, 3, 16, 16, max_batch=8)
