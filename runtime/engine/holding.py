"""With replicas (runtime/coordination): which copies of streams here may be served. A copy is
served only while this replica holds the stream, and only if it continues the checkpoint that
was committed when the stream was taken (a pause past the lease that nobody used to take the
stream keeps the copy; a newer commit by another replica makes it stale)."""
from __future__ import annotations

import logging

from runtime.coordination.ownership import Ownership
from runtime.engine.errors import EngineError, shown

log = logging.getLogger("tta.engine")


class Holding:
    def __init__(self, ownership: Ownership):
        self.ownership = ownership
        self._base: dict[str, int] = {}  # stream id -> committed version the copy here continues

    def base(self, stream_id: str) -> int:
        return self._base.get(stream_id, 0)

    def stale(self, stream_id: str, has_copy: bool) -> bool:
        """UNAVAILABLE unless held now; True when the copy here must be dropped for the committed state."""
        if not self.ownership.holds(stream_id):
            raise EngineError("UNAVAILABLE", f"this replica does not hold stream {shown(stream_id)} now (it was "
                                             f"handed over, or this replica's lease may have expired); retry")
        committed = self.ownership.pointer(stream_id).version
        if has_copy and self.base(stream_id) != committed:
            log.warning("stream %r: the copy here continues checkpoint %d, another replica committed %d since; "
                        "loading that", stream_id, self.base(stream_id), committed)
            return True
        if not has_copy or stream_id not in self._base:
            self._base[stream_id] = committed
        return False

    def saved(self, stream_id: str) -> None:
        self._base[stream_id] = self.ownership.pointer(stream_id).version

    def forget(self, stream_id: str) -> None:
        self._base.pop(stream_id, None)
