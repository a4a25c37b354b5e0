"""One stream: its adapter, its drift and adaptation figures, its guard, and its own operations
(apply the owed update, count a prediction, reset, describe itself, become a checkpoint record).

Only the stream table (engine/table.py) and the code it calls here assign a stream's fields.
The owed update and the step count belong to the adapter (`adapter.pending`, `adapter.steps`);
a stream keeps the step of its saved state only while it is evicted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from runtime import drift
from runtime.guard import GuardConfig, Guarded, Outcome, is_guarded
from runtime.metrics import OTHER, Metrics


@dataclass
class Stream:
    id: str
    policy: str
    hyperparameters: dict[str, str]
    adapter: Any = None  # None when evicted, or frozen (ONNX/TorchScript source path)
    resident: bool = True
    state_bytes: int = 0
    bn_probe: drift.BNShift | None = None
    marginal: drift.Marginal | None = None
    saved_step: int = 0  # the step of its state on disk, while evicted
    batches: int = 0
    samples: int = 0
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
    guarded: Guarded | None = None  # the collapse guard (runtime/guard.py is_guarded decides who has one)
    guard_trips: int = 0  # rollbacks and resets by the guard
    guard_fallbacks: int = 0  # batches answered with the source prediction by the guard
    dirty: bool = False  # changed since its last checkpoint
    damaged: str = ""  # why its saved state could not be read (answered DATA_LOSS until replaced or deleted)
    # escalation: the policy (and hyperparameters) the guard pinned the stream away from; a
    # SetPolicy or a Reset unpins (Reset: back to that policy, from the source state)
    pinned_from: tuple[str, dict[str, str]] | None = None
    # a reply computed elsewhere (runtime/onnx_batch_stats.py) owes an update with a forward of its
    # own: worth it while the client's pause after a reply (EMA) covers that update
    replied_at: float | None = None
    pause_seconds: float = float("inf")
    owed_update_seconds: float = 0.0

    COUNTERS = ("batches", "samples", "bn_shift", "entropy", "confidence", "class_marginal_entropy",
                "weight_distance", "last_loss", "feedback_labels", "feedback_correct", "guard_trips", "guard_fallbacks")

    @property
    def frozen(self) -> bool:
        """Resident without an adapter: the model's frozen forward (ONNX Runtime, TorchScript) serves it."""
        return self.resident and self.adapter is None

    @property
    def step(self) -> int:
        """Updates since the last reset or policy change."""
        return self.adapter.steps if self.adapter is not None else self.saved_step

    @property
    def pending(self) -> bool:
        """An update is owed for its last predicted batch."""
        return self.adapter is not None and self.adapter.pending

    @property
    def held_bytes(self) -> int:
        """What it holds in memory now, as the memory budget counts it: its state (twice for a
        guarded stream) plus what its owed update holds (the saved activations of its last
        batch, `adapter.pending_bytes`; 0 once the update is applied)."""
        return self.state_bytes + (self.adapter.pending_bytes if self.adapter is not None else 0)

    def counters(self) -> dict:
        return {k: getattr(self, k) for k in self.COUNTERS}

    # ------------------------------------------------------------------ state
    def install(self, adapter, num_classes: int, guard: GuardConfig) -> None:
        """Serve with this adapter (None: the frozen path) from now on."""
        self.adapter, self.resident, self.saved_step = adapter, True, 0
        self.marginal = self.marginal or drift.Marginal(num_classes)
        self.guarded = Guarded(guard) if is_guarded(adapter, guard) else None
        if adapter is not None:
            self.bn_probe = drift.BNShift()
            adapter.observe_bn_inputs(self.bn_probe)
            if self.guarded is not None:
                self.guarded.learned(adapter)  # the weights it starts from (a restored state has moved)
            # a guarded stream keeps a second copy of its state: the last good snapshot
            self.state_bytes = int(adapter.state_bytes()) * (2 if self.guarded is not None else 1)
        else:
            self.bn_probe, self.state_bytes = None, 0

    def evicted(self) -> None:
        """Its state is on disk now; drop it from memory."""
        self.saved_step = self.step
        self.adapter, self.bn_probe, self.guarded, self.resident, self.state_bytes = None, None, None, False, 0

    def restart(self, policy: str, hyperparameters: dict[str, str]) -> None:
        """A new policy: counters of the old one no longer describe it."""
        self.policy, self.hyperparameters, self.damaged = policy, dict(hyperparameters), ""
        self.pinned_from = None
        self.feedback_labels, self.feedback_correct, self.weight_distance, self.last_loss = 0, 0, 0.0, 0.0
        self.dirty = True

    def record(self) -> dict:
        """What a checkpoint or snapshot holds (the owed update applied first by the caller)."""
        return {"stream_id": self.id, "policy": self.policy, "hyperparameters": dict(self.hyperparameters),
                "adapter": self.adapter.state_dict() if self.adapter is not None else None, "step": self.step,
                "counters": self.counters()}

    def restore_counters(self, record: dict) -> None:
        for k, v in record.get("counters", {}).items():
            if k in self.COUNTERS:
                setattr(self, k, v)

    # ------------------------------------------------------------------ adaptation
    def learn(self, metrics: Metrics) -> None:
        """Apply the owed update of the last predicted batch."""
        started, recomputes = time.monotonic(), self.adapter.owes_forward
        figures = self.adapter.learn()
        if recomputes:
            self.owed_update_seconds = time.monotonic() - started
        if self.adapter.state_grows:  # what the memory budget counts follows it
            self.state_bytes = int(self.adapter.state_bytes()) * (2 if self.guarded is not None else 1)
        self._count_update(metrics, figures, time.monotonic() - started)

    def arrived(self, enqueued: float) -> None:
        """A batch of this stream was queued at `enqueued`: the client's pause since the last reply."""
        if self.replied_at is not None:
            pause = max(enqueued - self.replied_at, 0.0)
            self.pause_seconds = pause if self.pause_seconds == float("inf") else 0.7 * self.pause_seconds + 0.3 * pause

    def update_fits_pause(self) -> bool:
        """An owed update with its own forward is expected to end before the client's next batch
        (a client that sends back to back would otherwise wait for a forward more per batch)."""
        return self.pause_seconds >= self.owed_update_seconds

    def predicted(self, metrics: Metrics) -> float | None:
        """Bookkeeping right after the adapter predicted a batch; the batch's BN shift."""
        if self.adapter.adapts and not self.adapter.deferred_update:
            self._count_update(metrics, {}, 0.0)  # BN-only adapters update inside predict
        return self.bn_probe.take()

    def _count_update(self, metrics: Metrics, figures: dict, seconds: float) -> None:
        if "loss" in figures:
            self.last_loss = float(figures["loss"])
        distance = None
        if self.guarded is not None:  # the guard measures the weights once per update; gauges reuse it
            self.guarded.learned(self.adapter)
            distance = self.weight_distance = self.guarded.weight_distance
        elif self.adapter.updates_weights and metrics.stream_label(self.id) != OTHER:
            # a pass over all weights: only where a gauge shows it (tracked streams)
            distance = self.weight_distance = float(self.adapter.weight_distance())
        metrics.update(self.id, self.policy, figures, seconds, distance)

    def reset(self, metrics: Metrics, reason: str, num_classes: int) -> None:
        """Back to the source state, policy kept."""
        if self.adapter is not None:
            self.adapter.reset()
        self._forget(metrics, reason, num_classes)

    def _forget(self, metrics: Metrics, reason: str, num_classes: int) -> None:
        self.weight_distance, self.last_loss = 0.0, 0.0
        self.marginal = drift.Marginal(num_classes)
        if self.guarded is not None:
            self.guarded.after_reset()
        self.dirty = True
        metrics.reset(self.id, self.policy, reason)

    def guard_outcome(self, outcome: Outcome, metrics: Metrics, num_classes: int) -> None:
        """Count what the guard did (it has already done it to the adapter)."""
        metrics.guard_trip(self.id, self.policy, outcome.reason, outcome.action)
        if outcome.action == "fallback":
            self.guard_fallbacks += 1
            return
        self.guard_trips += 1
        if outcome.action == "reset":
            self._forget(metrics, "guard", num_classes)
        else:
            self.weight_distance = self.guarded.weight_distance
        self.dirty = True

    def record_batch(self, n: int, figures: dict, bn_shift: float | None) -> None:
        self.dirty = True
        self.batches += 1
        self.samples += n
        self.entropy = float(figures["entropy"].mean())
        self.confidence = float(figures["confidence"].mean())
        self.class_marginal_entropy = self.marginal.update(figures["probs"])
        if bn_shift is not None:
            self.bn_shift = bn_shift

    def rolled_back(self, num_classes: int) -> None:
        self.marginal = drift.Marginal(num_classes)
        self.dirty = True

    def record_feedback(self, correct: int, total: int) -> None:
        self.feedback_labels += total
        self.feedback_correct += correct
        self.dirty = True

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def info(self, model_name: str) -> dict:
        """What GetStream/ListStreams answer (the caller applied the owed update first)."""
        if self.resident and self.adapter is not None and self.adapter.updates_weights and self.guarded is None:
            self.weight_distance = float(self.adapter.weight_distance())
        return {"model": model_name, "stream_id": self.id, "policy": self.policy,
                "hyperparameters": dict(self.hyperparameters), "step": self.step, "batches": self.batches,
                "samples": self.samples, "resident": self.resident, "state_bytes": self.state_bytes,
                "bn_shift": self.bn_shift, "entropy": self.entropy, "confidence": self.confidence,
                "class_marginal_entropy": self.class_marginal_entropy, "weight_distance": self.weight_distance,
                "last_loss": self.last_loss, "feedback_labels": self.feedback_labels,
                "feedback_correct": self.feedback_correct,
                "accuracy": self.feedback_correct / self.feedback_labels if self.feedback_labels else 0.0,
                "snapshots": list(self.snapshots), "idle_seconds": time.monotonic() - self.last_used,
                "guard_trips": self.guard_trips, "guard_fallbacks": self.guard_fallbacks,
                "pinned_from": self.pinned_from[0] if self.pinned_from else ""}
