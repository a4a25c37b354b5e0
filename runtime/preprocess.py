"""Turn one inference input tensor from the wire into model input: float32 NCHW in [0, 1].

Accepted forms (all under the model's single input name):
  FP32  [N, C, H, W]  pixels in [0, 1] at the model's size (the fast path)
  UINT8 [N, H, W, C]  decoded pixels 0..255, any size (resized), C = 3 (RGB) or 1 (grey)
  BYTES [N]           encoded JPEG / PNG images (cv2.imdecode), any size (resized)
Contents come either raw (`raw_input_contents`, what tritonclient sends) or typed
(`contents.fp32_contents` / `uint_contents` / `bytes_contents`, what KServe's client sends).
Every rejection raises InputError with a message that says what was expected.
"""
from __future__ import annotations

import os
import struct

MAX_IMAGE_SIDE = 8192  # refuse absurd images (memory)
MAX_IMAGE_PIXELS = 1 << 26  # 67 M pixels: a small compressed "bomb" must not allocate gigabytes
# OpenCV checks the declared size before allocating, against this limit (read at decode time)
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))

import cv2  # noqa: E402 - after the limit above
import numpy as np  # noqa: E402


class InputError(ValueError):
    """The request's input is malformed (INVALID_ARGUMENT)."""


def deserialize_bytes(raw: bytes) -> list[bytes]:
    """Triton's raw BYTES layout: each element is a 4-byte little-endian length, then the bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InputError("raw BYTES contents are truncated: each element needs a 4-byte little-endian length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InputError(f"raw BYTES element {len(items)} claims {length} bytes but only {len(raw) - offset} remain")
        items.append(raw[offset:offset + length])
        offset += length
    return items


def serialize_bytes(items) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _resize(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 or float32 (N, h, w, C) -> (N, height, width, C); area filter when shrinking."""
    if images.shape[1:3] == (height, width):
        return images
    shrink = images.shape[1] > height or images.shape[2] > width
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    out = [cv2.resize(img, (width, height), interpolation=interpolation) for img in images]
    return np.stack([o if o.ndim == 3 else o[:, :, None] for o in out])


def _to_model_input(images_nhwc: np.ndarray, channels: int, height: int, width: int) -> np.ndarray:
    """uint8 (N, h, w, 1|3) -> float32 (N, channels, height, width) in [0, 1]."""
    images = _resize(images_nhwc, height, width)
    if images.shape[3] == 1 and channels == 3:
        images = np.repeat(images, 3, axis=3)
    elif images.shape[3] == 3 and channels == 1:
        images = images.mean(axis=3, keepdims=True)
    x = images.astype(np.float32) / 255.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _element_count(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def decode(datatype: str, shape, raw: bytes | None, contents, channels: int, height: int, width: int,
           max_batch: int) -> np.ndarray:
    """One input tensor -> float32 (N, channels, height, width) in [0, 1].

    `raw` is its raw_input_contents entry (None when typed contents are used); `contents` is
    the InferTensorContents message."""
    shape = [int(s) for s in shape]
    if any(s < 0 for s in shape):
        raise InputError(f"input shape {_shape_text(shape)} has a negative dimension")
    if not shape or shape[0] < 1:
        raise InputError(f"input shape {_shape_text(shape)} needs a batch dimension of at least 1")
    if shape[0] > max_batch:
        raise InputError(f"batch of {shape[0]} exceeds the model's max_batch_size {max_batch}; split the batch")
    count = _element_count(shape)

    if datatype == "FP32":
        expected = [channels, height, width]
        if len(shape) != 4 or shape[1:] != expected:
            raise InputError(f"FP32 input must have shape [N, {channels}, {height}, {width}] (NCHW pixels in [0, 1]); "
                             f"got {_shape_text(shape)}. Other sizes: send UINT8 [N, H, W, 3] or encoded images as BYTES")
        if raw is not None:
            if len(raw) != count * 4:
                raise InputError(f"FP32 input of shape {_shape_text(shape)} needs {count * 4} raw bytes "
                                 f"({count} elements), got {len(raw)}")
            x = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        else:
            if len(contents.fp32_contents) != count:
                raise InputError(f"FP32 input of shape {_shape_text(shape)} needs {count} fp32_contents, "
                                 f"got {len(contents.fp32_contents)}")
            x = np.asarray(contents.fp32_contents, dtype=np.float32)
        x = x.reshape(shape)
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).sum())
            raise InputError(f"FP32 input holds {bad} NaN or Inf values; send finite pixels in [0, 1]")
        low, high = float(x.min()), float(x.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise InputError(f"FP32 input must be pixels in [0, 1] (the server normalises); values range over "
                             f"[{low:.3g}, {high:.3g}] — was it normalised already, or is it 0..255 (send UINT8)?")
        return np.clip(x, 0.0, 1.0)

    if datatype == "UINT8":
        if len(shape) != 4 or shape[3] not in (1, 3):
            raise InputError(f"UINT8 input must have shape [N, H, W, 3] (RGB, NHWC) or [N, H, W, 1]; got {_shape_text(shape)}")
        if shape[1] < 1 or shape[2] < 1 or max(shape[1], shape[2]) > MAX_IMAGE_SIDE:
            raise InputError(f"UINT8 image size {shape[1]}x{shape[2]} is outside 1..{MAX_IMAGE_SIDE} pixels")
        if raw is not None:
            if len(raw) != count:
                raise InputError(f"UINT8 input of shape {_shape_text(shape)} needs {count} raw bytes, got {len(raw)}")
            images = np.frombuffer(raw, dtype=np.uint8)
        else:
            if len(contents.uint_contents) != count:
                raise InputError(f"UINT8 input of shape {_shape_text(shape)} needs {count} uint_contents, "
                                 f"got {len(contents.uint_contents)}")
            values = np.asarray(contents.uint_contents, dtype=np.uint32)
            if values.size and values.max() > 255:
                raise InputError("UINT8 uint_contents hold values above 255")
            images = values.astype(np.uint8)
        return _to_model_input(images.reshape(shape), channels, height, width)

    if datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InputError(f"BYTES input must have shape [N] (or [N, 1]): one encoded JPEG/PNG per sample; got {_shape_text(shape)}")
        items = deserialize_bytes(raw) if raw is not None else list(contents.bytes_contents)
        if len(items) != count:
            raise InputError(f"BYTES input of shape {_shape_text(shape)} needs {count} elements, got {len(items)}")
        decoded = []
        for i, blob in enumerate(items):
            try:
                image = cv2.imdecode(np.frombuffer(blob, dtype=np.uint8), cv2.IMREAD_COLOR) if blob else None
            except cv2.error:
                raise InputError(f"BYTES element {i} declares an image over {MAX_IMAGE_PIXELS} pixels; "
                                 f"resize it before sending") from None
            if image is None:
                raise InputError(f"BYTES element {i} ({len(blob)} bytes) is not a decodable JPEG or PNG image")
            if max(image.shape[:2]) > MAX_IMAGE_SIDE:
                raise InputError(f"image {i} is {image.shape[1]}x{image.shape[0]}, over {MAX_IMAGE_SIDE} pixels a side")
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            decoded.append(_resize(image[None], height, width)[0])
        return _to_model_input(np.stack(decoded), channels, height, width)

    raise InputError(f"input datatype {datatype!r} is not accepted; send FP32 [N, {channels}, {height}, {width}] "
                     f"pixels in [0, 1], UINT8 [N, H, W, 3], or BYTES [N] encoded JPEG/PNG")


def has_typed_contents(contents) -> bool:
    return any(len(getattr(contents, f)) for f in ("bool_contents", "int_contents", "int64_contents", "uint_contents",
                                                    "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents"))
