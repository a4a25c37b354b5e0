"""runtime.healthcheck over TLS (issue 17, part 3): the health check the Docker image and the Helm
chart run, against a real `tta serve` started with a self-signed certificate, and with mutual TLS.
Flags and their $TTA_HEALTHCHECK_* fallbacks (what the Docker HEALTHCHECK uses)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, ServerProcess
from runtime import healthcheck

HEALTHCHECK = [sys.executable, "-m", "runtime.healthcheck", "--timeout", "10"]
SERVICE_NAME = "tta-runtime.default.svc"  # what a cluster certificate names; probes dial 127.0.0.1


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


def _ec_key(name: str) -> list[str]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key"]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """self.pem/.key: a self-signed server certificate for 127.0.0.1 and SERVICE_NAME; ca.pem and
    client.pem/.key signed by it, for mutual TLS."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not installed (needed to make test certificates)")
    folder = tmp_path_factory.mktemp("healthcheck-tls")
    _openssl(folder, "req", "-x509", *_ec_key("self"), "-days", "1", "-subj", "/CN=tta-runtime", "-out", "self.pem",
             "-addext", f"subjectAltName=IP:127.0.0.1,DNS:{SERVICE_NAME}")
    _openssl(folder, "req", "-x509", *_ec_key("ca"), "-days", "1", "-subj", "/CN=test-ca", "-out", "ca.pem",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, extensions in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                             ("client", "extendedKeyUsage=clientAuth\n")):
        (folder / f"{name}.ext").write_text(extensions)
        _openssl(folder, "req", "-new", *_ec_key(name), "-subj", f"/CN={name}", "-out", f"{name}.csr")
        _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return folder


def healthcheck_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(healthcheck.ENV)}
    return subprocess.run([*HEALTHCHECK, *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})})


def test_healthcheck_over_tls_with_a_self_signed_certificate(tiny_config, certificates):
    c = certificates
    srv = ServerProcess("--model", str(tiny_config), "--tls-cert", str(c / "self.pem"), "--tls-key", str(c / "self.key"))
    try:
        ok, message = healthcheck.check(srv.target, "", 10, tls_ca=str(c / "self.pem"))
        assert ok and message.endswith("SERVING"), message
        ok, message = healthcheck.check(srv.target, "inference.GRPCInferenceService", 10, tls_ca=str(c / "self.pem"))
        assert ok, message
        # plaintext against a TLS port: unhealthy, not a hang
        plain = healthcheck_cli("--target", srv.target, "--timeout", "3")
        assert plain.returncode == 1 and plain.stdout.startswith("unhealthy: "), plain.stdout
        # the flags, and the environment the Docker HEALTHCHECK relies on
        r = healthcheck_cli("--target", srv.target, "--tls-ca", str(c / "self.pem"))
        assert r.returncode == 0 and r.stdout.startswith("ok: ") and r.stdout.count("\n") == 1, r.stdout + r.stderr
        r = healthcheck_cli(env={"TTA_HEALTHCHECK_TARGET": srv.target, "TTA_HEALTHCHECK_TLS_CA": str(c / "self.pem")})
        assert r.returncode == 0 and r.stdout.startswith("ok: "), r.stdout + r.stderr
        # a probe dials 127.0.0.1 while the certificate names the service: --tls-server-name
        r = healthcheck_cli("--target", srv.target, "--tls-ca", str(c / "self.pem"), "--tls-server-name", SERVICE_NAME)
        assert r.returncode == 0, r.stdout + r.stderr
        r = healthcheck_cli("--target", srv.target, "--tls-ca", str(c / "self.pem"), "--tls-server-name",
                            "someone-else.example", "--timeout", "3")
        assert r.returncode == 1 and r.stdout.startswith("unhealthy: "), r.stdout
        # a CA that did not sign the certificate
        r = healthcheck_cli("--target", srv.target, "--tls-ca", str(c / "ca.pem"), "--timeout", "3")
        assert r.returncode == 1 and r.stdout.startswith("unhealthy: "), r.stdout
        # a missing file is a one-line unhealthy, not a traceback
        r = healthcheck_cli("--target", srv.target, "--tls-ca", str(c / "missing.pem"))
        assert r.returncode == 1 and "TLS setup" in r.stdout and "Traceback" not in r.stderr, r.stdout + r.stderr
        assert srv.proc.poll() is None
    finally:
        assert srv.stop() == 0


def test_healthcheck_presents_a_client_certificate_for_mutual_tls(tiny_config, certificates):
    c = certificates
    srv = ServerProcess("--model", str(tiny_config), "--tls-cert", str(c / "server.pem"),
                        "--tls-key", str(c / "server.key"), "--tls-client-ca", str(c / "ca.pem"))
    try:
        refused = healthcheck_cli("--target", srv.target, "--tls-ca", str(c / "ca.pem"), "--timeout", "3")
        assert refused.returncode == 1 and refused.stdout.startswith("unhealthy: "), refused.stdout
        r = healthcheck_cli("--target", srv.target, "--tls-ca", str(c / "ca.pem"), "--tls-cert", str(c / "client.pem"),
                            "--tls-key", str(c / "client.key"))
        assert r.returncode == 0 and r.stdout.startswith("ok: "), r.stdout + r.stderr
        r = healthcheck_cli(env={"TTA_HEALTHCHECK_TARGET": srv.target, "TTA_HEALTHCHECK_TLS_CA": str(c / "ca.pem"),
                                 "TTA_HEALTHCHECK_TLS_CERT": str(c / "client.pem"),
                                 "TTA_HEALTHCHECK_TLS_KEY": str(c / "client.key")})
        assert r.returncode == 0, r.stdout + r.stderr
        r = healthcheck_cli("--target", srv.target, "--tls-ca", str(c / "ca.pem"), "--tls-cert", str(c / "client.pem"))
        assert r.returncode == 1 and "go together" in r.stdout, r.stdout
    finally:
        assert srv.stop() == 0
