"""What the engine refuses and how it says so: EngineError (a gRPC status code name and a
message for the client), `shown` (how a message echoes what a client sent: bounded), and the
checks of the names a request gives (stream id, snapshot name)."""
from __future__ import annotations

import errno

from runtime.checkpoints import MAX_FILE_NAME, SNAPSHOT_NAME, file_name
from runtime.protocol import DEFAULT_STREAM

MAX_STREAM_ID = 128
SHOWN = 64  # characters of a client's string that an error message echoes


def shown(value, limit: int = SHOWN) -> str:
    """A value a client sent, for an error message: its repr, cut after `limit` characters with
    the full length noted ("'aaa…'…(1048576 chars)"), so no message grows with the request (a
    gRPC status message past 8-16 KB never reaches the client: it sees "Stream removed")."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}…({len(value)} {'chars' if isinstance(value, str) else 'bytes'})"
    text = repr(value)
    return text if len(text) <= 4 * limit else f"{text[:limit]}…({len(text)} chars)"


class EngineError(Exception):
    """An error with the gRPC status code it should be answered with; `retry_after` (seconds), for
    a refusal under load, is when the engine expects room again (sent as gRPC's standard
    retry pushback, so clients with a retry policy come back then instead of at once)."""

    def __init__(self, code: str, message: str, retry_after: float | None = None,
                 metadata: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.code = code  # a grpc.StatusCode name
        self.message = message
        self.retry_after = retry_after
        self.metadata = metadata  # trailing metadata for the client, e.g. ("tta-holder", "replica@host:port")


def check_stream_id(stream_id: str | None) -> str:
    """The stream id a request names (DEFAULT_STREAM when none), or INVALID_ARGUMENT."""
    stream_id = stream_id or DEFAULT_STREAM
    if len(stream_id) > MAX_STREAM_ID or not stream_id.isprintable():
        raise EngineError("INVALID_ARGUMENT", f"stream id must be printable text of at most {MAX_STREAM_ID} "
                                              f"characters, got {shown(stream_id, 40)}")
    # a stream id names files in the state dir: its percent-encoding (up to 9 bytes a character)
    # must fit in one file name, so no request reaches the file system with a name it cannot hold
    if len(file_name(stream_id)) > MAX_FILE_NAME:
        raise EngineError("INVALID_ARGUMENT", f"stream id {shown(stream_id, 40)} is too long once encoded as a "
                                              f"file name; use a shorter id (ASCII letters, digits, '-', '_', '.')")
    return stream_id


def check_snapshot_name(name: str) -> str:
    """Empty (the engine picks a name) or SNAPSHOT_NAME over the whole string: a snapshot name
    becomes a file name, so nothing else (no separator, no trailing newline) gets through."""
    if name and not SNAPSHOT_NAME.fullmatch(name):
        raise EngineError("INVALID_ARGUMENT", f"snapshot name {shown(name, 80)}: use letters, digits, '.', '_', '-' "
                                              f"(at most 64, starting with a letter or digit)")
    return name


def storage_error(e: OSError, doing: str) -> EngineError:
    """A failed read or write of the state dir, as a client should hear it (no server paths): a
    full disk is RESOURCE_EXHAUSTED, anything else (read-only, I/O error, permissions) UNAVAILABLE."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    why = e.strerror or type(e).__name__
    return EngineError("RESOURCE_EXHAUSTED" if full else "UNAVAILABLE",
                       f"{doing}: the state directory {'is full' if full else 'cannot be used'} ({why}); "
                       f"{'free space' if full else 'fix the volume'} and retry")
