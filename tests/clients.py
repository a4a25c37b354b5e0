"""Client-side helpers shared by the tests that talk to a real `tta serve` (tritonclient.grpc and
the tta.v1 stubs): batches of the tiny model's input, request and reply helpers, error checks.

Imports only client code: tritonclient and the tta.v1 stubs can share a process (the server's
own inference stubs cannot; see conftest.py)."""
from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

import adapters
from runtime import protos

tta_pb = protos.load("tta.v1.adaptation_pb2")
tta_grpc = protos.load("tta.v1.adaptation_pb2_grpc")


def batches(n: int, size: int = 4, seed: int = 0, shift: float = 0.0) -> list[np.ndarray]:
    """A drifting stream of float32 NCHW batches in [0, 1]."""
    rng = np.random.default_rng(seed)
    return [np.clip(rng.random((size, 3, 16, 16), dtype=np.float32) * (0.6 + 0.1 * i) + shift + 0.05 * i, 0, 1)
            .astype(np.float32) for i in range(n)]


def fp32_input(x: np.ndarray) -> tc.InferInput:
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def infer(client, x, stream=None, request_id="", **kwargs):
    params = {"stream_id": stream} if stream else None
    return client.infer("tiny", [fp32_input(x)], parameters=params, request_id=request_id, **kwargs)


def logits(result) -> np.ndarray:
    return result.as_numpy("logits")


def parameters(result) -> dict:
    out = {}
    for k, v in result.get_response().parameters.items():
        out[k] = getattr(v, v.WhichOneof("parameter_choice"))
    return out


def reference(model, policy: str, **hyperparameters):
    return adapters.create(policy, model.module, **adapters.coerce(policy, hyperparameters))


def reference_outputs(model, policy, xs, **hyperparameters) -> list[np.ndarray]:
    adapter = reference(model, policy, **hyperparameters)
    return [adapter.step(torch.from_numpy(x)).numpy() for x in xs]


def assert_same(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def set_policy(control, stream, policy, **hp):
    return control.SetPolicy(tta_pb.SetPolicyRequest(stream_id=stream, policy=policy,
                                                     hyperparameters={k: str(v) for k, v in hp.items()}))


def expect_error(code: str, fragment: str, fn, *args, **kwargs):
    with pytest.raises(InferenceServerException) as info:
        fn(*args, **kwargs)
    assert info.value.status() == f"StatusCode.{code}", info.value
    assert fragment.lower() in info.value.message().lower(), info.value.message()
    return info.value.message()


def status(fn, *args, **kwargs) -> tuple[str, str]:
    """(status name, message) of a call that must fail, from tritonclient or a grpc stub."""
    try:
        fn(*args, **kwargs)
    except InferenceServerException as e:
        return str(e.status()).removeprefix("StatusCode."), e.message()
    except grpc.RpcError as e:
        return e.code().name, e.details()
    raise AssertionError(f"{fn} succeeded but should have failed")


# --- raw gRPC and metrics ---------------------------------------------------------------
def raw_unary(channel, method: str):
    """A unary call of `method` ("/package.Service/Rpc") that sends and returns raw bytes, as any
    gRPC client may (no stubs, no serialization)."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def raw_stream(channel, method: str):
    return channel.stream_stream(method, request_serializer=None, response_deserializer=None)


def scrape(server) -> dict[str, float]:
    """The server's /metrics samples, by their full name with labels."""
    text = urllib.request.urlopen(f"http://{server.host}:{server.metrics_port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def total(samples: dict, prefix: str, **labels) -> float:
    """The sum of a family's samples whose labels include `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in samples.items() if k.startswith(prefix + "{") and all(w in k for w in want))
