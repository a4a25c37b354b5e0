"""The control operations, typed: each runs on the worker between two batches, applies the
stream's owed update first where it reports or saves state, and answers a stream's info dict."""
from __future__ import annotations

import itertools

import numpy as np

from runtime.checkpoints import CorruptCheckpoint
from runtime.engine import export
from runtime.engine.errors import EngineError, check_snapshot_name, shown, storage_error
from runtime.engine.policies import Policies
from runtime.engine.table import REMEMBERED_REQUESTS, StreamTable
from runtime.metrics import Metrics
from runtime.model_config import LoadedModel


class Control:
    def __init__(self, model: LoadedModel, table: StreamTable, policies: Policies, metrics: Metrics):
        self.model, self.table, self.policies, self.metrics = model, table, policies, metrics

    def _info(self, stream) -> dict:
        info = stream.info(self.model.name)
        ownership = self.table.ownership
        info["holder"] = ownership.replica_id if ownership is not None else ""
        return info

    def get(self, stream_id: str) -> dict:
        stream = self.table.peek(stream_id)
        if stream is None:
            raise EngineError("NOT_FOUND", f"stream {shown(stream_id)} does not exist")
        self.table.learn_owed(stream)
        return self._info(stream)

    def list(self) -> list[dict]:
        streams = list(self.table.streams.values())
        if self.table.ownership is not None:  # replicas: copies not held here now are nobody's to report
            streams = [s for s in streams if self.table.ownership.holds(s.id)]
        for stream in streams:
            self.table.learn_owed(stream)  # report the state every reply so far has led to
        return [self._info(s) for s in streams]

    def set_policy(self, stream_id: str, policy: str, hyperparameters: dict[str, str]) -> dict:
        adapter = self.policies.build(policy, hyperparameters)  # validated before the stream is touched
        return self._info(self.table.replace_policy(stream_id, policy, hyperparameters, adapter))

    def reset(self, stream_id: str) -> dict:
        stream = self.table.get(stream_id, create=False)
        if stream.pinned_from is not None:  # unpin: the policy the guard took away, from the source state
            policy, hyperparameters = stream.pinned_from
            return self._info(self.table.replace_policy(stream_id, policy, hyperparameters,
                                                        self.policies.build(policy, hyperparameters)))
        stream.reset(self.metrics, "request", self.model.num_classes)
        return self._info(stream)

    def delete(self, stream_id: str) -> dict:
        stream = self.table.get(stream_id, create=False, load=False)
        info = self._info(stream)
        self.table.delete(stream)
        return info

    def snapshot(self, stream_id: str, name: str) -> tuple[str, dict]:
        check_snapshot_name(name)
        stream = self.table.get(stream_id, create=False)
        if not name:
            taken = set(stream.snapshots)
            name = next(f"snap-{i}" for i in itertools.count(len(stream.snapshots) + 1) if f"snap-{i}" not in taken)
        self.table.save_snapshot(stream, name)
        return name, self._info(stream)

    def rollback(self, stream_id: str, name: str) -> dict:
        check_snapshot_name(name)
        stream = self.table.get(stream_id, create=False)
        if not stream.snapshots:
            raise EngineError("NOT_FOUND", f"stream {shown(stream_id)} has no snapshots; take one with Snapshot first")
        name = name or stream.snapshots[-1]
        if name not in stream.snapshots:
            raise EngineError("NOT_FOUND", f"stream {shown(stream_id)} has no snapshot {shown(name)}; it has: "
                                           f"{', '.join(stream.snapshots)}")
        try:
            record = self.table.store.load_snapshot(stream_id, name)
        except CorruptCheckpoint as e:
            raise EngineError("DATA_LOSS", f"snapshot {shown(name)} of stream {shown(stream_id)} is damaged or was "
                                            f"refused: {e}") from None
        except OSError as e:  # gone or unreadable: the cause, never the server's path
            raise storage_error(e, f"snapshot {shown(name)} of stream {shown(stream_id)} could not be read") from None
        self.table.roll_back(stream, record)
        return self._info(stream)

    def export_stream(self, stream_id: str, fmt: str) -> dict:
        """The stream exported (engine/export.py), after its owed update; its state is only read."""
        export.check_format(fmt)  # before the stream is touched
        stream = self.table.get(stream_id, create=False)
        self.table.learn_owed(stream)
        return export.export_stream(stream, self.model, self.policies, fmt)

    def feedback(self, request_id: str, labels: list[int]) -> dict:
        predictions = self.table.predictions
        entry = predictions.pop(request_id, None)
        if entry is None:
            raise EngineError("NOT_FOUND", f"request id {shown(request_id)} is unknown, already has feedback, or is older "
                                           f"than the last {REMEMBERED_REQUESTS} requests")
        stream_id, policy, predicted = entry
        if len(labels) != len(predicted):
            predictions[request_id] = entry  # keep it: the caller can retry with the right labels
            raise EngineError("INVALID_ARGUMENT", f"request {shown(request_id)} had {len(predicted)} samples; "
                                                  f"send one label per sample, got {len(labels)}")
        bad = [v for v in labels if not 0 <= v < self.model.num_classes]
        if bad:
            predictions[request_id] = entry
            raise EngineError("INVALID_ARGUMENT", f"label {bad[0]} is not a class index in "
                                                  f"0..{self.model.num_classes - 1}")
        correct = int((np.asarray(labels) == predicted).sum())
        stream = self.table.peek(stream_id)
        if stream is not None and stream.policy == policy:
            stream.record_feedback(correct, len(labels))
        self.metrics.feedback(stream_id, policy, correct, len(labels))
        accuracy = stream.feedback_correct / stream.feedback_labels if stream and stream.feedback_labels else 0.0
        return {"stream_id": stream_id, "policy": policy, "correct": correct, "total": len(labels),
                "stream_accuracy": accuracy}

    def checkpoint_all(self) -> tuple[int, list[str]]:
        """At shutdown: every owed update applied, every stream saved (with a state dir); returns
        (streams saved, ids of those that could not be)."""
        for stream in self.table.streams.values():
            if stream.resident:
                self.table.learn_owed(stream)
        return self.table.checkpoint(changed_only=False, reason="shutdown") if self.table.persistent else (0, [])
