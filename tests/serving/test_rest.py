"""The REST front (issue 17, part 2): the Open Inference Protocol over HTTP beside gRPC, one engine.

Real `tta serve` subprocesses on loopback (REST on a free port, read from the ready line), the
stock tritonclient.http client (binary tensors and JSON) and plain curl: replies equal the gRPC
reply of an identical request, a stream adapts across both protocols, health, metadata, error
statuses, body limits, tokens, TLS, shutdown."""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from test_security import _make_ca, _make_leaf
from tritonclient.utils import InferenceServerException

from clients import batches, fp32_input, logits, parameters, scrape, total, tta_grpc, tta_pb
from conftest import TINY_LABELS, ServerProcess

CURL = shutil.which("curl") or "/usr/bin/curl"
pytestmark = pytest.mark.timeout(300)


def rest_url(srv) -> str:
    return f"{srv.host}:{srv.http_port}"


@pytest.fixture(scope="module")
def http(server):
    assert server.http_port > 0, "ServerProcess starts the REST front on a free port"
    client = th.InferenceServerClient(rest_url(server), network_timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server):
    client = tc.InferenceServerClient(server.target)
    yield client
    client.close()


def http_input(x: np.ndarray, binary: bool = True) -> th.InferInput:
    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def rest_infer(client, x, stream=None, binary=True, headers=None, **kwargs):
    params = {"stream_id": stream} if stream else None
    outputs = [th.InferRequestedOutput("logits", binary_data=binary)]
    return client.infer("tiny", [http_input(x, binary)], outputs=outputs, parameters=params, headers=headers,
                        **kwargs)


def grpc_infer(client, x, stream):
    return client.infer("tiny", [fp32_input(x)], parameters={"stream_id": stream})


def curl(*args: str, data: bytes | None = None) -> tuple[int, dict, bytes]:
    """(HTTP status, lower-cased headers, body) of one curl call (-s, bounded in time)."""
    if not Path(CURL).exists():
        pytest.fail("curl not found: apt-get install curl (the Makefile's SYSTEM_PACKAGES; make system-deps)")
    done = subprocess.run([CURL, "-s", "-S", "--max-time", "30", "-i", *args], input=data, capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):  # Expect: 100-continue
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def json_request(x: np.ndarray, **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}], **extra}).encode()


def assert_error(status: int, body: bytes, fragment: str, expected_status: int) -> str:
    assert status == expected_status, body
    message = json.loads(body)["error"]
    assert fragment.lower() in message.lower(), message
    assert "Traceback" not in message and "/work" not in message and ".py" not in message, message
    return message


# --- health and metadata ------------------------------------------------------------------
def test_health_and_metadata_with_tritonclient_http_and_curl(server, http):
    assert http.is_server_live() and http.is_server_ready()
    assert http.is_model_ready("tiny") and http.is_model_ready("tiny", "1")
    assert not http.is_model_ready("nope")
    meta = http.get_server_metadata()
    assert meta["name"] == "tta-runtime" and {"binary_tensor_data", "sequence", "tta"} <= set(meta["extensions"])
    model = http.get_model_metadata("tiny")
    assert model["name"] == "tiny" and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
    assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert http.get_model_metadata("tiny", "1") == model

    status, headers, body = curl(f"http://{rest_url(server)}/v2/health/ready")
    assert status == 200 and json.loads(body) == {"ready": True} and headers["content-type"] == "application/json"
    status, _, body = curl(f"http://{rest_url(server)}/v2/health/live")
    assert status == 200 and json.loads(body) == {"live": True}


# --- inference: binary, JSON, equal to gRPC -------------------------------------------------
def test_binary_and_json_replies_equal_the_grpc_reply_exactly(server, http, grpc_client):
    x = batches(1, seed=41)[0]
    reference = grpc_infer(grpc_client, x, "rest-eq-grpc")
    for stream, binary in (("rest-eq-binary", True), ("rest-eq-json", False)):
        result = rest_infer(http, x, stream, binary=binary, request_id=f"id-{stream}")
        np.testing.assert_array_equal(result.as_numpy("logits"), logits(reference))
        got, want = result.get_response(), parameters(reference)
        assert got["id"] == f"id-{stream}" and got["model_name"] == "tiny" and got["model_version"] == "1"
        assert got["parameters"]["stream_id"] == stream
        assert {k: v for k, v in got["parameters"].items() if k != "stream_id"} == \
               {k: v for k, v in want.items() if k != "stream_id"}
        assert ("data" in got["outputs"][0]) is not binary  # JSON data when binary_data is off

    # tritonclient's default (no outputs named): binary_data_output, all outputs binary
    result = http.infer("tiny", [http_input(x)], parameters={"stream_id": "rest-eq-default"})
    np.testing.assert_array_equal(result.as_numpy("logits"), logits(reference))
    # compressed request bodies (tritonclient's request_compression_algorithm)
    for algorithm in ("gzip", "deflate"):
        result = rest_infer(http, x, f"rest-eq-{algorithm}", request_compression_algorithm=algorithm)
        np.testing.assert_array_equal(result.as_numpy("logits"), logits(reference))


def test_curl_json_infer_with_classification(server, grpc_client):
    x = batches(1, seed=42)[0]
    reference = logits(grpc_infer(grpc_client, x, "rest-curl-grpc"))
    body = json_request(x, parameters={"stream_id": "rest-curl"},
                        outputs=[{"name": "logits", "parameters": {"classification": 3}}])
    status, headers, reply = curl("-X", "POST", "-H", "Content-Type: application/json", "--data-binary", "@-",
                                  f"http://{rest_url(server)}/v2/models/tiny/infer", data=body)
    assert status == 200, reply
    out = json.loads(reply)["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [4, 3]
    top = [item.split(":") for item in out["data"]]
    assert [int(t[1]) for t in top[:3]] == list(np.argsort(-reference[0], kind="stable")[:3])
    assert all(t[2] == TINY_LABELS[int(t[1])] for t in top)


def test_one_stream_adapts_across_rest_and_grpc(server, http, grpc_client):
    """The same stream id, alternately over REST (header / parameter / sequence_id) and gRPC,
    gives exactly what an all-gRPC stream gives: one adapted state, whichever protocol."""
    xs = batches(6, seed=43)
    want = [logits(grpc_infer(grpc_client, x, "rest-mix-ref")) for x in xs]
    got, steps = [], []
    for i, x in enumerate(xs):
        if i % 3 == 0:
            r = rest_infer(http, x, headers={"x-tta-stream-id": "rest-mix"})
            got.append(r.as_numpy("logits"))
            steps.append(r.get_response()["parameters"]["tta_step"])
        elif i % 3 == 1:
            r = grpc_infer(grpc_client, x, "rest-mix")
            got.append(logits(r))
            steps.append(parameters(r)["tta_step"])
        else:
            r = http.infer("tiny", [http_input(x)], sequence_id="rest-mix")  # Triton's sequence extension
            got.append(r.as_numpy("logits"))
            steps.append(r.get_response()["parameters"]["tta_step"])
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert steps == sorted(steps) and steps[-1] > steps[0]
    # sequence_start resets the stream over REST too: the first batch's reply again
    again = http.infer("tiny", [http_input(xs[0])], sequence_id="rest-mix", sequence_start=True)
    np.testing.assert_array_equal(again.as_numpy("logits"), want[0])


def test_rest_traffic_is_counted_like_grpc(server, http):
    before = scrape(server)
    rest_infer(http, batches(1, seed=44)[0], "rest-metrics")
    with pytest.raises(InferenceServerException):
        http.infer("tiny", [http_input(np.zeros((1, 3, 8, 8), np.float32))])
    after = scrape(server)
    assert total(after, "tta_requests_total", method="HTTP infer") - \
        total(before, "tta_requests_total", method="HTTP infer") == 2
    assert total(after, "tta_request_failures_total", method="HTTP infer", code="INVALID_ARGUMENT") - \
        total(before, "tta_request_failures_total", method="HTTP infer", code="INVALID_ARGUMENT") == 1
    assert total(after, "tta_request_duration_seconds_count", method="HTTP infer") > \
        total(before, "tta_request_duration_seconds_count", method="HTTP infer")


# --- errors ---------------------------------------------------------------------------------
def test_error_statuses(server, http):
    x = batches(1, seed=45)[0]
    with pytest.raises(InferenceServerException) as info:
        http.infer("nope", [http_input(x)])
    assert info.value.status() == "404" and "unknown model 'nope'" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        http.infer("tiny", [http_input(np.zeros((2, 3, 8, 8), np.float32))])
    assert info.value.status() == "400" and "[N, 3, 16, 16]" in info.value.message()

    url = f"http://{rest_url(server)}/v2/models/tiny/infer"
    assert_error(*curl("-X", "POST", "--data-binary", "{'inputs': [", url)[::2], "not valid JSON", 400)
    assert_error(*curl("-X", "POST", "--data-binary", "[1, 2]", url)[::2], "must be a JSON object", 400)
    assert_error(*curl("-X", "POST", "--data-binary", "@-", url, data=b"\xff\xfe binary")[::2], "UTF-8", 400)
    assert_error(*curl("-X", "POST", "--data-binary", "@-", url,
                       data=json_request(x, parameters={"stream_id": 7}))[::2], "must be a string", 400)
    assert_error(*curl("-X", "POST", "-H", "Inference-Header-Content-Length: 9999", "--data-binary", "{}", url)[::2],
                 "Inference-Header-Content-Length", 400)
    assert_error(*curl(f"http://{rest_url(server)}/v2/nowhere")[::2], "no such endpoint", 404)
    status, headers, body = curl(url)  # GET on infer
    assert_error(status, body, "POST", 405)
    assert headers["allow"] == "POST"

    # over --max-message-mb (1 MiB here): 413 from Content-Length before the body is sent (curl
    # waits for 100-continue: the connection closes), from the count of what arrives when no length
    # is declared (chunked), and to a client that sends at once and closes (urllib, Connection:
    # close): the overrun is read and dropped first, so that it reads the 413 instead of a reset
    big = json_request(np.zeros((1, 3, 16, 16), np.float32)) + b" " * (3 << 19)
    status, headers, body = curl("-X", "POST", "--expect100-timeout", "30", "--data-binary", "@-", url, data=big)
    assert_error(status, body, "larger than the server's limit", 413)
    assert headers.get("connection") == "close"
    status, headers, body = curl("-X", "POST", "-H", "Transfer-Encoding: chunked", "--data-binary", "@-", url,
                                 data=big)
    assert_error(status, body, "larger than the server's limit", 413)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(url, data=big, method="POST"), timeout=30)
    assert_error(info.value.code, info.value.read(), "larger than the server's limit", 413)
    assert http.is_server_ready()  # and the server serves on


# --- load, tokens, TLS, shutdown (servers of their own) -----------------------------------------
def test_a_refusal_under_load_is_429_with_retry_after(tiny_config):
    """A stream over its queue limit: RESOURCE_EXHAUSTED as 429, its retry pushback as Retry-After.
    A cotta stream with many augmented teacher passes keeps the engine busy meanwhile."""
    srv = ServerProcess("--model", str(tiny_config), "--max-stream-queue", "2")
    url = f"http://{rest_url(srv)}/v2/models/tiny/infer"

    def post(stream: str, n: int, value: float) -> None:
        body = json_request(np.full((n, 3, 16, 16), value, np.float32), parameters={"stream_id": stream})
        urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=120).read()

    try:
        with grpc.insecure_channel(srv.target) as channel:
            tta_grpc.AdaptationServiceStub(channel).SetPolicy(tta_pb.SetPolicyRequest(
                stream_id="rest-heavy", policy="cotta", hyperparameters={"n_augmentations": "1024", "threshold": "1.0"}))
        heavy = threading.Thread(target=post, args=("rest-heavy", 16, 0.5))
        heavy.start()
        time.sleep(0.3)  # let it reach the engine first
        waiting = [threading.Thread(target=post, args=("rest-pushy", 4, 0.2)) for _ in range(2)]  # its limit: 2
        for t in waiting:
            t.start()
        time.sleep(0.3)
        status, headers, body = curl("-X", "POST", "--data-binary", "@-", url, data=json_request(
            np.full((4, 3, 16, 16), 0.2, np.float32), parameters={"stream_id": "rest-pushy"}))
        busy = heavy.is_alive()
        for t in [heavy, *waiting]:
            t.join(120)
        assert busy, "the engine was not busy long enough for this test to mean anything"
        assert_error(status, body, "already has 2 batches waiting", 429)
        assert headers["retry-after"].isdigit() and int(headers["retry-after"]) >= 1
    finally:
        assert srv.stop() == 0


def test_inference_token_guards_rest_but_probes(tiny_config, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("rest-s3cret\n")
    srv = ServerProcess("--model", str(tiny_config), "--inference-token-file", str(token_file))
    base = f"http://{rest_url(srv)}"
    x = batches(1, seed=46)[0]
    try:
        assert curl(f"{base}/v2/health/ready")[0] == 200 and curl(f"{base}/v2/health/live")[0] == 200
        status, headers, body = curl("-X", "POST", "--data-binary", "@-", f"{base}/v2/models/tiny/infer",
                                     data=json_request(x))
        assert_error(status, body, "missing authorization", 401)
        assert headers["www-authenticate"].startswith("Bearer")
        assert_error(*curl("-H", "Authorization: Bearer wrong", f"{base}/v2/models/tiny")[::2], "wrong", 403)
        assert_error(*curl(f"{base}/v2")[::2], "authorization", 401)
        client = th.InferenceServerClient(rest_url(srv), network_timeout=30)
        try:
            result = rest_infer(client, x, "rest-token", headers={"authorization": "Bearer rest-s3cret"})
            assert result.as_numpy("logits").shape == (4, 10)
        finally:
            client.close()
    finally:
        assert srv.stop() == 0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not installed (needed to make test certificates)")
    folder = tmp_path_factory.mktemp("rest-pki")
    _make_ca(folder, "ca")
    _make_leaf(folder, "ca", "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _make_leaf(folder, "ca", "client", "extendedKeyUsage=clientAuth\n")
    return folder


def test_https_with_mutual_tls(tiny_config, pki):
    srv = ServerProcess("--model", str(tiny_config), "--tls-cert", str(pki / "server.pem"),
                        "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"))
    url = f"https://{rest_url(srv)}/v2/health/ready"
    try:
        status, _, body = curl("--cacert", str(pki / "ca.pem"), "--cert", str(pki / "client.pem"),
                               "--key", str(pki / "client.key"), url)
        assert status == 200 and json.loads(body) == {"ready": True}
        refused = subprocess.run([CURL, "-s", "--max-time", "20", "--cacert", str(pki / "ca.pem"), url],
                                 capture_output=True, timeout=60)  # no client certificate: no handshake
        assert refused.returncode != 0
        plain = subprocess.run([CURL, "-s", "--max-time", "20", f"http://{rest_url(srv)}/v2/health/ready"],
                               capture_output=True, timeout=60)
        assert plain.returncode != 0 or b'"ready"' not in plain.stdout  # no plain HTTP on the TLS port
        client = th.InferenceServerClient(rest_url(srv), ssl=True, network_timeout=30, ssl_options={
            "ca_certs": str(pki / "ca.pem"), "certfile": str(pki / "client.pem"), "keyfile": str(pki / "client.key")})
        try:
            result = rest_infer(client, batches(1, seed=47)[0], "rest-tls")
            assert result.as_numpy("logits").shape == (4, 10)
        finally:
            client.close()
    finally:
        assert srv.stop() == 0


def test_shutdown_turns_rest_readiness_off_refuses_new_infers_and_closes_the_port(tiny_config):
    """SIGTERM while a heavy batch runs: /v2/health/ready turns 503 with gRPC's ServerReady, a new
    infer is 503 (gRPC's UNAVAILABLE), the batch in flight still gets its reply, then the port closes."""
    srv = ServerProcess("--model", str(tiny_config))
    base = f"http://{rest_url(srv)}"
    replies = []

    def ready() -> int:
        try:
            return urllib.request.urlopen(f"{base}/v2/health/ready", timeout=10).status
        except urllib.error.HTTPError as e:
            return e.code

    def heavy() -> None:
        body = json_request(np.full((16, 3, 16, 16), 0.5, np.float32), parameters={"stream_id": "rest-drain"})
        with urllib.request.urlopen(urllib.request.Request(f"{base}/v2/models/tiny/infer", data=body), timeout=120) as r:
            replies.append(r.status)

    with grpc.insecure_channel(srv.target) as channel:
        tta_grpc.AdaptationServiceStub(channel).SetPolicy(tta_pb.SetPolicyRequest(
            stream_id="rest-drain", policy="cotta", hyperparameters={"n_augmentations": "1024", "threshold": "1.0"}))
    assert ready() == 200
    worker = threading.Thread(target=heavy)
    worker.start()
    time.sleep(0.5)  # on the engine
    srv.sigterm()
    deadline = time.monotonic() + 5
    while ready() != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready() == 503
    status, _, body = curl("-X", "POST", "--data-binary", "@-", f"{base}/v2/models/tiny/infer",
                           data=json_request(batches(1, seed=48)[0], parameters={"stream_id": "rest-late"}))
    running = worker.is_alive()
    worker.join(120)
    assert running, "the heavy batch ended before the late request: the test means nothing"
    assert_error(status, body, "shutting down", 503)
    assert replies == [200]  # what was in flight was answered
    assert srv.proc.wait(60) == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/v2/health/live", timeout=5)


def test_http_port_off_and_ready_line(tiny_config):
    srv = ServerProcess("--model", str(tiny_config), http_port=-1)
    try:
        assert srv.http_port == -1 and srv.port > 0
    finally:
        assert srv.stop() == 0
