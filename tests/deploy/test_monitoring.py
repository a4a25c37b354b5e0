"""Monitoring assets against real parts: promtool on the rules, a lint of the Grafana dashboard,
and a real Prometheus (Debian's package) scraping a real server fed with traffic, which must
return data for every PromQL expression the dashboard, the rules and the console page use."""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from tritonclient.utils import InferenceServerException

from conftest import REPO, TRACKED, ServerProcess

PROM = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "tta-runtime.json"
NEEDS = "install Debian's packages: apt-get install prometheus chromium (make test does it)"


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} not found: {NEEDS}")
    return path


def run(*cmd, timeout=60):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# --- static checks ----------------------------------------------------------------------

def test_promtool_accepts_the_config_and_rules():
    promtool = require("promtool")
    result = run(promtool, "check", "config", str(PROM / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    result = run(promtool, "check", "rules", *map(str, sorted((PROM / "rules").glob("*.yml"))))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests():
    result = run(require("promtool"), "test", "rules", str(PROM / "tests" / "alerts_test.yml"))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((PROM / "rules" / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def recording_rules() -> list[dict]:
    doc = yaml.safe_load((PROM / "rules" / "recording.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_every_alert_has_a_runbook_section_and_a_unit_test():
    runbook = (REPO / "docs" / "RUNBOOK.md").read_text()
    tested = (PROM / "tests" / "alerts_test.yml").read_text()
    for rule in alert_rules():
        assert rule["annotations"]["runbook"] == f"docs/RUNBOOK.md#{rule['alert'].lower()}"
        assert f"\n## {rule['alert']}\n" in runbook, f"docs/RUNBOOK.md has no section for {rule['alert']}"
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert f"alertname: {rule['alert']}" in tested, f"no promtool test for {rule['alert']}"


def dashboard_panels(collapsed: bool = False) -> list[dict]:
    """The dashboard's panels (with `collapsed`, also those inside collapsed rows, which hold
    series a single server does not export, e.g. the replicas row)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    nested = [q for p in panels if p["type"] == "row" and collapsed for q in p.get("panels", [])]
    return [p for p in panels if p["type"] != "row"] + nested


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "model", "policy", "stream"} <= variables
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert [r.split()[0] for r in rows] == ["Drift", "Policy", "Serving", "Replicas"]
    occupied = set()
    for p in dashboard_panels(collapsed=True):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        for t in p["targets"]:
            for used in re.findall(r"\$(\w+)", t["expr"]):
                assert used in variables, (p["title"], used)
            assert t["expr"].count("(") == t["expr"].count(")"), p["title"]
    drift = {p["title"] for p in dashboard_panels() if p["gridPos"]["y"] < 17}
    for title in ("BN-statistics shift", "Prediction entropy", "Prediction confidence", "Class-marginal entropy (collapse)",
                  "Adaptation loss", "Weight distance from source"):
        assert title in drift


# --- a real server, a real Prometheus -------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctl(target: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "runtime.cli", "ctl", "--target", target, *args],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def feed(target: str, n_batches: int, offset: int = 0) -> None:
    """Drifting traffic on the two tracked streams and on untracked ones, with feedback labels."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(target)
    rng = np.random.default_rng(offset)
    for i in range(n_batches):
        for stream in (*TRACKED, f"untracked-{i % 3}"):
            x = (rng.random((8, 3, 16, 16), dtype=np.float32) * (1.0 - 0.08 * (i % 10))).astype(np.float32)
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            request_id = f"{stream}-{offset}-{i}"
            client.infer("tiny", [inp], request_id=request_id, parameters={"stream_id": stream})
            if stream in TRACKED:
                ctl(target, "feedback", request_id, *[str(v) for v in rng.integers(0, 10, 8)])
    bad = grpcclient.InferInput("input", [2, 3, 5, 5], "FP32")  # wrong size: one failure series
    bad.set_data_from_numpy(np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
        client.infer("tiny", [bad], parameters={"stream_id": TRACKED[0]})
    one = grpcclient.InferInput("input", [1, 3, 16, 16], "FP32")  # a single image: the guard's small_batch fallback
    one.set_data_from_numpy(rng.random((1, 3, 16, 16), dtype=np.float32))
    client.infer("tiny", [one], parameters={"stream_id": TRACKED[1]})


class Prometheus:
    def __init__(self, metrics_port: int, folder: Path):
        self.port = free_port()
        config = yaml.safe_load((PROM / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(p) for p in sorted((PROM / "rules").glob("*.yml"))]
        config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
        path = folder / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            [require("prometheus"), f"--config.file={path}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", f"--web.console.templates={PROM / 'consoles'}",
             f"--web.console.libraries={PROM / 'console_libraries'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2)
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("prometheus did not become ready")

    def query(self, expr: str) -> list:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.load(urllib.request.urlopen(url, timeout=10))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for_value(self, expr: str, value: float, timeout: float = 60.0) -> None:
        """Until a scrape has seen `expr` at `value`. On a loaded machine a scrape can time out (its
        timeout is the 1 s interval), and a feed that no scrape saw in progress leaves counters whose
        increase() is 0: waiting between feeds gives every counter at least one sample per stage."""
        deadline, seen = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            result = self.query(expr)
            seen = float(result[0]["value"][1]) if result else None
            if seen == value:
                return
            time.sleep(0.3)
        raise AssertionError(f"prometheus never saw {expr} == {value} (last seen {seen})")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def monitored(tiny_config, tmp_path_factory):
    require("prometheus")
    # a memory budget too small for two adapted streams, so that eviction and restore happen too
    state_dir = tmp_path_factory.mktemp("state")
    server = ServerProcess("--model", str(tiny_config), "--state-dir", str(state_dir), "--memory-budget-mb", "0.001")
    prometheus = None
    try:
        prometheus = Prometheus(server.metrics_port, tmp_path_factory.mktemp("prometheus"))
        ctl(server.target, "set-policy", TRACKED[1], "tent")
        ctl(server.target, "set-policy", "untracked-0", "bn-ema")
        ctl(server.target, "set-policy", "untracked-1", "unmix-tns", "k=4")
        labels_seen = 'tta_feedback_labels_total{stream="%s"}' % TRACKED[0]
        feed(server.target, 6)
        prometheus.wait_for_value(labels_seen, 6 * 8)
        ctl(server.target, "snapshot", TRACKED[1], "--name", "before")
        feed(server.target, 6, offset=1)
        prometheus.wait_for_value(labels_seen, 12 * 8)
        ctl(server.target, "rollback", TRACKED[1], "--name", "before")
        ctl(server.target, "reset", TRACKED[0])
        feed(server.target, 4, offset=2)
        prometheus.wait_for_value(labels_seen, 16 * 8)
        time.sleep(6)  # a few more scrapes and rule evaluations
        yield server, prometheus
    finally:
        if prometheus:
            prometheus.stop()
        server.stop()


VARIABLES = {"$model": ".*", "$policy": ".*", "$stream": ".*", "${datasource}": ""}
COMPARISON = re.compile(r"\s*(>|<|==|>=|<=|!=)\s*[\d.\s*]+$")


def signal_parts(expr: str) -> list[str]:
    """The series an alert or filter compares: each side of top-level and/or, minus its threshold."""
    parts, depth, start = [], 0, 0
    text = " ".join(expr.split())
    tokens = list(re.finditer(r"\(|\)| and on \([^)]*\) | and | or ", text))
    for tok in tokens:
        if tok.group() == "(":
            depth += 1
        elif tok.group() == ")":
            depth -= 1
        elif depth == 0:
            parts.append(text[start:tok.start()])
            start = tok.end()
    parts.append(text[start:])
    return [COMPARISON.sub("", p).strip() for p in parts if not p.strip().startswith("absent(")]


def test_every_dashboard_and_rule_expression_returns_data(monitored):
    _, prometheus = monitored
    exprs = {}
    for p in dashboard_panels():
        for t in p["targets"]:
            e = t["expr"]
            for k, v in VARIABLES.items():
                e = e.replace(k, v)
            for part in signal_parts(e):
                exprs[part] = f"dashboard panel {p['title']!r}"
    dash = json.loads(DASHBOARD.read_text())
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            metric = re.match(r"label_values\((.*),\s*\w+\)$", v["query"]["query"]).group(1)
            exprs[metric.replace("$model", ".*")] = f"variable {v['name']}"
    for a in dash["annotations"]["list"]:
        for part in signal_parts(a["expr"].replace("$model", ".*")):
            exprs[part] = "annotation"
    for r in recording_rules():
        exprs[r["record"]] = "recording rule"
    for r in alert_rules():
        for part in signal_parts(r["expr"]):
            exprs[part] = f"alert {r['alert']}"
    empty = [f"{where}: {e}" for e, where in exprs.items() if not prometheus.query(e)]
    assert not empty, "no data for:\n" + "\n".join(empty)


def test_tracked_streams_are_labelled_and_the_rest_rolled_up(monitored):
    _, prometheus = monitored
    streams = {r["metric"]["stream"] for r in prometheus.query("tta_prediction_confidence_ratio_count")}
    assert streams == {*TRACKED, "_other"}
    policies = {r["metric"]["stream"]: r["metric"]["policy"] for r in prometheus.query("tta_class_marginal_entropy_ratio")}
    assert policies == {TRACKED[0]: "bn", TRACKED[1]: "tent"}
    assert float(prometheus.query('tta_feedback_labels_total{stream="tracked-a"}')[0]["value"][1]) == 16 * 8
    assert prometheus.query('up{job="tta-runtime"}')[0]["value"][1] == "1"


def test_console_page_renders_its_panels_in_chromium(monitored, tmp_path):
    _, prometheus = monitored
    chromium = require("chromium")
    result = run(chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=8000", "--dump-dom",
                 f"{prometheus.url}/consoles/tta.html", timeout=120)
    dom = result.stdout
    assert "<h1>tta-runtime</h1>" in dom, result.stderr[-2000:]
    panels = re.findall(r'<div class="tta-panel" id="panel-([\w-]+)">', dom)
    assert len(panels) == 15, panels
    for panel in ("bn-shift", "entropy", "confidence", "marginal", "requests", "streams", "accuracy"):
        block = dom.split(f'id="panel-{panel}"', 1)[1].split('class="tta-panel"', 1)[0]
        assert "tta-value" in block and "tta-nodata" not in block, f"panel {panel} shows no data"
        assert "<svg" in block, f"panel {panel}: prom_console.js drew no graph"


def test_every_exposed_metric_family_is_documented():
    from prometheus_client import generate_latest

    from runtime.metrics import Metrics

    metrics = Metrics("m", ["s"])
    metrics.stream_started("s", "bn")
    metrics.reset("s", "bn", "request")
    metrics.failure("ModelInfer", "INVALID_ARGUMENT")
    exposed = {line.split()[2] for line in generate_latest(metrics.registry).decode().splitlines()
               if line.startswith("# TYPE")}
    documented = (REPO / "docs" / "METRICS.md").read_text()
    missing = sorted(name for name in exposed if f"`{name}`" not in documented
                     and f"`{name.removesuffix('_info')}`" not in documented)
    assert not missing, f"docs/METRICS.md lacks {missing}"
    assert len(exposed) >= 25
