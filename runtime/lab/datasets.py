"""Fashion-MNIST, the demo model's data, read from the IDX files Debian ships.

    apt-get install dataset-fashion-mnist      # -> /usr/share/datasets/fashion-mnist/*.gz

Another location: the `--data-dir` flag of the commands, or env TTA_FASHION_MNIST_DIR. Plain
and gzipped IDX files are both read. The shipped demo slice (runtime/assets/demo/demo_slice.npz,
2 000 class-balanced test images) needs neither.

Model input: 28×28 grayscale replicated to 3 channels and zero-padded 2 px per side to
3×32×32 in [0, 1], so CIFAR-10-C parameters and the CoTTA augmentation apply unchanged.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_DIR = "TTA_FASHION_MNIST_DIR"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEMO_SLICE = Path(__file__).resolve().parent.parent / "assets" / "demo" / "demo_slice.npz"

FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DatasetMissing(FileNotFoundError):
    """The Fashion-MNIST IDX files are not where we looked."""


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """Where to read the IDX files: the flag, else env TTA_FASHION_MNIST_DIR, else Debian's path."""
    if override:
        return Path(override)
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DatasetMissing(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}. Install it with "
        f"`apt-get install {DEBIAN_PACKAGE}` (Debian/Ubuntu, files go to {DEFAULT_DIR}), "
        f"or point --data-dir / ${ENV_DIR} at a folder holding the IDX files.")


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (http://yann.lecun.com/exdb/mnist/ format) as a numpy array; .gz allowed."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:  # Fashion-MNIST is all unsigned bytes
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape} values, file holds {array.size}")
    return array.reshape(shape)


def load_split(split: str = "test", directory: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the "train" (60 000) or "test" (10 000) split."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = data_dir(directory)
    images_stem, labels_stem = _FILES[split]
    x = read_idx(_find(root, images_stem))
    y = read_idx(_find(root, labels_stem)).astype(np.int64)
    if len(x) != len(y):
        raise ValueError(f"{root}: {len(x)} images but {len(y)} labels in the {split} split")
    return x, y


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 3, 32, 32) in [0, 1]: 3 equal channels, 2 px zero border."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"expected (N, 28, 28) images, got {images.shape}")
    out = np.zeros((len(images), 3, 32, 32), dtype=np.float32)
    out[:, :, 2:30, 2:30] = (images.astype(np.float32) / 255.0)[:, None]
    return out


def load_demo_slice(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The shipped demo slice as model input: (x float32 (N, 3, 32, 32), y int64 (N,))."""
    raw_x, y = load_demo_slice_raw(path)
    return to_model_input(raw_x), y


def load_demo_slice_raw(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The shipped demo slice as stored: (uint8 (N, 28, 28), int64 (N,))."""
    path = Path(path) if path else DEMO_SLICE
    if not path.is_file():
        raise FileNotFoundError(f"demo slice {path} is missing; `tta train-demo` writes it")
    with np.load(path) as data:
        return data["x"], data["y"].astype(np.int64)
