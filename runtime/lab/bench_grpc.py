"""The gRPC sections of `tta bench`, against a real `tta serve` subprocess on loopback driven by
the stock tritonclient (runtime.lab.bench starts the server, demo model, default policy `source`):

- frozen: throughput of `source` streams over gRPC (unary ModelInfer, streaming ModelStreamInfer)
  over the in-process forward of the same model on the same batches, at batch 1 and 64;
- latency: reply latency (p50, p99) per policy over the `source` policy's, requests sent one
  after another on one stream per policy, the policies taken in turn so all see the same load.

tritonclient and our own `inference` stubs cannot share a process (both register `inference.*`
in protobuf's default pool), hence the subprocess; the tta.v1 control stubs (SetPolicy,
GetStream) can, so streams get their policy the way an operator would set it.
"""
from __future__ import annotations

import queue
import statistics
import time

import numpy as np
import torch

import adapters
from runtime.guard import GuardConfig
from runtime.lab.datasets import load_demo_slice
from runtime.lab.timing import median_ms, paired_times, percentile


class Endpoint:
    """A tritonclient connection to the server's (single) model, plus its tta.v1 control stub;
    `retry`: ModelInfer with gRPC's retry policy (runtime.protocol.RETRY_SERVICE_CONFIG), which
    honours the server's retry pushback."""

    def __init__(self, target: str, retry: bool = False):
        import grpc
        import tritonclient.grpc as tc

        from runtime import protos
        from runtime.protocol import RETRY_CHANNEL_ARGS

        self.tc = tc
        channel_args = None
        if retry:  # tritonclient's own defaults (message sizes, keepalive) plus the retry policy
            keepalive = tc.KeepAliveOptions()
            channel_args = [("grpc.max_send_message_length", tc.MAX_GRPC_MESSAGE_SIZE),
                            ("grpc.max_receive_message_length", tc.MAX_GRPC_MESSAGE_SIZE),
                            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
                            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
                            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
                            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
                            *RETRY_CHANNEL_ARGS]
        self.client = tc.InferenceServerClient(target, channel_args=channel_args)
        index = self.client.get_model_repository_index()
        meta = self.client.get_model_metadata(index.models[0].name if index.models else "demo")
        self.model, self.in_name, self.out_name = meta.name, meta.inputs[0].name, meta.outputs[0].name
        self.pb = protos.load("tta.v1.adaptation_pb2")
        self.control = protos.load("tta.v1.adaptation_pb2_grpc").AdaptationServiceStub(grpc.insecure_channel(target))
        self._replies: queue.Queue | None = None

    def _inputs(self, x: np.ndarray):
        inp = self.tc.InferInput(self.in_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return [inp]

    def infer(self, x: np.ndarray, stream_id: str, timeout: float | None = None):
        """Unary ModelInfer (with a client deadline of `timeout` s): (logits, the stream's
        adaptation step in the reply, the collapse guard's verdict on the batch or '')."""
        r = self.client.infer(self.model, self._inputs(x), outputs=[self.tc.InferRequestedOutput(self.out_name)],
                              parameters={"stream_id": stream_id}, client_timeout=timeout)
        params = r.get_response().parameters
        guard = params["tta_guard"].string_param if "tta_guard" in params else ""
        return r.as_numpy(self.out_name), params["tta_step"].int64_param, guard

    def stream_infer(self, x: np.ndarray, stream_id: str) -> np.ndarray:
        """One request on the (lazily opened) bidirectional ModelStreamInfer stream, and its reply."""
        if self._replies is None:
            self._replies = queue.Queue()
            self.client.start_stream(callback=lambda result, error: self._replies.put((result, error)))
        self.client.async_stream_infer(self.model, self._inputs(x), parameters={"stream_id": stream_id},
                                       outputs=[self.tc.InferRequestedOutput(self.out_name)])
        result, error = self._replies.get(timeout=300)
        if error is not None:
            raise RuntimeError(str(error))
        return result.as_numpy(self.out_name)

    def set_policy(self, stream_id: str, policy: str) -> None:
        self.control.SetPolicy(self.pb.SetPolicyRequest(model=self.model, stream_id=stream_id, policy=policy),
                               timeout=60)

    def stream_info(self, stream_id: str):
        return self.control.GetStream(self.pb.StreamRequest(model=self.model, stream_id=stream_id), timeout=60)

    def close(self) -> None:
        if self._replies is not None:
            self.client.stop_stream()
        self.client.close()


def _demo_batches(n: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    """n i.i.d. batches of the shipped demo images (real data: random pixels are what the collapse
    guard rightly refuses to learn from, so they would time something no real stream does)."""
    x, _ = load_demo_slice()
    rng = np.random.default_rng(seed)
    return [x[rng.choice(len(x), batch, replace=False)] for _ in range(n)]


def _pixels(n: int, batch: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((batch, 3, *size), dtype=np.float32) for _ in range(n)]


def bench_frozen(target: str, model, device, batch_sizes=(1, 64), batches: int = 20) -> list[dict]:
    """images/s of gRPC unary and streaming `source` over the in-process forward, the three paths
    called in turn on each batch (the ratio is the result). Batch 1 gets 5× the batches."""
    ep = Endpoint(target)
    frozen = adapters.create("source", model)  # what the server runs for a `source` stream of this model

    def in_process(x):
        return frozen.predict(torch.from_numpy(x).to(device)).float().cpu().numpy()

    rows = []
    try:
        for bs in batch_sizes:
            xs = _pixels((batches * 5 if bs < 16 else batches) + 2, bs, (32, 32), seed=bs)
            paths = {"in-process forward": in_process,
                     "gRPC ModelInfer": lambda x: ep.infer(x, "bench-frozen-unary")[0],
                     "gRPC ModelStreamInfer": lambda x: ep.stream_infer(x, "bench-frozen-stream")}
            times = paired_times(list(paths.values()), xs, device)
            # same model, same answer: the gRPC logits must be the in-process ones
            diff = max(float(np.abs(fn(xs[0]) - in_process(xs[0])).max()) for fn in list(paths.values())[1:])
            base = statistics.median(times[0])
            for label, t in zip(paths, times):
                med = statistics.median(t)
                rows.append({"path": label, "batch": bs, "ms_per_batch": median_ms(t), "images_per_s": bs / med,
                             "ratio": base / med, "max_abs_diff_vs_in_process": diff})
    finally:
        ep.close()
    return rows


def bench_concurrent(target: str, model, device, clients: int = 8, requests: int = 40, rounds: int = 3) -> dict:
    """Single images from `clients` concurrent clients (one stream each, one request at a time,
    as a fleet of cameras sends them): the server's images/s over the in-process forward's at
    batch 1, measured in turn, `rounds` times (median ratio). What dynamic batching is for."""
    import threading

    frozen = adapters.create("source", model)
    xs = _pixels(requests, 1, (32, 32), seed=7)
    endpoints = [Endpoint(target) for _ in range(clients)]

    def in_process() -> float:
        started = time.perf_counter()
        for x in xs:
            frozen.predict(torch.from_numpy(x).to(device)).float().cpu().numpy()
        return len(xs) / (time.perf_counter() - started)

    def served() -> float:
        errors: list[Exception] = []

        def client(ep: Endpoint, i: int) -> None:
            try:
                for x in xs:
                    ep.infer(x, f"bench-fleet-{i}")
            except Exception as e:  # noqa: BLE001 - reported below, not swallowed
                errors.append(e)
        threads = [threading.Thread(target=client, args=(ep, i)) for i, ep in enumerate(endpoints)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"a concurrent client failed: {errors[0]}")
        return clients * len(xs) / (time.perf_counter() - started)

    try:
        served(), in_process()  # warm-up
        pairs = [(served(), in_process()) for _ in range(rounds)]
    finally:
        for ep in endpoints:
            ep.close()
    ratios = [s / i for s, i in pairs]
    return {"path": f"gRPC ModelInfer, {clients} clients", "batch": 1, "images_per_s": statistics.median(
        [s for s, _ in pairs]), "in_process_images_per_s": statistics.median([i for _, i in pairs]),
        "ratio": statistics.median(ratios)}


def bench_latency(target: str, policies: list[str], batch: int = 64, requests: int = 20, warmup: int = 2,
                  guarded_target: str | None = None, young: int = GuardConfig.label_runs) -> tuple[list[dict], list[dict]]:
    """Reply latency per policy, sequential requests on one stream per policy. After each reply of
    a policy with a deferred update, the client waits until GetStream shows the update applied,
    so the next request measures a reply that had no update left to wait for; the figure
    `update_done_ms` (reply to update applied) shows where the learning step went. The `source`
    policy is the baseline and is always measured. `guarded_target`: a second server with the
    collapse guard on (the default configuration); its streams are measured in the same turns,
    so both sets of ratios (each over the guard-off server's `source`) see the same load. The
    figures are those of a stream past its first `young` batches (the guard computes the source's
    forward on every batch of a young stream, on a calm one every --guard-source-every-th); batches
    `warmup` to `young` give the young stream's p50 beside them (`p50_young_ms`).
    Returns (rows with the guard off, rows with the guard on: empty without guarded_target)."""
    sides = {"off": Endpoint(target)}
    if guarded_target:
        sides["rollback"] = Endpoint(guarded_target)
    policies = ["source"] + [p for p in policies if p != "source"]
    start_at = max(warmup, young)
    xs = _demo_batches(requests + start_at, batch, seed=1)
    latency = {(g, p): [] for g in sides for p in policies}
    early = {(g, p): [] for g in sides for p in policies}
    update = {(g, p): [] for g in sides for p in policies}
    verdicts = {(g, p): 0 for g in sides for p in policies}
    try:
        for ep in sides.values():
            for p in policies:
                ep.set_policy(f"bench-latency-{p}", p)
        for i, x in enumerate(xs):
            for g, ep in sides.items():
                for p in policies:  # in turn, so every policy sees the same machine load
                    sid, cls = f"bench-latency-{p}", adapters.REGISTRY[p]
                    start = time.perf_counter()
                    _, step, verdict = ep.infer(x, sid)
                    replied = time.perf_counter()
                    verdicts[g, p] += bool(verdict)
                    if cls.adapts and cls.deferred_update and not verdict:  # a guard verdict drops the update
                        while ep.stream_info(sid).step <= step:
                            if time.perf_counter() - replied > 300:
                                raise RuntimeError(f"stream {sid}: the update of step {step} was not applied in 300 s")
                            time.sleep(0.002)
                        if i >= start_at:
                            update[g, p].append(time.perf_counter() - replied)
                    if i >= start_at:
                        latency[g, p].append(replied - start)
                    elif i >= warmup:
                        early[g, p].append(replied - start)
        state = {(g, p): ep.stream_info(f"bench-latency-{p}").state_bytes for g, ep in sides.items() for p in policies}
    finally:
        for ep in sides.values():
            ep.close()
    base50, base99 = percentile(latency["off", "source"], 50), percentile(latency["off", "source"], 99)
    rows = {g: [] for g in ("off", "rollback")}
    for g in sides:
        for p in policies:
            p50, p99 = percentile(latency[g, p], 50), percentile(latency[g, p], 99)
            rows[g].append({"policy": p, "guard": g, "batch": batch, "requests": len(latency[g, p]),
                            "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "p50_ratio": p50 / base50,
                            "p99_ratio": p99 / base99,
                            "p50_young_ms": percentile(early[g, p], 50) * 1e3 if early[g, p] else None,
                            "p50_young_ratio": (percentile(early[g, p], 50) / percentile(early["off", "source"], 50)
                                                if early[g, p] else None),
                            "update_done_ms": statistics.median(update[g, p]) * 1e3 if update[g, p] else None,
                            "server_state_bytes": int(state[g, p]), "guard_verdicts": verdicts[g, p]})
    return rows["off"], rows["rollback"]

