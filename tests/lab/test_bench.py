"""`tta bench --quick --json` end to end: every section reports its figures with the machine, a
real server on loopback for the gRPC sections (speed itself is judged in docs/BENCHMARKS.md,
not asserted here; the load section's zero errors is)."""
import json
import math
import os
import subprocess
import sys

from conftest import REPO


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_quick_bench_reports_every_section():
    result = subprocess.run([sys.executable, "-m", "runtime.cli", "bench", "--quick", "--threads", "1", "--json",
                             "--load", "--seconds", "3", "--streams", "2,4", "--memory-budget-mb", "1"],
                            capture_output=True, text=True, timeout=180, cwd=REPO,
                            env=dict(os.environ, TTA_NO_PROGRESS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    m = report["machine"]
    assert m["torch_threads"] == 1 and m["cores"] >= 1 and m["cpu"] and m["torch"] and m["onnxruntime"]
    assert report["sections"] == ["frozen", "latency", "steps", "cotta", "memory", "onnx", "load"]
    quick = ["source", "bn", "unmix-tns", "tent"]

    frozen = report["frozen"]
    assert [(r["path"], r["batch"]) for r in frozen] == [
        (p, b) for b in (1, 16) for p in ("in-process forward", "gRPC ModelInfer", "gRPC ModelStreamInfer")]
    for r in frozen:
        assert _positive(r["ratio"]) and _positive(r["images_per_s"])
        assert abs(r["images_per_s"] - r["batch"] / (r["ms_per_batch"] / 1e3)) < 1e-6 * r["images_per_s"]
        assert r["max_abs_diff_vs_in_process"] < 1e-4  # the server answers with the same model
    [fleet] = report["frozen_concurrent"]  # single images from 8 clients at once: what dynamic batching serves
    assert fleet["batch"] == 1 and _positive(fleet["images_per_s"]) and _positive(fleet["in_process_images_per_s"])
    assert abs(fleet["ratio"] - fleet["images_per_s"] / fleet["in_process_images_per_s"]) < 0.5 * fleet["ratio"]

    latency = {r["policy"]: r for r in report["latency"]}
    assert list(latency) == quick and latency["source"]["p50_ratio"] == 1.0
    for r in latency.values():
        assert _positive(r["p50_ms"]) and r["p99_ms"] >= r["p50_ms"] and r["requests"] == 3
    assert _positive(latency["tent"]["update_done_ms"])  # the deferred update was seen applied after the reply
    assert latency["tent"]["guard_verdicts"] == 0  # real i.i.d. images: the guard lets every update through
    assert latency["bn"]["update_done_ms"] is None
    guarded = {r["policy"]: r for r in report["latency_guarded"]}  # the default server, measured beside
    assert list(guarded) == quick and all(r["guard"] == "rollback" and _positive(r["p50_ratio"]) for r in guarded.values())
    assert guarded["tent"]["server_state_bytes"] == 2 * latency["tent"]["server_state_bytes"]  # the guard's copy
    assert all(_positive(r["p50_young_ms"]) for r in guarded.values())  # a young stream's figure beside

    steps = {r["policy"]: r for r in report["steps"]}
    assert list(steps) == quick
    for r in steps.values():
        assert _positive(r["ratio"]) and abs(r["ratio"] - r["ms_per_batch"] / r["frozen_ms_per_batch"]) < 1e-9

    budget = 2**20
    for r in report["memory"]:
        assert r["budget_bytes"] == budget
        assert r["streams_fit"] == (budget // r["state_bytes"] if r["state_bytes"] else None)
    memory = {r["policy"]: r for r in report["memory"]}
    assert memory["source"]["state_bytes"] == 0 and memory["tent"]["state_bytes"] > 0
    # the server counts a stream's state as the in-process adapter does
    assert latency["tent"]["server_state_bytes"] == memory["tent"]["state_bytes"]

    assert [r["batch"] for r in report["onnx"]] == [1, 16]
    for r in report["onnx"]:
        assert _positive(r["onnx_over_torch"]) and r["max_abs_diff"] < 1e-3

    cotta = report["cotta"]  # runtime/lab/bench_adapters.py's figures
    assert cotta["available"]
    c = cotta["cotta_vs_serial"]
    assert c["n_augmentations"] == 32 and _positive(c["speedup"]) and c["max_abs_diff"] < 1e-3
    assert any(t["target"].startswith("cotta") for t in report["targets"])

    assert [r["streams"] for r in report["load"]] == [2, 4]  # one run per count, against one server
    assert max(r["goodput_over_peak"] for r in report["load"]) == 1.0
    assert all(0 < r["goodput_over_peak"] <= 1 and r["grpc_retry"] for r in report["load"])
    load = report["load"][1]
    assert load["errors"] == 0, load["error_messages"]
    assert load["streams"] == 4 and load["streams_served"] == 4 and load["requests"] > 0
    assert 3 <= load["seconds"] < 60 and load["p99_ms"] >= load["p50_ms"] > 0
    assert sum(p["requests"] for p in load["per_policy"].values()) == load["requests"]

    for t in report["targets"]:
        assert _positive(t["value"]) and isinstance(t["met"], bool)
    assert {t["target"].split()[0] for t in report["targets"]} >= {"bn", "unmix-tns", "tent"}


def test_unknown_section_is_refused():
    result = subprocess.run([sys.executable, "-m", "runtime.cli", "bench", "--sections", "steps,nope"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode != 0 and "unknown section 'nope'" in result.stderr
