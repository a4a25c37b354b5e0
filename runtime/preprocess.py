"""Turn one inference input tensor from the wire into model input: float32 NCHW in [0, 1].

Accepted forms (all under the model's single input name):
  FP32  [N, C, H, W]  pixels in [0, 1] at the model's size (the fast path)
  UINT8 [N, H, W, C]  decoded pixels 0..255, any size (resized), C = 3 (RGB) or 1 (grey)
  BYTES [N]           encoded JPEG / PNG images (cv2.imdecode), any size (resized)
Contents come either raw (`raw_input_contents`, what tritonclient sends) or typed
(`contents.fp32_contents` / `uint_contents` / `bytes_contents`, what KServe's client sends).
Every rejection raises InputError with a message that says what was expected.

Decoding is bounded before it starts: an encoded image's size is read from its PNG or JPEG
header (`image_size`), and an image over MAX_IMAGE_SIDE / MAX_IMAGE_PIXELS is refused without
being decoded. `DecodeBudget` bounds the pixels one request may decode (`tta serve
--max-decoded-mb`) and the pixels all requests being decoded at once may hold (`--decode-budget-mb`):
beyond it a request is refused at once instead of queueing unbounded work.
"""
from __future__ import annotations

import math
import os
import struct
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

MAX_IMAGE_SIDE = 8192  # refuse absurd images (memory)
MAX_IMAGE_PIXELS = 1 << 26  # 67 M pixels: a small compressed "bomb" must not allocate gigabytes
# OpenCV checks the declared size before allocating, against this limit (read at decode time)
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))

import cv2  # noqa: E402 - after the limit above
import numpy as np  # noqa: E402


class InputError(ValueError):
    """The request's input is malformed (INVALID_ARGUMENT)."""


class DecodeBusy(RuntimeError):
    """DecodeBudget's default refusal: the images being decoded already hold the budget (the
    server passes a `refuse` that makes it RESOURCE_EXHAUSTED)."""


DECODED_BYTES_PER_PIXEL = 3  # cv2.imdecode(IMREAD_COLOR) gives 8-bit BGR
MAX_DECODED_MB = 64.0  # default of `tta serve --max-decoded-mb`: per request
DECODE_BUDGET_MB = 256.0  # default of `tta serve --decode-budget-mb`: all requests being decoded
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (the frame header holds the size): SOF0-3, 5-7, 9-11, 13-15
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_MAX_SEGMENTS = 256  # segments before the frame header (EXIF, ICC profile chunks, tables)


def image_size(blob: bytes) -> tuple[int, int] | None:
    """(width, height) that an encoded PNG or JPEG declares in its header, without decoding it;
    None when the bytes are neither (or the header is cut short or names no size)."""
    if blob[:8] == _PNG_SIGNATURE:
        if len(blob) < 24 or blob[12:16] != b"IHDR":  # IHDR is the first chunk, at a fixed offset
            return None
        width, height = struct.unpack_from(">II", blob, 16)
        return (width, height) if width and height else None
    if blob[:2] != b"\xff\xd8":  # JPEG: SOI, then segments up to a start-of-frame
        return None
    offset = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        while offset < len(blob) and blob[offset] == 0xFF:  # a marker, after optional fill bytes
            offset += 1
        if offset < 3 or offset >= len(blob) or blob[offset - 1] != 0xFF:
            return None
        marker = blob[offset]
        offset += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers: no length
            continue
        if marker in (0xD9, 0xDA) or offset + 2 > len(blob):  # end of image / scan data before a frame
            return None
        (length,) = struct.unpack_from(">H", blob, offset)
        if marker in _JPEG_SOF:
            if length < 8 or offset + 7 > len(blob):
                return None
            height, width = struct.unpack_from(">HH", blob, offset + 3)
            return (width, height) if width and height else None
        if length < 2:
            return None
        offset += length
    return None


def _check_image_size(i: int, width: int, height: int) -> None:
    """Refuse an image too large to decode, from the size its header declares."""
    if max(width, height) > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"BYTES element {i} declares a {width}x{height} image, over {MAX_IMAGE_SIDE} pixels a side "
                         f"or {MAX_IMAGE_PIXELS} pixels; resize it before sending")


def decoded_bytes(datatype: str, shape, raw: bytes | None, contents) -> int:
    """Bytes of the pixels an input decodes to at its own size (before resizing), from the
    encoded images' headers; 0 for what is not decoded (FP32) or is malformed (decode() then
    says why). An encoded image too large to decode at all is refused here (InputError)."""
    if datatype == "UINT8":  # decoded already; resizing reads them (the message holds them)
        held = len(raw) if raw is not None else len(contents.uint_contents)
        return held if held == _element_count(shape) else 0
    if datatype != "BYTES":
        return 0
    try:
        items = deserialize_bytes(raw) if raw is not None else list(contents.bytes_contents)
    except InputError:
        return 0
    total = 0
    for i, blob in enumerate(items):
        size = image_size(blob)
        if size is not None:
            _check_image_size(i, *size)
            total += size[0] * size[1] * DECODED_BYTES_PER_PIXEL
    return total


class DecodeBudget:
    """Bounds on image decoding, for a server that decodes requests in a thread pool: a request
    whose images decode to more than `max_request_bytes` is refused (InputError), and while the
    requests being decoded hold `max_in_flight_bytes` another is refused at once with
    `refuse(message)`, rather than waiting in the pool's queue (a request alone is always let
    through, so one within the per-request bound never fails for want of budget). Thread-safe."""

    def __init__(self, max_request_bytes: int = int(MAX_DECODED_MB * 2**20),
                 max_in_flight_bytes: int = int(DECODE_BUDGET_MB * 2**20),
                 refuse: Callable[[str], Exception] = DecodeBusy):
        self.max_request_bytes, self.max_in_flight_bytes, self.refuse = max_request_bytes, max_in_flight_bytes, refuse
        self.in_flight = 0  # bytes held by the requests being decoded now
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, request) -> Iterator[int]:
        """Around the decoding of a ModelInferRequest: its bytes (decoded_bytes of its one input)
        are held until the block ends. A request that is not one well-formed input holds none
        (decoding it refuses it)."""
        need = self.request_bytes(request)
        if need > self.max_request_bytes:
            raise InputError(f"the request's images decode to {need / 2**20:.1f} MiB, over the limit of "
                             f"{self.max_request_bytes / 2**20:g} MiB per request (--max-decoded-mb); "
                             f"send fewer or smaller images, or resize them before sending")
        with self._lock:
            if need and self.in_flight and self.in_flight + need > self.max_in_flight_bytes:
                raise self.refuse(f"the server is decoding {self.in_flight / 2**20:.1f} MiB of images; "
                                  f"this request's {need / 2**20:.1f} MiB would exceed the decode budget of "
                                  f"{self.max_in_flight_bytes / 2**20:g} MiB (--decode-budget-mb): retry shortly")
            self.in_flight += need
        try:
            yield need
        finally:
            with self._lock:
                self.in_flight -= need

    @staticmethod
    def request_bytes(request) -> int:
        inputs, raw = request.inputs, request.raw_input_contents
        if len(inputs) != 1 or len(raw) > 1:
            return 0
        tensor = inputs[0]
        return decoded_bytes(tensor.datatype, tensor.shape, raw[0] if raw else None, tensor.contents)


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
    """A client's shape for a message: at most 8 dimensions shown (the messages stay short)."""
    more = f", …({len(shape)} dims)" if len(shape) > 8 else ""
    return "[" + ", ".join(str(int(s)) for s in shape[:8]) + more + "]"


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
            x = np.frombuffer(raw, dtype="<f4")  # a view of the request's bytes: the one copy is the clip below
        else:
            if len(contents.fp32_contents) != count:
                raise InputError(f"FP32 input of shape {_shape_text(shape)} needs {count} fp32_contents, "
                                 f"got {len(contents.fp32_contents)}")
            x = np.asarray(contents.fp32_contents, dtype=np.float32)
        x = x.reshape(shape)
        low, high = float(x.min()), float(x.max())  # NaN and Inf show in these: no separate pass
        if not (math.isfinite(low) and math.isfinite(high)):
            bad = int((~np.isfinite(x)).sum())
            raise InputError(f"FP32 input holds {bad} NaN or Inf values; send finite pixels in [0, 1]")
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
            size = image_size(blob)  # checked before decoding: the header says how much it would allocate
            if size is not None:
                _check_image_size(i, *size)
            try:
                image = cv2.imdecode(np.frombuffer(blob, dtype=np.uint8), cv2.IMREAD_COLOR) if size else None
            except cv2.error:
                raise InputError(f"BYTES element {i} declares an image over {MAX_IMAGE_PIXELS} pixels; "
                                 f"resize it before sending") from None
            if image is None or image.shape[0] * image.shape[1] > size[0] * size[1]:
                raise InputError(f"BYTES element {i} ({len(blob)} bytes) is not a decodable JPEG or PNG image")
            if max(image.shape[:2]) > MAX_IMAGE_SIDE:
                raise InputError(f"image {i} is {image.shape[1]}x{image.shape[0]}, over {MAX_IMAGE_SIDE} pixels a side")
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            decoded.append(_resize(image[None], height, width)[0])
        return _to_model_input(np.stack(decoded), channels, height, width)

    raise InputError(f"input datatype {datatype[:32]!r}{'…' if len(datatype) > 32 else ''} is not accepted; "
                     f"send FP32 [N, {channels}, {height}, {width}] pixels in [0, 1], UINT8 [N, H, W, 3], "
                     f"or BYTES [N] encoded JPEG/PNG")


def has_typed_contents(contents) -> bool:
    return any(len(getattr(contents, f)) for f in ("bool_contents", "int_contents", "int64_contents", "uint_contents",
                                                    "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents"))
