"""The thread boundary: jobs queued from the asyncio event loop for the one engine worker
thread, the queue limits, and the futures through which the worker answers.

Only this module touches both sides: the event loop submits jobs and awaits their futures; the
worker takes jobs and resolves each future thread-safely. Whatever runs inside a job (torch,
streams, files) is the rest of the engine's business.

Order: a stream's jobs (its batches and its control operations) run in the order they were
submitted; across streams the worker takes them round-robin, one job per stream in turn, so one
busy stream cannot make the others wait behind its backlog. A job of no stream (listing every
stream, the final checkpoint, stopping) is a barrier: it runs after everything submitted before
it and before everything submitted after it.

Admission: at most `max_queue` batches wait in all and `max_stream_queue` per stream, and a
batch that would wait longer than `max_wait` seconds or than its own deadline allows (the
measured time per job times the batches ahead of it) is refused at once. A stream refused for a
full queue in the last REFUSED_MEMORY seconds may take one of max_queue / 4 extra places when it
comes back, so closed-loop clients that resend the moment they get a reply cannot keep it out
(the extra places never stay empty waiting for it). A batch whose client deadline passed while
it waited is answered DEADLINE_EXCEEDED without running.

A refusal for load says when to come back (EngineError.retry_after, sent as gRPC's retry
pushback): a stream refused for a full queue is due back when its turn among the refused comes
(about one batch's time per stream refused before it), so clients that follow the hint return
in the order they were refused and spread out, and a refusal costs the server about once per
turn rather than once per client backoff step.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from runtime.engine.errors import EngineError, shown
from runtime.metrics import Metrics

STOP = object()  # the job that ends the worker loop
REFUSED_MEMORY = 5.0  # seconds past its hinted retry time a refused stream keeps its claim on an extra place
MAX_RETRY_AFTER = 30.0  # seconds: the longest retry hint
BLOCKING_THREADS = 32  # threads for blocking calls off the event loop (Jobs.once: streams being taken over)


@dataclass
class Job:
    fn: Callable[[], Any]
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    batch: Any = None  # an inference batch (engine.batches.Batch), so the worker can group batches
    stream_id: str | None = None  # None: a barrier (see the module docstring)
    deadline: float | None = None  # time.monotonic() after which nobody waits for the answer
    submitted: float = field(default_factory=time.monotonic)

    def cancelled(self) -> bool:
        return self.future is not None and self.future.cancelled()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def resolve(self, result=None, error: Exception | None = None) -> None:
        """Answer the job's awaiting coroutine from the worker thread (no-op without a future)."""
        if self.future is not None:
            self.loop.call_soon_threadsafe(_resolve, self.future, result, error)


def resolve_together(answers: list[tuple[Job, Any, Exception | None]]) -> None:
    """Answer several jobs (a group's batches) with one wake-up of the event loop: waking it once
    per job costs the worker a self-pipe write and a GIL hand-over each time."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for job, result, error in answers:
        if job.future is not None:
            by_loop.setdefault(job.loop, []).append((job.future, result, error))
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_resolve_each, items)


def _resolve_each(items: list) -> None:
    for future, result, error in items:
        _resolve(future, result, error)


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Round:
    """Jobs submitted between two barriers: a FIFO per stream, served round-robin, then the barrier."""

    def __init__(self):
        self.streams: collections.OrderedDict[str, collections.deque[Job]] = collections.OrderedDict()
        self.barrier: Job | object | None = None

    def add(self, job: Job) -> None:
        self.streams.setdefault(job.stream_id, collections.deque()).append(job)

    def pop_next(self, matches: Callable[[Job], bool] | None = None) -> Job | None:
        """The head job of the next stream in turn (of the first whose head matches, if given)."""
        for stream_id, jobs in self.streams.items():
            if matches is not None and not matches(jobs[0]):
                continue
            job = jobs.popleft()
            del self.streams[stream_id]
            if jobs:
                self.streams[stream_id] = jobs  # to the back of the round
            return job
        return None


class Jobs:
    def __init__(self, max_queue: int, max_stream_queue: int, metrics: Metrics, max_wait: float = 0.0):
        self.max_queue, self.max_stream_queue, self.max_wait = max_queue, max_stream_queue, max_wait
        self.metrics = metrics
        self._rounds: collections.deque[_Round] = collections.deque([_Round()])
        self._ready = threading.Condition()
        self._stream_queued: collections.Counter[str] = collections.Counter()  # event-loop side
        # streams refused for a full queue lately, in the order refused -> (when they are due back,
        # until when they keep their claim on an extra place)
        self._refused: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self._jitter = random.Random()
        self.queued = 0  # batches submitted and not yet answered (event-loop side)
        self.seconds_per_job = 0.0  # moving average of the time a batch job takes (worker side)
        # moving average of the time between two batches' arrivals (event-loop side; the worker
        # reads it to decide whether waiting for more batches to share a forward pass can pay)
        self.arrival_gap = float("inf")
        self._last_arrival: float | None = None
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._once: dict[str, asyncio.Future] = {}
        self._blocking: concurrent.futures.ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ event-loop side
    def submit(self, fn: Callable[[], Any], stream_id: str | None = None, batch: Any = None,
               deadline: float | None = None) -> asyncio.Future:
        """Queue a job now (so callers control the order) and return its future. With `batch`, the
        job is a batch of `stream_id`, counted against the queue limits."""
        if not self._accepting:
            raise EngineError("UNAVAILABLE", "the server is shutting down; retry on another replica")
        if batch is not None:
            self._admit(stream_id, deadline)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if batch is not None:
            self._arrived()
            self.queued += 1
            self._stream_queued[stream_id] += 1
            self._depth()
            future.add_done_callback(lambda f: self._batch_done(f, stream_id))
        self._put(Job(fn, future, loop, batch, stream_id, deadline))
        return future

    def _admit(self, stream_id: str, deadline: float | None) -> None:
        name = self.metrics.model
        now = time.monotonic()
        while self._refused and next(iter(self._refused.values()))[1] < now:
            self._refused.popitem(last=False)
        wait = self.queued * self.seconds_per_job  # what the batches queued now take to run
        # a stream refused lately may take one of the extra places beyond the limit when it comes
        # back, so that clients that resend the moment they get a reply cannot keep it out for good
        limit = self.max_queue + (self.max_queue // 4 if stream_id in self._refused else 0)
        if self.queued >= limit:
            retry = self._line_up(stream_id, now, self.queued - limit + 1)
            self.metrics.rejected.labels(name, "global_queue").inc()
            raise EngineError("RESOURCE_EXHAUSTED", f"the engine queue is full ({self.max_queue} batches waiting); "
                                                    f"retry in about {retry:.1f} s, or raise --max-queue", retry)
        if self._stream_queued[stream_id] >= self.max_stream_queue:
            self.metrics.rejected.labels(name, "stream_queue").inc()
            raise EngineError("RESOURCE_EXHAUSTED", f"stream {shown(stream_id)} already has {self.max_stream_queue} "
                                                    f"batches waiting; wait for replies before sending more, or "
                                                    f"raise --max-stream-queue", self._retry_after(wait))
        if self.max_wait and wait > self.max_wait:
            self.metrics.rejected.labels(name, "wait").inc()
            retry = self._retry_after(wait)
            raise EngineError("RESOURCE_EXHAUSTED", f"the engine is about {wait:.1f} s behind (more than "
                                                    f"--max-queue-wait {self.max_wait:g} s); retry in about "
                                                    f"{retry:.1f} s", retry)
        left = None if deadline is None else deadline - now
        if left is not None and wait > left:  # it would miss its deadline: say so now, run nothing
            self.metrics.rejected.labels(name, "wait").inc()
            retry = self._retry_after(wait)
            raise EngineError("RESOURCE_EXHAUSTED", f"the engine is about {wait:.1f} s behind, past this "
                                                    f"request's deadline in {max(left, 0):.1f} s; retry in about "
                                                    f"{retry:.1f} s", retry)
        self._refused.pop(stream_id, None)

    def _line_up(self, stream_id: str, now: float, over: int) -> float:
        """A stream refused for a full queue (`over` batches beyond its limit) keeps its place
        among the refused (first refused, first due) and is told to come back when its turn
        comes: a place frees up every batch, so the k-th refused stream is due after about k
        batches. Clients that follow the hint come back in the order they were refused, spread
        out, each finding an extra place; one back at its turn that still finds none is due again
        when one frees up."""
        per_batch = max(self.seconds_per_job, 0.001)
        if stream_id in self._refused:
            due = self._refused[stream_id][0]
            if due <= now:
                due = now + max(over, 1) * per_batch * self._jitter.uniform(0.9, 1.1)
        else:
            due = now + (len(self._refused) + 1) * per_batch * self._jitter.uniform(0.9, 1.1)
        due = min(due, now + MAX_RETRY_AFTER)
        self._refused[stream_id] = (due, due + REFUSED_MEMORY)
        while len(self._refused) > self.max_queue:
            self._refused.popitem(last=False)
        return max(due - now, 0.001)

    def _retry_after(self, wait: float) -> float:
        """When a client refused for the wait should come back: a random point in the second
        half of the time the queued batches take (returns spread out, not at once)."""
        return min(max(wait, self.seconds_per_job, 0.01) * self._jitter.uniform(0.5, 1.0), MAX_RETRY_AFTER)

    def _batch_done(self, future: asyncio.Future, stream_id: str) -> None:
        if not future.cancelled():
            future.exception()  # mark it retrieved: a stream whose client left may never await it
        self.queued -= 1
        self._stream_queued[stream_id] -= 1
        if self._stream_queued[stream_id] <= 0:
            del self._stream_queued[stream_id]
        self._depth()

    def _arrived(self) -> None:
        now = time.monotonic()
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            self.arrival_gap = gap if self.arrival_gap == float("inf") else 0.8 * self.arrival_gap + 0.2 * gap
        self._last_arrival = now

    def _depth(self) -> None:
        self.metrics.queue_depth.labels(self.metrics.model).set(self.queued)

    async def once(self, key: str, fn: Callable[[], Any]):
        """Run a blocking `fn` off the event loop (not on the worker); concurrent calls with the
        same key wait for the one run and share its result or error."""
        running = self._once.get(key)
        if running is None:
            if self._blocking is None:  # its own threads: many waiting hand-offs must not starve image decoding
                self._blocking = concurrent.futures.ThreadPoolExecutor(BLOCKING_THREADS, "tta-claim")
            running = asyncio.get_running_loop().run_in_executor(self._blocking, fn)
            self._once[key] = running
            running.add_done_callback(lambda _: self._once.pop(key, None))
        return await asyncio.shield(running)

    def stop_accepting(self) -> None:
        self._accepting = False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every accepted batch has been answered (or `timeout` passes)."""
        deadline = time.monotonic() + timeout
        while self.queued > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.queued == 0

    async def finish(self, fn: Callable[[], Any]):
        """Run `fn` after everything queued, then stop the worker; fn's result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._put(Job(fn, future, loop))
        result = await future
        self._put(STOP)
        await asyncio.to_thread(self._thread.join, 30)
        return result

    # ------------------------------------------------------------------ both sides
    def _put(self, job) -> None:
        with self._ready:
            if job is STOP or job.stream_id is None:  # a barrier closes the round
                self._rounds[-1].barrier = job
                self._rounds.append(_Round())
            else:
                self._rounds[-1].add(job)
            self._ready.notify()

    # ------------------------------------------------------------------ worker side
    def start(self, worker: Callable[[], None]) -> None:
        self._thread = threading.Thread(target=worker, name="tta-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker after the jobs already queued (nothing more is saved)."""
        if self._thread is not None and self._thread.is_alive():
            self._put(STOP)
            self._thread.join(30)

    def later(self, fn: Callable[[], Any], stream_id: str) -> None:
        """A job of the worker's own for a stream, after that stream's jobs queued now; nobody awaits it."""
        self._put(Job(fn, stream_id=stream_id))

    def _pop(self, matches: Callable[[Job], bool] | None = None):
        """Under the lock: the next runnable job, STOP, or None when nothing is runnable now."""
        while True:
            current = self._rounds[0]
            job = current.pop_next(matches)
            if job is not None:
                return job
            if current.streams:  # jobs left, none matching
                return None
            if current.barrier is None:  # the open round, empty
                return None
            if matches is not None:  # never group across a barrier
                return None
            self._rounds.popleft()
            return current.barrier

    def take(self, wait: bool, timeout: float | None):
        """The next job (STOP ends the worker); cancelled jobs are skipped and expired ones
        answered DEADLINE_EXCEEDED. Raises queue.Empty when nothing comes (at once if not `wait`)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while True:
                job = self._pop()
                if job is None:
                    remaining = None if end is None else end - time.monotonic()
                    if not wait or (remaining is not None and remaining <= 0):
                        raise queue.Empty
                    self._ready.wait(remaining)
                    continue
                if job is STOP or self._runnable(job):
                    return job

    def waiting(self) -> bool:
        """Some job waits besides the one running (worker side: `queued` is the event loop's count,
        which lags answers the loop has not yet been woken for)."""
        with self._ready:
            return any(r.streams or r.barrier is not None for r in self._rounds)

    def has_queued(self, stream_id: str) -> bool:
        """Some job of this stream waits (worker side)."""
        with self._ready:
            return any(stream_id in r.streams for r in self._rounds)

    def take_next_if(self, matches: Callable[[Job], bool], wait_until: float | None = None) -> Job | None:
        """A queued job in this round that can join a group, or None; with `wait_until`
        (time.monotonic()), one submitted before then is waited for (never across a barrier)."""
        with self._ready:
            while True:
                while (job := self._pop(matches)) is not None:
                    if self._runnable(job):
                        return job
                remaining = None if wait_until is None else wait_until - time.monotonic()
                if remaining is None or remaining <= 0 or self._rounds[0].barrier is not None:
                    return None
                self._ready.wait(remaining)

    def _runnable(self, job: Job) -> bool:
        if job.cancelled():
            return False  # the client gave up before its turn: leave the stream untouched
        if job.expired(time.monotonic()):
            self.metrics.rejected.labels(self.metrics.model, "deadline").inc()
            job.resolve(error=EngineError("DEADLINE_EXCEEDED", "the request's deadline passed while it waited "
                                                               "for the engine; it was not run"))
            return False
        return True

    def ran(self, seconds: float) -> None:
        """A batch job took this long: the admission estimate follows it."""
        self.seconds_per_job = seconds if not self.seconds_per_job else 0.9 * self.seconds_per_job + 0.1 * seconds
