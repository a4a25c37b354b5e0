"""`tta demo` end to end, small: its own server subprocess, tritonclient streams, feedback; the launcher."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


def test_demo_shows_adaptation_paying_off():
    from runtime.demo.model import PROTOTYPES, WEIGHTS
    from runtime.lab.datasets import DEMO_SLICE

    if not all(p.is_file() for p in (WEIGHTS, PROTOTYPES, DEMO_SLICE)):
        pytest.skip("demo assets not built yet (tta train-demo)")
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "demo", "--policies", "source,bn", "--phases",
                          "clean,fog:3", "--samples-per-phase", "128", "--batch-size", "64"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    table = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()
             if line.split() and line.split()[0] in ("clean", "fog:3", "mean")}
    assert set(table) == {"clean", "fog:3", "mean"}, out.stdout
    shift = {phase: float(table[phase][0]) for phase in ("clean", "fog:3")}  # BN shift column
    rows = {phase: tuple(float(v) for v in values[-2:]) for phase, values in table.items()}  # source, bn
    assert shift["fog:3"] > 1.5 * shift["clean"]  # the label-free drift figure saw the fog
    source, bn = rows["fog:3"]
    assert source < 40 and bn > source + 25  # fog ruins the frozen model; test-time BN recovers
    assert rows["clean"][0] > 85 and rows["clean"][1] > 85


def test_metrics_move_as_the_demo_stream_drifts():
    """`tta serve` (built-in demo model), a tracked stream goes from clean to fogged images:
    the scraped BN shift and entropy rise and the online accuracy from feedback falls."""
    import urllib.request

    import grpc
    import numpy as np
    import tritonclient.grpc as tc

    from conftest import ServerProcess
    from runtime import protos
    from runtime.demo.model import PROTOTYPES, WEIGHTS
    from runtime.lab.corruptions import corrupt
    from runtime.lab.datasets import DEMO_SLICE, load_demo_slice

    if not all(p.is_file() for p in (WEIGHTS, PROTOTYPES, DEMO_SLICE)):
        pytest.skip("demo assets not built yet (tta train-demo)")
    pb, pb_grpc = protos.load("tta.v1.adaptation_pb2"), protos.load("tta.v1.adaptation_pb2_grpc")
    x, y = load_demo_slice()
    clean, labels = np.ascontiguousarray(x[:128]), y[:128]
    fogged = corrupt(clean, "fog", 5, seed=0).astype(np.float32)
    srv = ServerProcess()  # no --model: the demo model
    stream = "demo-source"  # tracked in runtime/assets/demo/model.toml

    def scrape() -> dict:
        text = urllib.request.urlopen(f"http://{srv.host}:{srv.metrics_port}/metrics", timeout=10).read().decode()
        return {k: float(v) for k, _, v in (line.rpartition(" ") for line in text.splitlines()
                                             if line and not line.startswith("#"))}

    def series(samples, name):
        return next(v for k, v in samples.items() if k.startswith(name + "{") and f'stream="{stream}"' in k)

    try:
        client = tc.InferenceServerClient(srv.target)
        with grpc.insecure_channel(srv.target) as channel:
            control = pb_grpc.AdaptationServiceStub(channel)
            control.SetPolicy(pb.SetPolicyRequest(stream_id=stream, policy="source"))
            figures = []
            for phase, images in (("clean", clean), ("fog", fogged)):
                for start in range(0, 128, 64):
                    inp = tc.InferInput("input", [64, 3, 32, 32], "FP32")
                    inp.set_data_from_numpy(images[start:start + 64])
                    rid = f"{phase}-{start}"
                    client.infer("demo", [inp], parameters={"stream_id": stream}, request_id=rid)
                    control.Feedback(pb.FeedbackRequest(request_id=rid, labels=labels[start:start + 64].tolist()))
                figures.append(scrape())
        client.close()
    finally:
        assert srv.stop() == 0
    clean_m, fog_m = figures
    assert series(fog_m, "tta_stream_bn_shift") > 1.5 * series(clean_m, "tta_stream_bn_shift")

    def mean_entropy_since(after, before=None):
        def since(name):
            return series(after, name) - (series(before, name) if before else 0)
        return since("tta_prediction_entropy_ratio_sum") / since("tta_prediction_entropy_ratio_count")

    assert mean_entropy_since(fog_m, clean_m) > mean_entropy_since(clean_m)
    assert series(clean_m, "tta_online_accuracy_ratio") > 0.85
    assert series(fog_m, "tta_online_accuracy_ratio") < series(clean_m, "tta_online_accuracy_ratio") - 0.2


def test_launcher_reports_a_server_that_does_not_start(tmp_path):
    from runtime.demo.launcher import LocalServer, ServerNotReady

    with pytest.raises(ServerNotReady, match="exited with 2:\n(.|\n)*does not exist"):
        LocalServer("--model", str(tmp_path / "missing.toml"), env={"TTA_NO_PROGRESS": "1"})
    with pytest.raises(ServerNotReady, match="not ready within 0.01 s"):
        LocalServer(timeout=0.01)
