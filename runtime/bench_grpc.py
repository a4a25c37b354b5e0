"""gRPC vs in-process, for `tta bench`: a real `tta serve` subprocess on loopback, driven by
tritonclient (unary and streaming), against the same policy run in-process on the same batches.

tritonclient and our own `inference` stubs cannot share a process (both register
`inference.*` in protobuf's default pool), so the server always runs in a subprocess here."""
from __future__ import annotations

import os
import queue
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import adapters

POLICIES = ("source", "bn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(policy: str, timeout: float = 120.0):
    """`tta serve` on free loopback ports; returns (process, grpc address)."""
    import tritonclient.grpc as grpcclient

    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", str(metrics_port), "--policy", policy]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "TTA_NO_PROGRESS": "1"})
    address = f"127.0.0.1:{port}"
    client = grpcclient.InferenceServerClient(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tta serve exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if client.is_server_ready():
                return proc, address
        except Exception:  # not listening yet
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"tta serve did not become ready within {timeout:.0f} s")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def bench_grpc(model, batches, device, quick: bool = False) -> list[dict]:
    import tritonclient.grpc as grpcclient

    from runtime.bench import time_call

    rows = []
    for policy in POLICIES:
        proc, address = start_server(policy)
        try:
            client = grpcclient.InferenceServerClient(address)
            meta = client.get_model_metadata(_model_name(client))
            in_name, out_name, model_name = meta.inputs[0].name, meta.outputs[0].name, meta.name

            def request(x: torch.Tensor):
                arr = x.detach().cpu().numpy().astype(np.float32)
                inp = grpcclient.InferInput(in_name, list(arr.shape), "FP32")
                inp.set_data_from_numpy(arr)
                return inp

            def unary(x):
                r = client.infer(model_name, [request(x)], outputs=[grpcclient.InferRequestedOutput(out_name)],
                                 parameters={"stream_id": f"bench-unary-{policy}"})
                return r.as_numpy(out_name)

            replies: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error: replies.put((result, error)))

            def streamed(x):
                client.async_stream_infer(model_name, [request(x)], outputs=[grpcclient.InferRequestedOutput(out_name)],
                                          parameters={"stream_id": f"bench-stream-{policy}"})
                result, error = replies.get(timeout=120)
                if error is not None:
                    raise RuntimeError(str(error))
                return result.as_numpy(out_name)

            adapter = adapters.create(policy, model)
            for x in batches[:2]:  # warm-up of all three paths
                unary(x), streamed(x), adapter.step(x)
            t_in, t_unary, t_stream = [], [], []
            for x in batches[2:]:
                t_in.append(time_call(adapter.step, x, device))
                t_unary.append(time_call(unary, x, device))
                t_stream.append(time_call(streamed, x, device))
            client.stop_stream()
            base = statistics.median(t_in)
            rows.append({"path": f"{policy}: in-process step", "ms_per_batch": base * 1e3, "ratio": 1.0})
            for label, times in (("gRPC ModelInfer", t_unary), ("gRPC ModelStreamInfer", t_stream)):
                t = statistics.median(times)
                rows.append({"path": f"{policy}: {label}", "ms_per_batch": t * 1e3, "ratio": t / base})
        finally:
            stop_server(proc)
    return rows


def _model_name(client) -> str:
    """The server's (single) model: the first entry of the repository index, else 'demo'."""
    try:
        index = client.get_model_repository_index()
        if index.models:
            return index.models[0].name
    except Exception:
        pass
    return "demo"
