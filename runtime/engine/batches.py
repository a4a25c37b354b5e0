"""Predicting batches: one batch of a stream, or a group of batches of several streams in one
forward pass; the collapse guard's verdict carried out; the reply and the stream's figures.

Order within a batch (DESIGN.md principle 1, "predict first, adapt after"): the stream's owed
update from its previous batch is applied, the batch is predicted and answered, and this batch's
update is left owed (`adapter.pending`) for the worker to apply later.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import adapters
from adapters.batched import batch_key, predict_together
from runtime import drift
from runtime.engine.stream import Stream
from runtime.engine.table import StreamTable
from runtime.guard import Outcome
from runtime.metrics import Metrics
from runtime.model_config import LoadedModel

log = logging.getLogger("tta.engine")


@dataclass(frozen=True)
class Batch:
    """One inference request as the engine runs it (its stream id already checked)."""
    stream_id: str
    x: np.ndarray            # float32 NCHW in [0, 1]
    request_id: str
    enqueued: float          # time.monotonic() when queued
    start: bool = False      # reset the stream to the source state first (sequence_start)
    end: bool = False        # afterwards, checkpoint the stream and free its memory (sequence_end)


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


class Batches:
    def __init__(self, model: LoadedModel, table: StreamTable, metrics: Metrics):
        self.model, self.table, self.metrics = model, table, metrics
        self._source_adapter = None  # the source model's forward for the guard (built on first use)
        self.idle: Callable[[], bool] = lambda: True  # no other batch waits (the engine's queue says)
        # cumulative figures for ModelStatistics (written by the worker only)
        self.totals = {"batches": 0, "samples": 0, "queue_ns": 0, "compute_ns": 0, "last_inference_ms": 0}

    # ------------------------------------------------------------------ one batch
    def predict(self, batch: Batch) -> InferResult:
        started = time.monotonic()
        if batch.start and self.table.peek(batch.stream_id) is not None:
            stream = self.table.get(batch.stream_id)
            stream.reset(self.metrics, "sequence_start", self.model.num_classes)
        stream = self.table.get(batch.stream_id)
        stream.arrived(batch.enqueued)
        self.table.learn_owed(stream)  # batch t+1 sees the update from batch t
        verdict = ""
        try:
            early = (stream.guarded.fallback_before_predict(len(batch.x), stream.adapter)
                     if stream.guarded is not None else None)
            if stream.frozen:  # logits and the BN layers' input means in one forward
                logits, means = self.model.frozen.run(batch.x)
                bn_shift = self.model.frozen.bn_shift(means)
            elif early is not None:  # a single image: the source answers, the adapter is not touched
                logits, bn_shift, verdict = self._source_logits(batch.x, self._tensor(batch.x)), None, early.reason
                stream.guard_outcome(early, self.metrics, self.model.num_classes)
            else:
                x = self._tensor(batch.x)
                source = None
                if stream.guarded is not None and stream.guarded.needs_source(len(batch.x)):
                    source = self._source_logits(batch.x, x)  # first: they may answer alone
                    early = stream.guarded.fallback_for_stream(source, stream.adapter)
                if early is not None:  # a label-correlated stream: the adapter is not run
                    logits, bn_shift, verdict = source, None, early.reason
                    stream.guard_outcome(early, self.metrics, self.model.num_classes)
                else:
                    if stream.guarded is not None:
                        stream.guarded.before_predict(stream.adapter)
                    logits, bn_shift = self._adapted(stream, batch.x, x)
                    if stream.guarded is not None:
                        logits, verdict = self._guard(stream, logits, source, bn_shift)
                        if logits is None:  # a verdict on a batch judged without the source: its answer
                            logits = self._source_logits(batch.x, x)
            return self._finish(stream, batch, started, time.monotonic() - started, logits, bn_shift, verdict)
        except Exception:
            self._unlearn(stream)
            raise

    @staticmethod
    def _unlearn(stream: Stream) -> None:
        """The batch is answered with an error: the stream must not learn from it (a client that
        retries would teach it twice)."""
        if stream.adapter is not None:
            stream.adapter.discard()

    def _adapted(self, stream: Stream, x: np.ndarray, batch: torch.Tensor) -> tuple[np.ndarray, float | None]:
        """The adapter's prediction and its BN shift. A batch-statistics one runs on ONNX Runtime
        where the model has that forward (runtime/onnx_batch_stats.py): for a policy that then owes
        its update with a forward of its own, only while no other batch waits (an idle engine
        applies it before the next one, and while the stream's client pauses long enough after a
        reply for it; otherwise the next batch would wait for a forward more)."""
        forward, adapter = self.model.batch_stats, stream.adapter
        affine = adapter.batch_stats_affine() if forward is not None else None
        if affine is not None and forward.accepts(affine) and (
                not adapter.deferred_update or (self.idle() and stream.update_fits_pause())):
            logits, means = forward.run_with(x, affine)
            adapter.owe(batch)
            stream.predicted(self.metrics)
            return logits, forward.bn_shift(means)
        logits = adapter.predict(batch).float().cpu().numpy()
        return logits, stream.predicted(self.metrics)

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(self.model.device)

    def _source_logits(self, x: np.ndarray, batch: torch.Tensor) -> np.ndarray:
        if self.model.frozen is not None:
            return self.model.frozen(x)
        if self._source_adapter is None:
            self._source_adapter = adapters.create("source", self.model.module)
        return self._source_adapter.predict(batch).float().cpu().numpy()

    def _guard(self, stream: Stream, logits: np.ndarray, source: np.ndarray,
               bn_shift: float | None) -> tuple[np.ndarray, str]:
        """The guard's verdict on a guarded stream's batch, before its reply and its update
        (runtime/guard.py Guarded.judge decides and carries it out; here it is counted and logged)."""
        outcome: Outcome = stream.guarded.judge(stream.adapter, logits, source, stream.last_loss, bn_shift)
        if not outcome.reason:
            return outcome.reply, ""
        stream.guard_outcome(outcome, self.metrics, self.model.num_classes)
        if outcome.pin:
            self._pin(stream, outcome.reason)
        elif outcome.action != "fallback":
            done = (f"rolled back to its last good state (step {outcome.rolled_back_to})"
                    if outcome.action == "rollback" else "reset to the source state")
            log.warning("collapse guard: stream %r (%s) %s: %s (%s)", stream.id, stream.policy, done, outcome.reason,
                        stream.guarded.describe())
        return outcome.reply, outcome.reason

    def _pin(self, stream: Stream, reason: str) -> None:
        """Escalation: the guard keeps rolling the stream back or resetting it; serve it with the
        safe policy until an operator sets a policy or resets it."""
        was = (stream.policy, dict(stream.hyperparameters))
        safe = self.table.guard.safe_policy
        stream.restart(safe, {})
        stream.install(self.table.policies.build(safe, {}), self.model.num_classes, self.table.guard)
        stream.pinned_from = was
        self.metrics.guard_pins.labels(self.model.name, was[0]).inc()
        self.metrics.stream_started(stream.id, safe)
        log.warning("collapse guard: stream %r (%s) keeps collapsing (%d rollbacks/resets within %d batches, last: "
                    "%s): pinned to %r until an operator sets a policy or resets it", stream.id, was[0],
                    self.table.guard.pin_after, self.table.guard.pin_window, reason, safe)

    def _finish(self, stream: Stream, batch: Batch, started: float, inference_seconds: float, logits: np.ndarray,
                bn_shift: float | None, verdict: str = "") -> InferResult:
        n = len(batch.x)
        t = self.totals
        t["batches"] += 1
        t["samples"] += n
        t["queue_ns"] += int((started - batch.enqueued) * 1e9)
        t["compute_ns"] += int(inference_seconds * 1e9)
        t["last_inference_ms"] = int(time.time() * 1000)
        figures = drift.batch_figures(logits)
        stream.record_batch(n, figures, bn_shift)
        self.table.remember(batch.request_id, stream, figures["predicted"])
        self.metrics.batch(stream.id, stream.policy, n, figures, bn_shift, stream.class_marginal_entropy,
                           started - batch.enqueued, inference_seconds)
        result = InferResult(logits=logits, stream_id=stream.id, policy=stream.policy, step=stream.step,
                             request_id=batch.request_id, bn_shift=bn_shift, entropy=stream.entropy,
                             confidence=stream.confidence, class_marginal_entropy=stream.class_marginal_entropy,
                             guard=verdict)
        self.table.enforce_memory_budget(keep=stream.id)
        stream.replied_at = time.monotonic()
        return result

    # ------------------------------------------------------------------ cross-stream batching
    def group_key(self, batch: Batch):
        """Queued batches with equal keys can share one forward pass; None: this one cannot."""
        stream = self.table.peek(batch.stream_id)
        if batch.start or batch.end or stream is None or not stream.resident or stream.pending:
            return None
        if stream.frozen:  # one forward over stacked rows: batch sizes may differ
            return "frozen", batch.x.shape[1:]
        return batch_key(stream.adapter, torch.from_numpy(batch.x))

    def predict_group(self, group: list[Batch]) -> list[tuple[InferResult | None, Exception | None]] | None:
        """One forward pass for the batches of several streams, then each batch's bookkeeping and
        reply as if it had been predicted alone; None if the pass failed (predict them one by one)."""
        started = time.monotonic()
        streams = [self.table.get(b.stream_id) for b in group]
        xs = [b.x for b in group]
        try:
            if streams[0].frozen:  # each stream's BN shift from its own rows' means
                out, means = self.model.frozen.run(np.concatenate(xs))
                ends = np.cumsum([len(x) for x in xs]).tolist()
                rows = [slice(start, end) for start, end in zip([0, *ends[:-1]], ends)]
                logits = [out[r] for r in rows]
                shifts = [self.model.frozen.bn_shift(means, r) for r in rows]
            else:
                outs = predict_together([s.adapter for s in streams],
                                        [torch.from_numpy(x).to(self.model.device) for x in xs])
                logits = [o.float().cpu().numpy() for o in outs]
                shifts = [s.predicted(self.metrics) for s in streams]
        except Exception:  # noqa: BLE001 - never worse than one at a time
            log.exception("a grouped forward pass failed; predicting its batches one by one")
            return None
        share = (time.monotonic() - started) / len(group)  # compute time attributed to each batch
        self.metrics.grouped_batches.labels(self.model.name).observe(len(group))
        answers = []
        for batch, stream, lg, shift in zip(group, streams, logits, shifts):
            try:
                answers.append((self._finish(stream, batch, started, share, lg, shift), None))
            except Exception as e:  # noqa: BLE001
                log.exception("engine job failed")
                self._unlearn(stream)
                answers.append((None, e))
        return answers
