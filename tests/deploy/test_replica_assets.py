"""Deployment assets of the multi-replica mode (issue 13): the Helm chart's coordination mode
(rendered by tests/deploy/helm_render.py, schema-checked), deploy/routing/nginx.conf against
Debian's nginx (config test, and real routing of gRPC calls to three loopback backends), the
alert rules of deploy/prometheus/rules/replicas.yml (promtool) and the dashboard's "Replicas and
hand-offs" row. The replicas themselves, with etcd, are tested in tests/deploy/test_replicas.py."""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from helm_render import Renderer

from conftest import REPO

DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "tta-runtime"
NGINX_CONF = DEPLOY / "routing" / "nginx.conf"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tta-runtime.json"
K8S_VERSION = "1.33.0"
MULTI = {"coordination": {"enabled": True}, "replicas": {"count": 3}}
# the metric families of the multi-replica mode (issue 13); the row and the rules use no others
REPLICA_METRICS = {"tta_streams_held", "tta_handoffs_total", "tta_handoff_seconds", "tta_handoff_timeouts_total",
                   "tta_lease_losses_total", "tta_fencing_refusals_total", "tta_coordinator_up"}


def server_flags() -> set[str]:
    return set(re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', (REPO / "runtime" / "server.py").read_text()))


def by_kind(docs):
    out: dict[str, list] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def named(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def arg(args, flag):
    return args[args.index(flag) + 1]


def selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


# --- Helm: multi-replica mode ---------------------------------------------------------------------
def test_helm_multi_replica_renders_and_validates():
    import kubernetes_validate

    docs = Renderer(CHART, MULTI, release="tta", namespace="ml").manifests()
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    kinds = by_kind(docs)
    assert sorted(kinds) == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "PodDisruptionBudget", "Service",
                             "StatefulSet"]
    assert [d["metadata"]["name"] for d in kinds["Deployment"]] == ["tta-tta-runtime-router"]  # no server Deployment

    sts = named(docs, "StatefulSet", "tta-tta-runtime")
    pods = named(docs, "Service", "tta-tta-runtime-pods")
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["serviceName"] == "tta-tta-runtime-pods"
    assert pods["spec"]["clusterIP"] == "None" and pods["spec"]["publishNotReadyAddresses"] is True
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert selects(pods["spec"]["selector"], pod_labels)
    assert selects(sts["spec"]["selector"]["matchLabels"], pod_labels)

    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = c["args"]
    assert {a for a in args if a.startswith("--")} <= server_flags()
    assert arg(args, "--coordinator") == "etcd://tta-tta-runtime-etcd.ml.svc.cluster.local:2379"
    assert arg(args, "--replica-id") == "$(POD_NAME)"
    assert arg(args, "--advertise") == "$(POD_NAME).tta-tta-runtime-pods.$(POD_NAMESPACE).svc.cluster.local:8001"
    assert (arg(args, "--lease-ttl"), arg(args, "--handoff-timeout"), arg(args, "--checkpoint-interval")) == ("10", "5", "30")
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] == 8001
    assert c["readinessProbe"]["grpc"]["service"] == "inference.GRPCInferenceService"
    assert pod["terminationGracePeriodSeconds"] == 45 and pod["securityContext"]["runAsNonRoot"] is True

    # one ReadWriteMany state volume for all replicas, mounted where the image's --state-dir points
    state = {v["name"]: v for v in pod["volumes"]}["state"]
    pvc = named(docs, "PersistentVolumeClaim", state["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert {"name": "state", "mountPath": "/var/lib/tta/state"} in c["volumeMounts"]
    assert "tta-tta-runtime-state" not in {d["metadata"]["name"] for d in kinds["PersistentVolumeClaim"]}

    # bundled etcd: the official image, its own PVC, reachable at the --coordinator address
    etcd = named(docs, "StatefulSet", "tta-tta-runtime-etcd")
    ec = etcd["spec"]["template"]["spec"]["containers"][0]
    assert ec["image"].split(":")[0] in ("gcr.io/etcd-development/etcd", "quay.io/coreos/etcd")
    assert etcd["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert {"name": "data", "mountPath": "/var/lib/etcd"} in ec["volumeMounts"]
    assert any(a.startswith("--data-dir=/var/lib/etcd/") for a in ec["args"])
    etcd_svc = named(docs, "Service", "tta-tta-runtime-etcd")
    assert etcd["spec"]["serviceName"] == etcd_svc["metadata"]["name"]
    assert 2379 in [p["port"] for p in etcd_svc["spec"]["ports"]]

    # router: nginx over the pods' DNS names; no Service selects pods of another kind
    router = named(docs, "Deployment", "tta-tta-runtime-router")
    rc = router["spec"]["template"]["spec"]["containers"][0]
    renv = {e["name"]: e["value"] for e in rc["env"]}
    assert renv["REPLICAS"] == "3" and renv["POD_PREFIX"] == sts["metadata"]["name"]
    assert renv["PODS_DOMAIN"] == "tta-tta-runtime-pods.ml.svc.cluster.local"
    cm = named(docs, "ConfigMap", "tta-tta-runtime-router")
    assert "hash $http_x_tta_stream_id consistent;" in cm["data"]["nginx.conf"]
    assert "/etc/tta-router/start.sh" in rc["command"]
    router_labels = router["spec"]["template"]["metadata"]["labels"]
    etcd_labels = etcd["spec"]["template"]["metadata"]["labels"]
    for svc in kinds["Service"]:
        sel = svc["spec"]["selector"]
        hits = [n for n, labels in (("server", pod_labels), ("router", router_labels), ("etcd", etcd_labels))
                if selects(sel, labels)]
        assert len(hits) == 1, (svc["metadata"]["name"], hits)
    assert selects(named(docs, "Service", "tta-tta-runtime-router")["spec"]["selector"], router_labels)
    pdb = kinds["PodDisruptionBudget"][0]
    assert pdb["spec"]["maxUnavailable"] == 1 and selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)


def test_helm_multi_replica_with_an_existing_etcd_and_claim():
    values = {**MULTI, "coordination": {"enabled": True, "etcd": {"endpoints": "etcd-0.etcd:2379,etcd-1.etcd:2379"}},
              "state": {"persistentVolumeClaim": {"existingClaim": "shared"}}, "router": {"enabled": False},
              "server": {"extraArgs": ["--track", "cam-1"]}}
    docs = Renderer(CHART, values, release="tta").manifests()
    kinds = by_kind(docs)
    assert sorted(kinds) == ["PodDisruptionBudget", "Service", "StatefulSet"]
    assert [d["metadata"]["name"] for d in kinds["StatefulSet"]] == ["tta-tta-runtime"]  # no bundled etcd
    pod = kinds["StatefulSet"][0]["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert arg(args, "--coordinator") == "etcd://etcd-0.etcd:2379,etcd-1.etcd:2379"
    assert args[-2:] == ["--track", "cam-1"]
    assert {v["name"]: v for v in pod["volumes"]}["state"]["persistentVolumeClaim"]["claimName"] == "shared"


def test_helm_single_replica_default_renders_no_multi_replica_objects():
    rendered = Renderer(CHART).render()
    for name in ("statefulset.yaml", "service-pods.yaml", "pvc-shared.yaml", "etcd.yaml", "router.yaml"):
        assert rendered[name].strip() == "", name
    assert "--coordinator" not in rendered["deployment.yaml"]


def test_helm_router_start_script_is_valid_sh():
    docs = Renderer(CHART, MULTI, release="tta").manifests()
    script = named(docs, "ConfigMap", "tta-tta-runtime-router")["data"]["start.sh"]
    r = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr


# --- nginx ------------------------------------------------------------------------------------
def nginx_or_skip() -> str:
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if exe is None:
        pytest.skip("nginx not installed (apt-get install nginx)")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefix_dir(tmp_path: Path) -> Path:
    prefix = tmp_path / "nginx"
    (prefix / "logs").mkdir(parents=True)
    (prefix / "tmp").mkdir()
    return prefix


def test_routing_nginx_conf_passes_nginx_t(tmp_path):
    exe = nginx_or_skip()
    text = NGINX_CONF.read_text()
    assert "hash $http_x_tta_stream_id consistent;" in text and "grpc_pass grpc://tta;" in text
    assert re.search(r"listen 127\.0\.0\.1:\d+ http2;", text)
    assert "non_idempotent" not in text.split("grpc_next_upstream ", 1)[1].split(";")[0]
    # nothing outside the prefix: every path directive is relative
    for directive in ("pid", "error_log", "access_log", "client_body_temp_path", "proxy_temp_path"):
        for value in re.findall(rf"^\s*{directive}\s+(\S+)", text, re.M):
            assert not value.startswith("/"), (directive, value)
    r = subprocess.run([exe, "-t", "-p", str(prefix_dir(tmp_path)), "-c", str(NGINX_CONF)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_helm_router_nginx_conf_passes_nginx_t(tmp_path):
    exe = nginx_or_skip()
    docs = Renderer(CHART, MULTI, release="tta").manifests()
    conf = named(docs, "ConfigMap", "tta-tta-runtime-router")["data"]["nginx.conf"]
    prefix = prefix_dir(tmp_path)
    conf = conf.replace("/tmp/nginx/", f"{prefix}/")
    # what start.sh writes, with names that resolve here
    (prefix / "upstreams.conf").write_text("server localhost:8001 max_fails=1 fail_timeout=10s;\n")
    (tmp_path / "nginx.conf").write_text(conf)
    r = subprocess.run([exe, "-t", "-p", str(prefix), "-c", str(tmp_path / "nginx.conf")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


class Backend:
    """A gRPC server answering ModelInfer with its own name (raw bytes, no protobuf), or, for streams
    named "busy-*", with UNAVAILABLE and the holder in trailing metadata (a timed-out hand-off)."""

    def __init__(self, name: str, port: int):
        self.name, self.port, self.calls = name, port, 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(self.infer)})
        self.server.add_generic_rpc_handlers((handler,))
        assert self.server.add_insecure_port(f"127.0.0.1:{port}") == port
        self.server.start()

    def infer(self, request, context):
        self.calls += 1
        if dict(context.invocation_metadata()).get("x-tta-stream-id", "").startswith("busy-"):
            context.set_trailing_metadata((("tta-holder", "r9"),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "the holder did not release the stream in time")
        return self.name.encode()

    def stop(self):
        self.server.stop(0).wait(5)


@pytest.fixture
def routed(tmp_path):
    """deploy/routing/nginx.conf as shipped, on free ports, in front of three backends."""
    exe = nginx_or_skip()
    text = NGINX_CONF.read_text()
    ports = {p: free_port() for p in re.findall(r"server 127\.0\.0\.1:(\d+) ", text)}
    assert len(ports) == 3
    front = free_port()
    for old, new in ports.items():
        text = text.replace(f"server 127.0.0.1:{old} ", f"server 127.0.0.1:{new} ")
    text = re.sub(r"listen 127\.0\.0\.1:\d+ http2;", f"listen 127.0.0.1:{front} http2;", text)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    prefix = prefix_dir(tmp_path)
    backends = {f"r{i}": Backend(f"r{i}", p) for i, p in enumerate(ports.values(), 1)}
    proc = subprocess.Popen([exe, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", front), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((prefix / "logs" / "error.log").read_text()[-2000:]) from None
                time.sleep(0.1)
        channel = grpc.insecure_channel(f"127.0.0.1:{front}")
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

        def ask(stream: str) -> str:
            return call(b"", metadata=[("x-tta-stream-id", stream)], timeout=10).decode()

        yield ask, backends
        channel.close()
    finally:
        proc.terminate()
        proc.wait(15)
        for b in backends.values():
            b.stop()


def test_routing_nginx_keeps_each_stream_on_one_replica_and_skips_a_dead_one(routed):
    ask, backends = routed
    streams = [f"cam-{i}" for i in range(24)]
    first = {s: ask(s) for s in streams}
    assert len(set(first.values())) == 3, first  # spread over all three
    for _ in range(2):
        assert {s: ask(s) for s in streams} == first  # and sticky
    victim = first[streams[0]]
    backends[victim].stop()  # connection refused: nginx tries the next replica on the ring
    after = {s: ask(s) for s in streams}
    moved = {s for s in streams if first[s] == victim}
    assert all(after[s] != victim for s in moved)
    assert {s: after[s] for s in streams if s not in moved} == {s: first[s] for s in streams if s not in moved}


def test_routing_nginx_passes_unavailable_and_its_trailers_through_without_a_replay(routed):
    ask, backends = routed
    before = sum(b.calls for b in backends.values())
    with pytest.raises(grpc.RpcError) as caught:
        ask("busy-1")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ("tta-holder", "r9") in tuple(caught.value.trailing_metadata())
    assert sum(b.calls for b in backends.values()) == before + 1  # the replica got it once: no retry


# --- Prometheus rules and the dashboard row ------------------------------------------------------
def replica_alerts() -> list[dict]:
    doc = yaml.safe_load((PROM / "rules" / "replicas.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_replica_alert_rules_pass_promtool_and_their_unit_tests():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    r = subprocess.run([promtool, "check", "rules", str(PROM / "rules" / "replicas.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([promtool, "test", "rules", str(PROM / "tests" / "replicas_test.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_replica_alert_has_a_runbook_section_a_unit_test_and_known_metrics():
    # the sections are drafted in docs/_replicas_draft.md until they are merged into docs/RUNBOOK.md
    runbook = "\n".join((REPO / "docs" / n).read_text() for n in ("RUNBOOK.md", "_replicas_draft.md")
                        if (REPO / "docs" / n).exists())
    tested = (PROM / "tests" / "replicas_test.yml").read_text()
    names = {r["alert"] for r in replica_alerts()}
    assert names == {"TTAHandoffStorm", "TTAFencingRefusals", "TTACoordinatorDown", "TTALeaseLost"}
    for rule in replica_alerts():
        assert rule["annotations"]["runbook"] == f"docs/RUNBOOK.md#{rule['alert'].lower()}"
        assert f"\n## {rule['alert']}\n" in runbook, f"no runbook section for {rule['alert']}"
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert f"alertname: {rule['alert']}" in tested, f"no promtool test for {rule['alert']}"
        used = set(re.findall(r"\b(tta_[a-z_]+)", rule["expr"]))
        assert used - {"tta_requests_total"} <= REPLICA_METRICS, used


def test_dashboard_replicas_row_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    rows = [p for p in dash["panels"] if p["type"] == "row" and p["title"] == "Replicas and hand-offs"]
    assert len(rows) == 1
    row = rows[0]
    # collapsed: one replica (no --coordinator) has no data for it
    assert row["collapsed"] is True and row["panels"]
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dash["panels"] if p["type"] != "row")
    assert row["gridPos"]["y"] >= bottom
    ids = [p["id"] for p in dash["panels"]] + [p["id"] for p in row["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    # placement, datasource, variables and brackets of every panel: test_monitoring.test_dashboard_is_well_formed
    assert all(p["gridPos"]["y"] > row["gridPos"]["y"] for p in row["panels"])
    used = {re.sub(r"_bucket$", "", m) for p in row["panels"] for t in p["targets"]
            for m in re.findall(r"\b(tta_[a-z_]+)", t["expr"])}
    assert used == REPLICA_METRICS
