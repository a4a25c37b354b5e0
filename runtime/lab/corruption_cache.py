"""The bounded cache of corrupted user datasets (`tta replay --dataset`), under the corruption cache
dir (~/.cache/tta-runtime or $TTA_CACHE_DIR, or --cache-dir) in `replay-c/`.

One entry per (dataset fingerprint, corruption, severity, channels × height × width, seed, code
version): a plain .npy file of uint8 NCHW pixels (np.save / np.load with allow_pickle=False, never
a pickle), named KEY.SHA256.npy where SHA256 is the digest of the file's bytes. The digest is
checked before every use (the cache dir is outside the repository and may be written by others);
a file that fails it, or holds another shape or dtype, is deleted and regenerated. The folder is
kept under --cache-max-mb: on opening and after each write the least recently used entries (oldest modification
time; a read refreshes it) are removed until it fits; an entry larger than the whole bound is not
written (the run keeps it in memory).
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np

VERSION = "v1"  # bump when runtime/lab/corruptions.py changes what it produces
FOLDER = "replay-c"
DEFAULT_MAX_MB = 2048


def entry_key(dataset_fingerprint: str, corruption: str, severity: int, shape: tuple[int, int, int],
              seed: int) -> str:
    c, h, w = shape
    return f"{dataset_fingerprint[:16]}-{corruption}-s{severity}-{c}x{h}x{w}-seed{seed}-{VERSION}"


def encode(array: np.ndarray, ext: str = ".npy") -> bytes:
    """uint8 pixels as .npy bytes (or an .npz holding `x`), never pickled."""
    buffer = io.BytesIO()
    array = np.ascontiguousarray(array, dtype=np.uint8)
    np.save(buffer, array, allow_pickle=False) if ext == ".npy" else np.savez(buffer, x=array)
    return buffer.getvalue()


def load_verified(folder: Path, key: str, shape: tuple[int, ...], ext: str = ".npy") -> tuple[np.ndarray | None, int]:
    """(the entry KEY.SHA256{ext} in folder whose bytes match their digest and hold uint8 of this shape,
    or None; how many failing files were deleted on the way)."""
    rejected = 0
    for path in sorted(folder.glob(f"{key}.*{ext}")) if folder.is_dir() else []:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        array = None
        if hashlib.sha256(data).hexdigest() == path.name[len(key) + 1:-len(ext)]:
            try:
                if ext == ".npy":
                    array = np.load(io.BytesIO(data), allow_pickle=False)
                else:
                    with np.load(io.BytesIO(data), allow_pickle=False) as z:
                        array = z["x"]
            except (ValueError, KeyError, OSError):
                array = None
        if array is None or array.dtype != np.uint8 or array.shape != tuple(shape):
            rejected += 1
            print(f"note: cache entry {path} failed its check; regenerating it", file=sys.stderr)
            path.unlink(missing_ok=True)
            continue
        os.utime(path)  # recently used: evicted last
        return array, rejected
    return None, rejected


def save_verified(folder: Path, key: str, data: bytes, ext: str = ".npy") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.{hashlib.sha256(data).hexdigest()}{ext}"
    tmp = folder / f".{key}.tmp{os.getpid()}"
    tmp.write_bytes(data)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return path


class CorruptionCache:
    def __init__(self, root: str | os.PathLike, max_mb: float = DEFAULT_MAX_MB):
        if max_mb < 0:
            raise ValueError(f"--cache-max-mb must be >= 0, not {max_mb}")
        self.dir = Path(root) / FOLDER
        self.max_bytes = int(max_mb * 2**20)
        self.evicted = self.skipped = self.rejected = 0
        self.evict()  # a lowered bound applies at once

    def _entries(self) -> list[Path]:
        return sorted(self.dir.glob("*.npy")) if self.dir.is_dir() else []

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The verified entry for `key` of this shape (uint8), or None."""
        array, rejected = load_verified(self.dir, key, shape)
        self.rejected += rejected
        return array

    def put(self, key: str, array: np.ndarray) -> Path | None:
        data = encode(array)
        if len(data) > self.max_bytes:
            self.skipped += 1
            return None
        path = save_verified(self.dir, key, data)
        self.evict(keep=path)
        return path

    def evict(self, keep: Path | None = None) -> None:
        """Remove the least recently used entries until the folder fits the bound."""
        entries = [(p.stat().st_mtime, p.stat().st_size, p) for p in self._entries()]
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda e: (e[0], e[2].name)):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            self.evicted += 1

    def summary(self) -> dict:
        entries = self._entries()
        return {"dir": str(self.dir), "entries": len(entries), "bytes": sum(p.stat().st_size for p in entries),
                "max_mb": self.max_bytes / 2**20, "evicted": self.evicted, "not_written": self.skipped,
                "rejected": self.rejected}

    def line(self) -> str:
        s = self.summary()
        extra = f"; {s['evicted']} oldest removed" if s["evicted"] else ""
        extra += f"; {s['not_written']} over the bound kept in memory only" if s["not_written"] else ""
        return (f"cache: {s['entries']} corrupted sets, {s['bytes'] / 2**20:.1f} MB of {s['max_mb']:.0f} MB at "
                f"{s['dir']} (least recently used removed first; --cache-max-mb){extra}")
