"""Per-stream state on disk: checkpoints, evicted streams and named snapshots.

Layout under the state directory:
    streams/<quoted stream id>.pt                    the stream's latest checkpoint
    streams/<quoted stream id>.pt.prev               the one before it (fallback if the latest is damaged)
    snapshots/<quoted stream id>/<name>.pt           named snapshots
Each payload is one torch.save'd dict: {"stream_id", "policy", "hyperparameters", "adapter"
(the adapter's state_dict, generator state included; None for a frozen stream), "step",
"counters"}. A file is MAGIC + SHA-256 of the payload + payload, so a damaged file is detected
on read instead of being loaded. Writes are atomic: temporary file, fsync, rename, fsync of the
directory; the previous checkpoint is kept as a hard link first. A crash at any moment (kill -9,
power loss) therefore leaves the stream's last completed checkpoint readable.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import quote, unquote

import torch

log = logging.getLogger("tta.checkpoints")

SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAGIC = b"TTA-CKPT-1\n"
DIGEST_BYTES = 32
TMP_SUFFIX = ".tmp"
MAX_FILE_NAME = 240  # bytes; file systems allow 255 for a name, the rest is for suffixes
PREV_SUFFIX = ".prev"


class CorruptCheckpoint(Exception):
    """A state file whose checksum does not match its contents (or that is cut short)."""


def file_name(stream_id: str) -> str:
    name = quote(stream_id, safe="") or "%00"
    # a leading dot would hide the file (and '.'/'..' name directories): encode it like any other byte
    return "%2E" + name[1:] if name.startswith(".") else name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def decode(data: bytes, origin: str = "state file"):
    if not data.startswith(MAGIC):
        raise CorruptCheckpoint(f"{origin}: not a tta-runtime checkpoint (bad header)")
    digest = data[len(MAGIC):len(MAGIC) + DIGEST_BYTES]
    payload = data[len(MAGIC) + DIGEST_BYTES:]
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptCheckpoint(f"{origin}: checksum mismatch ({len(payload)} payload bytes)")
    # weights_only=False: the payload holds generator states and plain containers we wrote ourselves,
    # and its checksum has just been verified
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)


class StateStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "streams").mkdir(parents=True, exist_ok=True)
        (self.root / "snapshots").mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """Temporary files are what a crash mid-write leaves behind; they were never a checkpoint."""
        for tmp in self.root.rglob(f".*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)

    # --- atomic file io -------------------------------------------------------------------
    @staticmethod
    def _write(path: Path, obj, keep_previous: bool = False) -> None:
        data = encode(obj)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}{TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if keep_previous and path.exists():
                prev = path.with_name(path.name + PREV_SUFFIX)
                prev.unlink(missing_ok=True)
                os.link(path, prev)  # the latest stays in place until the rename below
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    def _read(path: Path):
        return decode(path.read_bytes(), str(path))

    def _read_with_fallback(self, path: Path):
        """The latest checkpoint, or the previous one when the latest is damaged (which is then
        set aside as *.corrupt-<time> for inspection, never loaded)."""
        try:
            return self._read(path)
        except CorruptCheckpoint as e:
            prev = path.with_name(path.name + PREV_SUFFIX)
            kept = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            os.replace(path, kept)
            if not prev.exists():
                log.error("%s; moved it to %s and no previous checkpoint exists", e, kept.name)
                raise
            log.error("%s; moved it to %s and resuming from the previous checkpoint", e, kept.name)
            os.link(prev, path)
            return self._read(path)

    # --- stream state -------------------------------------------------------------------
    def stream_path(self, stream_id: str) -> Path:
        return self.root / "streams" / f"{file_name(stream_id)}.pt"

    def save_stream(self, stream_id: str, record: dict) -> None:
        self._write(self.stream_path(stream_id), record, keep_previous=True)

    def load_stream(self, stream_id: str) -> dict:
        return self._read_with_fallback(self.stream_path(stream_id))

    def delete_stream(self, stream_id: str) -> None:
        path = self.stream_path(stream_id)
        path.unlink(missing_ok=True)
        path.with_name(path.name + PREV_SUFFIX).unlink(missing_ok=True)
        folder = self.root / "snapshots" / file_name(stream_id)
        if folder.is_dir():
            shutil.rmtree(folder)

    def saved_streams(self) -> list[str]:
        return sorted(unquote(p.stem) for p in (self.root / "streams").glob("*.pt") if not p.name.startswith("."))

    # --- snapshots ------------------------------------------------------------------------
    def snapshot_path(self, stream_id: str, name: str) -> Path:
        return self.root / "snapshots" / file_name(stream_id) / f"{name}.pt"

    def save_snapshot(self, stream_id: str, name: str, record: dict) -> None:
        self._write(self.snapshot_path(stream_id, name), record)

    def load_snapshot(self, stream_id: str, name: str) -> dict:
        return self._read(self.snapshot_path(stream_id, name))

    def snapshots(self, stream_id: str) -> list[str]:
        """Names, oldest first."""
        folder = self.root / "snapshots" / file_name(stream_id)
        if not folder.is_dir():
            return []
        files = [p for p in folder.glob("*.pt") if not p.name.startswith(".")]
        return [p.stem for p in sorted(files, key=lambda p: p.stat().st_mtime_ns)]
