"""The engine: per-stream adapters driven by one dedicated torch worker thread.

Order of work (DESIGN.md principle 1, "predict first, adapt after"):
  * every batch and every control operation is a job on one FIFO queue served by one thread,
    so a stream's jobs run in arrival order and a policy change, reset or rollback lands
    exactly between two batches;
  * a batch job predicts, hands the reply back to the event loop at once, and leaves the
    stream's update (adapter.learn) pending; pending updates run when the queue is idle, or
    right before that stream's next batch (so batch t+1 always sees the update from batch t),
    or before any control operation or checkpoint of the stream.
The gRPC event loop never runs torch code: it awaits asyncio futures the worker resolves.

Streams are created on first use with the model's default policy, up to a stream limit
(RESOURCE_EXHAUSTED beyond it). When the adapted state of resident streams exceeds the memory
budget, the least recently used idle streams are written to disk and dropped from memory; their
next batch loads them back, so nothing learned is lost.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

import adapters
from adapters.batched import batch_key, predict_together
from runtime import drift
from runtime.checkpoints import MAX_FILE_NAME, SNAPSHOT_NAME, CorruptCheckpoint, StateStore, file_name
from runtime.guard import FALLBACK, GuardConfig, StreamGuard, comparable_logits
from runtime.metrics import OTHER, Metrics
from runtime.model_config import LoadedModel

log = logging.getLogger("tta.engine")

DEFAULT_STREAM = "default"
MAX_STREAM_ID = 128
REMEMBERED_REQUESTS = 65536  # predictions kept for feedback
WIRE_FORBIDDEN = {"generator", "augment", "prototypes"}  # objects, not settable over the wire


def check_snapshot_name(name: str) -> str:
    """Empty (the engine picks a name) or SNAPSHOT_NAME over the whole string: a snapshot name
    becomes a file name, so nothing else (no separator, no trailing newline) gets through."""
    if name and not SNAPSHOT_NAME.fullmatch(name):
        raise EngineError("INVALID_ARGUMENT", f"snapshot name {name[:80]!r}: use letters, digits, '.', '_', '-' "
                                              f"(at most 64, starting with a letter or digit)")
    return name


class EngineError(Exception):
    """An error with the gRPC status code it should be answered with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code  # a grpc.StatusCode name
        self.message = message


@dataclass
class InferResult:
    logits: np.ndarray
    stream_id: str
    policy: str
    step: int
    request_id: str
    bn_shift: float | None
    entropy: float
    confidence: float
    class_marginal_entropy: float
    guard: str = ""  # the collapse guard's verdict on this batch (runtime/guard.py REASONS), if any


@dataclass
class Stream:
    id: str
    policy: str
    hyperparameters: dict[str, str]
    adapter: Any = None  # None when evicted, or frozen (ONNX/TorchScript source path)
    frozen: bool = False
    resident: bool = True
    state_bytes: int = 0
    bn_probe: drift.BNShift | None = None
    marginal: drift.Marginal | None = None
    pending: bool = False  # an update (learn) is owed for the last batch
    batches: int = 0
    samples: int = 0
    step: int = 0  # updates since the last reset / policy change (kept when evicted)
    bn_shift: float = 0.0
    entropy: float = 0.0
    confidence: float = 0.0
    class_marginal_entropy: float = 1.0
    weight_distance: float = 0.0
    last_loss: float = 0.0
    feedback_labels: int = 0
    feedback_correct: int = 0
    snapshots: list[str] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    guard: StreamGuard | None = None  # the collapse guard's view of the stream (weight-updating policies)
    good_state: dict | None = None  # the guard's last good snapshot of the adapter (in memory)
    guard_trips: int = 0  # rollbacks and resets by the guard
    guard_fallbacks: int = 0  # batches answered with the source prediction by the guard
    dirty: bool = False  # changed since its last checkpoint
    damaged: str = ""  # why its saved state could not be read (answered DATA_LOSS until replaced or deleted)

    COUNTERS = ("batches", "samples", "bn_shift", "entropy", "confidence", "class_marginal_entropy",
                "weight_distance", "last_loss", "feedback_labels", "feedback_correct", "guard_trips", "guard_fallbacks")

    def counters(self) -> dict:
        return {k: getattr(self, k) for k in self.COUNTERS}


@dataclass
class _Job:
    fn: Callable[[], Any]
    future: asyncio.Future | None
    loop: asyncio.AbstractEventLoop | None
    batch: tuple | None = None  # an inference batch: _predict's arguments, for cross-stream batching

    def cancelled(self) -> bool:
        return self.future is not None and self.future.cancelled()


class Engine:
    def __init__(self, model: LoadedModel, metrics: Metrics | None = None, state_dir: str | None = None,
                 max_streams: int = 1024, memory_budget_bytes: int = 2 << 30, max_queue: int = 256,
                 max_batch: int = 256, guard: GuardConfig | None = None, max_stream_queue: int = 64,
                 checkpoint_interval: float = 0.0, max_group: int | None = None):
        self.model = model
        self.guard = guard or GuardConfig()
        self._source_adapter = None  # the source model's forward for the guard (built on first use)
        self.metrics = metrics or Metrics(model.name, model.tracked_streams)
        self.max_streams = max_streams
        self.memory_budget = memory_budget_bytes
        self.max_queue = max_queue
        self.max_stream_queue = max_stream_queue
        # queued batches of different streams that can share one forward pass (adapters/batched.py):
        # up to this many; 1 turns cross-stream batching off. Default: on for CUDA, where the passes
        # are launch-bound; off on the CPU, where stacked passes measured no faster (docs/BENCHMARKS.md)
        self.max_group = max_group if max_group is not None else (64 if str(model.device).startswith("cuda") else 1)
        self._backlog: collections.deque[_Job | None] = collections.deque()  # taken off the queue, not yet run
        self._stream_queued: collections.Counter[str] = collections.Counter()  # event-loop side
        # periodic checkpoints of changed streams (with a state dir); 0 = only at eviction and shutdown
        self.checkpoint_interval = checkpoint_interval if state_dir else 0.0
        self._last_checkpoint = time.monotonic()
        self.max_batch = max_batch
        self.persistent = state_dir is not None
        self._tmp_dir = None if state_dir else tempfile.mkdtemp(prefix="tta-state-")
        self.store = StateStore(state_dir or self._tmp_dir)
        self.streams: collections.OrderedDict[str, Stream] = collections.OrderedDict()  # LRU order
        self._predictions: collections.OrderedDict[str, tuple[str, str, np.ndarray]] = collections.OrderedDict()
        self._request_ids = itertools.count(1)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._queued = 0
        self._accepting = True
        # cumulative figures for ModelStatistics (written by the worker only)
        self.totals = {"batches": 0, "samples": 0, "queue_ns": 0, "compute_ns": 0, "last_inference_ms": 0}
        self.metrics.memory_budget.labels(model.name).set(memory_budget_bytes)
        self.metrics.stream_limit.labels(model.name).set(max_streams)
        self._restore_saved_streams()
        self._thread = threading.Thread(target=self._worker, name="tta-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ event-loop side
    def _enqueue(self, fn: Callable[[], Any], stream_id: str | None = None, batch: tuple | None = None) -> asyncio.Future:
        """Put a job on the queue now (so callers control the order) and return its future.
        `stream_id`: the job is a batch of that stream, counted against the queue limits."""
        if not self._accepting:
            raise EngineError("UNAVAILABLE", "the server is shutting down; retry on another replica")
        if stream_id is not None:
            if self._queued >= self.max_queue:
                self.metrics.rejected.labels(self.model.name, "global_queue").inc()
                raise EngineError("RESOURCE_EXHAUSTED", f"the engine queue is full ({self.max_queue} batches "
                                                        f"waiting); retry later or raise --max-queue")
            if self._stream_queued[stream_id] >= self.max_stream_queue:
                self.metrics.rejected.labels(self.model.name, "stream_queue").inc()
                raise EngineError("RESOURCE_EXHAUSTED", f"stream {stream_id!r} already has {self.max_stream_queue} "
                                                        f"batches waiting; wait for replies before sending more, or "
                                                        f"raise --max-stream-queue")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if stream_id is not None:
            self._queued += 1
            self._stream_queued[stream_id] += 1
            self.metrics.queue_depth.labels(self.model.name).set(self._queued)
            future.add_done_callback(lambda f: self._batch_done(f, stream_id))
        self._jobs.put(_Job(fn, future, loop, batch))
        return future

    def _batch_done(self, future, stream_id: str) -> None:
        if not future.cancelled():
            future.exception()  # mark it retrieved: a stream whose client left may never await it
        self._queued -= 1
        self._stream_queued[stream_id] -= 1
        if self._stream_queued[stream_id] <= 0:
            del self._stream_queued[stream_id]
        self.metrics.queue_depth.labels(self.model.name).set(self._queued)

    async def _submit(self, fn: Callable[[], Any]):
        return await self._enqueue(fn)

    def enqueue_infer(self, stream_id: str | None, x: np.ndarray, request_id: str = "", start: bool = False,
                      end: bool = False) -> asyncio.Future:
        """Queue one batch (float32 NCHW in [0, 1]) of a stream; the future resolves to its
        InferResult as soon as it is predicted (its update follows later). Batches of a stream
        are served in the order they were queued. `start`: reset the stream to the source state
        first; `end`: afterwards, checkpoint the stream and release its memory (Triton's
        sequence_start / sequence_end)."""
        stream_id = self.check_stream_id(stream_id)
        request_id = request_id or f"req-{next(self._request_ids)}"
        enqueued = time.monotonic()
        args = (stream_id, x, request_id, enqueued, start, end)
        return self._enqueue(lambda: self._predict(*args), stream_id, args)

    async def infer(self, stream_id: str | None, x: np.ndarray, request_id: str = "", start: bool = False,
                    end: bool = False) -> InferResult:
        return await self.enqueue_infer(stream_id, x, request_id, start, end)

    async def call(self, method: str, *args):
        """Run a control operation (a `_op_*` method) on the worker thread, between batches."""
        fn = getattr(self, f"_op_{method}")
        return await self._submit(lambda: fn(*args))

    def check_stream_id(self, stream_id: str | None) -> str:
        stream_id = stream_id or DEFAULT_STREAM
        if len(stream_id) > MAX_STREAM_ID or not stream_id.isprintable():
            raise EngineError("INVALID_ARGUMENT", f"stream id must be printable text of at most {MAX_STREAM_ID} "
                                                  f"characters, got {stream_id[:40]!r}...")
        # a stream id names files in the state dir: its percent-encoding (up to 9 bytes a character)
        # must fit in one file name, so no request reaches the file system with a name it cannot hold
        if len(file_name(stream_id)) > MAX_FILE_NAME:
            raise EngineError("INVALID_ARGUMENT", f"stream id {stream_id[:40]!r}... is too long once encoded as a "
                                                  f"file name; use a shorter id (ASCII letters, digits, '-', '_', '.')")
        return stream_id

    def check_policy(self, policy: str, hyperparameters: dict[str, str]) -> None:
        """Raise EngineError unless a stream could run this policy with these hyperparameters."""
        self._new_adapter(policy, hyperparameters)

    def stop_accepting(self) -> None:
        self._accepting = False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every accepted batch has been answered (or `timeout` passes)."""
        deadline = time.monotonic() + timeout
        while self._queued > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self._queued == 0

    async def drain_and_checkpoint(self) -> int:
        """Finish queued work and pending updates, then (with a state dir) save every stream.
        Returns the number of streams saved."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put(_Job(self._op_checkpoint_all, future, loop))
        saved = await future
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join, 30)
        return saved

    def close(self) -> None:
        """Stop the worker (without checkpointing) and remove a temporary state dir."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(30)
        if self._tmp_dir:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)

    # ------------------------------------------------------------------ worker thread
    def _worker(self) -> None:
        torch.set_grad_enabled(True)
        while True:
            self._maybe_checkpoint()
            try:
                if self._backlog:
                    job = self._backlog.popleft()
                elif self._has_pending():
                    job = self._jobs.get_nowait()
                else:  # wake up for the next periodic checkpoint even when no request comes
                    job = self._jobs.get(timeout=self.checkpoint_interval or None)
            except queue.Empty:
                try:
                    self._learn_one_pending()  # nothing waiting: apply an owed update now
                except Exception:  # noqa: BLE001 - a failing update must not stop the engine
                    log.exception("adaptation update failed")
                continue
            if job is None:
                return
            if job.cancelled():
                continue  # the client gave up (deadline, cancel) before its turn: leave the stream untouched
            group = self._gather_group(job) if job.batch is not None and self.max_group > 1 else None
            if group is not None:
                self._predict_group(group)
            else:
                self._run(job)

    def _run(self, job: _Job) -> None:
        try:
            result, error = job.fn(), None
        except EngineError as e:
            result, error = None, e
        except Exception as e:  # noqa: BLE001 - a bug must fail one request, not the engine
            log.exception("engine job failed")
            result, error = None, EngineError("INTERNAL", f"{type(e).__name__}: {e}")
        if job.future is not None:
            job.loop.call_soon_threadsafe(_resolve, job.future, result, error)

    def _maybe_checkpoint(self) -> None:
        if self.checkpoint_interval and time.monotonic() - self._last_checkpoint >= self.checkpoint_interval:
            try:
                self._checkpoint(changed_only=True, reason="periodic")
            except Exception:  # noqa: BLE001 - a full disk must not stop serving; it is counted and logged
                log.exception("periodic checkpoint failed")
                self.metrics.checkpoint_failures.labels(self.model.name).inc()
            self._last_checkpoint = time.monotonic()

    def _has_pending(self) -> bool:
        return any(s.pending for s in self.streams.values())

    def _learn_one_pending(self) -> None:
        for stream in self.streams.values():
            if stream.pending:
                self._learn(stream)
                return

    # --- streams ------------------------------------------------------------------------
    def _restore_saved_streams(self) -> None:
        if not self.persistent:
            return
        for stream_id in self.store.saved_streams():
            stream = self._saved_stream(stream_id)
            if stream is not None:
                self.streams[stream_id] = stream
        if self.streams:
            log.info("found saved state of %d streams in %s", len(self.streams), self.store.root)
        self._update_stream_gauges()

    def _saved_stream(self, stream_id: str) -> Stream | None:
        """A stream whose state is on disk in the state dir (evicted, not yet loaded), or None."""
        if not self.persistent or not self.store.stream_path(stream_id).exists():
            return None
        try:
            record = self.store.load_stream(stream_id)
        except Exception as e:  # noqa: BLE001 - one unreadable file must not stop the server
            # keep the stream known: its clients must hear that its learned state is gone, not get
            # a silently fresh model
            log.error("the saved state of stream %r is unreadable: %s", stream_id, e)
            return Stream(id=stream_id, policy=self.model.default_policy, hyperparameters={}, resident=False,
                          damaged=str(e))
        stream = Stream(id=stream_id, policy=record["policy"], hyperparameters=record["hyperparameters"],
                        resident=False, step=int(record.get("step", 0)))
        for k, v in record.get("counters", {}).items():
            setattr(stream, k, v)
        stream.snapshots = self.store.snapshots(stream_id)
        return stream

    def _stream(self, stream_id: str, create: bool = True, load: bool = True) -> Stream:
        """The stream, resident in memory (loaded back from disk if evicted, unless `load` is false:
        for operations that replace or drop its state); LRU-touched."""
        stream = self.streams.get(stream_id)
        if stream is None and len(self.streams) < self.max_streams:
            # state another process left in a shared state dir (a replica that checkpointed it
            # at shutdown, before the stream was routed here): resume it instead of starting over
            stream = self._saved_stream(stream_id)
            if stream is not None:
                self.streams[stream_id] = stream
                log.info("resuming stream %r from %s", stream_id, self.store.root)
        if stream is None:
            if not create:
                raise EngineError("NOT_FOUND", f"stream {stream_id!r} does not exist (streams are created by their "
                                               f"first inference request or SetPolicy)")
            if len(self.streams) >= self.max_streams:
                raise EngineError("RESOURCE_EXHAUSTED", f"stream limit of {self.max_streams} reached; reuse a stream "
                                                        f"id, delete idle streams (tta ctl delete) or raise --max-streams")
            stream = Stream(id=stream_id, policy=self.model.default_policy,
                            hyperparameters=dict(self.model.default_hyperparameters))
            self._install(stream, self._new_adapter(stream.policy, stream.hyperparameters))
            self.streams[stream_id] = stream
            self.metrics.stream_started(stream_id, stream.policy)
        elif not stream.resident and load:
            if stream.damaged:
                raise self._data_loss(stream)
            self._load_back(stream)
        self.streams.move_to_end(stream_id)
        stream.last_used = time.monotonic()
        return stream

    def _new_adapter(self, policy: str, hyperparameters: dict[str, str]):
        """Validate a policy and build its adapter; None means the frozen (ONNX/TorchScript) path."""
        if policy not in adapters.available():
            raise EngineError("INVALID_ARGUMENT", f"unknown policy {policy!r}; available: {', '.join(adapters.available())}")
        forbidden = sorted(set(hyperparameters) & WIRE_FORBIDDEN)
        if forbidden:
            raise EngineError("INVALID_ARGUMENT", f"hyperparameter {forbidden[0]!r} cannot be set over the wire "
                                                  f"(it is set by the server or in-process only)")
        if not self.model.can_adapt():
            if policy != "source":
                raise EngineError("FAILED_PRECONDITION", f"model {self.model.name!r} is a frozen graph "
                                  f"({self.model.platform}); it serves only the 'source' policy. To adapt, give the "
                                  f"model config a [model] factory for the same network")
            if hyperparameters:
                raise EngineError("INVALID_ARGUMENT", "policy 'source' takes no hyperparameters")
            return None
        if policy == "source" and self.model.frozen is not None and not hyperparameters:
            return None  # the fast frozen path (ONNX Runtime) for unadapted streams
        try:
            typed = adapters.coerce(policy, hyperparameters)
            if policy == "mean-teacher" and self.model.prototypes is not None:
                typed["prototypes"] = self.model.prototypes
            return adapters.create(policy, self.model.module, **typed)
        except ValueError as e:
            raise EngineError("INVALID_ARGUMENT", f"policy {policy!r}: {e}") from None

    def _install(self, stream: Stream, adapter) -> None:
        stream.adapter = adapter
        stream.frozen = adapter is None
        stream.resident = True
        stream.pending = False
        stream.marginal = stream.marginal or drift.Marginal(self.model.num_classes)
        guarded = adapter is not None and adapter.updates_weights and self.guard.action != "off"
        stream.guard = StreamGuard(self.guard) if guarded else None
        stream.good_state = None
        if adapter is not None:
            stream.bn_probe = drift.BNShift()
            adapter.observe_bn_inputs(stream.bn_probe)
            # a guarded stream keeps a second copy of its state: the last good snapshot
            stream.state_bytes = int(adapter.state_bytes()) * (2 if guarded else 1)
        else:
            stream.bn_probe, stream.state_bytes = None, 0

    def _record(self, stream: Stream, adapter_state=None) -> dict:
        if adapter_state is None and stream.adapter is not None:
            adapter_state = stream.adapter.state_dict()
        return {"stream_id": stream.id, "policy": stream.policy, "hyperparameters": dict(stream.hyperparameters),
                "adapter": adapter_state, "step": stream.step, "counters": stream.counters()}

    def _apply_record(self, stream: Stream, record: dict) -> None:
        adapter = self._new_adapter(record["policy"], record["hyperparameters"])
        if adapter is not None and record.get("adapter") is not None:
            adapter.load_state_dict(record["adapter"])
        stream.policy, stream.hyperparameters = record["policy"], dict(record["hyperparameters"])
        stream.step = int(record.get("step", 0))
        self._install(stream, adapter)

    def _load_back(self, stream: Stream) -> None:
        try:
            record = self.store.load_stream(stream.id)
        except CorruptCheckpoint as e:
            stream.damaged = str(e)
            raise self._data_loss(stream) from None
        self._apply_record(stream, record)
        self.metrics.restores.labels(self.model.name, "disk").inc()
        self._update_stream_gauges()

    @staticmethod
    def _data_loss(stream: Stream) -> EngineError:
        return EngineError("DATA_LOSS", f"the saved state of stream {stream.id!r} is damaged and has no intact "
                                        f"previous checkpoint ({stream.damaged}); the file was set aside. Delete "
                                        f"the stream (tta ctl delete) or set its policy to start it over from the "
                                        f"source model")

    def _evict(self, stream: Stream) -> None:
        if stream.pending:
            self._learn(stream)
        self._save(stream, "eviction")
        stream.adapter, stream.bn_probe, stream.resident, stream.state_bytes = None, None, False, 0
        self.metrics.evictions.labels(self.model.name).inc()

    def _enforce_memory_budget(self, keep: str) -> None:
        used = sum(s.state_bytes for s in self.streams.values() if s.resident)
        for stream in list(self.streams.values()):  # least recently used first
            if used <= self.memory_budget:
                break
            if stream.id == keep or not stream.resident or stream.state_bytes == 0:
                continue
            used -= stream.state_bytes
            self._evict(stream)
        self._update_stream_gauges()

    def _update_stream_gauges(self) -> None:
        resident = sum(1 for s in self.streams.values() if s.resident)
        self.metrics.streams.labels(self.model.name, "resident").set(resident)
        self.metrics.streams.labels(self.model.name, "evicted").set(len(self.streams) - resident)
        self.metrics.state_bytes.labels(self.model.name).set(
            sum(s.state_bytes for s in self.streams.values() if s.resident))

    # --- batches ------------------------------------------------------------------------
    def _predict(self, stream_id: str, x: np.ndarray, request_id: str, enqueued: float, start: bool = False,
                 end: bool = False):
        started = time.monotonic()
        if start and stream_id in self.streams:
            self._op_reset(stream_id, reason="sequence_start")
        stream = self._stream(stream_id)
        if stream.pending:
            self._learn(stream)  # batch t+1 sees the update from batch t
        if end:  # after this reply (and this batch's update): to disk, out of memory
            self._jobs.put(_Job(lambda: self._release(stream_id), None, None))
        verdict = ""
        if stream.frozen:
            logits = self.model.frozen(x)
            bn_shift = None
        else:
            batch = torch.from_numpy(x).to(self.model.device)
            # every `snapshot_every` updates, the state about to predict this batch is a candidate
            # for the guard's last good snapshot: it becomes one if this batch passes the checks
            candidate = (stream.adapter.state_dict() if stream.guard is not None
                         and stream.guard.snapshot_due(stream.step) else None)
            logits = stream.adapter.predict(batch).float().cpu().numpy()
            bn_shift = self._predicted(stream)
            if stream.guard is not None:
                logits, verdict = self._guard(stream, x, batch, logits, bn_shift, candidate)
        return self._finish_batch(stream, x, request_id, enqueued, started, time.monotonic() - started, logits,
                                  bn_shift, verdict)

    def _predicted(self, stream: Stream) -> float | None:
        """Bookkeeping right after an adapter predicted a batch of the stream; its BN shift."""
        if stream.adapter.adapts:
            if stream.adapter.deferred_update:
                stream.pending = True  # learn() after the reply
            else:
                self._count_update(stream, {}, 0.0)  # BN-only adapters update inside predict
        return stream.bn_probe.take()

    def _finish_batch(self, stream: Stream, x: np.ndarray, request_id: str, enqueued: float, started: float,
                      inference_seconds: float, logits: np.ndarray, bn_shift: float | None,
                      verdict: str = "") -> InferResult:
        self.totals["batches"] += 1
        self.totals["samples"] += len(x)
        self.totals["queue_ns"] += int((started - enqueued) * 1e9)
        self.totals["compute_ns"] += int(inference_seconds * 1e9)
        self.totals["last_inference_ms"] = int(time.time() * 1000)
        figures = drift.batch_figures(logits)
        stream.dirty = True
        stream.batches += 1
        stream.samples += len(x)
        stream.entropy = float(figures["entropy"].mean())
        stream.confidence = float(figures["confidence"].mean())
        stream.class_marginal_entropy = stream.marginal.update(figures["probs"])
        if bn_shift is not None:
            stream.bn_shift = bn_shift
        self._remember(request_id, stream, figures["predicted"])
        self.metrics.batch(stream.id, stream.policy, len(x), figures, bn_shift, stream.class_marginal_entropy,
                           started - enqueued, inference_seconds)
        result = InferResult(logits=logits, stream_id=stream.id, policy=stream.policy, step=stream.step,
                             request_id=request_id, bn_shift=bn_shift, entropy=stream.entropy,
                             confidence=stream.confidence, class_marginal_entropy=stream.class_marginal_entropy,
                             guard=verdict)
        self._enforce_memory_budget(keep=stream.id)
        return result

    # --- cross-stream batching -------------------------------------------------------------
    def _group_key(self, job: _Job):
        """Queued batches with equal keys can share one forward pass; None: this one cannot."""
        stream_id, x, _, _, start, end = job.batch
        stream = self.streams.get(stream_id)
        if start or end or stream is None or not stream.resident or stream.pending:
            return None
        if stream.frozen:
            return "frozen", x.shape
        return batch_key(stream.adapter, torch.from_numpy(x))

    def _gather_group(self, first: _Job) -> list[_Job] | None:
        """`first` and the batches queued right behind it that can share its forward pass (other
        streams, same key): taken in queue order and only while they match, so no stream's
        batches or control operations are reordered. None when there is nothing to group."""
        key = self._group_key(first)
        if key is None:
            return None
        group, streams = [first], {first.batch[0]}
        while len(group) < self.max_group:
            if self._backlog:
                job = self._backlog.popleft()
            else:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
            if job is not None and job.cancelled():
                continue
            if job is None or job.batch is None or job.batch[0] in streams or self._group_key(job) != key:
                self._backlog.appendleft(job)  # runs next, in its place
                break
            group.append(job)
            streams.add(job.batch[0])
        return group if len(group) > 1 else None

    def _predict_group(self, group: list[_Job]) -> None:
        """One forward pass for the batches of several streams, then each batch's bookkeeping
        and reply as if it had been predicted alone."""
        started = time.monotonic()
        streams = [self._stream(job.batch[0]) for job in group]
        xs = [job.batch[1] for job in group]
        try:
            if streams[0].frozen:
                logits = np.split(self.model.frozen(np.concatenate(xs)), len(xs))
                shifts = [None] * len(xs)
            else:
                outs = predict_together([s.adapter for s in streams],
                                        [torch.from_numpy(x).to(self.model.device) for x in xs])
                logits = [o.float().cpu().numpy() for o in outs]
                shifts = [self._predicted(s) for s in streams]
        except Exception:  # noqa: BLE001 - never worse than one at a time
            log.exception("a grouped forward pass failed; predicting its batches one by one")
            for job in group:
                self._run(job)
            return
        share = (time.monotonic() - started) / len(group)  # compute time attributed to each batch
        self.metrics.grouped_batches.labels(self.model.name).observe(len(group))
        for job, stream, lg, shift in zip(group, streams, logits, shifts):
            _, x, request_id, enqueued, _, _ = job.batch
            try:
                result, error = self._finish_batch(stream, x, request_id, enqueued, started, share, lg, shift), None
            except Exception as e:  # noqa: BLE001
                log.exception("engine job failed")
                result, error = None, EngineError("INTERNAL", f"{type(e).__name__}: {e}")
            job.loop.call_soon_threadsafe(_resolve, job.future, result, error)

    # --- the collapse guard (runtime/guard.py) ------------------------------------------------
    def _source_logits(self, x: np.ndarray, batch: torch.Tensor) -> np.ndarray:
        if self.model.frozen is not None:
            return self.model.frozen(x)
        if self._source_adapter is None:
            self._source_adapter = adapters.create("source", self.model.module)
        return self._source_adapter.predict(batch).float().cpu().numpy()

    def _guard(self, stream: Stream, x: np.ndarray, batch: torch.Tensor, logits: np.ndarray,
               bn_shift: float | None, candidate: dict | None) -> tuple[np.ndarray, str]:
        """Check a guarded stream's batch before its reply and before its update. On a verdict the
        batch's update is dropped. A fallback (label-correlated or too small a batch) answers the
        batch with the source model's prediction and keeps the adapted state; the other reasons
        roll the stream back to its last good snapshot, or reset it to the source state (the
        batch is answered with the source's prediction only when its own logits are non-finite).
        `tta replay --guard` applies the verdicts the same way (docs/RESULTS.md)."""
        source = self._source_logits(x, batch)
        stream.weight_distance = float(stream.adapter.weight_distance())
        reason = stream.guard.observe(comparable_logits(stream.adapter, logits), source, loss=stream.last_loss,
                                      weight_distance=stream.weight_distance, bn_shift=bn_shift)
        if reason is None:
            if candidate is not None and stream.guard.healthy():  # that state raised no signal at all
                stream.good_state = candidate
            return logits, ""
        stream.pending = False
        stream.adapter.discard()
        action = stream.guard.action(reason)
        if action == FALLBACK:
            stream.guard_fallbacks += 1
            self.metrics.guard_trip(stream.id, stream.policy, reason, FALLBACK)
            return source, reason
        if action == "rollback" and stream.good_state is not None:
            stream.adapter.load_state_dict(stream.good_state)
            stream.good_state = None  # used up: tripping again before a new good state means reset
            stream.step = stream.adapter.steps
            done = f"rolled back to its last good state (step {stream.step})"
        else:
            action = "reset"
            self._op_reset(stream.id, reason="guard")
            done = "reset to the source state"
        stream.guard.after_action()
        stream.guard_trips += 1
        stream.dirty = True
        self.metrics.guard_trip(stream.id, stream.policy, reason, action)
        figures = ", ".join(f"{k} {v:.3g}" for k, v in stream.guard.figures.items() if isinstance(v, float))
        log.warning("collapse guard: stream %r (%s) %s: %s (%s)", stream.id, stream.policy, done, reason, figures)
        return (source if reason == "non_finite" else logits), reason

    def _release(self, stream_id: str) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and stream.resident:
            self._evict(stream)
            self._update_stream_gauges()

    def _learn(self, stream: Stream) -> None:
        stream.pending = False
        started = time.monotonic()
        figures = stream.adapter.learn()
        self._count_update(stream, figures, time.monotonic() - started)

    def _count_update(self, stream: Stream, figures: dict, seconds: float) -> None:
        stream.step = stream.adapter.steps
        if "loss" in figures:
            stream.last_loss = float(figures["loss"])
        distance = None
        # a pass over all weights: only where a gauge shows it (tracked streams); GetStream computes its own
        if stream.adapter is not None and stream.adapter.updates_weights and \
                self.metrics.stream_label(stream.id) != OTHER:
            distance = stream.weight_distance = float(stream.adapter.weight_distance())
        self.metrics.update(stream.id, stream.policy, figures, seconds, distance)

    def _remember(self, request_id: str, stream: Stream, predicted: np.ndarray) -> None:
        self._predictions[request_id] = (stream.id, stream.policy, predicted.astype(np.int32))
        self._predictions.move_to_end(request_id)
        while len(self._predictions) > REMEMBERED_REQUESTS:
            self._predictions.popitem(last=False)

    # --- control operations (run on the worker, between batches) --------------------------
    def _info(self, stream: Stream) -> dict:
        if stream.resident and stream.adapter is not None and stream.adapter.updates_weights:
            stream.weight_distance = float(stream.adapter.weight_distance())
        return {"model": self.model.name, "stream_id": stream.id, "policy": stream.policy,
                "hyperparameters": dict(stream.hyperparameters), "step": stream.step, "batches": stream.batches,
                "samples": stream.samples, "resident": stream.resident, "state_bytes": stream.state_bytes,
                "bn_shift": stream.bn_shift, "entropy": stream.entropy, "confidence": stream.confidence,
                "class_marginal_entropy": stream.class_marginal_entropy, "weight_distance": stream.weight_distance,
                "last_loss": stream.last_loss, "feedback_labels": stream.feedback_labels,
                "feedback_correct": stream.feedback_correct,
                "accuracy": stream.feedback_correct / stream.feedback_labels if stream.feedback_labels else 0.0,
                "snapshots": list(stream.snapshots), "idle_seconds": time.monotonic() - stream.last_used,
                "guard_trips": stream.guard_trips, "guard_fallbacks": stream.guard_fallbacks}

    def _op_get(self, stream_id: str) -> dict:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise EngineError("NOT_FOUND", f"stream {stream_id!r} does not exist")
        if stream.pending:
            self._learn(stream)
        return self._info(stream)

    def _op_list(self) -> list[dict]:
        for stream in self.streams.values():
            if stream.pending:
                self._learn(stream)  # report the state every reply so far has led to
        return [self._info(s) for s in self.streams.values()]

    def _op_set_policy(self, stream_id: str, policy: str, hyperparameters: dict[str, str]) -> dict:
        adapter = self._new_adapter(policy, hyperparameters)  # validated before the stream is touched
        if stream_id not in self.streams and len(self.streams) >= self.max_streams:
            raise EngineError("RESOURCE_EXHAUSTED", f"stream limit of {self.max_streams} reached")
        stream = self._stream(stream_id, load=False)  # its old state is replaced anyway
        stream.damaged = ""
        old_policy = stream.policy
        stream.policy, stream.hyperparameters = policy, dict(hyperparameters)
        stream.step, stream.feedback_labels, stream.feedback_correct = 0, 0, 0
        stream.weight_distance, stream.last_loss = 0.0, 0.0
        stream.dirty = True
        self._install(stream, adapter)
        self.metrics.reset(stream_id, old_policy, "policy_change")
        self.metrics.stream_started(stream_id, policy)
        self._enforce_memory_budget(keep=stream_id)
        return self._info(stream)

    def _op_reset(self, stream_id: str, reason: str = "request") -> dict:
        stream = self._stream(stream_id, create=False)
        if stream.adapter is not None:
            stream.adapter.reset()
        stream.pending, stream.step, stream.weight_distance, stream.last_loss = False, 0, 0.0, 0.0
        stream.marginal = drift.Marginal(self.model.num_classes)
        if stream.guard is not None:
            stream.guard.after_action()
            stream.good_state = None
        stream.dirty = True
        self.metrics.reset(stream_id, stream.policy, reason)
        return self._info(stream)

    def _op_delete(self, stream_id: str) -> dict:
        stream = self._stream(stream_id, create=False, load=False)
        info = self._info(stream)
        del self.streams[stream_id]
        self.store.delete_stream(stream_id)
        self._predictions = collections.OrderedDict(
            (k, v) for k, v in self._predictions.items() if v[0] != stream_id)
        self._update_stream_gauges()
        return info

    def _op_snapshot(self, stream_id: str, name: str) -> tuple[str, dict]:
        stream = self._stream(stream_id, create=False)
        if not name:
            taken = set(stream.snapshots)
            name = next(f"snap-{i}" for i in itertools.count(len(stream.snapshots) + 1) if f"snap-{i}" not in taken)
        check_snapshot_name(name)
        if stream.pending:
            self._learn(stream)
        self.store.save_snapshot(stream_id, name, self._record(stream))
        if name in stream.snapshots:
            stream.snapshots.remove(name)
        stream.snapshots.append(name)
        return name, self._info(stream)

    def _op_rollback(self, stream_id: str, name: str) -> dict:
        stream = self._stream(stream_id, create=False)
        if not stream.snapshots:
            raise EngineError("NOT_FOUND", f"stream {stream_id!r} has no snapshots; take one with Snapshot first")
        name = name or stream.snapshots[-1]
        if name not in stream.snapshots:
            raise EngineError("NOT_FOUND", f"stream {stream_id!r} has no snapshot {name!r}; it has: "
                                           f"{', '.join(stream.snapshots)}")
        try:
            record = self.store.load_snapshot(stream_id, name)
        except CorruptCheckpoint as e:
            raise EngineError("DATA_LOSS", f"snapshot {name!r} of stream {stream_id!r} is damaged: {e}") from None
        self._apply_record(stream, record)
        stream.dirty = True
        stream.marginal = drift.Marginal(self.model.num_classes)
        self.metrics.rollback(stream_id, stream.policy)
        self._enforce_memory_budget(keep=stream_id)
        return self._info(stream)

    def _op_feedback(self, request_id: str, labels: list[int]) -> dict:
        entry = self._predictions.pop(request_id, None)
        if entry is None:
            raise EngineError("NOT_FOUND", f"request id {request_id!r} is unknown, already has feedback, or is older "
                                           f"than the last {REMEMBERED_REQUESTS} requests")
        stream_id, policy, predicted = entry
        if len(labels) != len(predicted):
            self._predictions[request_id] = entry  # keep it: the caller can retry with the right labels
            raise EngineError("INVALID_ARGUMENT", f"request {request_id!r} had {len(predicted)} samples; "
                                                  f"send one label per sample, got {len(labels)}")
        bad = [v for v in labels if not 0 <= v < self.model.num_classes]
        if bad:
            self._predictions[request_id] = entry
            raise EngineError("INVALID_ARGUMENT", f"label {bad[0]} is not a class index in 0..{self.model.num_classes - 1}")
        correct = int((np.asarray(labels) == predicted).sum())
        stream = self.streams.get(stream_id)
        if stream is not None and stream.policy == policy:
            stream.feedback_labels += len(labels)
            stream.feedback_correct += correct
            stream.dirty = True
        self.metrics.feedback(stream_id, policy, correct, len(labels))
        accuracy = stream.feedback_correct / stream.feedback_labels if stream and stream.feedback_labels else 0.0
        return {"stream_id": stream_id, "policy": policy, "correct": correct, "total": len(labels),
                "stream_accuracy": accuracy}

    def _op_checkpoint_all(self) -> int:
        """At shutdown: every owed update applied, every stream saved (with a state dir)."""
        for stream in self.streams.values():
            if stream.resident and stream.pending:
                self._learn(stream)
        return self._checkpoint(changed_only=False, reason="shutdown") if self.persistent else 0

    def _checkpoint(self, changed_only: bool, reason: str) -> int:
        """Save streams (those changed since their last checkpoint, or all resident ones); a
        stream owed an update gets it first, so the checkpoint holds what every reply led to."""
        started, saved = time.monotonic(), 0
        for stream in self.streams.values():
            if stream.resident and (stream.dirty or not changed_only):
                if stream.pending:
                    self._learn(stream)
                self._save(stream, reason)
                saved += 1
            elif not stream.resident and stream.dirty:  # feedback counted while its state was on disk
                record = self.store.load_stream(stream.id)
                record["counters"] = stream.counters()
                self.store.save_stream(stream.id, record)
                stream.dirty = False
                saved += 1
        if saved:
            self.metrics.checkpoint_seconds.labels(self.model.name).observe(time.monotonic() - started)
        return saved

    def _save(self, stream: Stream, reason: str) -> None:
        self.store.save_stream(stream.id, self._record(stream))
        stream.dirty = False
        self.metrics.checkpoints.labels(self.model.name, reason).inc()


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
