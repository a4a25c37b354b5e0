"""Overload against a real server: per-stream backpressure and client deadlines.

A cotta stream with many augmented teacher passes keeps the engine busy for a while, so later
requests are certain to wait in the queue."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from conftest import ServerProcess
from runtime import protos

pb, pb_grpc = protos.load("tta.v1.adaptation_pb2"), protos.load("tta.v1.adaptation_pb2_grpc")


def request(x: np.ndarray) -> list[tc.InferInput]:
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


@pytest.fixture(scope="module")
def busy_server(tiny_config):
    srv = ServerProcess("--model", str(tiny_config), "--max-stream-queue", "2")
    with grpc.insecure_channel(srv.target) as channel:
        pb_grpc.AdaptationServiceStub(channel).SetPolicy(pb.SetPolicyRequest(
            stream_id="heavy", policy="cotta", hyperparameters={"n_augmentations": "1024", "threshold": "1.0"}))
    yield srv
    assert srv.stop() == 0


class occupy(threading.Thread):
    """Send one heavy cotta batch from another thread (the engine works on it for a while);
    `done_at` tells when its reply came, so a test can check the engine really was busy."""

    def __init__(self, srv):
        super().__init__()
        self.srv, self.done_at = srv, float("inf")
        self.start()
        time.sleep(0.3)  # let it reach the engine first

    def run(self):
        client = tc.InferenceServerClient(self.srv.target)
        client.infer("tiny", request(np.full((16, 3, 16, 16), 0.5, np.float32)), parameters={"stream_id": "heavy"})
        self.done_at = time.monotonic()
        client.close()


def batches_of(srv, stream: str) -> int:
    with grpc.insecure_channel(srv.target) as channel:
        try:
            return pb_grpc.AdaptationServiceStub(channel).GetStream(pb.StreamRequest(stream_id=stream)).batches
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
            return 0


def test_expired_deadline_is_answered_and_the_batch_is_never_adapted_on(busy_server):
    client = tc.InferenceServerClient(busy_server.target)
    client.infer("tiny", request(np.full((4, 3, 16, 16), 0.3, np.float32)), parameters={"stream_id": "late"})
    before = batches_of(busy_server, "late")
    heavy = occupy(busy_server)
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", request(np.full((4, 3, 16, 16), 0.7, np.float32)), parameters={"stream_id": "late"},
                     client_timeout=0.2)
    refused_at = time.monotonic()
    assert "Deadline" in str(e.value) or "DEADLINE" in str(e.value)
    heavy.join(120)
    assert heavy.done_at > refused_at, "the engine was not busy long enough for this test to mean anything"
    assert batches_of(busy_server, "late") == before  # the expired batch was dropped, not adapted on
    client.infer("tiny", request(np.full((4, 3, 16, 16), 0.3, np.float32)), parameters={"stream_id": "late"})
    assert batches_of(busy_server, "late") == before + 1
    client.close()


def test_a_stream_over_its_queue_limit_gets_resource_exhausted_others_do_not(busy_server):
    results: dict[str, list] = {"hog": [], "other": []}

    def send(stream: str, i: int):
        client = tc.InferenceServerClient(busy_server.target)
        try:
            client.infer("tiny", request(np.full((4, 3, 16, 16), 0.1 * i, np.float32)), parameters={"stream_id": stream})
            results[stream].append("ok")
        except InferenceServerException as e:
            results[stream].append(e.status() + " " + e.message())
        finally:
            client.close()

    heavy = occupy(busy_server)
    threads = [threading.Thread(target=send, args=("hog", i)) for i in range(4)]
    threads.append(threading.Thread(target=send, args=("other", 0)))
    for t in threads:
        t.start()
        time.sleep(0.05)
    sent_at = time.monotonic()
    for t in threads:
        t.join(120)
    heavy.join(120)
    assert heavy.done_at > sent_at, "the engine was not busy long enough for this test to mean anything"
    refused = [r for r in results["hog"] if r != "ok"]
    assert results["hog"].count("ok") == 2 and len(refused) == 2, results
    assert all(r.startswith("StatusCode.RESOURCE_EXHAUSTED") and "'hog' already has 2 batches waiting" in r
               for r in refused), refused
    assert results["other"] == ["ok"]


def test_a_refusal_carries_grpc_retry_pushback(busy_server):
    """RESOURCE_EXHAUSTED for load comes with gRPC's standard `grpc-retry-pushback-ms` trailer
    (whole milliseconds), which gRPC clients with a retry policy (runtime.protocol.RETRY_SERVICE_CONFIG)
    wait out before retrying."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    x = np.full((4, 3, 16, 16), 0.2, np.float32)
    req = service_pb2.ModelInferRequest(model_name="tiny", raw_input_contents=[x.tobytes()])
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.parameters["stream_id"].string_param = "pushy"
    heavy = occupy(busy_server)
    with grpc.insecure_channel(busy_server.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        waiting = [stub.ModelInfer.future(req) for _ in range(2)]  # its queue limit: 2
        time.sleep(0.2)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(req)
        sent_at = time.monotonic()
        for w in waiting:
            w.result(timeout=120)
    heavy.join(120)
    assert heavy.done_at > sent_at, "the engine was not busy long enough for this test to mean anything"
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    pushback = dict(refused.value.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
    assert pushback is not None and pushback.isdigit() and int(pushback) >= 1, refused.value.trailing_metadata()
    assert "already has 2 batches waiting" in refused.value.details()
