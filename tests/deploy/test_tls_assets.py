"""TLS through the deploy assets (issue 17, part 3): the Helm chart mounts a TLS Secret, passes it
to `tta serve` and probes with the image's health check over TLS (Kubernetes' gRPC probes speak
no TLS); the compose override passes the files to the server and its HEALTHCHECK. The health
check itself over TLS: tests/serving/test_healthcheck_tls.py."""
from __future__ import annotations

import re

import pytest
import yaml
from helm_render import Renderer

from conftest import REPO
from runtime import healthcheck

DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "tta-runtime"


def healthcheck_flags() -> set[str]:
    return set(re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', (REPO / "runtime" / "healthcheck.py").read_text()))


def server_pod(values: dict) -> tuple[dict, dict]:
    docs = Renderer(CHART, values).manifests()
    kind = "StatefulSet" if values.get("coordination", {}).get("enabled") else "Deployment"
    workload = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == "test-tta-runtime"][0]
    pod = workload["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


@pytest.mark.parametrize("coordination", [False, True], ids=["deployment", "statefulset"])
@pytest.mark.parametrize("client_auth", [False, True], ids=["tls", "mutual-tls"])
def test_chart_wires_tls_through_the_server_and_its_probes(coordination, client_auth):
    import kubernetes_validate

    values = {"tls": {"enabled": True, "secretName": "my-tls", "clientAuth": client_auth},
              "coordination": {"enabled": coordination}}
    for doc in Renderer(CHART, values).manifests():
        if doc["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(doc, "1.33.0", strict=True)
    pod, c = server_pod(values)
    args = c["args"]
    assert args[args.index("--tls-cert") + 1] == "/etc/tta/tls/tls.crt"
    assert args[args.index("--tls-key") + 1] == "/etc/tta/tls/tls.key"
    assert ("--tls-client-ca" in args) == client_auth
    assert {"name": "tls", "mountPath": "/etc/tta/tls", "readOnly": True} in c["volumeMounts"]
    tls_volume = [v for v in pod["volumes"] if v["name"] == "tls"][0]
    assert tls_volume["secret"]["secretName"] == "my-tls"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "grpc" not in c[probe]
        command = c[probe]["exec"]["command"]
        assert command[:3] == ["python", "-m", "runtime.healthcheck"]
        assert set(a for a in command if a.startswith("--")) <= healthcheck_flags()
        assert command[command.index("--tls-ca") + 1] == "/etc/tta/tls/ca.crt"
        assert ("--tls-cert" in command and "--tls-key" in command) == client_auth
        assert float(command[command.index("--timeout") + 1]) < c[probe]["timeoutSeconds"]
    readiness = c["readinessProbe"]["exec"]["command"]
    assert readiness[readiness.index("--service") + 1] == "inference.GRPCInferenceService"


def test_chart_without_tls_keeps_grpc_probes_and_h2c():
    pod, c = server_pod({})
    assert all(c[p]["grpc"]["port"] == 8001 for p in ("startupProbe", "livenessProbe", "readinessProbe"))
    assert "--tls-cert" not in c["args"] and not [v for v in pod["volumes"] if v["name"] == "tls"]
    docs = Renderer(CHART, {"tls": {"enabled": True}}).manifests()
    service = [d for d in docs if d["kind"] == "Service"][0]
    assert "appProtocol" not in service["spec"]["ports"][0]  # not cleartext h2c any more


def test_chart_tls_server_name_reaches_the_probes():
    _, c = server_pod({"tls": {"enabled": True, "serverName": "tta.prod.svc"}})
    command = c["livenessProbe"]["exec"]["command"]
    assert command[command.index("--tls-server-name") + 1] == "tta.prod.svc"


def test_compose_tls_override():
    override = yaml.safe_load((DEPLOY / "docker" / "compose.tls.yaml").read_text())
    server = override["services"]["server"]
    command = server["command"]
    mount_source, mount_target = server["volumes"][0].split(":")[:2]
    assert mount_source == "./tls"
    for flag in ("--tls-cert", "--tls-key"):
        assert command[command.index(flag) + 1].startswith(mount_target + "/")
    env = server["environment"]
    assert env["TTA_HEALTHCHECK_TLS_CA"].startswith(mount_target + "/")
    assert all(k.startswith(healthcheck.ENV) for k in env)
    # the Dockerfiles' HEALTHCHECK reads these variables: the names must be the health check's
    source = (REPO / "runtime" / "healthcheck.py").read_text()
    for name in ("TLS_CA", "TLS_CERT", "TLS_KEY", "TLS_SERVER_NAME"):
        assert f'ENV + "{name}"' in source
