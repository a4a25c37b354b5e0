"""The state dir shared by replicas: checkpoints are written under new names
(<stream>.v<version>.pt) and become the stream's state only when the fenced commit in etcd
points at them (Ownership.commit); a replica that lost the stream can write a file but never
make anyone read it. The previous version is kept until the next commit (a fallback for a
damaged latest file); older ones are removed. Snapshots are written by the holder only."""
from __future__ import annotations

import errno
from pathlib import Path

from runtime.checkpoints import PREV_SUFFIX, CorruptCheckpoint, StateStore, file_name
from runtime.coordination.etcd import EtcdUnavailable
from runtime.coordination.ownership import Ownership, Unheld


class FencedStore(StateStore):
    def __init__(self, *args, ownership: Ownership, **kwargs):
        super().__init__(*args, **kwargs)
        self.ownership = ownership

    def _version_path(self, stream_id: str, version: int) -> Path:
        return self.root / "streams" / f"{file_name(stream_id)}.v{version}.pt"

    def stream_path(self, stream_id: str) -> Path:
        """The committed checkpoint (as read when the stream was taken); a one-process state dir's
        file when none was ever committed, so a single server's state carries over."""
        pointer = self.ownership.pointer(stream_id)
        if pointer.file:
            return self.root / "streams" / Path(pointer.file).name
        return super().stream_path(stream_id)

    def save_stream(self, stream_id: str, record: dict) -> None:
        if not self.ownership.holds(stream_id):
            raise Unheld(stream_id)  # before writing a file nobody may read
        version = self.ownership.pointer(stream_id).version + 1
        path = self._version_path(stream_id, version)
        self._write(path, stream_id, record)
        try:
            self.ownership.commit(stream_id, version, path.name)
        except EtcdUnavailable as e:  # not committed: a storage failure, retried at the next checkpoint
            path.unlink(missing_ok=True)
            raise OSError(errno.EIO, f"the checkpoint could not be committed: {e}") from None
        except BaseException:  # NotHeld: the file must never be read
            path.unlink(missing_ok=True)
            raise
        self._version_path(stream_id, version - 2).unlink(missing_ok=True)

    def load_stream(self, stream_id: str) -> dict:
        path = self.stream_path(stream_id)
        try:
            return self._read(path, stream_id)
        except CorruptCheckpoint:
            version = self.ownership.pointer(stream_id).version
            previous = self._version_path(stream_id, version - 1) if version > 1 else path.with_name(
                path.name + PREV_SUFFIX)
            if not previous.exists():
                raise
            return self._read(previous, stream_id)

    def delete_stream(self, stream_id: str) -> None:
        try:
            self.ownership.forget(stream_id)
        except EtcdUnavailable as e:
            raise OSError(errno.EIO, f"the deletion could not be committed: {e}") from None
        for path in (self.root / "streams").glob(f"{file_name(stream_id)}.v*.pt"):
            path.unlink(missing_ok=True)
        super().delete_stream(stream_id)

    def saved_streams(self) -> list[str]:
        return []  # with replicas, a stream is found when it is taken, not at start
