"""`tta bench` runs end to end and reports the side-by-side ratios (a smoke test: speed itself
is judged from docs/BENCHMARKS.md, not asserted here)."""
import json
import os
import subprocess
import sys

from conftest import REPO


def test_bench_reports_ratios_for_adapters_and_grpc():
    result = subprocess.run([sys.executable, "-m", "runtime.cli", "bench", "--threads", "1", "--batches", "2",
                             "--batch-size", "8", "--adapters", "source,bn,tent", "--json"],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=dict(os.environ, TTA_NO_PROGRESS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    rows = {r["policy"]: r for r in report["adapters_vs_frozen"]}
    assert set(rows) == {"source", "bn", "tent"}
    for r in rows.values():
        assert r["ratio"] > 0 and abs(r["ratio"] - r["ms_per_batch"] / r["frozen_ms_per_batch"]) < 1e-9
    paths = [r["path"] for r in report["grpc_vs_inprocess"]]
    assert paths == [f"{p}: {k}" for p in ("source", "bn")
                     for k in ("in-process step", "gRPC ModelInfer", "gRPC ModelStreamInfer")]
    assert report["machine"]["threads"] == 1
