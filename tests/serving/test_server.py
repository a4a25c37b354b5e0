"""The server end to end: a real `tta serve` subprocess on loopback, the real tritonclient.grpc.

Results are compared with the same adapter run in-process on the same batches.
"""
from __future__ import annotations

import queue
import subprocess
import sys
from functools import partial

import cv2
import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

import adapters
from clients import (
    assert_same,
    batches,
    expect_error,
    fp32_input,
    infer,
    logits,
    parameters,
    reference,
    reference_outputs,
    scrape,
    set_policy,
    total,
    tta_grpc,
    tta_pb,
)
from conftest import REPO, TINY_LABELS
from runtime.model_config import load

torch.set_num_threads(1)  # the server runs with one thread too: same summation order


# --- helpers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(server):
    c = tc.InferenceServerClient(server.target)
    yield c
    c.close()


@pytest.fixture(scope="module")
def control(server):
    channel = grpc.insecure_channel(server.target)
    yield tta_grpc.AdaptationServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def tiny_model(tiny_config):
    return load(tiny_config, device="cpu")


# --- health, metadata -------------------------------------------------------------------
def test_health_metadata_and_config(server, client):
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService", "tta.v1.AdaptationService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    channel.close()
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and not client.is_model_ready("nope")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "tta-runtime" and "classification" in meta["extensions"]
    model_meta = client.get_model_metadata("tiny", as_json=True)
    assert model_meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": ["-1", "3", "16", "16"]}
    assert model_meta["outputs"][0]["shape"] == ["-1", "10"]
    assert client.get_model_repository_index(as_json=True)["models"] == [{"name": "tiny", "version": "1", "state": "READY"}]
    config = client.get_model_config("tiny", as_json=True)["config"]
    assert config["max_batch_size"] == 256 and config["input"][0]["dims"] == ["3", "16", "16"]
    before = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    infer(client, batches(1, size=3)[0], stream="stats")
    after = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 3
    assert int(after["execution_count"]) - int(before.get("execution_count", 0)) == 1
    assert int(after["inference_stats"]["success"]["count"]) >= 1 and int(after["last_inference"]) > 0


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(server.target)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="tta.v1.AdaptationService")])))
    channel.close()
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "tta.v1.AdaptationService", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in replies[1].file_descriptor_response.file_descriptor_proto]
    assert any(f.name == "tta/v1/adaptation.proto" for f in files)  # grpcurl can describe the service


# --- results equal the in-process adapter ----------------------------------------------
def test_unary_matches_in_process_adapter_and_reports_parameters(client, control, tiny_model):
    set_policy(control, "unary-tent", "tent", lr="0.01")
    xs = batches(4, seed=1)
    expected = reference_outputs(tiny_model, "tent", xs, lr="0.01")
    for t, (x, want) in enumerate(zip(xs, expected)):
        result = infer(client, x, stream="unary-tent", request_id=f"unary-{t}")
        assert_same(logits(result), want)
        p = parameters(result)
        assert p["stream_id"] == "unary-tent" and p["policy"] == "tent"
        assert p["tta_step"] == t  # the update of this batch comes after the reply
        assert 0.0 <= p["tta_entropy"] <= 1.0 and p["tta_bn_shift"] >= 0.0
        assert result.get_response().id == f"unary-{t}"
    # tent changed the outputs: the stream really adapted (not equal to the source model)
    frozen = tiny_model.module(torch.from_numpy(xs[-1])).detach().numpy()
    assert not np.allclose(logits(result), frozen, atol=1e-4)


def test_asyncio_tritonclient_works_too(server, control, tiny_model):
    import asyncio

    import tritonclient.grpc.aio as tc_aio

    set_policy(control, "aio", "bn")
    x = batches(1, seed=15)[0]

    async def call():
        client = tc_aio.InferenceServerClient(server.target)
        try:
            inp = tc_aio.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return (await client.infer("tiny", [inp], parameters={"stream_id": "aio"})).as_numpy("logits")
        finally:
            await client.close()

    assert_same(asyncio.run(call()), reference_outputs(tiny_model, "bn", [x])[0])


def test_stream_named_by_header(client, control, tiny_model):
    set_policy(control, "by-header", "bn-ema", momentum="0.3")
    xs = batches(3, seed=2)
    expected = reference_outputs(tiny_model, "bn-ema", xs, momentum="0.3")
    for x, want in zip(xs, expected):
        result = client.infer("tiny", [fp32_input(x)], headers={"x-tta-stream-id": "by-header"})
        assert parameters(result)["stream_id"] == "by-header"
        assert_same(logits(result), want)
    msg = expect_error("INVALID_ARGUMENT", "stream named twice", client.infer, "tiny", [fp32_input(xs[0])],
                       parameters={"stream_id": "other"}, headers={"x-tta-stream-id": "by-header"})
    assert "other" in msg


def test_two_streams_with_different_policies_evolve_independently(client, control, tiny_model):
    set_policy(control, "indep-a", "tent", lr="0.005")
    set_policy(control, "indep-b", "bn-ema")
    xa, xb = batches(4, seed=3), batches(4, seed=4, shift=0.2)
    want_a = reference_outputs(tiny_model, "tent", xa, lr="0.005")
    want_b = reference_outputs(tiny_model, "bn-ema", xb)
    for t in range(4):  # interleaved: each stream sees only its own history
        assert_same(logits(infer(client, xa[t], stream="indep-a")), want_a[t])
        assert_same(logits(infer(client, xb[t], stream="indep-b")), want_b[t])


def png_input(pixels_nhwc: np.ndarray) -> tc.InferInput:
    blobs = np.array([cv2.imencode(".png", cv2.cvtColor(p, cv2.COLOR_RGB2BGR))[1].tobytes() for p in pixels_nhwc],
                     dtype=np.object_)
    inp = tc.InferInput("input", [len(blobs)], "BYTES")
    inp.set_data_from_numpy(blobs)
    return inp


def test_streaming_matches_in_process_and_survives_bad_requests(server, control, tiny_model):
    """Requests sent without waiting, FP32 and PNG alternating (PNG decoding runs off the event
    loop), a malformed one in the middle: replies come back in order, equal to the adapter's."""
    set_policy(control, "bidi", "tent", lr="0.01")
    rng = np.random.default_rng(5)
    pixels = [rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8) for _ in range(6)]
    xs = [(p.astype(np.float32) / 255).transpose(0, 3, 1, 2).copy() for p in pixels]
    expected = reference_outputs(tiny_model, "tent", xs, lr="0.01")
    replies: queue.Queue = queue.Queue()
    client = tc.InferenceServerClient(server.target)
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    bad = tc.InferInput("input", [1, 3, 8, 8], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    for t, (x, p) in enumerate(zip(xs, pixels)):
        client.async_stream_infer("tiny", [png_input(p) if t % 2 else fp32_input(x)], request_id=f"bidi-{t}",
                                  parameters={"stream_id": "bidi"})
        if t == 1:
            client.async_stream_infer("tiny", [bad], parameters={"stream_id": "bidi"})  # wrong shape mid-stream
    got = [replies.get(timeout=30) for _ in range(7)]
    client.stop_stream()
    client.close()
    errors = [e for _, e in got if e is not None]
    assert len(errors) == 1 and "INVALID_ARGUMENT" in str(errors[0]) and "shape" in str(errors[0])
    results = [r for r, e in got if e is None]
    assert [r.get_response().id for r in results] == [f"bidi-{t}" for t in range(6)]
    for result, want in zip(results, expected):  # the bad frame did not disturb the stream
        assert_same(logits(result), want)


def test_triton_sequence_parameters_map_onto_streams(client, control, tiny_model):
    """sequence_id names the stream; sequence_start resets it; sequence_end checkpoints it to
    disk and frees its memory (the next batch loads it back)."""
    set_policy(control, "cam-seq", "tent", lr="0.01")
    xs = batches(3, seed=14)
    expected = reference_outputs(tiny_model, "tent", xs, lr="0.01")
    run = partial(client.infer, "tiny", sequence_id="cam-seq")
    assert_same(logits(run([fp32_input(xs[0])], sequence_start=True)), expected[0])
    assert_same(logits(run([fp32_input(xs[1])])), expected[1])
    result = run([fp32_input(xs[2])], sequence_end=True)
    assert_same(logits(result), expected[2])
    assert parameters(result)["stream_id"] == "cam-seq"
    info = control.GetStream(tta_pb.StreamRequest(stream_id="cam-seq"))
    assert not info.resident and info.step == 3 and info.policy == "tent"
    assert_same(logits(run([fp32_input(xs[0])], sequence_start=True)), expected[0])  # a new sequence
    assert parameters(client.infer("tiny", [fp32_input(xs[0])], sequence_id=42))["stream_id"] == "42"


def test_stream_with_triton_grpc_error_header_ends_with_the_status(server):
    replies: queue.Queue = queue.Queue()
    client = tc.InferenceServerClient(server.target)
    client.start_stream(callback=lambda result, error: replies.put((result, error)),
                        headers={"triton_grpc_error": "true"})
    bad = tc.InferInput("input", [1, 3, 8, 8], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    client.async_stream_infer("tiny", [bad])
    result, error = replies.get(timeout=30)
    client.stop_stream()
    client.close()
    assert result is None and error.status() == "StatusCode.INVALID_ARGUMENT" and "shape" in error.message()


# --- control service --------------------------------------------------------------------
def test_snapshot_rollback_reset_and_set_policy(client, control, tiny_model):
    stream = "ctl"
    set_policy(control, stream, "tent", lr="0.01")
    xs = batches(4, seed=6)
    infer(client, xs[0], stream=stream)
    infer(client, xs[1], stream=stream)
    snap = control.Snapshot(tta_pb.SnapshotRequest(stream_id=stream, name="after-two"))
    assert snap.name == "after-two" and snap.stream.step == 2
    out3 = logits(infer(client, xs[2], stream=stream))
    infer(client, xs[3], stream=stream)
    info = control.Rollback(tta_pb.RollbackRequest(stream_id=stream, name="after-two"))
    assert info.step == 2 and info.snapshots == ["after-two"]
    assert_same(logits(infer(client, xs[2], stream=stream)), out3)  # the same state as then

    info = control.ResetStream(tta_pb.StreamRequest(stream_id=stream))
    assert info.step == 0 and info.policy == "tent"
    fresh = reference(tiny_model, "tent", lr="0.01")
    assert_same(logits(infer(client, xs[0], stream=stream)), fresh.step(torch.from_numpy(xs[0])).numpy())

    info = set_policy(control, stream, "source")
    assert info.policy == "source" and info.step == 0
    frozen = tiny_model.module(torch.from_numpy(xs[1])).detach().numpy()
    assert_same(logits(infer(client, xs[1], stream=stream)), frozen)
    assert parameters(infer(client, xs[1], stream=stream))["policy"] == "source"

    with pytest.raises(grpc.RpcError) as e:
        control.Rollback(tta_pb.RollbackRequest(stream_id=stream, name="never-taken"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "after-two" in e.value.details()


def test_policies_listed_with_hyperparameters(control):
    reply = control.ListPolicies(tta_pb.ListPoliciesRequest())
    names = [p.name for p in reply.policies]
    assert names == adapters.available() and list(reply.supported) == names
    cotta = next(p for p in reply.policies if p.name == "cotta")
    assert cotta.updates_weights and any(h.name == "lr" for h in cotta.hyperparameters)


def test_feedback_gives_online_accuracy(client, control):
    stream = "feedback"
    set_policy(control, stream, "bn")
    x = batches(1, size=6, seed=7)[0]
    predicted = logits(infer(client, x, stream=stream, request_id="fb-1")).argmax(axis=1)
    labels = predicted.copy()
    labels[:2] = (labels[:2] + 1) % 10  # two wrong
    reply = control.Feedback(tta_pb.FeedbackRequest(request_id="fb-1", labels=labels.tolist()))
    assert (reply.correct, reply.total, reply.stream_id, reply.policy) == (4, 6, stream, "bn")
    assert reply.stream_accuracy == pytest.approx(4 / 6)
    info = control.GetStream(tta_pb.StreamRequest(stream_id=stream))
    assert (info.feedback_correct, info.feedback_labels) == (4, 6)
    with pytest.raises(grpc.RpcError) as e:  # each request takes feedback once
        control.Feedback(tta_pb.FeedbackRequest(request_id="fb-1", labels=labels.tolist()))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    infer(client, x, stream=stream, request_id="fb-2")
    with pytest.raises(grpc.RpcError) as e:
        control.Feedback(tta_pb.FeedbackRequest(request_id="fb-2", labels=[1, 2]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "one label per sample" in e.value.details()


# --- input forms ------------------------------------------------------------------------
def test_uint8_png_and_typed_inputs_match_fp32(client, control, server):
    set_policy(control, "forms", "source")  # stateless: every form must give the same logits
    rng = np.random.default_rng(8)
    pixels = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)  # NHWC RGB
    x = (pixels.astype(np.float32) / 255).transpose(0, 3, 1, 2).copy()
    want = logits(infer(client, x, stream="forms"))

    u8 = tc.InferInput("input", list(pixels.shape), "UINT8")
    u8.set_data_from_numpy(pixels)
    assert_same(logits(client.infer("tiny", [u8], parameters={"stream_id": "forms"})), want)

    top = client.infer("tiny", [png_input(pixels)], parameters={"stream_id": "forms"},
                       outputs=[tc.InferRequestedOutput("logits", class_count=3)]).as_numpy("logits")
    assert top.shape == (2, 3)
    value, index, label = top[0, 0].decode().split(":")
    assert int(index) == int(want[0].argmax()) and label == TINY_LABELS[int(index)]
    assert float(value) == pytest.approx(float(want[0].max()), abs=1e-5)

    # typed contents (what KServe's client sends), through tritonclient's own stubs
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="tiny")
    request.parameters["stream_id"].string_param = "forms"
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    channel = grpc.insecure_channel(server.target)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    typed = np.frombuffer(stub.ModelInfer(request).raw_output_contents[0], dtype="<f4").reshape(2, 10)
    assert_same(typed, want)
    for datatype, shape, field, values in (
            ("UINT8", list(pixels.shape), "uint_contents", pixels.ravel().tolist()),
            ("BYTES", [2], "bytes_contents", [cv2.imencode(".png", cv2.cvtColor(p, cv2.COLOR_RGB2BGR))[1].tobytes()
                                               for p in pixels])):
        other = service_pb2.ModelInferRequest(model_name="tiny")
        other.parameters["stream_id"].string_param = "forms"
        tensor = other.inputs.add(name="input", datatype=datatype, shape=shape)
        getattr(tensor.contents, field).extend(values)
        out = np.frombuffer(stub.ModelInfer(other).raw_output_contents[0], dtype="<f4").reshape(2, 10)
        assert_same(out, want)
    request.raw_input_contents.append(x.tobytes())  # raw and typed together: refused
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request)
    channel.close()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "one form" in e.value.details()


# --- bad input: right status, actionable message, nobody else harmed --------------------
def test_bad_requests_get_clear_errors_and_harm_no_one(client, control, tiny_model):
    bystander = "bystander"
    set_policy(control, bystander, "tent", lr="0.01")
    xs = batches(3, seed=9)
    expected = reference_outputs(tiny_model, "tent", xs, lr="0.01")
    assert_same(logits(infer(client, xs[0], stream=bystander)), expected[0])

    x = batches(1, seed=10)[0]
    victim = {"stream_id": "victim"}
    wrong_shape = tc.InferInput("input", [4, 16, 16, 3], "FP32")
    wrong_shape.set_data_from_numpy(x.transpose(0, 2, 3, 1).copy())
    expect_error("INVALID_ARGUMENT", "[N, 3, 16, 16]", client.infer, "tiny", [wrong_shape], parameters=victim)

    wrong_dtype = tc.InferInput("input", list(x.shape), "INT32")
    wrong_dtype.set_data_from_numpy(x.astype(np.int32))
    expect_error("INVALID_ARGUMENT", "datatype 'INT32' is not accepted", client.infer, "tiny", [wrong_dtype],
                 parameters=victim)

    wrong_count = fp32_input(x[:2])
    wrong_count.set_shape([4, 3, 16, 16])  # claims 4 samples, carries 2
    expect_error("INVALID_ARGUMENT", "needs 12288 raw bytes", client.infer, "tiny", [wrong_count], parameters=victim)

    for bad_value in (np.nan, np.inf):
        poisoned = x.copy()
        poisoned[0, 0, 0, 0] = bad_value
        expect_error("INVALID_ARGUMENT", "NaN or Inf", infer, client, poisoned, stream="victim")

    expect_error("INVALID_ARGUMENT", "pixels in [0, 1]", infer, client, x * 255, stream="victim")

    garbage = tc.InferInput("input", [1], "BYTES")
    garbage.set_data_from_numpy(np.array([b"this is not an image"], dtype=np.object_))
    expect_error("INVALID_ARGUMENT", "not a decodable JPEG or PNG", client.infer, "tiny", [garbage], parameters=victim)

    bomb = tc.InferInput("input", [1], "BYTES")  # 250 kB of PNG that would decode to 243 MB
    bomb.set_data_from_numpy(np.array([cv2.imencode(".png", np.zeros((9000, 9000, 3), np.uint8))[1].tobytes()],
                                      dtype=np.object_))
    expect_error("INVALID_ARGUMENT", "resize it before sending", client.infer, "tiny", [bomb], parameters=victim)

    expect_error("NOT_FOUND", "unknown model 'nope'", client.infer, "nope", [fp32_input(x)])
    expect_error("INVALID_ARGUMENT", "exactly one input", client.infer, "tiny", [], parameters=victim)
    renamed = tc.InferInput("image", list(x.shape), "FP32")
    renamed.set_data_from_numpy(x)
    expect_error("INVALID_ARGUMENT", "named 'input'", client.infer, "tiny", [renamed], parameters=victim)

    big = np.random.default_rng(0).random((400, 3, 16, 16), dtype=np.float32)  # 1.2 MiB > the 1 MiB limit
    expect_error("RESOURCE_EXHAUSTED", "larger than max", infer, client, big, stream="victim")

    for policy, hp, fragment in (("nope", {}, "unknown policy 'nope'"),
                                 ("tent", {"lr": "fast"}, "'lr'"),
                                 ("tent", {"lr": "-1"}, "out of range"),
                                 ("bn", {"alpha": "0.1"}, "no hyperparameter 'alpha'"),
                                 ("cotta", {"generator": "global"}, "cannot be set over the wire")):
        with pytest.raises(grpc.RpcError) as e:
            set_policy(control, bystander, policy, **hp)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (policy, hp)
        assert fragment in e.value.details(), e.value.details()

    # the bystander kept its policy and state; the server still serves it, in order
    info = control.GetStream(tta_pb.StreamRequest(stream_id=bystander))
    assert info.policy == "tent" and info.step == 1
    assert_same(logits(infer(client, xs[1], stream=bystander)), expected[1])
    assert_same(logits(infer(client, xs[2], stream=bystander)), expected[2])
    assert client.is_server_ready()


# --- metrics over HTTP ------------------------------------------------------------------
def test_metrics_expose_families_that_move(server, client, control):
    set_policy(control, "tracked-a", "tent", lr="0.01")
    set_policy(control, "untracked-x", "bn")
    before = scrape(server)
    with pytest.raises(InferenceServerException):
        infer(client, np.full((1, 3, 16, 16), np.nan, np.float32), stream="tracked-a")
    for t, x in enumerate(batches(3, seed=11, shift=0.3)):  # a shifted stream
        infer(client, x, stream="tracked-a", request_id=f"m-a-{t}")
        infer(client, x, stream="untracked-x", request_id=f"m-x-{t}")
    predicted = logits(infer(client, batches(1, seed=12)[0], stream="tracked-a", request_id="m-fb")).argmax(axis=1)
    control.Feedback(tta_pb.FeedbackRequest(request_id="m-fb", labels=predicted.tolist()))
    control.GetStream(tta_pb.StreamRequest(stream_id="tracked-a"))  # applies the pending update
    after = scrape(server)

    def moved(prefix, **labels):
        return total(after, prefix, **labels) - total(before, prefix, **labels)

    assert moved("tta_requests_total", method="ModelInfer") >= 7
    assert moved("tta_batch_size_count") >= 7
    assert moved("tta_inference_duration_seconds_count", policy="tent") >= 4
    assert moved("tta_queue_duration_seconds_count") >= 7
    assert moved("tta_bn_shift_count", stream="tracked-a") == 4
    assert moved("tta_bn_shift_count", stream="_other", policy="bn") == 3  # untracked streams roll up
    assert not any('stream="untracked-x"' in k for k in after)
    assert moved("tta_prediction_entropy_ratio_count", stream="tracked-a") == 16  # per sample
    assert moved("tta_prediction_confidence_ratio_count", stream="tracked-a") == 16
    assert moved("tta_adaptation_loss_count", stream="tracked-a") >= 3
    assert moved("tta_adaptation_updates_total", stream="tracked-a") >= 3
    assert total(after, "tta_weight_distance_ratio", stream="tracked-a") > 0
    assert 0 < total(after, "tta_class_marginal_entropy_ratio", stream="tracked-a", policy="tent") <= 1
    assert total(after, "tta_stream_bn_shift", stream="tracked-a", policy="tent") > 0
    assert moved("tta_feedback_labels_total", stream="tracked-a") == 4
    assert total(after, "tta_online_accuracy_ratio", stream="tracked-a", policy="tent") == 1.0
    assert total(after, "tta_streams", state="resident") >= 2
    assert total(after, "tta_stream_state_bytes") > 0
    assert total(after, "tta_stream_resets_total", reason="policy_change") >= 1
    assert moved("tta_request_failures_total", code="INVALID_ARGUMENT", method="ModelInfer") == 1


# --- the command-line client ------------------------------------------------------------
def test_tta_ctl_drives_the_control_service(server, client):
    run = partial(subprocess.run, capture_output=True, text=True, cwd=REPO, timeout=60)
    tta = [sys.executable, "-m", "runtime.cli", "ctl", "--target", server.target]
    out = run([*tta, "set-policy", "via-ctl", "bn-alpha", "alpha=0.2"])
    assert out.returncode == 0, out.stderr
    assert "policy bn-alpha alpha=0.2" in out.stdout
    infer(client, batches(1, seed=13)[0], stream="via-ctl", request_id="ctl-req")
    out = run([*tta, "--json", "get", "via-ctl"])
    assert out.returncode == 0 and '"batches": "1"' in out.stdout
    out = run([*tta, "snapshot", "via-ctl", "--name", "s1"])
    assert out.returncode == 0 and "'s1'" in out.stdout
    out = run([*tta, "set-policy", "via-ctl", "tent", "lr=abc"])
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr and "'lr'" in out.stderr
    out = run([*tta, "streams"])
    assert out.returncode == 0 and "via-ctl: policy bn-alpha" in out.stdout
