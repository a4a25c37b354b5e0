"""A user's own labelled images for `tta replay --dataset`: an .npz file or a folder of class sub-folders,
checked against the model's input ([input] size and channels, number of classes).

- `.npz` with `x`, uint8 [N, H, W, C] (NHWC, 0..255) or float32 [N, C, H, W] (NCHW, in [0, 1]), at
  the model's input size, and `y`, integer labels [N] in 0..classes-1. Read with
  np.load(allow_pickle=False): object (pickled) arrays are refused, before anything is loaded.
- A folder: one sub-folder per class, sorted names = class indices 0, 1, ... (hidden ones skipped);
  images (png, jpg, jpeg, bmp, tif, tiff, webp, ppm, pgm, pbm) decoded with OpenCV (cv2.imdecode),
  to grayscale or RGB as the model takes, and resized to its input size (INTER_AREA when shrinking,
  else INTER_LINEAR). Their order, for data played as recorded: by file name across all classes
  (ties by class), so frames named by time play in time order.

Bounds: at most MAX_IMAGES images and MAX_BYTES of pixels as stored (both checked from the .npz
header before loading), image files at most MAX_FILE_BYTES each. Every refusal is a DataError
whose one-line message says what to change.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from runtime.console import Progress

MAX_IMAGES = 1_000_000
MAX_BYTES = 8 << 30
MAX_FILE_BYTES = 64 << 20
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


class DataError(ValueError):
    """The data does not fit the model or the rules above; the message says what to change."""


@dataclass
class Dataset:
    name: str
    path: str
    x: np.ndarray          # NCHW, uint8 0..255 or float32 in [0, 1], at the model's input size
    y: np.ndarray          # int64 [N]
    fingerprint: str       # SHA-256 over dtype, shape and bytes of x, then of y

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "samples": len(self.y), "dtype": str(self.x.dtype),
                "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class Expect:
    """What the model takes: channels, height, width, number of classes, and its name for messages."""
    channels: int
    height: int
    width: int
    classes: int
    model: str = "the model"

    def nhwc(self) -> list[int]:
        return [self.height, self.width, self.channels]

    def nchw(self) -> list[int]:
        return [self.channels, self.height, self.width]


def fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (x, y):
        h.update(json.dumps([str(a.dtype), list(a.shape)]).encode() + b"\n")
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _npz_header(path: Path, key: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of array `key` in the .npz, read from its .npy header without loading it."""
    try:
        with zipfile.ZipFile(path) as zf:
            if f"{key}.npy" not in zf.namelist():
                raise DataError(f"{path}: no array {key!r}; save it with np.savez(path, x=images, y=labels)")
            with zf.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = reader(f)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz ({e}); write it with np.savez(path, x=images, y=labels)") from None
    return shape, dtype


def check_x(where: str, x_shape: tuple, dtype: np.dtype, want: Expect) -> None:
    """Refuse an x of the wrong rank, size, dtype or layout, naming what the model takes."""
    n = x_shape[0] if x_shape else 0
    if dtype.hasobject:
        raise DataError(f"{where}: x holds Python objects (pickles are refused); store uint8 or float32 pixels")
    if len(x_shape) != 4:
        raise DataError(f"{where}: x has shape {list(x_shape)}; {want.model} takes uint8 [N, {', '.join(map(str, want.nhwc()))}] "
                        f"(NHWC) or float32 [N, {', '.join(map(str, want.nchw()))}] (NCHW)")
    if n == 0:
        raise DataError(f"{where}: the dataset is empty (x has 0 images)")
    if n > MAX_IMAGES:
        raise DataError(f"{where}: {n} images is over the limit of {MAX_IMAGES}; replay a subset")
    if n * int(np.prod(x_shape[1:])) * dtype.itemsize > MAX_BYTES:
        raise DataError(f"{where}: x is {n * int(np.prod(x_shape[1:])) * dtype.itemsize / 2**30:.1f} GiB, over the "
                        f"limit of {MAX_BYTES / 2**30:.0f} GiB; replay a subset or store uint8")
    got = list(x_shape[1:])
    if dtype == np.uint8:
        layout, want_shape, channel_axis = "NHWC", want.nhwc(), 2
    elif dtype == np.float32:
        layout, want_shape, channel_axis = "NCHW", want.nchw(), 0
    else:
        raise DataError(f"{where}: x is {dtype}; store uint8 NHWC 0..255 or float32 NCHW in [0, 1] "
                        f"(e.g. x.astype(np.float32) / 255 then NCHW)")
    if got == want_shape:
        return
    other = want.nchw() if layout == "NHWC" else want.nhwc()
    if got == other:
        raise DataError(f"{where}: {dtype} x must be {layout} [N, {', '.join(map(str, want_shape))}], got "
                        f"[N, {', '.join(map(str, got))}]: transpose it")
    if sorted(got[:channel_axis] + got[channel_axis + 1:]) == sorted([want.height, want.width]) \
            and got[channel_axis] != want.channels:
        raise DataError(f"{where}: x has {got[channel_axis]} channel(s), {want.model} takes {want.channels}; "
                        f"convert the images (grayscale <-> RGB) to {want.channels}")
    raise DataError(f"{where}: x is [N, {', '.join(map(str, got))}], {want.model} takes {dtype} {layout} "
                    f"[N, {', '.join(map(str, want_shape))}]; resize the images to {want.height}x{want.width}")


def check_y(where: str, y: np.ndarray, n: int, want: Expect) -> np.ndarray:
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DataError(f"{where}: y must be integer class labels of shape [N], got {y.dtype} {list(y.shape)}")
    if len(y) != n:
        raise DataError(f"{where}: {n} images but {len(y)} labels; give one label per image")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= want.classes:
        raise DataError(f"{where}: labels run {low}..{high}, {want.model} has {want.classes} classes (0.."
                        f"{want.classes - 1}); relabel the data or use the model it was labelled for")
    return y.astype(np.int64)


def load_npz(path: Path, want: Expect) -> tuple[np.ndarray, np.ndarray]:
    shape, dtype = _npz_header(path, "x")
    check_x(str(path), shape, dtype, want)
    y_shape, y_dtype = _npz_header(path, "y")
    if y_dtype.hasobject:
        raise DataError(f"{path}: y holds Python objects (pickles are refused); store integer labels")
    with np.load(path, allow_pickle=False) as data:
        x, y = data["x"], data["y"]
    y = check_y(str(path), y, len(x), want)
    if x.dtype == np.float32:
        low, high = float(np.min(x)), float(np.max(x))
        if not (0.0 <= low and high <= 1.0):  # NaN fails this too
            raise DataError(f"{path}: float32 x must lie in [0, 1], found {low:.3g}..{high:.3g}; divide by 255 "
                            f"or store uint8")
        return np.ascontiguousarray(x), y
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y


def _decode(path: Path, want: Expect) -> np.ndarray:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise DataError(f"{path}: {path.stat().st_size / 2**20:.0f} MiB is over the {MAX_FILE_BYTES >> 20} MiB "
                        f"limit for one image; shrink it")
    flag = cv2.IMREAD_GRAYSCALE if want.channels == 1 else cv2.IMREAD_COLOR
    img = cv2.imdecode(np.fromfile(path, np.uint8), flag)
    if img is None:
        raise DataError(f"{path}: OpenCV cannot decode this image; convert it to PNG or JPEG, or remove it")
    if (img.shape[0], img.shape[1]) != (want.height, want.width):
        shrink = img.shape[0] * img.shape[1] > want.height * want.width
        img = cv2.resize(img, (want.width, want.height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if want.channels == 1:
        return img[None]
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)


def load_folder(root: Path, want: Expect, show_progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    if want.channels not in (1, 3):
        raise DataError(f"{root}: image folders decode to 1 or 3 channels, {want.model} takes {want.channels}; "
                        f"give an .npz instead")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders; put each class's images in its own sub-folder "
                        f"(sorted names = class indices)")
    if len(classes) > want.classes:
        raise DataError(f"{root}: {len(classes)} class sub-folders, {want.model} has {want.classes} classes; "
                        f"remove the extra folders")
    files = []
    for label, folder in enumerate(classes):
        files += [(f.name, label, f) for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]
        if len(files) > MAX_IMAGES:
            raise DataError(f"{root}: over {MAX_IMAGES} images; replay a subset")
    if not files:
        raise DataError(f"{root}: the dataset is empty (no {', '.join(sorted(IMAGE_EXTENSIONS))} files in its "
                        f"class sub-folders)")
    files.sort(key=lambda t: (t[0], t[1]))
    if len(files) * want.channels * want.height * want.width > MAX_BYTES:
        raise DataError(f"{root}: {len(files)} images at {want.height}x{want.width} exceed {MAX_BYTES >> 30} GiB; "
                        f"replay a subset")
    x = np.empty((len(files), want.channels, want.height, want.width), np.uint8)
    for i, (_, _, path) in enumerate(Progress(files, desc=f"decode {root.name}", disable=not show_progress)):
        x[i] = _decode(path, want)
    return x, np.array([label for _, label, _ in files], np.int64)


def load(path: str | Path, want: Expect, show_progress: bool = True) -> Dataset:
    """One --dataset: an .npz file or a folder of class sub-folders, checked against `want`."""
    path = Path(path).expanduser()
    if path.is_dir():
        x, y = load_folder(path, want, show_progress)
    elif path.is_file():
        x, y = load_npz(path, want)
    else:
        raise DataError(f"--dataset {path}: no such file or folder")
    return Dataset(path.stem if path.is_file() else path.name, str(path), x, y, fingerprint(x, y))


def unique_names(sets: list[Dataset]) -> list[Dataset]:
    """Domain names: each dataset's stem, with #2, #3, ... where a name repeats."""
    seen: dict[str, int] = {"mixed": 1}  # the name of the mixed_domains block
    for d in sets:
        seen[d.name] = seen.get(d.name, 0) + 1
        if seen[d.name] > 1:
            d.name = f"{d.name}#{seen[d.name]}"
    return sets
