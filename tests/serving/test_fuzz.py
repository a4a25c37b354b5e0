"""Bounded, repeatable fuzzing (hypothesis, derandomized) of ModelInfer and the tta.v1 control
RPCs against one real server. Property: every call either succeeds or fails with a status
other than INTERNAL/UNKNOWN and a non-empty message, and the server stays alive.

Requests are well-formed tensors with odd contents (scaled pixels, NaN/Inf, random bytes, cut
or corrupted images) plus up to two fuzzed fields, so most calls get past the first check."""
from __future__ import annotations

import string
import struct

import cv2
import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

import adapters
from clients import batches, tta_grpc, tta_pb
from conftest import ServerProcess

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
STREAMS = ["fuzz-a", "fuzz-b"]  # known streams, so control calls reach real state
REQUEST_IDS = ["fuzz-req-a", "fuzz-req-b"]  # their first requests, for Feedback
X = batches(1, seed=40)[0]


@pytest.fixture(scope="module")
def fuzzed(tiny_config):
    srv = ServerProcess("--model", str(tiny_config), "--max-message-mb", "1", "--max-streams", "64")
    channel = grpc.insecure_channel(srv.target)
    infer = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    for stream, request_id in zip(STREAMS, REQUEST_IDS):
        r = service_pb2.ModelInferRequest(model_name="tiny", id=request_id)
        r.inputs.add(name="input", datatype="FP32", shape=list(X.shape))
        r.raw_input_contents.append(X.tobytes())
        r.parameters["stream_id"].string_param = stream
        infer.ModelInfer(r, timeout=60)
    yield srv, infer, tta_grpc.AdaptationServiceStub(channel)
    channel.close()
    assert srv.stop() == 0


def check(srv, call) -> None:
    """The property, for one call."""
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (e.code(), e.details())
        assert e.details() and e.details().strip(), e.code()
    assert srv.proc.poll() is None, srv.stderr()[-3000:]


texts = st.text(max_size=40)
printable = st.text(st.characters(categories=["L", "N", "P", "S", "Zs"]), max_size=40)
names = st.sampled_from(STREAMS) | printable | texts
parameter_values = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), texts)
PARAMETER_FIELD = {bool: "bool_param", int: "int64_param", float: "double_param", str: "string_param"}


def set_parameter(parameters, key: str, value) -> None:
    setattr(parameters[key], PARAMETER_FIELD[type(value)], value)


# --- ModelInfer -------------------------------------------------------------------------------
@st.composite
def tensors(draw) -> tuple[str, list[int], bytes]:
    """(datatype, shape, raw contents) of a well-formed tensor with odd contents."""
    kind = draw(st.sampled_from(["fp32", "uint8", "image"]))
    if kind == "fp32":  # pixels scaled and shifted: in range, out of range, NaN, Inf
        n = draw(st.integers(1, 4))
        x = X[:n] * draw(st.floats(width=32)) + draw(st.floats(-1, 1, width=32))
        return "FP32", [n, 3, 16, 16], x.astype("<f4").tobytes()
    if kind == "uint8":  # any image size, any bytes
        h, w, c = draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.sampled_from([1, 3]))
        return "UINT8", [1, h, w, c], draw(st.binary(min_size=h * w * c, max_size=h * w * c))
    # a PNG or JPEG, maybe cut short or with a flipped byte
    side = draw(st.integers(1, 64))
    image = np.full((side, side, 3), 128, np.uint8)
    blob = bytearray(cv2.imencode(draw(st.sampled_from([".png", ".jpg"])), image)[1])
    blob = blob[:draw(st.integers(0, len(blob)))]
    if blob and draw(st.booleans()):
        blob[draw(st.integers(0, len(blob) - 1))] ^= 0xFF
    return "BYTES", [1], struct.pack("<I", len(blob)) + bytes(blob)


def fuzz_field(draw, r: service_pb2.ModelInferRequest, field: str) -> None:
    """Replace or add one part of the request with something arbitrary."""
    if field == "model":
        r.model_name = draw(texts)
    elif field == "version":
        r.model_version = draw(texts)
    elif field == "datatype":
        r.inputs[0].datatype = draw(st.sampled_from(["INT32", "FP16", "BOOL", ""]) | texts)
    elif field == "shape":
        r.inputs[0].ClearField("shape")
        r.inputs[0].shape.extend(draw(st.lists(st.integers(-2**63, 2**63 - 1) | st.integers(-2, 300), max_size=5)))
    elif field == "raw":
        r.raw_input_contents[0] = draw(st.binary(max_size=4096))
    elif field == "typed":
        contents = r.inputs[0].contents
        contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=64)))
        contents.uint_contents.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=64)))
        contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=64), max_size=3)))
        if draw(st.booleans()):
            r.ClearField("raw_input_contents")
    elif field == "inputs":
        if draw(st.booleans()):
            r.inputs.add(name=draw(texts), datatype="FP32", shape=[1])
        else:
            r.inputs[0].name = draw(texts)
    elif field == "parameters":
        keys = st.sampled_from(["stream_id", "sequence_id", "sequence_start", "sequence_end", "priority"]) | texts
        for key, value in draw(st.dictionaries(keys, parameter_values, min_size=1, max_size=3)).items():
            set_parameter(r.parameters, key, value)
    elif field == "outputs":
        out = r.outputs.add(name=draw(st.sampled_from(["logits", "probabilities"]) | texts))
        set_parameter(out.parameters, draw(st.sampled_from(["classification"]) | texts), draw(parameter_values))


FIELDS = ["model", "version", "datatype", "shape", "raw", "typed", "inputs", "parameters", "outputs"]


@st.composite
def infer_requests(draw):
    datatype, shape, raw = draw(tensors())
    r = service_pb2.ModelInferRequest(model_name="tiny", id=draw(texts))
    r.inputs.add(name="input", datatype=datatype, shape=shape)
    r.raw_input_contents.append(raw)
    r.parameters["stream_id"].string_param = draw(names)
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True)):
        fuzz_field(draw, r, field)
    return r


header_values = st.text(alphabet=string.ascii_letters + string.digits + "-_./ ", max_size=30)


@FUZZ
@given(request=infer_requests(), header=st.none() | header_values, both=st.booleans())
def test_fuzz_model_infer(fuzzed, request, header, both):
    srv, infer, _ = fuzzed
    metadata = [("x-tta-stream-id", header)] if header is not None else None
    if metadata and not both:  # the stream named by the header alone (else both, maybe differently)
        del request.parameters["stream_id"]
    check(srv, lambda: infer.ModelInfer(request, metadata=metadata, timeout=60))


# --- control RPCs -------------------------------------------------------------------------------
HYPERPARAMETERS = sorted({h["name"] for p in adapters.available() for h in adapters.describe(p)["hyperparameters"]})
hp_values = st.sampled_from(["0", "1", "-1", "0.5", "1e-3", "1e9", "nan", "inf", "true", "", "[1, 2]", "bn",
                             "unmix-tns"]) | texts
models = st.sampled_from(["", "tiny", "nope"])


@st.composite
def set_policy_requests(draw):
    """A policy with hyperparameter names of its own (or any), values that may be anything."""
    policy = draw(st.sampled_from(adapters.available()) | texts)
    own = [h["name"] for h in adapters.describe(policy)["hyperparameters"]] if policy in adapters.available() else []
    keys = st.sampled_from(own or HYPERPARAMETERS) | st.sampled_from(HYPERPARAMETERS) | texts
    return tta_pb.SetPolicyRequest(model=draw(models), stream_id=draw(names), policy=policy,
                                   hyperparameters=draw(st.dictionaries(keys, hp_values, max_size=3)))


def control_calls(stub):
    snapshot_names = st.sampled_from(["", "good"]) | texts
    return st.one_of(
        st.builds(lambda r: lambda: stub.SetPolicy(r, timeout=60), set_policy_requests()),
        st.builds(lambda rpc, m, s: lambda: getattr(stub, rpc)(tta_pb.StreamRequest(model=m, stream_id=s), timeout=60),
                  st.sampled_from(["GetStream", "ResetStream", "DeleteStream"]), models, names),
        st.builds(lambda m, s, n: lambda: stub.Snapshot(tta_pb.SnapshotRequest(model=m, stream_id=s, name=n),
                                                        timeout=60), models, names, snapshot_names),
        st.builds(lambda m, s, n: lambda: stub.Rollback(tta_pb.RollbackRequest(model=m, stream_id=s, name=n),
                                                        timeout=60), models, names, snapshot_names),
        st.builds(lambda m, r, labels: lambda: stub.Feedback(tta_pb.FeedbackRequest(model=m, request_id=r,
                                                                                   labels=labels), timeout=60),
                  models, st.sampled_from(REQUEST_IDS) | texts,
                  st.lists(st.integers(-1, 11) | st.integers(-2**63, 2**63 - 1), max_size=6)),
        st.builds(lambda m: lambda: stub.ListStreams(tta_pb.ListStreamsRequest(model=m), timeout=60), models),
        st.just(lambda: stub.ListPolicies(tta_pb.ListPoliciesRequest(), timeout=60)),
    )


@FUZZ
@given(data=st.data())
def test_fuzz_control_rpcs(fuzzed, data):
    srv, _, control = fuzzed
    check(srv, data.draw(control_calls(control)))


def test_server_survived_the_fuzzing(fuzzed):
    srv, infer, control = fuzzed
    assert srv.proc.poll() is None
    assert infer.ServerReady(service_pb2.ServerReadyRequest(), timeout=30).ready
    assert len(control.ListPolicies(tta_pb.ListPoliciesRequest(), timeout=30).policies) == len(adapters.available())
