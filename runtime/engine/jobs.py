"""The thread boundary: jobs queued from the asyncio event loop for the one engine worker
thread, the queue limits, and the futures through which the worker answers.

Only this module touches both sides: the event loop submits jobs and awaits their futures; the
worker takes jobs in arrival order and resolves each future thread-safely. Whatever runs inside a
job (torch, streams, files) is the rest of the engine's business.
"""
from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from runtime.engine.errors import EngineError
from runtime.metrics import Metrics


@dataclass
class Job:
    fn: Callable[[], Any]
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    batch: Any = None  # an inference batch (engine.batches.Batch), so the worker can group batches

    def cancelled(self) -> bool:
        return self.future is not None and self.future.cancelled()

    def resolve(self, result=None, error: Exception | None = None) -> None:
        """Answer the job's awaiting coroutine from the worker thread (no-op without a future)."""
        if self.future is not None:
            self.loop.call_soon_threadsafe(_resolve, self.future, result, error)


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Jobs:
    """A FIFO of jobs served by one worker thread, with the backpressure limits of batches: at
    most `max_queue` batches waiting in all and `max_stream_queue` per stream."""

    def __init__(self, max_queue: int, max_stream_queue: int, metrics: Metrics):
        self.max_queue, self.max_stream_queue = max_queue, max_stream_queue
        self.metrics = metrics
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._backlog: collections.deque[Job | None] = collections.deque()  # taken off the queue, not yet run
        self._stream_queued: collections.Counter[str] = collections.Counter()  # event-loop side
        self.queued = 0  # batches submitted and not yet answered (event-loop side)
        self._accepting = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ event-loop side
    def submit(self, fn: Callable[[], Any], stream_id: str | None = None, batch: Any = None) -> asyncio.Future:
        """Queue a job now (so callers control the order) and return its future. `stream_id`: the
        job is a batch of that stream, counted against the queue limits."""
        if not self._accepting:
            raise EngineError("UNAVAILABLE", "the server is shutting down; retry on another replica")
        if stream_id is not None:
            if self.queued >= self.max_queue:
                self.metrics.rejected.labels(self.metrics.model, "global_queue").inc()
                raise EngineError("RESOURCE_EXHAUSTED", f"the engine queue is full ({self.max_queue} batches "
                                                        f"waiting); retry later or raise --max-queue")
            if self._stream_queued[stream_id] >= self.max_stream_queue:
                self.metrics.rejected.labels(self.metrics.model, "stream_queue").inc()
                raise EngineError("RESOURCE_EXHAUSTED", f"stream {stream_id!r} already has {self.max_stream_queue} "
                                                        f"batches waiting; wait for replies before sending more, or "
                                                        f"raise --max-stream-queue")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if stream_id is not None:
            self.queued += 1
            self._stream_queued[stream_id] += 1
            self.metrics.queue_depth.labels(self.metrics.model).set(self.queued)
            future.add_done_callback(lambda f: self._batch_done(f, stream_id))
        self._queue.put(Job(fn, future, loop, batch))
        return future

    def _batch_done(self, future: asyncio.Future, stream_id: str) -> None:
        if not future.cancelled():
            future.exception()  # mark it retrieved: a stream whose client left may never await it
        self.queued -= 1
        self._stream_queued[stream_id] -= 1
        if self._stream_queued[stream_id] <= 0:
            del self._stream_queued[stream_id]
        self.metrics.queue_depth.labels(self.metrics.model).set(self.queued)

    def stop_accepting(self) -> None:
        self._accepting = False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every accepted batch has been answered (or `timeout` passes)."""
        deadline = time.monotonic() + timeout
        while self.queued > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.queued == 0

    async def finish(self, fn: Callable[[], Any]):
        """Run `fn` as the last job (after everything queued), then stop the worker; its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(Job(fn, future, loop))
        result = await future
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join, 30)
        return result

    # ------------------------------------------------------------------ worker side
    def start(self, worker: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=worker, name="tta-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker after the jobs already queued (nothing more is saved)."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(30)

    def later(self, fn: Callable[[], Any]) -> None:
        """A job of the worker's own, after what is queued now; nobody awaits it."""
        self._queue.put(Job(fn))

    def take(self, wait: bool, timeout: float | None) -> Job | None:
        """The next job: the backlog first, then the queue (waiting up to `timeout` when `wait`).
        None means stop; raises queue.Empty when there is nothing."""
        if self._backlog:
            return self._backlog.popleft()
        if not wait:
            return self._queue.get_nowait()
        return self._queue.get(timeout=timeout)

    def take_next_if(self, matches: Callable[[Job], bool]) -> Job | None:
        """The next queued job if it matches (skipping cancelled ones), else None and it stays
        next in line: so grouping never reorders jobs."""
        while True:
            try:
                job = self.take(wait=False, timeout=None)
            except queue.Empty:
                return None
            if job is not None and job.cancelled():
                continue
            if job is None or not matches(job):
                self._backlog.appendleft(job)
                return None
            return job
