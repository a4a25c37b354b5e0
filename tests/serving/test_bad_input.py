"""Bad input, table-driven: every malformed request gets its specified status and a message that
says what to send instead; none of them harms the server or another stream. A witness stream
(TENT, which updates its weights every batch) is fed a fixed sequence of batches with the bad
requests interleaved, while another thread keeps switching a third stream's policy and
inferring on it; the witness's outputs must equal those of the same sequence on a clean stream
(to float rounding: a reply may come from ONNX Runtime or torch). One real server (conftest's,
messages over 1 MiB refused), real tritonclient."""
from __future__ import annotations

import queue
import struct
import threading
from types import SimpleNamespace

import cv2
import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from clients import batches, fp32_input, logits, set_policy, status, tta_grpc, tta_pb

WITNESS, CLEAN, CHURN, VICTIM = "bad-input-witness", "bad-input-clean", "bad-input-churn", "bad-input-victim"
WITNESS_POLICY = {"policy": "tent", "lr": "0.01"}
X = batches(1, seed=10)[0]  # a valid (4, 3, 16, 16) batch


@pytest.fixture(scope="module")
def ctx(server):
    channel = grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 8 << 20)])
    c = SimpleNamespace(server=server, client=tc.InferenceServerClient(server.target),
                        infer=service_pb2_grpc.GRPCInferenceServiceStub(channel),
                        control=tta_grpc.AdaptationServiceStub(channel))
    yield c
    c.client.close()
    channel.close()


# --- request builders -------------------------------------------------------------------------
def request(datatype="FP32", shape=(4, 3, 16, 16), raw: bytes | None = X.tobytes(), stream=VICTIM, name="input",
            model="tiny", **parameters) -> service_pb2.ModelInferRequest:
    """A raw ModelInferRequest (what tritonclient would send, but free to be wrong in any field)."""
    r = service_pb2.ModelInferRequest(model_name=model)
    if name is not None:
        r.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if raw is not None:
        r.raw_input_contents.append(raw)
    if stream is not None:
        r.parameters["stream_id"].string_param = stream
    for key, value in parameters.items():
        field = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}[type(value)]
        setattr(r.parameters[key], field, value)
    return r


def typed(datatype: str, shape, field: str, values, raw: bytes | None = None) -> service_pb2.ModelInferRequest:
    r = request(datatype, shape, raw=raw)
    getattr(r.inputs[0].contents, field).extend(values)
    return r


def edited(r: service_pb2.ModelInferRequest, change) -> service_pb2.ModelInferRequest:
    change(r)
    return r


def classification(value) -> service_pb2.ModelInferRequest:
    """A request for the top-k output, with `value` as its (wrongly typed or valued) k."""
    r = request()
    p = r.outputs.add(name="logits").parameters["classification"]
    setattr(p, "string_param" if isinstance(value, str) else "int64_param", value)
    return r


def poisoned(value: float) -> np.ndarray:
    x = X.copy()
    x[1, 2, 3, 4] = value
    return x


def png_bomb() -> bytes:
    """250 kB of PNG that declares 81 M pixels (243 MB decoded)."""
    return cv2.imencode(".png", np.zeros((9000, 9000, 3), np.uint8))[1].tobytes()


def length_prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def infer(c, r, metadata=None):
    return c.infer.ModelInfer(r, metadata=metadata, timeout=60)


def stream_infer(c, bad: np.ndarray):
    """A bad request then a good one on one ModelStreamInfer call (tritonclient): the bad one's
    error comes back as error_message "<STATUS>: <message>" and the stream goes on."""
    replies: queue.Queue = queue.Queue()
    c.client.start_stream(callback=lambda result, error: replies.put(error or result))
    try:
        c.client.async_stream_infer("tiny", [fp32_input(bad)], parameters={"stream_id": VICTIM})
        c.client.async_stream_infer("tiny", [fp32_input(X)], parameters={"stream_id": VICTIM})
        first, second = replies.get(timeout=60), replies.get(timeout=60)
    finally:
        c.client.stop_stream()
    assert second.as_numpy("logits").shape == (4, 10), second  # the stream survived the bad frame
    code, _, message = first.message().partition(": ")
    raise InferenceServerException(message, status=f"StatusCode.{code}")


def set_witness_policy(c, **hyperparameters):
    return c.control.SetPolicy(tta_pb.SetPolicyRequest(stream_id=WITNESS, policy="tent",
                                                       hyperparameters=hyperparameters))


# (name, call, expected status, message fragment). Calls that name a stream use VICTIM, except the
# control calls aimed at the witness itself, which must leave it untouched.
CASES = [
    # shape
    ("FP32 NHWC instead of NCHW", lambda c: infer(c, request(shape=(4, 16, 16, 3))), "INVALID_ARGUMENT", "[N, 3, 16, 16]"),
    ("FP32 without batch dimension", lambda c: infer(c, request(shape=(3, 16, 16))), "INVALID_ARGUMENT",
     "[N, 3, 16, 16]"),
    ("FP32 wrong image size", lambda c: infer(c, request(shape=(1, 3, 32, 32), raw=bytes(3 * 32 * 32 * 4))),
     "INVALID_ARGUMENT", "Other sizes: send UINT8"),
    ("empty shape", lambda c: infer(c, request(shape=())), "INVALID_ARGUMENT", "batch dimension of at least 1"),
    ("batch of zero", lambda c: infer(c, request(shape=(0, 3, 16, 16), raw=b"")), "INVALID_ARGUMENT",
     "batch dimension of at least 1"),
    ("negative dimension", lambda c: infer(c, request(shape=(-4, 3, 16, 16))), "INVALID_ARGUMENT", "negative dimension"),
    ("batch over max_batch_size", lambda c: infer(c, request(shape=(257, 3, 16, 16), raw=b"")), "INVALID_ARGUMENT",
     "max_batch_size 256"),
    ("UINT8 with 4 channels", lambda c: infer(c, request("UINT8", (1, 16, 16, 4), raw=bytes(1024))),
     "INVALID_ARGUMENT", "[N, H, W, 3]"),
    ("UINT8 image over 8192 a side", lambda c: infer(c, request("UINT8", (1, 9000, 1, 3), raw=b"")),
     "INVALID_ARGUMENT", "outside 1..8192"),
    ("BYTES with 2-D shape", lambda c: infer(c, request("BYTES", (1, 2), raw=length_prefixed(b"a", b"b"))),
     "INVALID_ARGUMENT", "shape [N]"),
    # datatype
    ("INT32 datatype", lambda c: infer(c, request("INT32")), "INVALID_ARGUMENT", "datatype 'INT32' is not accepted"),
    ("FP64 datatype", lambda c: infer(c, request("FP64", raw=X.astype(np.float64).tobytes())), "INVALID_ARGUMENT",
     "datatype 'FP64' is not accepted"),
    ("made-up datatype", lambda c: infer(c, request("FLOAT")), "INVALID_ARGUMENT", "datatype 'FLOAT'"),
    # element count
    ("raw shorter than shape", lambda c: infer(c, request(raw=X[:2].tobytes())), "INVALID_ARGUMENT",
     "needs 12288 raw bytes (3072 elements), got 6144"),
    ("raw longer than shape", lambda c: infer(c, request(shape=(1, 3, 16, 16))), "INVALID_ARGUMENT",
     "needs 3072 raw bytes"),
    ("empty raw contents", lambda c: infer(c, request(raw=b"")), "INVALID_ARGUMENT", "got 0"),
    ("typed FP32 count wrong", lambda c: infer(c, typed("FP32", (1, 3, 16, 16), "fp32_contents", [0.5] * 10, raw=None)),
     "INVALID_ARGUMENT", "needs 768 fp32_contents, got 10"),
    ("raw and typed contents mixed", lambda c: infer(c, typed("FP32", (4, 3, 16, 16), "fp32_contents", [0.5],
                                                              raw=X.tobytes())), "INVALID_ARGUMENT", "use one form"),
    ("two raw entries for one input", lambda c: infer(c, edited(request(), lambda r: r.raw_input_contents.append(b"x"))),
     "INVALID_ARGUMENT", "2 raw_input_contents entries"),
    ("no data at all", lambda c: infer(c, request(raw=None)), "INVALID_ARGUMENT", "has no data"),
    ("UINT8 typed value over 255", lambda c: infer(c, typed("UINT8", (1, 1, 1, 3), "uint_contents", [1, 2, 300])),
     "INVALID_ARGUMENT", "above 255"),
    # values
    ("NaN pixel", lambda c: infer(c, request(raw=poisoned(np.nan).tobytes())), "INVALID_ARGUMENT", "1 NaN or Inf"),
    ("+Inf pixel", lambda c: infer(c, request(raw=poisoned(np.inf).tobytes())), "INVALID_ARGUMENT", "NaN or Inf"),
    ("-Inf in typed contents", lambda c: infer(c, typed("FP32", (1, 3, 16, 16), "fp32_contents",
                                                        [0.5] * 767 + [-np.inf])), "INVALID_ARGUMENT", "NaN or Inf"),
    ("0..255 pixels as FP32", lambda c: infer(c, request(raw=(X * 255).tobytes())), "INVALID_ARGUMENT",
     "is it 0..255 (send UINT8)?"),
    ("already normalised FP32", lambda c: infer(c, request(raw=((X - 0.5) / 0.25).tobytes())), "INVALID_ARGUMENT",
     "was it normalised already"),
    # oversized, empty, undecodable
    ("message over --max-message-mb", lambda c: infer(c, request(shape=(100, 3, 32, 32), raw=bytes(1_228_800))),
     "RESOURCE_EXHAUSTED", "larger than max"),
    ("no inputs", lambda c: infer(c, request(name=None, raw=None)), "INVALID_ARGUMENT",
     "exactly one input named 'input', got 0"),
    ("two inputs", lambda c: infer(c, edited(request(), lambda r: r.inputs.add(name="extra", datatype="FP32",
                                                                                  shape=[1]))),
     "INVALID_ARGUMENT", "exactly one input"),
    ("misnamed input", lambda c: infer(c, request(name="image")), "INVALID_ARGUMENT", "input is named 'input'"),
    ("undecodable image bytes", lambda c: infer(c, request("BYTES", (1,), raw=length_prefixed(b"not an image"))),
     "INVALID_ARGUMENT", "not a decodable JPEG or PNG"),
    ("empty image element", lambda c: infer(c, request("BYTES", (1,), raw=length_prefixed(b""))), "INVALID_ARGUMENT",
     "element 0 (0 bytes) is not a decodable"),
    ("truncated BYTES length prefix", lambda c: infer(c, request("BYTES", (1,), raw=b"\x05\x00")), "INVALID_ARGUMENT",
     "truncated"),
    ("BYTES element longer than the data", lambda c: infer(c, request("BYTES", (1,), raw=b"\xff\x00\x00\x00abc")),
     "INVALID_ARGUMENT", "claims 255 bytes but only 3 remain"),
    ("BYTES count differs from shape", lambda c: infer(c, request("BYTES", (2,), raw=length_prefixed(b"x"))),
     "INVALID_ARGUMENT", "needs 2 elements, got 1"),
    ("PNG decompression bomb", lambda c: infer(c, request("BYTES", (1,), raw=length_prefixed(png_bomb()))),
     "INVALID_ARGUMENT", "resize it before sending"),
    ("bad frame inside ModelStreamInfer", lambda c: stream_infer(c, poisoned(np.nan)),
     "INVALID_ARGUMENT", "NaN or Inf"),
    # unknown model / output / stream / snapshot / request
    ("unknown model", lambda c: infer(c, request(model="nope")), "NOT_FOUND", "unknown model 'nope'"),
    ("unknown model version", lambda c: infer(c, edited(request(), lambda r: setattr(r, "model_version", "7"))),
     "NOT_FOUND", "has no version '7'"),
    ("unknown output", lambda c: c.client.infer("tiny", [fp32_input(X)], parameters={"stream_id": VICTIM},
                                                outputs=[tc.InferRequestedOutput("probabilities")]),
     "INVALID_ARGUMENT", "unknown output 'probabilities'"),
    ("unknown stream: GetStream", lambda c: c.control.GetStream(tta_pb.StreamRequest(stream_id="never-seen")),
     "NOT_FOUND", "stream 'never-seen' does not exist"),
    ("unknown stream: ResetStream", lambda c: c.control.ResetStream(tta_pb.StreamRequest(stream_id="never-seen")),
     "NOT_FOUND", "does not exist"),
    ("unknown stream: DeleteStream", lambda c: c.control.DeleteStream(tta_pb.StreamRequest(stream_id="never-seen")),
     "NOT_FOUND", "does not exist"),
    ("unknown stream: Snapshot", lambda c: c.control.Snapshot(tta_pb.SnapshotRequest(stream_id="never-seen")),
     "NOT_FOUND", "does not exist"),
    ("unknown model: control", lambda c: c.control.GetStream(tta_pb.StreamRequest(model="nope", stream_id=WITNESS)),
     "NOT_FOUND", "unknown model 'nope'"),
    ("rollback without snapshots", lambda c: c.control.Rollback(tta_pb.RollbackRequest(stream_id=WITNESS)),
     "NOT_FOUND", "has no snapshots"),
    ("unknown snapshot name", lambda c: c.control.Rollback(tta_pb.RollbackRequest(stream_id=WITNESS, name="nope")),
     "NOT_FOUND", "has no snapshots"),
    ("path as snapshot name", lambda c: c.control.Snapshot(tta_pb.SnapshotRequest(stream_id=WITNESS,
                                                                                  name="../../escape")),
     "INVALID_ARGUMENT", "snapshot name '../../escape'"),
    ("unknown request id for feedback", lambda c: c.control.Feedback(tta_pb.FeedbackRequest(request_id="nope",
                                                                                            labels=[1])),
     "NOT_FOUND", "request id 'nope' is unknown"),
    ("feedback without request id", lambda c: c.control.Feedback(tta_pb.FeedbackRequest(labels=[1])),
     "INVALID_ARGUMENT", "request_id is required"),
    ("feedback label count wrong", lambda c: c.control.Feedback(tta_pb.FeedbackRequest(request_id="witness-0",
                                                                                       labels=[1, 2])),
     "INVALID_ARGUMENT", "had 4 samples; send one label per sample, got 2"),
    ("feedback label out of range", lambda c: c.control.Feedback(tta_pb.FeedbackRequest(request_id="witness-0",
                                                                                        labels=[1, 2, 3, 10])),
     "INVALID_ARGUMENT", "label 10 is not a class index in 0..9"),
    # stream ids
    ("stream id not printable", lambda c: infer(c, request(stream="cam\x00-1")), "INVALID_ARGUMENT", "printable"),
    ("stream id too long", lambda c: infer(c, request(stream="s" * 129)), "INVALID_ARGUMENT", "at most 128"),
    ("stream named twice, differently", lambda c: infer(c, request(), metadata=[("x-tta-stream-id", "other")]),
     "INVALID_ARGUMENT", "stream named twice and differently"),
    # invalid hyperparameters, aimed at the witness itself
    ("unknown policy", lambda c: c.control.SetPolicy(tta_pb.SetPolicyRequest(stream_id=WITNESS, policy="nope")),
     "INVALID_ARGUMENT", "unknown policy 'nope'"),
    ("hyperparameter not a number", lambda c: set_witness_policy(c, lr="fast"), "INVALID_ARGUMENT",
     "cannot read 'fast' as float"),
    ("hyperparameter NaN", lambda c: set_witness_policy(c, lr="nan"), "INVALID_ARGUMENT", "'lr'"),
    ("hyperparameter out of range", lambda c: set_witness_policy(c, lr="-1"), "INVALID_ARGUMENT", "out of range"),
    ("unknown hyperparameter", lambda c: set_witness_policy(c, alpha="0.1"), "INVALID_ARGUMENT",
     "no hyperparameter 'alpha'"),
    ("object hyperparameter over the wire", lambda c: set_witness_policy(c, generator="global"), "INVALID_ARGUMENT",
     "cannot be set over the wire"),
    ("source takes no hyperparameters", lambda c: c.control.SetPolicy(tta_pb.SetPolicyRequest(
        stream_id=WITNESS, policy="source", hyperparameters={"lr": "0.1"})), "INVALID_ARGUMENT",
     "adapter 'source' has no hyperparameter 'lr'"),
    # wrong parameter types
    ("stream_id as an integer", lambda c: infer(c, request(stream=None, stream_id=7)), "INVALID_ARGUMENT",
     "'stream_id' must be a string"),
    ("classification as a string", lambda c: infer(c, classification("3")), "INVALID_ARGUMENT", "positive integer"),
    ("classification below 1", lambda c: infer(c, classification(-2)), "INVALID_ARGUMENT", "positive integer"),
    ("sequence_start as a string", lambda c: infer(c, request(sequence_start="false")), "INVALID_ARGUMENT",
     "'sequence_start' must be a bool"),
    ("sequence_end as an integer", lambda c: infer(c, request(sequence_end=1)), "INVALID_ARGUMENT",
     "'sequence_end' must be a bool"),
    ("sequence_id as a double", lambda c: infer(c, request(stream=None, sequence_id=1.5)), "INVALID_ARGUMENT",
     "'sequence_id' must be an integer or a string"),
]


def test_the_table_is_big_enough():
    assert len(CASES) >= 30 and len({name for name, *_ in CASES}) == len(CASES)


def churn(target: str, stop: threading.Event, done: list, errors: list) -> None:
    """Concurrent SetPolicy during inference: switch a stream's policy and infer on it, in a loop."""
    client = tc.InferenceServerClient(target)
    with grpc.insecure_channel(target) as channel:
        control = tta_grpc.AdaptationServiceStub(channel)
        x = batches(1, seed=30)[0]
        policies = ["bn", "tent", "source", "bn-ema", "cotta"]
        while not stop.is_set():
            try:
                policy = policies[len(done) % len(policies)]
                assert set_policy(control, CHURN, policy).policy == policy
                reply = client.infer("tiny", [fp32_input(x)], parameters={"stream_id": CHURN})
                assert reply.get_response().parameters["policy"].string_param == policy
                done.append(policy)
            except Exception as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
                break
    client.close()


def test_bad_requests_get_their_status_and_harm_no_one(ctx):
    xs = batches(8, seed=21)
    for stream in (WITNESS, CLEAN):
        set_policy(ctx.control, stream, **WITNESS_POLICY)

    stop, done, errors = threading.Event(), [], []
    churner = threading.Thread(target=churn, args=(ctx.server.target, stop, done, errors), daemon=True)
    churner.start()
    witnessed, failures = [], []
    try:
        for i, x in enumerate(xs):
            witnessed.append(logits(ctx.client.infer("tiny", [fp32_input(x)], request_id=f"witness-{i}",
                                                     parameters={"stream_id": WITNESS})))
            for name, call, code, fragment in CASES[i::len(xs)]:
                got_code, message = status(call, ctx)
                if got_code != code or fragment not in message:
                    failures.append(f"{name}: expected {code} with {fragment!r}, got {got_code}: {message}")
                elif not message.strip():
                    failures.append(f"{name}: empty message")
    finally:
        stop.set()
        churner.join(60)
    assert not failures, "\n".join(failures)
    assert not errors, errors
    assert len(done) >= 3, f"the concurrent SetPolicy/infer loop ran only {len(done)} rounds"

    # the same batches on a clean stream, without bad requests in between: the same answers, to the
    # float rounding of where each was computed (ONNX Runtime while the server is idle, else torch;
    # what the stream learns is the same bit for bit either way, tests/engine/test_batch_stats_reply.py)
    clean = [logits(ctx.client.infer("tiny", [fp32_input(x)], parameters={"stream_id": CLEAN})) for x in xs]
    for i, (a, b) in enumerate(zip(witnessed, clean)):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-5), \
            f"witness batch {i} differs from the clean run by {np.abs(a - b).max()}"
    info = ctx.control.GetStream(tta_pb.StreamRequest(stream_id=WITNESS))
    assert (info.policy, info.hyperparameters["lr"], info.batches) == ("tent", "0.01", len(xs))

    # the server is alive and still serves everyone
    assert ctx.server.proc.poll() is None
    assert ctx.client.is_server_live() and ctx.client.is_server_ready()
    assert logits(ctx.client.infer("tiny", [fp32_input(X)], parameters={"stream_id": VICTIM})).shape == (4, 10)


@pytest.mark.parametrize("policy,hyperparameters,fragment", [
    ("unmix-tns", {"k": str(10**12)}, "integer in [1, 1024]"),
    ("tent", {"norm": "unmix-tns", "norm_options": '{"k": 100000}'}, "integer in [1, 1024]"),
    ("tent", {"seed": str(2**70)}, "integer in [0, 2^63)"),
])
def test_sizes_that_would_exhaust_memory_or_overflow_are_refused(ctx, policy, hyperparameters, fragment):
    code, message = status(ctx.control.SetPolicy, tta_pb.SetPolicyRequest(
        stream_id=VICTIM, policy=policy, hyperparameters=hyperparameters))
    assert code == "INVALID_ARGUMENT" and fragment in message, (code, message)
