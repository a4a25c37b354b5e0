"""Wire hygiene: bytes that do not parse as the request message, client strings of any length, and
error messages that show nothing of the server's file system. One real `tta serve` (its own, so
its log is this module's alone; messages up to the default 64 MiB, so 1 MB strings arrive; a
state dir and no memory budget, so every idle stream is on disk), raw gRPC and tritonclient."""
from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from clients import batches, raw_stream, raw_unary, scrape, status, total, tta_grpc, tta_pb
from conftest import REPO, ServerProcess

MALFORMED = b"\xff" * 16  # a varint that never ends: no message parses from it
BIG = "x" * (1 << 20)  # 1 MB: far past what a gRPC status (a trailer of 8-16 KB) can carry
X = batches(1, seed=50)[0]


@pytest.fixture(scope="module")
def srv(tiny_config, tmp_path_factory):
    state = tmp_path_factory.mktemp("hygiene-state")
    proc = ServerProcess("--model", str(tiny_config), "--state-dir", str(state), "--memory-budget-mb", "0")
    proc.state = state
    channel = grpc.insecure_channel(proc.target, options=[("grpc.max_send_message_length", 64 << 20)])
    proc.channel = channel
    proc.infer = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    proc.control = tta_grpc.AdaptationServiceStub(channel)
    yield proc
    channel.close()
    assert proc.stop() == 0


def infer_request(stream="hygiene", model="tiny", name="input", datatype="FP32", shape=X.shape):
    r = service_pb2.ModelInferRequest(model_name=model)
    r.inputs.add(name=name, datatype=datatype, shape=list(shape))
    r.raw_input_contents.append(X.tobytes())
    r.parameters["stream_id"].string_param = stream
    return r


def new_log(srv, since: int) -> str:
    time.sleep(0.5)  # the log is read from a pipe by a thread
    return srv.stderr()[since:]


# --- bytes that are not the request message --------------------------------------------------
RAW_UNARY = [
    ("inference.GRPCInferenceService", "ModelInfer", "inference.ModelInferRequest"),
    ("inference.GRPCInferenceService", "ModelMetadata", "inference.ModelMetadataRequest"),
    ("inference.GRPCInferenceService", "ServerLive", "inference.ServerLiveRequest"),
    ("tta.v1.AdaptationService", "SetPolicy", "tta.v1.SetPolicyRequest"),
    ("tta.v1.AdaptationService", "GetStream", "tta.v1.StreamRequest"),
    ("tta.v1.AdaptationService", "ListStreams", "tta.v1.ListStreamsRequest"),
]


@pytest.mark.parametrize("service,method,message_name", RAW_UNARY)
def test_malformed_request_bytes_are_invalid_argument_and_counted(srv, service, method, message_name):
    log, before = len(srv.stderr()), scrape(srv)
    code, message = status(raw_unary(srv.channel, f"/{service}/{method}"), MALFORMED, timeout=30)
    assert code == "INVALID_ARGUMENT", (code, message)
    assert f"the request is not a valid {message_name} protobuf" in message
    after = scrape(srv)
    assert total(after, "tta_requests_total", method=method) - total(before, "tta_requests_total", method=method) == 1
    assert total(after, "tta_request_failures_total", method=method, code="INVALID_ARGUMENT") - \
        total(before, "tta_request_failures_total", method=method, code="INVALID_ARGUMENT") == 1
    # the server is alive and serves well-formed requests as before
    assert srv.proc.poll() is None
    assert srv.infer.ModelInfer(infer_request(), timeout=30).outputs[0].shape == [4, 10]
    assert srv.control.GetStream(tta_pb.StreamRequest(stream_id="hygiene"), timeout=30).stream_id == "hygiene"
    assert "Traceback" not in new_log(srv, log)


def test_a_malformed_message_fails_alone_inside_model_stream_infer(srv):
    log, before = len(srv.stderr()), scrape(srv)
    good = infer_request(stream="hygiene-stream").SerializeToString()
    replies = [service_pb2.ModelStreamInferResponse.FromString(r) for r in
               raw_stream(srv.channel, "/inference.GRPCInferenceService/ModelStreamInfer")(
                   iter([MALFORMED, good, MALFORMED, good]), timeout=60)]
    assert len(replies) == 4
    for bad in (replies[0], replies[2]):
        assert bad.error_message.startswith("INVALID_ARGUMENT: the request is not a valid "
                                            "inference.ModelInferRequest protobuf"), bad.error_message
    for ok in (replies[1], replies[3]):
        assert not ok.error_message and ok.infer_response.outputs[0].shape == [4, 10]
    assert srv.control.GetStream(tta_pb.StreamRequest(stream_id="hygiene-stream"), timeout=30).batches == 2
    after = scrape(srv)
    moved = lambda family, **labels: total(after, family, **labels) - total(before, family, **labels)  # noqa: E731
    assert moved("tta_requests_total", method="ModelStreamInfer") == 4
    assert moved("tta_request_failures_total", method="ModelStreamInfer", code="INVALID_ARGUMENT") == 2

    # Triton's opt-in header: the malformed message ends the stream with its status
    call = raw_stream(srv.channel, "/inference.GRPCInferenceService/ModelStreamInfer")(
        iter([MALFORMED]), timeout=60, metadata=[("triton_grpc_error", "true")])
    code, message = status(list, call)
    assert code == "INVALID_ARGUMENT" and "not a valid inference.ModelInferRequest protobuf" in message
    assert srv.proc.poll() is None
    assert "Traceback" not in new_log(srv, log)


# --- client strings of any length -------------------------------------------------------------
def _many_inputs():
    r = infer_request()
    for i in range(3000):
        r.inputs.add(name=f"{i:04d}" + "i" * 350, datatype="FP32", shape=[1])
    return r


def _outputs(name):
    r = infer_request()
    r.outputs.add(name=name)
    return r


def _named_twice(srv):
    return srv.infer.ModelInfer(infer_request(stream=BIG), metadata=[("x-tta-stream-id", "other")], timeout=60)


def _hyperparameters(srv, policy, **hyperparameters):
    return srv.control.SetPolicy(tta_pb.SetPolicyRequest(stream_id="hygiene", policy=policy,
                                                         hyperparameters=hyperparameters), timeout=60)


LONG = [
    ("model name", lambda s: s.infer.ModelInfer(infer_request(model=BIG), timeout=60), "NOT_FOUND", "unknown model"),
    ("model version", lambda s: s.infer.ModelInfer(
        service_pb2.ModelInferRequest(model_name="tiny", model_version=BIG), timeout=60), "NOT_FOUND", "no version"),
    ("model metadata name", lambda s: s.infer.ModelMetadata(service_pb2.ModelMetadataRequest(name=BIG), timeout=60),
     "NOT_FOUND", "unknown model"),
    ("stream id", lambda s: s.infer.ModelInfer(infer_request(stream=BIG), timeout=60), "INVALID_ARGUMENT",
     "at most 128"),
    ("stream named twice", _named_twice, "INVALID_ARGUMENT", "stream named twice"),
    ("input name", lambda s: s.infer.ModelInfer(infer_request(name=BIG), timeout=60), "INVALID_ARGUMENT",
     "unknown input"),
    ("3000 long input names", lambda s: s.infer.ModelInfer(_many_inputs(), timeout=60), "INVALID_ARGUMENT",
     "exactly one input"),
    ("output name", lambda s: s.infer.ModelInfer(_outputs(BIG), timeout=60), "INVALID_ARGUMENT", "unknown output"),
    ("datatype", lambda s: s.infer.ModelInfer(infer_request(datatype=BIG), timeout=60), "INVALID_ARGUMENT",
     "input datatype"),
    ("shape of 200000 dimensions", lambda s: s.infer.ModelInfer(infer_request(shape=(1, 3, 16, 16) + (1,) * 200_000),
                                                                timeout=60), "INVALID_ARGUMENT", "shape"),
    ("control model name", lambda s: s.control.GetStream(tta_pb.StreamRequest(model=BIG, stream_id="hygiene"),
                                                         timeout=60), "NOT_FOUND", "unknown model"),
    ("control stream id", lambda s: s.control.GetStream(tta_pb.StreamRequest(stream_id=BIG), timeout=60),
     "INVALID_ARGUMENT", "at most 128"),
    ("policy name", lambda s: _hyperparameters(s, BIG), "INVALID_ARGUMENT", "unknown policy"),
    ("hyperparameter name", lambda s: _hyperparameters(s, "tent", **{BIG: "1"}), "INVALID_ARGUMENT",
     "no hyperparameter"),
    ("hyperparameter value", lambda s: _hyperparameters(s, "tent", lr=BIG), "INVALID_ARGUMENT", "cannot read"),
    ("norm_options", lambda s: _hyperparameters(s, "tent", norm="unmix-tns", norm_options=BIG), "INVALID_ARGUMENT",
     "norm_options"),
    ("snapshot name", lambda s: s.control.Snapshot(tta_pb.SnapshotRequest(stream_id="hygiene", name=BIG), timeout=60),
     "INVALID_ARGUMENT", "snapshot name"),
    ("rollback name", lambda s: s.control.Rollback(tta_pb.RollbackRequest(stream_id="hygiene", name=BIG), timeout=60),
     "INVALID_ARGUMENT", "snapshot name"),
    ("feedback request id", lambda s: s.control.Feedback(tta_pb.FeedbackRequest(request_id=BIG, labels=[1]),
                                                         timeout=60), "NOT_FOUND", "request id"),
]


@pytest.mark.parametrize("what,call,code,fragment", LONG, ids=[case[0] for case in LONG])
def test_long_client_strings_get_their_status_and_a_short_message(srv, what, call, code, fragment):
    srv.infer.ModelInfer(infer_request(), timeout=30)  # the stream exists (Snapshot, Rollback)
    got, message = status(call, srv)
    assert (got, fragment in message) == (code, True), (got, message[:300])
    assert len(message.encode()) <= 1024, (len(message), message[:300])
    assert srv.proc.poll() is None


# --- no server paths in what clients hear -----------------------------------------------------
ABSOLUTE_PATH = re.compile(r"(?:^|[\s'\"(=:,])/(?:[\w.-]+/)+")


def _damage(path: Path) -> None:
    for _ in range(200):  # written by the engine when another stream needs the memory
        if path.exists():
            break
        time.sleep(0.05)
    assert path.exists(), f"{path} was never written"
    path.write_bytes(b"not a checkpoint at all")


def test_error_messages_show_no_server_paths(srv, tiny_config):
    from test_bad_input import CASES  # every bad request the server refuses

    client = tc.InferenceServerClient(srv.target)
    ctx = SimpleNamespace(server=srv, client=client, infer=srv.infer, control=srv.control)
    messages = {}
    try:
        for name, call, *_ in CASES:
            messages[name] = status(call, ctx)

        # DATA_LOSS: a stream whose saved state is damaged, and a damaged snapshot
        srv.control.SetPolicy(tta_pb.SetPolicyRequest(stream_id="damaged", policy="tent"), timeout=30)
        srv.infer.ModelInfer(infer_request(stream="damaged"), timeout=30)
        srv.infer.ModelInfer(infer_request(stream="hygiene"), timeout=30)  # no memory budget: "damaged" to disk
        _damage(srv.state / "streams" / "damaged.pt")
        messages["damaged stream"] = status(srv.infer.ModelInfer, infer_request(stream="damaged"), timeout=30)
        srv.infer.ModelInfer(infer_request(stream="damaged-snapshot"), timeout=30)
        srv.control.Snapshot(tta_pb.SnapshotRequest(stream_id="damaged-snapshot", name="good"), timeout=30)
        _damage(srv.state / "snapshots" / "damaged-snapshot" / "good.pt")
        messages["damaged snapshot"] = status(srv.control.Rollback, tta_pb.RollbackRequest(
            stream_id="damaged-snapshot", name="good"), timeout=30)
    finally:
        client.close()
    assert messages["damaged stream"][0] == "DATA_LOSS" and messages["damaged snapshot"][0] == "DATA_LOSS", messages

    forbidden = {str(REPO), str(srv.state), str(srv.state.resolve()), str(tiny_config.parent)}
    leaks = [f"{name}: {code}: {message}" for name, (code, message) in messages.items()
             if any(path in message for path in forbidden) or ABSOLUTE_PATH.search(message)]
    assert not leaks, "\n".join(leaks)
    assert srv.proc.poll() is None


def test_shown_and_bounded():
    from runtime.engine.errors import shown
    from runtime.serving.errors import bounded

    assert shown("cam-1") == "'cam-1'"
    assert shown(BIG) == repr("x" * 64) + "…(1048576 chars)"
    assert len(shown("\x00" * 10_000)) < 300 and len(shown(list(range(10_000)))) < 300
    assert bounded("short") == "short"
    cut = bounded("€" * 10_000)
    assert len(cut.encode()) <= 1024 and cut.endswith("…(cut, 30000 bytes)")
