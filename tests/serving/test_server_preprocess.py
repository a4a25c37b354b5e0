"""Input decoding without a server: resizing, grey images, JPEG, malformed raw BYTES; image
sizes read from headers before decoding, and the decode budget (per request, all in flight)."""
from __future__ import annotations

import struct
import threading
import time
import zlib
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import tritonclient.grpc as tc

from clients import expect_error
from runtime import preprocess
from runtime.preprocess import (
    DecodeBudget,
    DecodeBusy,
    InputError,
    decode,
    decoded_bytes,
    deserialize_bytes,
    image_size,
    serialize_bytes,
)


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


def png_header(width: int, height: int) -> bytes:
    """A PNG cut after its IHDR chunk: it declares a size and holds no pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))


def encoded(ext: str, height: int, width: int, *flags) -> bytes:
    return cv2.imencode(ext, np.full((height, width, 3), 90, np.uint8), list(flags))[1].tobytes()


def test_image_sizes_are_read_from_png_and_jpeg_headers():
    for ext in (".png", ".jpg"):
        for height, width in ((64, 48), (1, 1), (7, 300)):
            assert image_size(encoded(ext, height, width)) == (width, height)
    assert image_size(encoded(".jpg", 40, 30, cv2.IMWRITE_JPEG_PROGRESSIVE, 1)) == (30, 40)  # SOF2
    assert image_size(png_header(100_000, 3)) == (100_000, 3)
    jpeg = encoded(".jpg", 20, 10)
    for cut in (0, 2, 3, 10, 20):  # cut before the frame header
        assert image_size(jpeg[:cut]) is None
    assert image_size(encoded(".bmp", 4, 4)) is None and image_size(b"not an image") is None
    assert image_size(png_header(0, 5)) is None


def test_an_image_declaring_a_huge_size_is_refused_before_decoding(monkeypatch):
    def never(*_):
        raise AssertionError("decoded")

    monkeypatch.setattr(preprocess.cv2, "imdecode", never)
    for width, height in ((9000, 10), (8000, 8400)):  # over a side; over MAX_IMAGE_PIXELS
        with pytest.raises(InputError, match="resize it before sending"):
            decode("BYTES", [1], serialize_bytes([png_header(width, height)]), None, 3, 16, 16, max_batch=8)
    with pytest.raises(InputError, match="not a decodable JPEG or PNG"):  # only JPEG and PNG are decoded
        decode("BYTES", [1], serialize_bytes([encoded(".bmp", 4, 4)]), None, 3, 16, 16, max_batch=8)


def test_decoded_bytes_count_three_bytes_a_pixel_from_the_headers():
    blobs = [encoded(".png", 30, 20), encoded(".jpg", 10, 10)]
    assert decoded_bytes("BYTES", [2], serialize_bytes(blobs), None) == (600 + 100) * 3
    assert decoded_bytes("BYTES", [2], None, SimpleNamespace(bytes_contents=blobs)) == (600 + 100) * 3
    assert decoded_bytes("UINT8", [1, 4, 5, 3], bytes(60), None) == 60
    assert decoded_bytes("UINT8", [1, 4000, 5000, 3], bytes(60), None) == 0  # malformed: decode() says why
    assert decoded_bytes("FP32", [1, 3, 16, 16], bytes(3072), None) == 0
    assert decoded_bytes("BYTES", [1], b"\x05\x00", None) == 0
    with pytest.raises(InputError, match="resize it before sending"):
        decoded_bytes("BYTES", [1], serialize_bytes([png_header(10_000, 10_000)]), None)


def request_of(*blobs: bytes):
    """Stands in for a ModelInferRequest with one BYTES input (the fields DecodeBudget reads)."""
    tensor = SimpleNamespace(datatype="BYTES", shape=[len(blobs)], contents=None)
    return SimpleNamespace(inputs=[tensor], raw_input_contents=[serialize_bytes(blobs)])


def test_the_decode_budget_bounds_a_request_and_the_requests_in_flight():
    budget = DecodeBudget(max_request_bytes=3 * 1000 * 1000, max_in_flight_bytes=5 * 1000 * 1000)
    big = request_of(png_header(1000, 1000))  # 3 MB decoded
    with pytest.raises(InputError, match="--max-decoded-mb"):
        with budget.hold(request_of(png_header(1000, 1000), png_header(10, 10))):
            pass
    with budget.hold(big) as held:
        assert held == 3_000_000 and budget.in_flight == 3_000_000
        with pytest.raises(DecodeBusy, match="--decode-budget-mb"):
            with budget.hold(big):
                pass
        with budget.hold(request_of(png_header(1000, 600))):  # 1.8 MB more fits
            assert budget.in_flight == 4_800_000
    assert budget.in_flight == 0
    lone = DecodeBudget(max_request_bytes=10**9, max_in_flight_bytes=1)
    with lone.hold(big):  # alone it always passes: nothing else would ever let it through
        pass
    with budget.hold(SimpleNamespace(inputs=[], raw_input_contents=[])) as held:
        assert held == 0  # malformed: holds nothing, decoding refuses it


def test_the_decode_budget_is_thread_safe():
    budget = DecodeBudget(max_request_bytes=10**9, max_in_flight_bytes=10 * 3 * 100 * 100,
                          refuse=lambda message: RuntimeError(message))
    request, peak, refused, lock = request_of(png_header(100, 100)), [0], [0], threading.Lock()

    def worker():
        for _ in range(200):
            try:
                with budget.hold(request):
                    with lock:
                        peak[0] = max(peak[0], budget.in_flight)
                    time.sleep(0)
            except RuntimeError:
                with lock:
                    refused[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.in_flight == 0 and peak[0] <= budget.max_in_flight_bytes


def test_the_server_refuses_a_request_decoding_to_more_than_max_decoded_mb(server):
    """The session server runs with the default --max-decoded-mb (64): two 4096 x 4096 PNGs
    (110 kB on the wire) would decode to 96 MiB, refused from their headers."""
    blob = encoded(".png", 4096, 4096)
    images = tc.InferInput("input", [2], "BYTES")
    images.set_data_from_numpy(np.array([blob, blob], dtype=np.object_))
    client = tc.InferenceServerClient(server.target)
    try:
        expect_error("INVALID_ARGUMENT", "--max-decoded-mb", client.infer, "tiny", [images],
                     parameters={"stream_id": "decode-budget"})
        one = tc.InferInput("input", [1], "BYTES")
        one.set_data_from_numpy(np.array([encoded(".png", 40, 30)], dtype=np.object_))
        assert client.infer("tiny", [one], parameters={"stream_id": "decode-budget"}).as_numpy("logits").shape == (1, 10)
    finally:
        client.close()
