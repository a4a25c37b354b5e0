"""gRPC vs in-process, for `tta bench`: a real `tta serve` subprocess on loopback, driven by
tritonclient (unary and streaming), against the same policy run in-process on the same batches.

tritonclient and our own `inference` stubs cannot share a process (both register
`inference.*` in protobuf's default pool), so the server always runs in a subprocess here."""
from __future__ import annotations

import queue
import statistics

import numpy as np
import torch

import adapters

POLICIES = ("source", "bn")


def bench_grpc(model, batches, device, quick: bool = False) -> list[dict]:
    import tritonclient.grpc as grpcclient

    from runtime.bench import time_call
    from runtime.demo import StartedServer

    rows = []
    for policy in POLICIES:
        server = StartedServer(0, -1, extra_args=("--policy", policy))
        try:
            client = grpcclient.InferenceServerClient(server.target)
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
            server.stop()
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
