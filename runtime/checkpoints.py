"""Per-stream state on disk: evicted streams, shutdown checkpoints and named snapshots.

Layout under the state directory:
    streams/<quoted stream id>.pt                    the stream's latest state
    snapshots/<quoted stream id>/<name>.pt           named snapshots
Each file is one torch.save'd dict: {"stream_id", "policy", "hyperparameters", "adapter"
(the adapter's state_dict, None for a frozen stream), "counters"}. Writes are atomic
(temporary file, fsync, rename), so a crash leaves either the old or the new state.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from urllib.parse import quote, unquote

import torch

SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _file_name(stream_id: str) -> str:
    return quote(stream_id, safe="") or "%00"


class StateStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "streams").mkdir(parents=True, exist_ok=True)
        (self.root / "snapshots").mkdir(parents=True, exist_ok=True)

    # --- atomic file io -------------------------------------------------------------------
    @staticmethod
    def _write(path: Path, obj) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @staticmethod
    def _read(path: Path):
        # weights_only=False: the files hold generator states and plain containers we wrote ourselves
        return torch.load(path, map_location="cpu", weights_only=False)

    # --- stream state -------------------------------------------------------------------
    def stream_path(self, stream_id: str) -> Path:
        return self.root / "streams" / f"{_file_name(stream_id)}.pt"

    def save_stream(self, stream_id: str, record: dict) -> None:
        self._write(self.stream_path(stream_id), record)

    def load_stream(self, stream_id: str) -> dict:
        return self._read(self.stream_path(stream_id))

    def delete_stream(self, stream_id: str) -> None:
        self.stream_path(stream_id).unlink(missing_ok=True)
        folder = self.root / "snapshots" / _file_name(stream_id)
        if folder.is_dir():
            for f in folder.glob("*.pt"):
                f.unlink()
            folder.rmdir()

    def saved_streams(self) -> list[str]:
        return sorted(unquote(p.stem) for p in (self.root / "streams").glob("*.pt"))

    # --- snapshots ------------------------------------------------------------------------
    def snapshot_path(self, stream_id: str, name: str) -> Path:
        return self.root / "snapshots" / _file_name(stream_id) / f"{name}.pt"

    def save_snapshot(self, stream_id: str, name: str, record: dict) -> None:
        self._write(self.snapshot_path(stream_id, name), record)

    def load_snapshot(self, stream_id: str, name: str) -> dict:
        return self._read(self.snapshot_path(stream_id, name))

    def snapshots(self, stream_id: str) -> list[str]:
        """Names, oldest first."""
        folder = self.root / "snapshots" / _file_name(stream_id)
        files = sorted(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime_ns) if folder.is_dir() else []
        return [p.stem for p in files]
