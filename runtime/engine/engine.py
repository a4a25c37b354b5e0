"""The engine: per-stream adapters driven by one dedicated torch worker thread, and the typed
async API the serving layer calls.

Order of work (DESIGN.md principle 1, "predict first, adapt after"):
  * every batch and every control operation is a job on one FIFO queue served by one thread
    (engine/jobs.py), so a stream's jobs run in arrival order and a policy change, reset or
    rollback lands exactly between two batches;
  * a batch job predicts (engine/batches.py), hands the reply back to the event loop at once, and
    leaves the stream's update owed; owed updates run when the queue is idle, or right before
    that stream's next batch (so batch t+1 always sees the update from batch t), or before any
    control operation or checkpoint of the stream.
The gRPC event loop never runs torch code: it awaits futures the worker resolves.

Streams are created on first use with the model's default policy, up to a stream limit; idle
streams beyond the memory budget go to disk and come back on their next batch (engine/table.py).
"""
from __future__ import annotations

import functools
import itertools
import logging
import queue
import shutil
import tempfile
import time

import numpy as np
import torch

from runtime.checkpoints import REASONS, StateStore
from runtime.coordination.etcd import EtcdUnavailable
from runtime.coordination.fenced_store import FencedStore
from runtime.coordination.ownership import HandoffTimeout, NoLease, Ownership
from runtime.engine.batches import Batch, Batches, InferResult
from runtime.engine.control import Control
from runtime.engine.errors import EngineError, check_stream_id, shown
from runtime.engine.jobs import STOP, Job, Jobs, resolve_together
from runtime.engine.policies import Policies
from runtime.engine.table import StreamTable
from runtime.guard import GuardConfig
from runtime.metrics import Metrics
from runtime.model_config import LoadedModel

log = logging.getLogger("tta.engine")


class Engine:
    def __init__(self, model: LoadedModel, metrics: Metrics | None = None, state_dir: str | None = None,
                 max_streams: int = 1024, memory_budget_bytes: int = 2 << 30, max_queue: int = 256,
                 guard: GuardConfig | None = None, max_stream_queue: int = 64,
                 checkpoint_interval: float = 0.0, max_group: int = 64, max_queue_wait: float = 0.0,
                 stream_ttl: float = 0.0, state_key: bytes | None = None, ownership: Ownership | None = None,
                 handoff_timeout: float = 5.0, group_samples: int = 64, group_wait: float = 0.001):
        self.model = model
        # replicas: streams are held through etcd (runtime/coordination); None: this process owns all
        self.ownership, self.handoff_timeout = ownership, handoff_timeout
        self.metrics = metrics or Metrics(model.name, model.tracked_streams)
        self.max_streams, self.memory_budget = max_streams, memory_budget_bytes
        # dynamic batching: queued batches that can share one forward pass (frozen streams, and
        # source/bn/bn-alpha streams with per-stream statistics, adapters/batched.py) are predicted
        # together, up to `max_group` batches (1: off) and `group_samples` samples; a group may wait
        # up to `group_wait` seconds for more, but only while measured arrivals say one is due and
        # waiting has lately paid (GroupWait), so a lone client never waits
        self.max_group, self.group_samples = max_group, group_samples
        self.group_wait = GroupWait(group_wait)
        # periodic checkpoints of changed streams (with a state dir); 0 = only at eviction and shutdown
        self.checkpoint_interval = checkpoint_interval if state_dir else 0.0
        self._last_checkpoint = time.monotonic()
        # idle streams beyond this many seconds are forgotten (0: never): checked at start (streams
        # restored idle since their checkpoint), then every tenth of it
        self.stream_ttl = stream_ttl
        self._last_expiry = float("-inf")
        self.persistent = state_dir is not None
        self._tmp_dir = None if state_dir else tempfile.mkdtemp(prefix="tta-state-")
        # state_key: every state file is signed with it (HMAC) and verified; None: SHA-256 only
        rejected = self.metrics.state_files_rejected
        for reason in REASONS:  # every series exists from the start, at 0
            rejected.labels(model.name, reason)
        store = StateStore if ownership is None else functools.partial(FencedStore, ownership=ownership)
        self.store = store(state_dir or self._tmp_dir, key=state_key, model_fingerprint=model.fingerprint,
                           on_reject=lambda reason: rejected.labels(model.name, reason).inc())
        self.policies = Policies(model)
        for policy in self.policies.describe()[1]:  # from 0, so an alert on increase() sees the first pin
            self.metrics.guard_pins.labels(model.name, policy)
        self.table = StreamTable(model, self.policies, self.metrics, self.store, self.persistent, max_streams,
                                 memory_budget_bytes, guard or GuardConfig(), ownership)
        self.batches = Batches(model, self.table, self.metrics)
        self.batches.idle = lambda: not self.jobs.waiting()
        self.control = Control(model, self.table, self.policies, self.metrics)
        self.jobs = Jobs(max_queue, max_stream_queue, self.metrics, max_queue_wait)
        self._request_ids = itertools.count(1)
        self.metrics.memory_budget.labels(model.name).set(memory_budget_bytes)
        self.metrics.stream_limit.labels(model.name).set(max_streams)
        self.table.restore_saved()
        self.jobs.start(self._worker)

    # ------------------------------------------------------------------ typed async API (event loop)
    def enqueue_infer(self, stream_id: str | None, x: np.ndarray, request_id: str = "", start: bool = False,
                      end: bool = False, deadline: float | None = None) -> "asyncio.Future[InferResult]":  # noqa: F821
        """Queue one batch (float32 NCHW in [0, 1]) of a stream; the future resolves to its
        InferResult as soon as it is predicted (its update follows later). Batches of a stream
        are served in the order they were queued. `start`: reset the stream to the source state
        first; `end`: afterwards, checkpoint the stream and release its memory (Triton's
        sequence_start / sequence_end). `deadline` (time.monotonic()): past it, the batch is
        answered DEADLINE_EXCEEDED instead of being run."""
        batch = Batch(check_stream_id(stream_id), x, request_id or f"req-{next(self._request_ids)}",
                      time.monotonic(), start, end)
        return self.jobs.submit(lambda: self._predict(batch), batch.stream_id, batch, deadline)

    async def infer(self, stream_id: str | None, x: np.ndarray, request_id: str = "", start: bool = False,
                    end: bool = False, deadline: float | None = None) -> InferResult:
        return await self.enqueue_infer(stream_id, x, request_id, start, end, deadline)

    async def claim(self, stream_id: str | None, deadline: float | None = None) -> None:
        """With replicas: make sure this replica holds the stream before its work is queued,
        taking it over from its holder if need be (latency, not an error, within
        --handoff-timeout or the request's deadline). Without a coordinator: nothing to do."""
        if self.ownership is None:
            return
        stream_id = check_stream_id(stream_id)
        if self.ownership.holds(stream_id):
            return
        timeout = self.handoff_timeout
        if deadline is not None:
            timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        try:
            await self.jobs.once(stream_id, lambda: self.ownership.acquire(stream_id, timeout))
        except HandoffTimeout as e:
            raise EngineError("UNAVAILABLE", f"stream {shown(stream_id)} is held by replica {e.holder} ({e.advertise}), "
                                             f"which did not hand it over within {e.waited:.1f} s; retry",
                              metadata=(("tta-holder", f"{e.holder}@{e.advertise}"),)) from None
        except NoLease:
            raise EngineError("UNAVAILABLE", "this replica has no valid etcd lease now (etcd unreachable, or the "
                                             "lease was lost): it takes no stream until it has one; retry") from None
        except (EtcdUnavailable, OSError) as e:
            raise EngineError("UNAVAILABLE", f"the coordinator cannot be reached ({e}): this replica serves only the "
                                             f"streams it holds; retry later") from None

    async def hand_over(self, stream_id: str) -> dict:
        """ReleaseStream: give the stream to the replica asking for it (see StreamTable.hand_over)."""
        if self.ownership is None:
            raise EngineError("FAILED_PRECONDITION", "this server runs without --coordinator: there is no other "
                                                     "replica to hand a stream to")
        stream_id = check_stream_id(stream_id)

        def release():
            try:
                self.table.hand_over(stream_id)
            except (EtcdUnavailable, OSError) as e:
                raise EngineError("UNAVAILABLE", f"stream {shown(stream_id)} was not released: {e}") from None
            return {"model": self.model.name, "stream_id": stream_id, "holder": ""}
        return await self.jobs.submit(release, stream_id)

    async def _on_stream(self, stream_id: str, operation):
        """Run a control operation of one stream on the worker, in order with its batches."""
        stream_id = check_stream_id(stream_id)
        await self.claim(stream_id)
        return await self.jobs.submit(lambda: operation(stream_id), stream_id)

    async def set_policy(self, stream_id: str, policy: str, hyperparameters: dict[str, str]) -> dict:
        return await self._on_stream(stream_id, lambda s: self.control.set_policy(s, policy, hyperparameters))

    async def get_stream(self, stream_id: str) -> dict:
        return await self._on_stream(stream_id, self.control.get)

    async def list_streams(self) -> list[dict]:
        return await self.jobs.submit(self.control.list)

    async def reset_stream(self, stream_id: str) -> dict:
        return await self._on_stream(stream_id, self.control.reset)

    async def delete_stream(self, stream_id: str) -> dict:
        return await self._on_stream(stream_id, self.control.delete)

    async def snapshot(self, stream_id: str, name: str = "") -> tuple[str, dict]:
        return await self._on_stream(stream_id, lambda s: self.control.snapshot(s, name))

    async def rollback(self, stream_id: str, name: str = "") -> dict:
        return await self._on_stream(stream_id, lambda s: self.control.rollback(s, name))

    async def export_stream(self, stream_id: str, fmt: str) -> dict:
        """ExportStream: the stream as an ONNX graph or a safetensors state dict (engine/export.py)."""
        return await self._on_stream(stream_id, lambda s: self.control.export_stream(s, fmt))

    async def feedback(self, request_id: str, labels: list[int]) -> dict:
        if not request_id:
            raise EngineError("INVALID_ARGUMENT", "request_id is required (the id of the inference response)")
        return await self.jobs.submit(lambda: self.control.feedback(request_id, list(labels)))

    def describe_policies(self) -> tuple[list[dict], list[str]]:
        """(every policy with its wire hyperparameters, those this model supports); no stream involved."""
        return self.policies.describe()

    def check_policy(self, policy: str, hyperparameters: dict[str, str]) -> None:
        """Raise EngineError unless a stream could run this policy with these hyperparameters."""
        self.policies.build(policy, hyperparameters)

    @property
    def totals(self) -> dict:
        """Cumulative figures for ModelStatistics."""
        return self.batches.totals

    def stop_accepting(self) -> None:
        self.jobs.stop_accepting()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every accepted batch has been answered (or `timeout` passes)."""
        return await self.jobs.wait_idle(timeout)

    async def drain_and_checkpoint(self) -> tuple[int, list[str]]:
        """Finish queued work and owed updates, then (with a state dir) save every stream and stop
        the worker. Returns (streams saved, ids of the streams that could not be saved)."""
        result = await self.jobs.finish(self.control.checkpoint_all)
        if self.ownership is not None:  # scale-in: every stream free for the other replicas at once
            self.ownership.close()
        return result

    @property
    def durable(self) -> bool:
        """The last write to the state dir succeeded."""
        return self.table.durable

    def close(self) -> None:
        """Stop the worker (without checkpointing) and remove a temporary state dir."""
        self.jobs.stop()
        if self._tmp_dir:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)

    # ------------------------------------------------------------------ worker thread
    def _worker(self) -> None:
        torch.set_grad_enabled(True)
        while True:
            self._maybe_checkpoint()
            self._maybe_expire()
            try:  # wake up for the next periodic checkpoint or expiry even when no request comes
                job = self.jobs.take(wait=False, timeout=None)
            except queue.Empty:  # nothing queued: wait for a job unless an owed update can be applied now
                job = None
            try:
                if job is None:
                    job = self.jobs.take(wait=not self.table.any_owed(), timeout=self._tick())
            except queue.Empty:
                try:
                    self.table.learn_one_owed()  # nothing waiting: apply an owed update now
                except Exception:  # noqa: BLE001 - a failing update must not stop the engine
                    log.exception("adaptation update failed")
                continue
            if job is STOP:
                return
            started = time.monotonic()
            group = self._gather_group(job) if job.batch is not None and self.max_group > 1 else None
            if group is None:
                self._run(job)
            else:
                answers = self.batches.predict_group([j.batch for j in group])
                if answers is None:
                    for j in group:
                        self._run(j)
                else:
                    resolve_together([(j, result, None if error is None else _internal(error))
                                      for j, (result, error) in zip(group, answers)])
            if job.batch is not None:
                self.jobs.ran((time.monotonic() - started) / (len(group) if group else 1))
            else:  # a control operation may have changed any stream: the memory budget counts them all again
                self.table.recount_soon()

    def _predict(self, batch: Batch) -> InferResult:
        if batch.end:  # after this reply (and this batch's update): to disk, out of memory
            self.jobs.later(lambda: self.table.release(batch.stream_id), batch.stream_id)
        return self.batches.predict(batch)

    @staticmethod
    def _run(job: Job) -> None:
        try:
            result, error = job.fn(), None
        except EngineError as e:
            result, error = None, e
        except Exception as e:  # noqa: BLE001 - a bug must fail one request, not the engine
            log.exception("engine job failed")
            result, error = None, _internal(e)
        job.resolve(result, error)

    def _gather_group(self, first: Job) -> list[Job] | None:
        """`first` and the queued batches that can share its forward pass (same key; consecutive
        batches of one frozen stream too), taken in queue order and only while they match, so no
        stream's batches or control operations are reordered. None when there is nothing to group."""
        key = self.batches.group_key(first.batch)
        if key is None:
            return None
        group, streams, samples = [first], {first.batch.stream_id}, len(first.batch.x)
        frozen = key[0] == "frozen"  # no state: a stream's next batch may join its previous one

        def joins(job: Job) -> bool:
            return (job.batch is not None and (frozen or job.batch.stream_id not in streams)
                    and samples + len(job.batch.x) <= self.group_samples and self.batches.group_key(job.batch) == key)

        until, joined_while_waiting = None, 0
        while len(group) < self.max_group and samples < self.group_samples:
            job = self.jobs.take_next_if(joins)
            if job is None and until is None and self.group_wait.worth_it(self.jobs.arrival_gap):
                until = time.monotonic() + self.group_wait.seconds
            if job is None and until is not None:
                job = self.jobs.take_next_if(joins, wait_until=until)
                joined_while_waiting += job is not None
            if job is None:
                break
            group.append(job)
            streams.add(job.batch.stream_id)
            samples += len(job.batch.x)
        if until is not None:
            self.group_wait.waited(joined_while_waiting)
        return group if len(group) > 1 else None

    def _tick(self) -> float | None:
        ticks = [t for t in (self.checkpoint_interval, self.stream_ttl / 10) if t]
        return min(ticks) if ticks else None

    def _maybe_expire(self) -> None:
        if self.stream_ttl and time.monotonic() - self._last_expiry >= self.stream_ttl / 10:
            self._last_expiry = time.monotonic()
            self.table.expire_idle(self.stream_ttl, self.jobs.has_queued)

    def _maybe_checkpoint(self) -> None:
        if self.checkpoint_interval and time.monotonic() - self._last_checkpoint >= self.checkpoint_interval:
            try:  # streams that could not be saved are logged and counted there, and saved next time
                self.table.checkpoint(changed_only=True, reason="periodic")
            except Exception:  # noqa: BLE001 - a bug in a checkpoint must not stop serving
                log.exception("periodic checkpoint failed")
                self.metrics.checkpoint_failures.labels(self.model.name).inc()
            self._last_checkpoint = time.monotonic()


class GroupWait:
    """Whether a group should wait for more batches: only when the measured time between
    arrivals is within the wait, and waiting has lately brought batches (a moving average of
    batches joined per wait; when it says no, one wait in PROBE_EVERY still tries, so a change
    in the load is noticed)."""
    PROBE_EVERY = 32

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.gain = 1.0  # batches that joined per wait, moving average
        self._declined = 0

    def worth_it(self, arrival_gap: float) -> bool:
        if self.seconds <= 0 or arrival_gap > self.seconds:
            return False
        if self.gain >= 0.5:
            return True
        self._declined += 1
        return self._declined % self.PROBE_EVERY == 0

    def waited(self, joined: int) -> None:
        self.gain = 0.8 * self.gain + 0.2 * joined


def _internal(error: Exception) -> EngineError:
    if isinstance(error, EngineError):
        return error
    why = error.strerror if isinstance(error, OSError) and error.strerror else error  # no server paths
    return EngineError("INTERNAL", f"{type(error).__name__}: {why} (the server log has the details)")
