"""ExportStream (runtime/engine/export.py): an adapted stream as an ONNX graph or a safetensors state
dict, checked against the stream's own answers; refusals where no exact export exists; the
stream's state untouched; and through a real server with `tta ctl export`."""
from __future__ import annotations

import os
import subprocess
import sys

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

import adapters
from adapter_models import tiny_cnn
from clients import infer, logits, status, tta_grpc, tta_pb
from conftest import REPO, ServerProcess, run_engine
from runtime.engine import EngineError

torch.set_num_threads(1)  # the engine's answers and the checks below sum in the same order

TOLERANCE = 1e-4
EXACT_ONNX = [
    ("source", {}), ("bn", {}), ("bn-alpha", {"alpha": "0.3"}), ("bn-ema", {}), ("bn-ema", {"momentum": "0.5"}),
    ("unmix-tns", {}), ("tent", {}), ("tent", {"norm": "unmix-tns"}), ("eata", {}), ("sar", {}), ("deyo", {}),
    ("mean-teacher", {}), ("cotta", {"threshold": "0", "n_augmentations": "2"}),
    ("rotta", {"memory_size": "8", "update_frequency": "4"}),
]


def batches(n: int, size: int = 8, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(rng.random((size, 3, 16, 16), dtype=np.float32) * (0.6 + 0.1 * i) + 0.05 * i, 0, 1)
            .astype(np.float32) for i in range(n)]


def ort_logits(data: bytes, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def adapt_then_export(tiny, policy, hyperparameters, fmt, exports=True):
    """Two streams on the same batches, one exported after 3 batches: (export or error, the exported
    stream's next two answers, the other stream's)."""
    xs = batches(3)
    follow = [batches(1, size=5, seed=9)[0], batches(1, size=8, seed=11)[0]]

    async def scenario(engine):
        for stream in ("exported", "twin"):
            await engine.set_policy(stream, policy, hyperparameters)
            for x in xs:
                await engine.infer(stream, x)
        try:
            result = await engine.export_stream("exported", fmt) if exports else None
        except EngineError as e:
            result = e
        answers = {s: [(await engine.infer(s, x)).logits for x in follow] for s in ("exported", "twin")}
        return result, follow, answers["exported"], answers["twin"]
    return run_engine(tiny, scenario)


@pytest.mark.parametrize("policy, hyperparameters", EXACT_ONNX, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()))
def test_onnx_export_answers_as_the_stream_and_leaves_it_unchanged(tiny, policy, hyperparameters):
    exported, follow, answers, twin = adapt_then_export(tiny, policy, hyperparameters, "onnx")
    assert isinstance(exported, dict), exported
    assert exported["format"] == "onnx" and exported["file_name"].endswith(".onnx") and exported["step"] >= 0
    assert "max |logits difference|" in exported["note"]
    # the graph computes the stream's next answer (a batch size it was not exported at), before its update
    got = ort_logits(exported["data"], follow[0])
    assert np.abs(got - answers[0]).max() <= TOLERANCE
    # the export changed nothing: the stream answers bit for bit as the one never exported
    for a, b in zip(answers, twin):
        np.testing.assert_array_equal(a, b)


def test_cotta_exports_its_teacher_and_says_so(tiny):
    exported, *_ = adapt_then_export(tiny, "cotta", {"threshold": "0", "n_augmentations": "2"}, "onnx")
    assert "WITHOUT CoTTA's augmentation ensemble" in exported["note"]


def test_mean_teacher_exports_both_members(tiny):
    exported, *_ = adapt_then_export(tiny, "mean-teacher", {}, "onnx")
    assert "student + teacher" in exported["note"]


def _factory_answer(path, x: np.ndarray) -> np.ndarray:
    """The user's side: the factory's network, the file loaded into it, eval mode, the config's mean/std."""
    network = tiny_cnn()
    network.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        return network.eval()((torch.from_numpy(x) - 0.5) / 0.25).numpy()


@pytest.mark.parametrize("policy, hyperparameters", [("source", {}),
                                                     ("rotta", {"memory_size": "8", "update_frequency": "4"})])
def test_safetensors_loads_into_the_factory_and_answers_as_the_stream(tiny, tmp_path, policy, hyperparameters):
    exported, follow, answers, twin = adapt_then_export(tiny, policy, hyperparameters, "safetensors")
    assert isinstance(exported, dict), exported
    path = tmp_path / exported["file_name"]
    path.write_bytes(exported["data"])
    assert np.abs(_factory_answer(path, follow[0]) - answers[0]).max() <= TOLERANCE
    for a, b in zip(answers, twin):
        np.testing.assert_array_equal(a, b)
    state, source = load_file(str(path)), tiny_cnn().state_dict()
    assert set(state) == set(source)  # the factory's own names: no "network." prefix, no normalize buffers
    moved = any(not torch.equal(state[k], source[k]) for k in source)
    assert moved == (policy == "rotta")  # rotta's teacher has adapted; source has not


@pytest.mark.parametrize("policy, hyperparameters, fmt, fragment", [
    ("lame", {}, "onnx", "lame cannot be exported exactly"),
    ("lame", {}, "safetensors", "feature graph"),
    ("tent", {"steps": "2"}, "onnx", "steps=2"),
    ("tent", {}, "safetensors", "--format onnx"),
    ("bn", {}, "safetensors", "each batch's own statistics"),
    ("bn-ema", {}, "safetensors", "folds each batch's statistics"),
    ("unmix-tns", {}, "safetensors", "each sample's own statistics"),
    ("mean-teacher", {}, "safetensors", "--format onnx"),
    ("cotta", {"n_augmentations": "2"}, "safetensors", "--format onnx"),
])
def test_refusals_say_why_and_change_nothing(tiny, policy, hyperparameters, fmt, fragment):
    error, _, answers, twin = adapt_then_export(tiny, policy, hyperparameters, fmt)
    assert isinstance(error, EngineError) and error.code == "FAILED_PRECONDITION", error
    assert fragment in error.message, error.message
    for a, b in zip(answers, twin):
        np.testing.assert_array_equal(a, b)


def test_a_source_stream_on_the_frozen_onnx_path_exports_too(tiny_config):
    from runtime.model_config import load

    model = load(tiny_config, device="cpu", frozen_backend="onnx")  # `source` streams: no adapter, ONNX Runtime
    x = batches(1, size=4, seed=5)[0]

    async def scenario(engine):
        await engine.set_policy("frozen", "source", {})
        answer = (await engine.infer("frozen", x)).logits
        return await engine.export_stream("frozen", "onnx"), await engine.export_stream("frozen", "safetensors"), answer
    graph, weights, answer = run_engine(model, scenario)
    assert np.abs(ort_logits(graph["data"], x) - answer).max() <= TOLERANCE
    assert weights["format"] == "safetensors" and "nothing adapted" in weights["note"]


def test_an_evicted_stream_is_loaded_back_for_its_export(tiny):
    async def scenario(engine):
        await engine.set_policy("old", "tent", {})
        for x in batches(2):
            await engine.infer("old", x)
        for i in range(6):  # other streams push it out of the tiny memory budget
            await engine.set_policy(f"new-{i}", "tent", {})
            await engine.infer(f"new-{i}", batches(1, seed=i)[0])
        evicted = not (await engine.get_stream("old"))["resident"]
        exported = await engine.export_stream("old", "onnx")
        return evicted, exported, (await engine.infer("old", batches(1, seed=40)[0])).logits
    one_stream = adapters.create("tent", tiny.module).state_bytes()
    evicted, exported, answer = run_engine(tiny, scenario, memory_budget_bytes=int(one_stream * 1.5))
    assert evicted and exported["step"] == 2
    assert np.abs(ort_logits(exported["data"], batches(1, seed=40)[0]) - answer).max() <= TOLERANCE


def test_bad_format_and_unknown_stream(tiny):
    async def scenario(engine):
        errors = []
        for stream, fmt in (("nobody", "onnx"), ("nobody", "zip")):
            try:
                await engine.export_stream(stream, fmt)
            except EngineError as e:
                errors.append((e.code, e.message))
        return errors
    (missing, bad) = run_engine(tiny, scenario)
    assert missing[0] == "NOT_FOUND" and bad[0] == "INVALID_ARGUMENT" and "onnx or safetensors" in bad[1]


# --- a real server: chunks under a 1 MiB message limit, the control token, `tta ctl export` -----
WIDE = """
import torch
from torch import nn


def wide():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 16 * 16, 384), nn.BatchNorm1d(384), nn.ReLU(), nn.Linear(384, 10)).eval()
"""


@pytest.fixture(scope="module")
def wide_config(tmp_path_factory):
    """A model with a BatchNorm1d and 3.2 MB of weights (several chunks under a 1 MiB message limit)."""
    folder = tmp_path_factory.mktemp("wide-model")
    (folder / "wide.py").write_text(WIDE)
    (folder / "wide.toml").write_text("""
name = "tiny"
[model]
factory = "wide.py:wide"
factory_weights = true  # the factory's network is the model (seeded), no weights file
[input]
size = [16, 16]
channels = 3
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
[policy]
default = "bn"
""")
    return folder / "wide.toml"


@pytest.fixture(scope="module")
def wide(wide_config):
    from runtime.model_config import load

    return load(wide_config, device="cpu")


@pytest.mark.parametrize("policy, hyperparameters", EXACT_ONNX, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()))
def test_onnx_export_of_a_model_with_batchnorm1d(wide, policy, hyperparameters):
    exported, follow, answers, twin = adapt_then_export(wide, policy, hyperparameters, "onnx")
    assert isinstance(exported, dict), exported
    assert np.abs(ort_logits(exported["data"], follow[0]) - answers[0]).max() <= TOLERANCE
    for a, b in zip(answers, twin):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def wide_server(wide_config, monkeypatch_module):
    monkeypatch_module.setenv("TTA_CONTROL_TOKEN", "export-s3cret")
    monkeypatch_module.delenv("TTA_INFERENCE_TOKEN", raising=False)
    proc = ServerProcess("--model", str(wide_config), "--max-message-mb", "1")
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


CTL = [sys.executable, "-m", "runtime.cli", "ctl"]
TOKEN = [("authorization", "Bearer export-s3cret")]


def ctl(server, *args, token="export-s3cret"):
    return subprocess.run([*CTL, "--target", server.target, *(["--token", token] if token else []), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith("TTA_")})


def test_tta_ctl_export_writes_the_file_the_server_streams(wide_server, tmp_path):
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(wide_server.target)
    with grpc.insecure_channel(wide_server.target) as channel:
        stub = tta_grpc.AdaptationServiceStub(channel)
        stub.SetPolicy(tta_pb.SetPolicyRequest(stream_id="cam", policy="tent"), metadata=TOKEN)
        for x in batches(3):
            infer(client, x, stream="cam")
        # without the control token: refused, nothing written
        out = ctl(wide_server, "export", "cam", "--out", str(tmp_path / "no.onnx"), token=None)
        assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr, out.stderr
        assert not list(tmp_path.iterdir())
        out = ctl(wide_server, "export", "cam", "--format", "onnx", "--out", str(tmp_path / "cam.onnx"))
        assert out.returncode == 0, out.stderr
        assert "exported stream cam (tent, step 3) as onnx" in out.stdout and "max |logits difference|" in out.stdout
        data = (tmp_path / "cam.onnx").read_bytes()
        assert len(data) > 3 * 2**20  # more than three chunks under the 1 MiB message limit
        x = batches(1, size=6, seed=21)[0]
        assert np.abs(ort_logits(data, x) - logits(infer(client, x, stream="cam"))).max() <= TOLERANCE
        # a refusal reaches the user with its status, and leaves no file behind
        out = ctl(wide_server, "export", "cam", "--format", "safetensors", "--out", str(tmp_path / "cam.st"))
        assert out.returncode == 1 and "FAILED_PRECONDITION" in out.stderr and "--format onnx" in out.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cam.onnx"]
        out = ctl(wide_server, "export", "cam", "--out", str(tmp_path / "missing" / "cam.onnx"))
        assert out.returncode == 1 and "cannot write" in out.stderr and "Traceback" not in out.stderr, out.stderr
        # the stub directly: chunks of at most 1 MiB, the fields in the first one
        chunks = list(stub.ExportStream(tta_pb.ExportRequest(stream_id="cam", format="onnx"), metadata=TOKEN))
        assert len(chunks) >= 4 and all(len(c.data) <= 2**20 for c in chunks)
        assert chunks[0].total_bytes == sum(len(c.data) for c in chunks) and chunks[0].policy == "tent"
        assert status(lambda: list(stub.ExportStream(tta_pb.ExportRequest(stream_id="cam", format="zip"),
                                                     metadata=TOKEN)))[0] == "INVALID_ARGUMENT"
        # bytes that are no ExportRequest: INVALID_ARGUMENT, as for every other RPC
        garbage = channel.unary_stream("/tta.v1.AdaptationService/ExportStream", request_serializer=None,
                                       response_deserializer=None)
        code, message = status(lambda: list(garbage(b"\xff\xff\xff", metadata=TOKEN)))
        assert code == "INVALID_ARGUMENT" and "ExportRequest" in message, (code, message)
    client.close()
