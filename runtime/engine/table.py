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
from runtime.engine.errors import EngineError
from runtime.engine.policies import Policies
from runtime.engine.stream import Stream
from runtime.guard import GuardConfig
from runtime.metrics import Metrics
from runtime.model_config import LoadedModel

log = logging.getLogger("tta.engine")

REMEMBERED_REQUESTS = 65536  # predictions kept for feedback


class StreamTable:
    def __init__(self, model: LoadedModel, policies: Policies, metrics: Metrics, store: StateStore,
                 persistent: bool, max_streams: int, memory_budget: int, guard: GuardConfig):
        self.model, self.policies, self.metrics, self.store = model, policies, metrics, store
        self.persistent, self.max_streams, self.memory_budget = persistent, max_streams, memory_budget
        self.guard = guard
        self.streams: collections.OrderedDict[str, Stream] = collections.OrderedDict()  # LRU order
        # request id -> (stream id, policy, predicted classes), for feedback
        self.predictions: collections.OrderedDict[str, tuple[str, str, np.ndarray]] = collections.OrderedDict()

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
                          damaged=str(e))
        stream = Stream(id=stream_id, policy=record["policy"], hyperparameters=record["hyperparameters"],
                        resident=False, saved_step=int(record.get("step", 0)))
        stream.restore_counters(record)
        stream.snapshots = self.store.snapshots(stream_id)
        return stream

    def get(self, stream_id: str, create: bool = True, load: bool = True) -> Stream:
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
        """Forget the stream: memory, disk, snapshots, its predictions awaiting feedback."""
        del self.streams[stream.id]
        self.store.delete_stream(stream.id)
        self.predictions = collections.OrderedDict((k, v) for k, v in self.predictions.items() if v[0] != stream.id)
        self.update_gauges()

    def release(self, stream_id: str) -> None:
        """To disk and out of memory (Triton's sequence_end)."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.resident:
            self._evict(stream)
            self.update_gauges()

    # ------------------------------------------------------------------ memory and disk
    def _load_back(self, stream: Stream) -> None:
        try:
            record = self.store.load_stream(stream.id)
        except CorruptCheckpoint as e:
            stream.damaged = str(e)
            raise self._data_loss(stream) from None
        self.apply_record(stream, record)
        self.metrics.restores.labels(self.model.name, "disk").inc()
        self.update_gauges()

    @staticmethod
    def _data_loss(stream: Stream) -> EngineError:
        return EngineError("DATA_LOSS", f"the saved state of stream {stream.id!r} is damaged and has no intact "
                                        f"previous checkpoint ({stream.damaged}); the file was set aside. Delete "
                                        f"the stream (tta ctl delete) or set its policy to start it over from the "
                                        f"source model")

    def _evict(self, stream: Stream) -> None:
        self.learn_owed(stream)
        self._save(stream, "eviction")
        stream.evicted()
        self.metrics.evictions.labels(self.model.name).inc()

    def enforce_memory_budget(self, keep: str) -> None:
        used = sum(s.state_bytes for s in self.streams.values() if s.resident)
        for stream in list(self.streams.values()):  # least recently used first
            if used <= self.memory_budget:
                break
            if stream.id == keep or not stream.resident or stream.state_bytes == 0:
                continue
            used -= stream.state_bytes
            self._evict(stream)
        self.update_gauges()

    def update_gauges(self) -> None:
        resident = sum(1 for s in self.streams.values() if s.resident)
        self.metrics.streams.labels(self.model.name, "resident").set(resident)
        self.metrics.streams.labels(self.model.name, "evicted").set(len(self.streams) - resident)
        self.metrics.state_bytes.labels(self.model.name).set(
            sum(s.state_bytes for s in self.streams.values() if s.resident))

    # ------------------------------------------------------------------ owed updates
    def learn_owed(self, stream: Stream) -> None:
        if stream.pending:
            stream.learn(self.metrics)

    def learn_one_owed(self) -> bool:
        """Apply one owed update (the least recently used stream's); False when none is owed."""
        for stream in self.streams.values():
            if stream.pending:
                stream.learn(self.metrics)
                return True
        return False

    def any_owed(self) -> bool:
        return any(s.pending for s in self.streams.values())

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, changed_only: bool, reason: str) -> int:
        """Save streams (those changed since their last checkpoint, or all resident ones); a
        stream owed an update gets it first, so the checkpoint holds what every reply led to."""
        started, saved = time.monotonic(), 0
        for stream in self.streams.values():
            if stream.resident and (stream.dirty or not changed_only):
                self.learn_owed(stream)
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
        self.store.save_stream(stream.id, stream.record())
        stream.dirty = False
        self.metrics.checkpoints.labels(self.model.name, reason).inc()

    def save_snapshot(self, stream: Stream, name: str) -> None:
        self.learn_owed(stream)
        self.store.save_snapshot(stream.id, name, stream.record())
        if name in stream.snapshots:
            stream.snapshots.remove(name)
        stream.snapshots.append(name)

    # ------------------------------------------------------------------ predictions for feedback
    def remember(self, request_id: str, stream: Stream, predicted: np.ndarray) -> None:
        self.predictions[request_id] = (stream.id, stream.policy, predicted.astype(np.int32))
        self.predictions.move_to_end(request_id)
        while len(self.predictions) > REMEMBERED_REQUESTS:
            self.predictions.popitem(last=False)
