"""The stream table: every stream the server knows, resident or evicted to the state dir. It
creates streams (up to the stream limit), keeps them in LRU order within the memory budget,
evicts idle ones to disk and loads them back, restores saved streams at start, writes
checkpoints, and remembers recent predictions for feedback.
"""
from __future__ import annotations

import collections
import logging
import time

import numpy as np

from runtime.checkpoints import CorruptCheckpoint, StateStore
from runtime.coordination.ownership import NotHeld, Ownership, Unheld
from runtime.engine.errors import EngineError, shown, storage_error
from runtime.engine.holding import Holding
from runtime.engine.policies import Policies
from runtime.engine.stream import Stream
from runtime.guard import GuardConfig
from runtime.metrics import Metrics
from runtime.model_config import LoadedModel

log = logging.getLogger("tta.engine")

REMEMBERED_REQUESTS = 65536  # predictions kept for feedback
RECOUNT_EVERY = 1.0  # seconds between full counts of what resident streams hold, whatever happened
GAUGES_EVERY = 0.5  # seconds between updates of the stream-count gauges on the batch path


class StreamTable:
    def __init__(self, model: LoadedModel, policies: Policies, metrics: Metrics, store: StateStore,
                 persistent: bool, max_streams: int, memory_budget: int, guard: GuardConfig,
                 ownership: Ownership | None = None):
        self.model, self.policies, self.metrics, self.store = model, policies, metrics, store
        # with replicas (runtime/coordination): a stream is served only while this replica holds it,
        # and a copy is used only if it continues the checkpoint committed when it was taken
        self.ownership = ownership
        self.holding = Holding(ownership) if ownership is not None else None
        self.persistent, self.max_streams, self.memory_budget = persistent, max_streams, memory_budget
        self.guard = guard
        self.streams: collections.OrderedDict[str, Stream] = collections.OrderedDict()  # LRU order
        self.durable = True  # the last write to the state dir succeeded (tta_state_durable, health "tta.state")
        self.metrics.durable.labels(model.name).set(1)
        # request id -> (stream id, policy, predicted classes), for feedback
        self.predictions: collections.OrderedDict[str, tuple[str, str, np.ndarray]] = collections.OrderedDict()
        # what resident streams hold, kept between full counts: a batch changes only its own
        # stream's figure, so the memory budget is checked without walking every stream per batch
        self._held: dict[str, int] = {}
        self._used = 0
        self._counted_at = -float("inf")
        self._gauges_at = -float("inf")

    # ------------------------------------------------------------------ finding and creating
    def restore_saved(self) -> None:
        """At start: every stream saved in the state dir is known (evicted) until its next request."""
        if not self.persistent:
            return
        for stream_id in self.store.saved_streams():
            stream = self._saved_stream(stream_id)
            if stream is not None:
                self.streams[stream_id] = stream
        if self.streams:
            log.info("found saved state of %d streams in %s", len(self.streams), self.store.root)
        self.update_gauges()

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
                          # the client hears no server path: CorruptCheckpoint names the file relative to the state dir
                          damaged=str(e) if isinstance(e, CorruptCheckpoint) else getattr(e, "strerror", None) or
                          type(e).__name__)
        stream = Stream(id=stream_id, policy=record["policy"], hyperparameters=record["hyperparameters"],
                        resident=False, saved_step=int(record.get("step", 0)))
        stream.restore_counters(record)
        stream.snapshots = self.store.snapshots(stream_id)
        try:  # idle since its checkpoint was written, so --stream-ttl counts across restarts
            idle = max(0.0, time.time() - self.store.stream_path(stream_id).stat().st_mtime)
            stream.last_used = time.monotonic() - idle
        except OSError:
            pass
        return stream

    def get(self, stream_id: str, create: bool = True, load: bool = True) -> Stream:
        """The stream, resident in memory (loaded back from disk if evicted, unless `load` is false:
        for operations that replace or drop its state); LRU-touched."""
        if self.ownership is not None:
            self._check_held(stream_id)
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
                raise EngineError("NOT_FOUND", f"stream {shown(stream_id)} does not exist (streams are created by their "
                                               f"first inference request or SetPolicy)")
            self._check_room(stream_id)
            stream = Stream(id=stream_id, policy=self.model.default_policy,
                            hyperparameters=dict(self.model.default_hyperparameters))
            stream.install(self.policies.build(stream.policy, stream.hyperparameters), self.model.num_classes,
                           self.guard)
            self.streams[stream_id] = stream
            self.metrics.stream_started(stream_id, stream.policy)
        elif not stream.resident and load:
            if stream.damaged:
                raise self._data_loss(stream)
            self._load_back(stream)
        self.streams.move_to_end(stream_id)
        stream.touch()
        return stream

    def _check_held(self, stream_id: str) -> None:
        """With replicas: UNAVAILABLE unless this replica holds the stream now; a copy here that
        does not continue the committed checkpoint (another replica committed since) is dropped,
        and the committed state is loaded instead."""
        stream = self.streams.get(stream_id)
        if self.holding.stale(stream_id, stream is not None):
            self._drop(stream)
    def _drop(self, stream: Stream) -> None:
        """Forget the copy here without saving it (it is not this replica's to save)."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        stream.evicted()
        self.holding.forget(stream.id)
        self.recount_soon()

    def drop_unheld(self, stream: Stream) -> None:
        log.error("stream %r: this replica no longer holds it, so its state since checkpoint %d was not kept here "
                  "(fencing); dropped from memory", stream.id, self.holding.base(stream.id))
        self._drop(stream)
        self.update_gauges()

    def _check_room(self, stream_id: str) -> None:
        if stream_id not in self.streams and len(self.streams) >= self.max_streams:
            raise EngineError("RESOURCE_EXHAUSTED", f"stream limit of {self.max_streams} reached; reuse a stream "
                                                    f"id, delete idle streams (tta ctl delete) or raise --max-streams")

    def peek(self, stream_id: str) -> Stream | None:
        """The stream if known, without loading or touching it."""
        return self.streams.get(stream_id)

    # ------------------------------------------------------------------ replacing and dropping
    def replace_policy(self, stream_id: str, policy: str, hyperparameters: dict[str, str], adapter) -> Stream:
        """Give the stream (created if new) a new policy with its freshly built adapter."""
        self._check_room(stream_id)
        stream = self.get(stream_id, load=False)  # its old state is replaced anyway
        old_policy = stream.policy
        stream.restart(policy, hyperparameters)
        stream.install(adapter, self.model.num_classes, self.guard)
        self.metrics.reset(stream_id, old_policy, "policy_change")
        self.metrics.stream_started(stream_id, policy)
        self.enforce_memory_budget(keep=stream_id)
        return stream

    def apply_record(self, stream: Stream, record: dict) -> None:
        """Load a checkpoint or snapshot record into the stream."""
        adapter = self.policies.build(record["policy"], record["hyperparameters"])
        if adapter is not None and record.get("adapter") is not None:
            adapter.load_state_dict(record["adapter"])
        stream.policy, stream.hyperparameters = record["policy"], dict(record["hyperparameters"])
        stream.install(adapter, self.model.num_classes, self.guard)

    def roll_back(self, stream: Stream, record: dict) -> None:
        """Back to a snapshot's record; the class marginal starts afresh."""
        self.apply_record(stream, record)
        stream.rolled_back(self.model.num_classes)
        self.metrics.rollback(stream.id, stream.policy)
        self.enforce_memory_budget(keep=stream.id)

    def delete(self, stream: Stream) -> None:
        """Forget the stream: memory, disk, snapshots, its predictions awaiting feedback. If its
        files cannot be removed, nothing is forgotten and the error says so (it would come back)."""
        try:
            self._write(lambda: self.store.delete_stream(stream.id))
        except (NotHeld, Unheld):
            self._drop(stream)
            raise EngineError("UNAVAILABLE", f"stream {shown(stream.id)} was not deleted: this replica no longer "
                                             f"holds it; retry") from None
        except OSError as e:
            raise storage_error(e, f"stream {shown(stream.id)} was not deleted") from None
        del self.streams[stream.id]
        if self.holding is not None:
            self.holding.forget(stream.id)
        self.predictions = collections.OrderedDict((k, v) for k, v in self.predictions.items() if v[0] != stream.id)
        self.update_gauges()

    def expire_idle(self, ttl: float, busy) -> list[str]:
        """Forget (as DeleteStream does) the streams idle for more than `ttl` seconds that have no
        job queued (`busy(stream_id)`); their ids."""
        now, expired = time.monotonic(), []
        for stream in list(self.streams.values()):
            if now - stream.last_used > ttl and not busy(stream.id):
                try:
                    self.delete(stream)
                except EngineError as e:
                    log.warning("idle stream %r could not expire: %s", stream.id, e.message)
                    continue
                expired.append(stream.id)
        if expired:
            self.metrics.expired.labels(self.model.name).inc(len(expired))
            log.info("%d streams idle for more than %g s expired: %s", len(expired), ttl,
                     ", ".join(repr(s) for s in expired[:10]) + (" ..." if len(expired) > 10 else ""))
        return expired

    def release(self, stream_id: str) -> None:
        """To disk and out of memory (Triton's sequence_end); kept in memory if it cannot be saved."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.resident:
            self._evict(stream)
            self.update_gauges()

    def hand_over(self, stream_id: str) -> None:
        """With replicas: give the stream to the replica asking for it - its owed update applied,
        a checkpoint committed, out of memory, its key released. Not held here: nothing to do."""
        stream = self.streams.get(stream_id)
        if not self.ownership.holds(stream_id):
            if stream is not None and stream_id not in self.ownership.held():
                self._drop(stream)  # a copy this replica no longer holds is never served again
            return
        if stream is not None and stream.resident:
            self.learn_owed(stream)
            try:
                if not self._save(stream, "handoff"):
                    return  # fenced off: not ours to hand over
            except OSError as e:
                raise storage_error(e, f"stream {shown(stream_id)} was not handed over: its state could not be "
                                       f"saved") from None
        if stream is not None:
            self._drop(stream)
        self.ownership.release(stream_id, handed_over=True)
        self.update_gauges()

    # ------------------------------------------------------------------ memory and disk
    def _load_back(self, stream: Stream) -> None:
        try:
            record = self.store.load_stream(stream.id)
        except CorruptCheckpoint as e:
            stream.damaged = str(e)
            raise self._data_loss(stream) from None
        except OSError as e:
            raise storage_error(e, f"stream {shown(stream.id)} could not be loaded back") from None
        self.apply_record(stream, record)
        self.metrics.restores.labels(self.model.name, "disk").inc()
        self.update_gauges()

    @staticmethod
    def _data_loss(stream: Stream) -> EngineError:
        return EngineError("DATA_LOSS", f"the saved state of stream {shown(stream.id)} is damaged or was refused "
                                        f"and has no intact previous checkpoint ({stream.damaged}); the file was set aside. Delete "
                                        f"the stream (tta ctl delete) or set its policy to start it over from the "
                                        f"source model")

    def _evict(self, stream: Stream) -> bool:
        """Save the stream and drop it from memory; False (and it stays) if it cannot be saved."""
        self.learn_owed(stream)
        try:
            self._save(stream, "eviction")
        except OSError as e:
            log.warning("stream %r stays in memory: it cannot be saved (%s)", stream.id, e.strerror or e)
            return False
        stream.evicted()
        self.metrics.evictions.labels(self.model.name).inc()
        return True

    def resident_bytes(self) -> int:
        """What the resident streams hold now: state, guard copies and owed updates' activations
        (a full count, which the budget check then keeps up to date stream by stream)."""
        self._held = {s.id: s.held_bytes for s in self.streams.values() if s.resident}
        self._used, self._counted_at = sum(self._held.values()), time.monotonic()
        return self._used

    def recount_soon(self) -> None:
        """Streams other than a batch's own may have changed (a control operation, an owed update
        applied, a checkpoint, an expiry): the next budget check counts every stream again."""
        self._counted_at = -float("inf")

    def _used_after(self, stream_id: str) -> int:
        """Bytes held by resident streams, given that only `stream_id` changed since the last count
        (a full count at least every RECOUNT_EVERY seconds, whatever else happened)."""
        if time.monotonic() - self._counted_at > RECOUNT_EVERY:
            return self.resident_bytes()
        stream = self.streams.get(stream_id)
        held = stream.held_bytes if stream is not None and stream.resident else 0
        self._used += held - self._held.get(stream_id, 0)
        self._held[stream_id] = held
        return self._used

    def enforce_memory_budget(self, keep: str) -> None:
        """Bring what the resident streams hold within the budget: first apply owed updates
        (least recently used first; each frees its batch's activations, and a stream's next batch
        would apply it first anyway, so no stream's batches change order), then evict the least
        recently used streams to disk (never `keep`, the stream being served, the only one that
        changed since the last check)."""
        used = self._used_after(keep)
        if used <= self.memory_budget:
            self._update_gauges_now_and_then(used)
            return
        for stream in list(self.streams.values()):  # least recently used first
            if used <= self.memory_budget:
                break
            if stream.resident and stream.pending:
                held = stream.held_bytes
                self.learn_owed(stream)
                used -= held - stream.held_bytes
        for stream in list(self.streams.values()):  # least recently used first
            if used <= self.memory_budget:
                break
            if stream.id == keep or not stream.resident or stream.held_bytes == 0:
                continue
            held = stream.held_bytes
            self._evict(stream)  # its owed update is applied first, even if it cannot be saved and stays
            used -= held - stream.held_bytes
        self.update_gauges()

    def _update_gauges_now_and_then(self, used: int) -> None:
        self.metrics.state_bytes.labels(self.model.name).set(used)
        if time.monotonic() - self._gauges_at > GAUGES_EVERY:
            self.update_gauges(used)

    def update_gauges(self, resident_bytes: int | None = None) -> None:
        self._gauges_at = time.monotonic()
        resident = sum(1 for s in self.streams.values() if s.resident)
        self.metrics.streams.labels(self.model.name, "resident").set(resident)
        self.metrics.streams.labels(self.model.name, "evicted").set(len(self.streams) - resident)
        self.metrics.state_bytes.labels(self.model.name).set(
            self.resident_bytes() if resident_bytes is None else resident_bytes)

    # ------------------------------------------------------------------ owed updates
    def learn_owed(self, stream: Stream) -> None:
        if stream.pending:
            stream.learn(self.metrics)

    def learn_one_owed(self) -> bool:
        """Apply one owed update (the least recently used stream's); False when none is owed."""
        self.recount_soon()
        for stream in self.streams.values():
            if stream.pending:
                stream.learn(self.metrics)
                return True
        return False

    def any_owed(self) -> bool:
        return any(s.pending for s in self.streams.values())

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, changed_only: bool, reason: str) -> tuple[int, list[str]]:
        """Save streams (those changed since their last checkpoint, or all resident ones); a
        stream owed an update gets it first, so the checkpoint holds what every reply led to.
        Returns (streams saved, ids of the streams that could not be saved): one failing write
        does not stop the others."""
        started, saved, failed = time.monotonic(), 0, []
        self.recount_soon()
        for stream in list(self.streams.values()):
            try:
                if stream.resident and (stream.dirty or not changed_only):
                    self.learn_owed(stream)
                    if not self._save(stream, reason):
                        continue
                elif not stream.resident and stream.dirty:  # feedback counted while its state was on disk
                    record = self.store.load_stream(stream.id)
                    record["counters"] = stream.counters()
                    self._write(lambda: self.store.save_stream(stream.id, record))
                    stream.dirty = False
                else:
                    continue
                saved += 1
            except NotHeld:
                self.drop_unheld(stream)
            except Unheld:
                pass
            except (OSError, CorruptCheckpoint) as e:
                failed.append(stream.id)
                log.error("stream %r was not checkpointed: %s", stream.id, getattr(e, "strerror", None) or e)
        if saved:
            self.metrics.checkpoint_seconds.labels(self.model.name).observe(time.monotonic() - started)
        if failed:
            self.metrics.checkpoint_failures.labels(self.model.name).inc()
        return saved, failed

    def _write(self, write) -> None:
        """Run a write to the state dir, keeping `durable` (and its gauge) up to date."""
        try:
            write()
        except OSError as e:
            self._wrote(e)
            raise
        self._wrote(None)

    def _wrote(self, error: OSError | None) -> None:
        durable = error is None
        if durable != self.durable:
            self.durable = durable
            self.metrics.durable.labels(self.model.name).set(int(durable))
            if durable:
                log.info("the state directory takes writes again")
            else:
                log.error("the state directory cannot be written (%s): adapted state is kept in memory only "
                          "until it can", error.strerror or error)

    def _save(self, stream: Stream, reason: str) -> bool:
        """Checkpoint the stream; False when the commit was fenced off (the stream is then dropped)."""
        try:
            self._write(lambda: self.store.save_stream(stream.id, stream.record()))
        except NotHeld:
            self.drop_unheld(stream)
            return False
        except Unheld:  # kept (taking the stream again checks it continues the committed state) unless memory is short
            if reason == "eviction":
                self._drop(stream)
            return False
        stream.dirty = False
        if self.holding is not None:
            self.holding.saved(stream.id)
        self.metrics.checkpoints.labels(self.model.name, reason).inc()
        return True

    def save_snapshot(self, stream: Stream, name: str) -> None:
        self.learn_owed(stream)
        try:
            self._write(lambda: self.store.save_snapshot(stream.id, name, stream.record()))
        except OSError as e:
            raise storage_error(e, f"snapshot {shown(name)} of stream {shown(stream.id)} was not saved") from None
        if name in stream.snapshots:
            stream.snapshots.remove(name)
        stream.snapshots.append(name)

    # ------------------------------------------------------------------ predictions for feedback
    def remember(self, request_id: str, stream: Stream, predicted: np.ndarray) -> None:
        self.predictions[request_id] = (stream.id, stream.policy, predicted.astype(np.int32))
        self.predictions.move_to_end(request_id)
        while len(self.predictions) > REMEMBERED_REQUESTS:
            self.predictions.popitem(last=False)
