"""Errors to gRPC statuses, in one place: every failure a handler meets (the engine's, a bad
input's) becomes a status code and a message, and is counted in the serving metrics together
with the request itself and, for inference, its duration and ModelStatistics outcome.

Requests whose bytes do not parse reach the handlers as `Malformed` (see wire.add_servicer) and
are answered here too. Every status message is bounded (MAX_MESSAGE): messages echo client
strings only through `shown`, and this is the last line of defence."""
from __future__ import annotations

import functools
import time

import grpc

from runtime.engine.errors import EngineError
from runtime.metrics import Metrics
from runtime.preprocess import InputError

MAX_MESSAGE = 1024  # bytes (UTF-8) of a status message; gRPC drops trailers past 8-16 KB ("Stream removed")


class Malformed:
    """What a handler gets instead of a request whose bytes do not parse as its message."""

    def __init__(self, message_name: str, size: int):
        self.message_name, self.size = message_name, size

    def error(self) -> EngineError:
        return EngineError("INVALID_ARGUMENT", f"the request is not a valid {self.message_name} protobuf "
                                               f"({self.size} byte{'' if self.size == 1 else 's'} that do not parse); send a serialized "
                                               f"{self.message_name}")


def bounded(message: str, limit: int = MAX_MESSAGE) -> str:
    """The message, cut to `limit` UTF-8 bytes (noting its full length) if longer."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    return data[:limit - 32].decode("utf-8", "ignore") + f"…(cut, {len(data)} bytes)"


RETRY_PUSHBACK = "grpc-retry-pushback-ms"  # gRPC's standard trailer (gRFC A6): retry no sooner than this


def trailers_of(error: Exception) -> tuple[tuple[str, str], ...]:
    """Trailing metadata for a failure: the retry pushback of a refusal under load. gRPC clients
    with a retry policy for the code (e.g. RESOURCE_EXHAUSTED) wait that long before retrying."""
    retry_after = getattr(error, "retry_after", None)
    pushback = ((RETRY_PUSHBACK, str(max(1, round(retry_after * 1000)))),) if retry_after else ()
    return pushback + tuple(getattr(error, "metadata", ()))


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, EngineError):
        return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL), bounded(error.message)
    if isinstance(error, InputError):
        return grpc.StatusCode.INVALID_ARGUMENT, bounded(str(error))
    raise error  # not ours to translate: a bug, left to grpc (UNKNOWN) and the log


class Outcomes:
    """Counts and total nanoseconds of inference requests that succeeded or failed (ModelStatistics)."""

    def __init__(self):
        self.success, self.fail = [0, 0], [0, 0]

    def add(self, ok: bool, started: float) -> None:
        entry = self.success if ok else self.fail
        entry[0] += 1
        entry[1] += int((time.monotonic() - started) * 1e9)


class Request:
    """One request's account: counted on arrival, then ok() or failed(error) -> (status, message).
    `outcomes` (inference requests only) also times it into ModelStatistics and the duration histogram."""

    def __init__(self, metrics: Metrics, method: str, outcomes: Outcomes | None = None):
        self.metrics, self.method, self.outcomes = metrics, method, outcomes
        self.started = time.monotonic()
        metrics.request(method)

    def ok(self) -> None:
        self._done(True)

    def failed(self, error: Exception) -> tuple[grpc.StatusCode, str]:
        code, message = status_of(error)
        self.metrics.failure(self.method, code.name)
        self._done(False)
        return code, message

    def _done(self, ok: bool) -> None:
        if self.outcomes is not None:
            self.outcomes.add(ok, self.started)
            self.metrics.request_duration.labels(self.metrics.model, self.method).observe(
                time.monotonic() - self.started)


def unary(method: str, inference: bool = False, quiet: bool = False):
    """Decorator of a unary handler `async def Rpc(self, request, context)` of a servicer with
    `.metrics` (and `.outcomes` for inference): errors become statuses, everything is counted.
    A Malformed request is answered INVALID_ARGUMENT without calling the handler. `quiet`
    (probes, server metadata): counted only when refused as Malformed."""
    def decorate(handler):
        @functools.wraps(handler)
        async def wrapper(self, request, context):
            if quiet and not isinstance(request, Malformed):
                return await handler(self, request, context)
            account = Request(self.metrics, method, self.outcomes if inference else None)
            try:
                if isinstance(request, Malformed):
                    raise request.error()
                response = await handler(self, request, context)
            except (EngineError, InputError) as e:
                await context.abort(*account.failed(e), trailers_of(e))
            account.ok()
            return response
        return wrapper
    return decorate
