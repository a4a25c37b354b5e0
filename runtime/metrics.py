"""Prometheus metrics (DESIGN.md §Metrics, SERVING.md §4): `tta_` prefix, base units, bounded labels.

Labels: `model`; drift/adaptation families also `policy` and `stream`, where `stream` is the
stream id only for tracked streams (model config [streams] tracked, `--track`) and `_other`
for the rest, so the number of series stays bounded however many streams clients open.
Per-batch and per-sample signals are histograms (aggregate across streams and replicas; window
them with rate()); gauges hold the latest value of a tracked stream.
"""
from __future__ import annotations

import platform

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)

# `_created` series double the exposition for no use here (SERVING.md §4.1)
disable_created_metrics()

OTHER = "_other"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
SHIFT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
LOSS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)


class Metrics:
    def __init__(self, model: str, tracked_streams: list[str], registry: CollectorRegistry | None = None):
        self.model = model
        self.tracked = set(tracked_streams)
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # serving
        self.requests = Counter("tta_requests_total", "Inference and control requests received",
                                ["model", "method"], registry=r)
        self.failures = Counter("tta_request_failures_total", "Requests answered with an error, by gRPC status code",
                                ["model", "method", "code"], registry=r)
        self.request_duration = Histogram("tta_request_duration_seconds", "Time from receiving a request to its reply",
                                          ["model", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_duration = Histogram("tta_queue_duration_seconds", "Time a batch waited for the engine",
                                        ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_duration = Histogram("tta_inference_duration_seconds", "Prediction time of a batch",
                                            ["model", "policy"], buckets=LATENCY_BUCKETS, registry=r)
        self.adaptation_duration = Histogram("tta_adaptation_duration_seconds", "Update (learn) time of a batch",
                                             ["model", "policy"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("tta_batch_size", "Samples per inference batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("tta_queue_depth", "Batches waiting for the engine", ["model"], registry=r)
        self.streams = Gauge("tta_streams", "Known streams: resident in memory or evicted to disk",
                             ["model", "state"], registry=r)
        self.state_bytes = Gauge("tta_stream_state_bytes", ("Bytes per-stream state holds in memory: adapter state, "
                                 "optimizer moments, the guard's copy, saved activations of owed updates"),
                                 ["model"], registry=r)
        self.memory_budget = Gauge("tta_stream_memory_budget_bytes", "Memory budget for per-stream state",
                                   ["model"], registry=r)
        self.stream_limit = Gauge("tta_stream_limit", "Most streams the server keeps", ["model"], registry=r)
        self.evictions = Counter("tta_stream_evictions_total", "Idle streams whose state was moved to disk",
                                 ["model"], registry=r)
        self.restores = Counter("tta_streams_restored_total", "Streams whose state was loaded from disk",
                                ["model", "source"], registry=r)
        self.rejected = Counter("tta_requests_rejected_total", "Batches refused or dropped before they ran, by why: "
                                "global_queue / stream_queue (full), wait (would wait over --max-queue-wait), "
                                "deadline (the client's deadline passed while it waited; never run)", ["model", "queue"], registry=r)
        self.checkpoints = Counter("tta_checkpoints_total", "Stream states written to the state dir, by reason "
                                   "(periodic, eviction, shutdown)", ["model", "reason"], registry=r)
        self.checkpoint_seconds = Histogram("tta_checkpoint_duration_seconds", "Time to write a round of "
                                            "checkpoints", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.checkpoint_failures = Counter("tta_checkpoint_failures_total", "Rounds of periodic checkpoints that "
                                           "failed (disk full, permissions); the state stays in memory", ["model"],
                                           registry=r)
        self.state_files_rejected = Counter("tta_state_files_rejected_total", "State files (checkpoints, "
                                            "snapshots) refused when read, never loaded, by reason: checksum, "
                                            "signature, format, other_stream, other_model, legacy",
                                            ["model", "reason"], registry=r)
        self.expired = Counter("tta_streams_expired_total", "Idle streams forgotten after --stream-ttl (memory, "
                               "disk and snapshots)", ["model"], registry=r)
        self.durable = Gauge("tta_state_durable", "1 while writes to the state directory succeed; 0 after one "
                             "failed (disk full, read-only, I/O error) until one succeeds: adapted state is then "
                             "in memory only", ["model"], registry=r)
        # replicas (runtime/coordination): zero and unused without --coordinator
        self.streams_held = Gauge("tta_streams_held", "Streams whose etcd owner key this replica holds", ["model"],
                                  registry=r)
        self.handoffs = Counter("tta_handoffs_total", "Streams taken over from (in) or released to (out) another "
                                "replica", ["model", "direction"], registry=r)
        self.handoff_seconds = Histogram("tta_handoff_seconds", "Time from asking a stream's holder to release it "
                                         "to holding it", ["model", "direction"], registry=r,
                                         buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.handoff_timeouts = Counter("tta_handoff_timeouts_total", "Requests answered UNAVAILABLE because the "
                                        "stream's holder did not release it within --handoff-timeout", ["model"],
                                        registry=r)
        self.lease_losses = Counter("tta_lease_losses_total", "Times this replica found its etcd lease gone",
                                    ["model"], registry=r)
        self.fencing_refusals = Counter("tta_fencing_refusals_total", "Checkpoint commits refused because this "
                                        "replica no longer held the stream", ["model"], registry=r)
        self.coordinator_up = Gauge("tta_coordinator_up", "1 while the last etcd call succeeded", ["model"],
                                    registry=r)
        self.grouped_batches = Histogram("tta_grouped_batches", "Batches of different streams predicted in one "
                                         "forward pass (cross-stream batching), per pass", ["model"],
                                         buckets=BATCH_BUCKETS, registry=r)
        self.build = Info("tta_build", "Versions", registry=r)
        self.build.info({"torch": torch.__version__, "python": platform.python_version(),
                         "cuda": str(torch.version.cuda or "none")})
        # drift and adaptation (label-free)
        labels = ["model", "policy", "stream"]
        self.bn_shift = Histogram("tta_bn_shift", "BN-statistics shift of a batch against the source statistics "
                                  "(|mean - source mean| / source std, averaged)", labels, buckets=SHIFT_BUCKETS, registry=r)
        self.entropy = Histogram("tta_prediction_entropy_ratio", "Prediction entropy / log(classes), per sample",
                                 labels, buckets=RATIO_BUCKETS, registry=r)
        self.confidence = Histogram("tta_prediction_confidence_ratio", "Top-class probability, per sample",
                                    labels, buckets=RATIO_BUCKETS, registry=r)
        self.marginal_entropy = Gauge("tta_class_marginal_entropy_ratio", "Entropy of the stream's recent class "
                                      "marginal / log(classes); near 0 = collapse (tracked streams)", labels, registry=r)
        self.last_bn_shift = Gauge("tta_stream_bn_shift", "BN-statistics shift of the stream's latest batch "
                                   "(tracked streams)", labels, registry=r)
        self.loss = Histogram("tta_adaptation_loss", "Adaptation loss of an update", labels, buckets=LOSS_BUCKETS, registry=r)
        self.weight_distance = Gauge("tta_weight_distance_ratio", "||theta - theta_source|| / ||theta_source|| of the "
                                     "adapted weights (tracked streams)", labels, registry=r)
        self.updates = Counter("tta_adaptation_updates_total", "Adaptation updates applied", labels, registry=r)
        self.resets = Counter("tta_stream_resets_total", "Streams returned to the source state, by reason",
                              labels + ["reason"], registry=r)
        self.rollbacks = Counter("tta_stream_rollbacks_total", "Streams rolled back to a snapshot", labels, registry=r)
        self.guard_trips = Counter("tta_guard_trips_total", "Collapse-guard interventions, by reason (non_finite, "
                                   "marginal_collapse, weight_runaway, bn_shift_jump, label_shift, small_batch) "
                                   "and action (rollback, reset, fallback)", labels + ["reason", "action"], registry=r)
        self.guard_pins = Counter("tta_guard_pins_total", "Streams the collapse guard pinned to its safe policy "
                                  "(--guard-safe-policy) after --guard-pin-after rollbacks/resets within "
                                  "--guard-pin-window batches, by the policy pinned away from",
                                  ["model", "policy"], registry=r)
        self.feedback_labels = Counter("tta_feedback_labels_total", "Ground-truth labels received", labels, registry=r)
        self.feedback_correct = Counter("tta_feedback_correct_total", "Labelled samples the stream predicted correctly",
                                        labels, registry=r)
        self.accuracy = Gauge("tta_online_accuracy_ratio", "Online accuracy from feedback labels (correct / labels)",
                              labels, registry=r)
        self._feedback_totals: dict[tuple, list[int]] = {}  # label values -> [correct, labels], for the gauge

    def stream_label(self, stream_id: str) -> str:
        return stream_id if stream_id in self.tracked else OTHER

    def stream_started(self, stream_id: str, policy: str) -> None:
        """Create the stream's series at 0 so rates work from its first request."""
        lv = (self.model, policy, self.stream_label(stream_id))
        for family in (self.updates, self.feedback_labels, self.feedback_correct, self.rollbacks):
            family.labels(*lv)

    def batch(self, stream_id: str, policy: str, n: int, figures: dict, bn_shift: float | None,
              marginal_entropy: float, queue_seconds: float, inference_seconds: float) -> None:
        label = self.stream_label(stream_id)
        lv = (self.model, policy, label)
        self.batch_size.labels(self.model).observe(n)
        self.queue_duration.labels(self.model).observe(queue_seconds)
        self.inference_duration.labels(self.model, policy).observe(inference_seconds)
        entropy, confidence = self.entropy.labels(*lv), self.confidence.labels(*lv)
        for e, c in zip(figures["entropy"], figures["confidence"]):
            entropy.observe(float(e))
            confidence.observe(float(c))
        if bn_shift is not None:
            self.bn_shift.labels(*lv).observe(bn_shift)
        if label != OTHER:
            self.marginal_entropy.labels(*lv).set(marginal_entropy)
            if bn_shift is not None:
                self.last_bn_shift.labels(*lv).set(bn_shift)

    def update(self, stream_id: str, policy: str, figures: dict, seconds: float, weight_distance: float | None) -> None:
        label = self.stream_label(stream_id)
        lv = (self.model, policy, label)
        self.updates.labels(*lv).inc()
        self.adaptation_duration.labels(self.model, policy).observe(seconds)
        if "loss" in figures:
            self.loss.labels(*lv).observe(max(float(figures["loss"]), 0.0))
        if weight_distance is not None and label != OTHER:
            self.weight_distance.labels(*lv).set(weight_distance)

    def reset(self, stream_id: str, policy: str, reason: str) -> None:
        self.resets.labels(self.model, policy, self.stream_label(stream_id), reason).inc()

    def rollback(self, stream_id: str, policy: str) -> None:
        self.rollbacks.labels(self.model, policy, self.stream_label(stream_id)).inc()

    def guard_trip(self, stream_id: str, policy: str, reason: str, action: str) -> None:
        self.guard_trips.labels(self.model, policy, self.stream_label(stream_id), reason, action).inc()

    def feedback(self, stream_id: str, policy: str, correct: int, total: int) -> None:
        lv = (self.model, policy, self.stream_label(stream_id))
        self.feedback_labels.labels(*lv).inc(total)
        self.feedback_correct.labels(*lv).inc(correct)
        totals = self._feedback_totals.setdefault(lv, [0, 0])
        totals[0] += correct
        totals[1] += total
        if totals[1] > 0:
            self.accuracy.labels(*lv).set(totals[0] / totals[1])

    def request(self, method: str) -> None:
        self.requests.labels(self.model, method).inc()

    def failure(self, method: str, code: str) -> None:
        self.failures.labels(self.model, method, code).inc()

    def serve_http(self, port: int, host: str = "0.0.0.0"):
        """Expose /metrics over HTTP; returns the HTTP server (call .shutdown() to stop)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
