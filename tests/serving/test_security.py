"""Security: bearer tokens (control and inference), mutual TLS with a generated CA, and no path
from a request to the file system outside the state directory. Real `tta serve` subprocesses,
real tritonclient and `tta ctl`."""
from __future__ import annotations

import queue
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import grpc
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from clients import batches, fp32_input, status, tta_grpc, tta_pb
from conftest import REPO, ServerProcess

CTL = [sys.executable, "-m", "runtime.cli", "ctl"]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# --- bearer tokens ------------------------------------------------------------------------
def test_inference_and_control_tokens(tiny_config, tmp_path, monkeypatch):
    token_file = tmp_path / "inference-token"
    token_file.write_text("infer-s3cret\n")
    monkeypatch.setenv("TTA_CONTROL_TOKEN", "ctl-s3cret")  # the control token from the environment
    srv = ServerProcess("--model", str(tiny_config), "--inference-token-file", str(token_file))
    client = tc.InferenceServerClient(srv.target)
    x = batches(1, seed=3)[0]
    infer = lambda headers=None: client.infer("tiny", [fp32_input(x)], parameters={"stream_id": "auth"},  # noqa: E731
                                              headers=headers)
    try:
        # probes stay open: ServerLive/ServerReady and grpc.health.v1
        assert client.is_server_live() and client.is_server_ready()
        with grpc.insecure_channel(srv.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING

        code, message = status(infer)
        assert code == "UNAUTHENTICATED" and "missing authorization" in message and "Bearer" in message
        for malformed in ("Basic aW5mZXI6czNjcmV0", "Bearer", "Bearer   ", "infer-s3cret"):
            code, message = status(infer, {"authorization": malformed})
            assert (code, "malformed" in message) == ("UNAUTHENTICATED", True), (malformed, code, message)
        assert status(infer, bearer("guess")) == ("PERMISSION_DENIED", "wrong inference token")
        assert status(infer, bearer("ctl-s3cret")) == ("PERMISSION_DENIED", "wrong inference token")
        assert status(client.get_model_metadata, "tiny")[0] == "UNAUTHENTICATED"  # metadata is guarded too
        assert infer(bearer("infer-s3cret")).as_numpy("logits").shape == (4, 10)
        assert infer({"authorization": "bearer infer-s3cret"}).as_numpy("logits").shape == (4, 10)  # scheme: any case

        # streaming inference: the token travels once, at stream start
        for headers, expected in ((bearer("infer-s3cret"), "ok"), (None, "UNAUTHENTICATED"),
                                  (bearer("guess"), "PERMISSION_DENIED")):
            replies: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error: replies.put(error or result), headers=headers)
            try:
                client.async_stream_infer("tiny", [fp32_input(x)], parameters={"stream_id": "auth"})
            except InferenceServerException:
                pass  # the server refused the stream before this request went out; the callback has the error
            reply = replies.get(timeout=30)
            client.stop_stream()
            if expected == "ok":
                assert reply.as_numpy("logits").shape == (4, 10)
            else:
                assert isinstance(reply, InferenceServerException) and expected in str(reply.status()), reply

        # control: the inference token changes nothing there; read-only RPCs (which list every stream
        # id, its hyperparameters and snapshot names) take the inference or the control token
        with grpc.insecure_channel(srv.target) as channel:
            stub = tta_grpc.AdaptationServiceStub(channel)
            request = tta_pb.SetPolicyRequest(stream_id="auth", policy="tent")
            assert status(stub.SetPolicy, request)[0] == "UNAUTHENTICATED"
            assert status(stub.SetPolicy, request, metadata=[("authorization", "Bearer infer-s3cret")]) == \
                ("PERMISSION_DENIED", "wrong control token")
            assert stub.SetPolicy(request, metadata=[("authorization", "Bearer ctl-s3cret")]).policy == "tent"
            read_only = [(stub.GetStream, tta_pb.StreamRequest(stream_id="auth")),
                         (stub.ListStreams, tta_pb.ListStreamsRequest()),
                         (stub.ListPolicies, tta_pb.ListPoliciesRequest())]
            for rpc, read in read_only:
                code, message = status(rpc, read)
                assert code == "UNAUTHENTICATED" and "inference or control token" in message, (rpc, code, message)
                assert status(rpc, read, metadata=[("authorization", "Bearer guess")]) == \
                    ("PERMISSION_DENIED", "wrong inference or control token")
                for token in ("infer-s3cret", "ctl-s3cret"):
                    assert rpc(read, metadata=[("authorization", f"Bearer {token}")]) is not None
            assert stub.GetStream(tta_pb.StreamRequest(stream_id="auth"),
                                  metadata=[("authorization", "Bearer infer-s3cret")]).policy == "tent"
            listed = stub.ListStreams(tta_pb.ListStreamsRequest(), metadata=[("authorization", "Bearer ctl-s3cret")])
            assert "auth" in {s.stream_id for s in listed.streams}

        # tta ctl takes the control token from the environment (or --token)
        ok = subprocess.run([*CTL, "--target", srv.target, "reset", "auth"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
        assert ok.returncode == 0 and "auth: policy tent" in ok.stdout, ok.stderr
        wrong = subprocess.run([*CTL, "--target", srv.target, "--token", "guess", "reset", "auth"], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 1 and "PERMISSION_DENIED: wrong control token" in wrong.stderr
        listed = subprocess.run([*CTL, "--target", srv.target, "streams"], cwd=REPO, capture_output=True, text=True,
                                timeout=60)
        assert listed.returncode == 0 and "auth: policy tent" in listed.stdout, listed.stderr
        assert srv.proc.poll() is None
    finally:
        client.close()
        assert srv.stop() == 0
    assert "infer-s3cret" not in srv.stderr() and "ctl-s3cret" not in srv.stderr()  # tokens are never logged


def test_an_inference_token_alone_guards_every_control_rpc(tiny_config, monkeypatch):
    """Without a control token, an inference-token server leaves no control RPC open: reads and
    changes both take the inference token. Without any token (the session server) all stay open."""
    monkeypatch.delenv("TTA_CONTROL_TOKEN", raising=False)
    monkeypatch.setenv("TTA_INFERENCE_TOKEN", "only-infer")
    srv = ServerProcess("--model", str(tiny_config))
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = tta_grpc.AdaptationServiceStub(channel)
            good = [("authorization", "Bearer only-infer")]
            for rpc, request in ((stub.SetPolicy, tta_pb.SetPolicyRequest(stream_id="alone", policy="tent")),
                                 (stub.ResetStream, tta_pb.StreamRequest(stream_id="alone")),
                                 (stub.GetStream, tta_pb.StreamRequest(stream_id="alone")),
                                 (stub.ListStreams, tta_pb.ListStreamsRequest())):
                code, message = status(rpc, request)
                assert code == "UNAUTHENTICATED" and "inference token" in message, (rpc, code, message)
                assert status(rpc, request, metadata=[("authorization", "Bearer guess")]) == \
                    ("PERMISSION_DENIED", "wrong inference token")
                assert rpc(request, metadata=good) is not None
            assert stub.GetStream(tta_pb.StreamRequest(stream_id="alone"), metadata=good).policy == "tent"
    finally:
        assert srv.stop() == 0


def test_read_only_control_stays_open_without_an_inference_token(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = tta_grpc.AdaptationServiceStub(channel)
        assert stub.ListPolicies(tta_pb.ListPoliciesRequest()).policies
        assert stub.ListStreams(tta_pb.ListStreamsRequest()).stream_limit > 0


# --- mutual TLS with a generated CA ---------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             cwd=folder)


def _make_leaf(folder: Path, ca: str, name: str, extensions: str) -> None:
    """name.pem + name.key, signed by the CA `ca`."""
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA with a server certificate (SAN 127.0.0.1) and a client certificate, and a second CA
    with a client certificate the server must refuse."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not installed (needed to make test certificates)")
    folder = tmp_path_factory.mktemp("pki")
    _make_ca(folder, "ca")
    _make_leaf(folder, "ca", "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _make_leaf(folder, "ca", "client", "extendedKeyUsage=clientAuth\n")
    _make_ca(folder, "other-ca")
    _make_leaf(folder, "other-ca", "intruder", "extendedKeyUsage=clientAuth\n")
    return folder


def test_mutual_tls_accepts_only_clients_signed_by_the_ca(tiny_config, pki):
    srv = ServerProcess("--model", str(tiny_config), "--tls-cert", str(pki / "server.pem"),
                        "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"))
    x = batches(1, seed=4)[0]

    def infer(**credentials):
        client = tc.InferenceServerClient(srv.target, ssl=True, root_certificates=str(pki / "ca.pem"), **credentials)
        try:
            return client.infer("tiny", [fp32_input(x)], parameters={"stream_id": "mtls"}, client_timeout=20)
        finally:
            client.close()

    try:
        good = infer(private_key=str(pki / "client.key"), certificate_chain=str(pki / "client.pem"))
        assert good.as_numpy("logits").shape == (4, 10)
        # no client certificate, or one from another CA: the handshake fails, no RPC reaches the server
        assert status(infer)[0] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
        assert status(infer, private_key=str(pki / "intruder.key"),
                      certificate_chain=str(pki / "intruder.pem"))[0] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")

        ctl = [*CTL, "--target", srv.target, "--timeout", "20", "--tls-ca", str(pki / "ca.pem")]
        ok = subprocess.run([*ctl, "--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key"),
                             "get", "mtls"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0 and "mtls: policy bn" in ok.stdout, ok.stderr
        refused = subprocess.run([*ctl, "get", "mtls"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr, refused.stderr
        assert srv.proc.poll() is None
    finally:
        assert srv.stop() == 0


# --- no path from a request to the file system ----------------------------------------------
# Stream ids that look like paths are accepted and percent-encoded into one file name each.
PATHLIKE_STREAMS = ["../../x", "/etc/passwd", "a/b", "..", ".", ".hidden", "%2F..%2F", "C:\\win", "x" * 128,
                    "é/../ü"]
# Ids that cannot be stored safely are refused.
REFUSED_STREAMS = {"x\x00y": "printable", "a\nb": "printable", "x" * 129: "at most 128",
                   "€" * 128: "too long once encoded", "/" * 100: "too long once encoded"}
REFUSED_SNAPSHOTS = ["../x", "/etc/passwd", "a/b", "..", ".", ".hidden", "x\x00", "good\n", "a" * 65, "-x", "x y"]


def test_request_names_never_leave_the_state_dir(tiny_config, tmp_path):
    state = tmp_path / "state"
    # memory budget 0: every idle stream is written to disk at once
    srv = ServerProcess("--model", str(tiny_config), "--state-dir", str(state), "--memory-budget-mb", "0")
    client = tc.InferenceServerClient(srv.target)
    channel = grpc.insecure_channel(srv.target)
    stub = tta_grpc.AdaptationServiceStub(channel)
    x = batches(1, seed=5)[0]
    try:
        for stream in PATHLIKE_STREAMS:
            client.infer("tiny", [fp32_input(x)], parameters={"stream_id": stream})
            assert stub.Snapshot(tta_pb.SnapshotRequest(stream_id=stream, name="good")).name == "good"
        client.infer("tiny", [fp32_input(x)], headers={"x-tta-stream-id": "../header"})
        client.infer("tiny", [fp32_input(x)], sequence_id="../sequence")
        for stream, fragment in REFUSED_STREAMS.items():
            code, message = status(client.infer, "tiny", [fp32_input(x)], parameters={"stream_id": stream})
            assert code == "INVALID_ARGUMENT" and fragment in message, (stream, code, message)
            code, message = status(stub.Snapshot, tta_pb.SnapshotRequest(stream_id=stream, name="good"))
            assert code == "INVALID_ARGUMENT" and fragment in message, (stream, code, message)
        for name in REFUSED_SNAPSHOTS:
            for rpc, request in ((stub.Snapshot, tta_pb.SnapshotRequest), (stub.Rollback, tta_pb.RollbackRequest)):
                code, message = status(rpc, request(stream_id="a/b", name=name))
                assert code == "INVALID_ARGUMENT" and "snapshot name" in message, (name, code, message)
        assert stub.Rollback(tta_pb.RollbackRequest(stream_id="../../x", name="good")).stream_id == "../../x"
        assert srv.proc.poll() is None
    finally:
        client.close()
        channel.close()
        assert srv.stop() == 0  # checkpoints every stream

    accepted = set(PATHLIKE_STREAMS) | {"../header", "../sequence"}
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    streams, snapshots = set(), set()
    for f in files:
        assert f.parts[0] == "state", f"written outside the state dir: {f}"
        kind, *rest = f.parts[1:]
        assert all(part not in (".", "..") and "/" not in part for part in rest), f
        if kind == "streams":
            assert len(rest) == 1 and rest[0].endswith((".pt", ".pt.prev")), f
            streams.add(unquote(rest[0].removesuffix(".prev").removesuffix(".pt")))
        else:
            assert kind == "snapshots" and len(rest) == 2 and rest[1] == "good.pt", f
            snapshots.add(unquote(rest[0]))
    assert streams == accepted  # one file per stream, each decoding back to its id
    assert snapshots == set(PATHLIKE_STREAMS)

    # and the encoding round-trips: a restarted server knows every stream by its id
    srv = ServerProcess("--model", str(tiny_config), "--state-dir", str(state))
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = tta_grpc.AdaptationServiceStub(channel)
            listed = {s.stream_id for s in stub.ListStreams(tta_pb.ListStreamsRequest()).streams}
            assert listed == accepted
            for stream in PATHLIKE_STREAMS:
                info = stub.GetStream(tta_pb.StreamRequest(stream_id=stream))
                assert info.batches == 1 and list(info.snapshots) == ["good"], stream
    finally:
        assert srv.stop() == 0
