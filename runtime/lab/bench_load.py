"""The load section of `tta bench` (`--load`): many concurrent streams against a real `tta serve`
on loopback for a bounded time. Each stream is one client thread with its own tritonclient
connection and stream id, sending unary requests back to back with a client deadline; the
streams take the policies of a mix in turn (SetPolicy before the clock starts). Clients behave
as well-behaved gRPC clients do: with `retry` (the default) gRPC itself retries a refusal
(RESOURCE_EXHAUSTED) under runtime.protocol.RETRY_SERVICE_CONFIG, waiting as long as the
server's retry pushback says; a refusal that still comes back (attempts used up), or every
refusal without `retry`, makes the client back off (exponentially with jitter, from 25 ms up to
1.6 s, reset by a reply) and try again. Those refusals and the requests that missed their
deadline are counted apart from errors, whose expected count is zero.
Goodput is the replies per second; fairness is how evenly the streams were served (the fewest
and the median replies per stream).

A benchmark, not a timed test: tests/lab/test_bench.py runs it for a few seconds only.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from runtime.lab.bench_grpc import Endpoint
from runtime.lab.timing import percentile

REFUSED = ("StatusCode.RESOURCE_EXHAUSTED", "StatusCode.UNAVAILABLE")
BACKOFF = (0.025, 1.6)  # seconds: first and longest wait after a refusal


def bench_load(target: str, streams: int = 64, seconds: float = 60.0, batch: int = 8,
               policies: tuple[str, ...] = ("source", "bn", "tent"), timeout: float = 10.0,
               retry: bool = True) -> dict:
    endpoints = [Endpoint(target, retry=retry) for _ in range(streams)]
    ids = [f"bench-load-{i:03d}" for i in range(streams)]
    policy_of = {sid: policies[i % len(policies)] for i, sid in enumerate(ids)}
    for ep, sid in zip(endpoints, ids):
        ep.set_policy(sid, policy_of[sid])
    x = np.random.default_rng(2).random((batch, 3, 32, 32), dtype=np.float32)
    latencies: dict[str, list[float]] = {sid: [] for sid in ids}
    errors: list[str] = []
    refused, late = [0], [0]
    start_line = threading.Barrier(streams + 1)
    deadline = 0.0

    def client(ep: Endpoint, sid: str) -> None:
        rng = np.random.default_rng(abs(hash(sid)) % 2**32)
        backoff = BACKOFF[0]
        start_line.wait()
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                logits, _, _ = ep.infer(x, sid, timeout=timeout)
                if logits.shape[0] != batch or not np.isfinite(logits).all():
                    raise ValueError(f"bad reply: shape {logits.shape}, finite {np.isfinite(logits).all()}")
            except Exception as e:  # noqa: BLE001 - every failure is a result here, listed in the report
                status = str(getattr(e, "status", lambda: "")())
                if status in REFUSED:
                    refused[0] += 1
                    time.sleep(backoff * rng.uniform(0.5, 1.5))
                    backoff = min(2 * backoff, BACKOFF[1])
                elif status == "StatusCode.DEADLINE_EXCEEDED":
                    late[0] += 1
                else:
                    errors.append(f"{sid}: {type(e).__name__}: {e}"[:300])
                continue
            latencies[sid].append(time.perf_counter() - t0)
            backoff = BACKOFF[0]

    threads = [threading.Thread(target=client, args=(ep, sid), daemon=True) for ep, sid in zip(endpoints, ids)]
    for t in threads:
        t.start()
    began = time.perf_counter()
    deadline = began + seconds
    start_line.wait()
    for t in threads:
        t.join(seconds + 300)  # a request in flight at the deadline finishes
    elapsed = time.perf_counter() - began
    for ep in endpoints:
        ep.close()

    def summary(values: list[float]) -> dict:
        if not values:
            return {"requests": 0}
        return {"requests": len(values), "p50_ms": percentile(values, 50) * 1e3,
                "p99_ms": percentile(values, 99) * 1e3, "max_ms": max(values) * 1e3}

    everything = [v for vs in latencies.values() for v in vs]
    per_policy = {p: summary([v for sid in ids if policy_of[sid] == p for v in latencies[sid]]) for p in policies}
    return {"streams": streams, "seconds": elapsed, "batch": batch, "policies": list(policies),
            **summary(everything), "errors": len(errors), "error_messages": errors[:20],
            "requests_per_s": len(everything) / elapsed, "images_per_s": len(everything) * batch / elapsed,
            "refused": refused[0], "missed_deadline": late[0], "client_deadline_s": timeout, "grpc_retry": retry,
            "streams_served": sum(1 for vs in latencies.values() if vs),
            "replies_per_stream_min": min(len(vs) for vs in latencies.values()),
            "replies_per_stream_median": float(np.median([len(vs) for vs in latencies.values()])),
            "per_policy": per_policy}
