"""The frozen forward of `source` streams on ONNX Runtime keeps the BN-shift drift figure
(runtime/onnx_frozen.py): one run of the augmented graph yields the logits and every BatchNorm
layer's per-sample input means, equal to torch's; an ORT-served stream reports the BN shift a
torch-served one does, a grouped forward gives each stream the figure of its own rows, and
`--frozen-backend auto` falls back to torch (one log line) where ONNX Runtime is not exact,
while `onnx` refuses to start."""
from __future__ import annotations

import asyncio
import logging
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import adapters
from adapter_models import randomise_bn, tiny_cnn
from conftest import run_engine, write_tiny_config
from runtime import drift, onnx_frozen
from runtime.demo.model import build_demo_model
from runtime.model_config import ConfigError, load

CPU = torch.device("cpu")


class Residual(nn.Module):
    """A second architecture: a stem, a residual block with a BN'd 1×1 downsample branch, and a
    BatchNorm1d on the pooled features (an N×C input: no spatial axes)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                                  nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12))
        self.down = nn.Sequential(nn.Conv2d(8, 12, 1, stride=2), nn.BatchNorm2d(12))
        self.features = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(self.body(h) + self.down(h))
        return self.head(self.features(h.mean(dim=(2, 3))))


def residual() -> nn.Module:
    torch.manual_seed(3)
    return randomise_bn(Residual(), seed=3).eval()


def images(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.random((n, 3, size, size), dtype=np.float32) * 0.8 + 0.15, 0, 1).astype(np.float32)


def adapter_shift(module: nn.Module, x: np.ndarray) -> float:
    """drift.BNShift through the `source` adapter: what a torch-served source stream reports."""
    source, probe = adapters.create("source", module), drift.BNShift()
    source.observe_bn_inputs(probe)
    source.predict(torch.from_numpy(x))
    return probe.take()


@pytest.mark.parametrize("build, size, layers", [(build_demo_model, 32, 19), (residual, 16, 5)],
                         ids=["demo-resnet20", "residual"])
@pytest.mark.parametrize("n", [1, 7])
def test_the_augmented_graph_gives_torchs_logits_and_bn_means(build, size, layers, n):
    module = build().eval()
    frozen = onnx_frozen.ort_forward(onnx_frozen.export(module, images(2, size, 0), CPU), CPU)
    reference = onnx_frozen.TorchForward(module, CPU)
    assert len(frozen.stats) == len(reference.stats) == layers
    x = images(n, size, seed=n)
    logits, means = frozen.run(x)
    want, want_means = reference.run(x)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(frozen(x), want, rtol=1e-5, atol=1e-5)  # logits only: the same
    assert [m.shape for m in means] == [m.shape for m in want_means] and means[0].shape[0] == n
    for got, expected in zip(means, want_means):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    expected_shift = adapter_shift(module, x)
    assert frozen.bn_shift(means) == pytest.approx(expected_shift, rel=1e-5)
    assert reference.bn_shift(want_means) == pytest.approx(expected_shift, rel=1e-5)
    assert not any(m.training for m in module.modules())


def test_the_general_tap_where_shape_inference_knows_no_rank(monkeypatch):
    """Without ranks and types the taps Cast, Reshape to [N, C, -1] and ReduceMean: the same means."""
    monkeypatch.setattr(onnx_frozen, "_value_types", lambda model: {})
    module, x = residual(), images(7, 16, seed=5)
    frozen = onnx_frozen.ort_forward(onnx_frozen.export(module, images(2, 16, 0), CPU), CPU)
    want, want_means = onnx_frozen.TorchForward(module, CPU).run(x)
    logits, means = frozen.run(x)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    for got, expected in zip(means, want_means):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert frozen.bn_shift(means, slice(2, 5)) == pytest.approx(adapter_shift(module, x[2:5]), rel=1e-5)


def test_the_demo_model_serves_source_streams_on_onnx_runtime_by_default_of_the_server():
    model = load(None, device="cpu", frozen_backend="auto")
    assert isinstance(model.frozen, onnx_frozen.OrtForward)
    assert any("source streams run on ONNX Runtime" in n and "checked against torch" in n for n in model.notes)
    assert model.batch_stats is not None and "reply on ONNX Runtime" in model.notes[-1]  # one knob for both
    assert load(None, device="cpu", frozen_backend="torch").batch_stats is None


def test_an_onnx_served_source_stream_reports_the_bn_shift_of_a_torch_served_one(tiny_config):
    served = {backend: load(tiny_config, device="cpu", default_policy="source", frozen_backend=backend)
              for backend in ("auto", "torch")}
    assert isinstance(served["auto"].frozen, onnx_frozen.OrtForward) and served["torch"].frozen is None
    xs = [images(4, 16, seed) for seed in (1, 2)]

    async def scenario(engine):
        results = [await engine.infer("s", x) for x in xs]
        return results, (await engine.get_stream("s"))["bn_shift"]

    (ort_results, ort_gauge), (torch_results, torch_gauge) = (run_engine(served[b], scenario) for b in ("auto", "torch"))
    for a, b in zip(ort_results, torch_results):
        assert a.policy == b.policy == "source"
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)
        assert a.bn_shift is not None and a.bn_shift == pytest.approx(b.bn_shift, rel=1e-5)
    assert ort_gauge == pytest.approx(torch_gauge, rel=1e-5) and ort_gauge > 0


def test_a_grouped_frozen_forward_gives_each_stream_the_bn_shift_of_its_own_rows(tiny_config):
    model = load(tiny_config, device="cpu", default_policy="source", frozen_backend="onnx")
    # streams of different drift: each must get its own figure, not the group's
    xs = [np.clip(images(3, 16, i) * (0.4 + 0.3 * i) + 0.1 * i, 0, 1).astype(np.float32) for i in range(4)]

    async def scenario(engine):
        for i in range(len(xs)):
            await engine.set_policy(f"g{i}", "source", {})
        busy = engine.jobs.submit(lambda: time.sleep(0.3))  # queue them all behind it: one group
        futures = [engine.enqueue_infer(f"g{i}", x) for i, x in enumerate(xs)]
        await busy
        results = await asyncio.gather(*futures)
        histogram = engine.metrics.grouped_batches.labels(engine.model.name)
        return results, histogram._sum.get()

    results, grouped = run_engine(model, scenario, max_group=8)
    assert grouped == 4
    shifts = [r.bn_shift for r in results]
    for r, x in zip(results, xs):
        assert r.bn_shift == pytest.approx(adapter_shift(model.module, x), rel=1e-5)
    assert len({round(s, 6) for s in shifts}) == 4  # four different figures


FACTORIES = '''
import torch
from torch import nn


class Unfaithful(nn.Module):
    """Doubles its logits for batches of more than one image: a traced export bakes the branch of
    the batch it was traced with (2), so ONNX Runtime answers a single image differently from torch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, 10))

    def forward(self, x):
        out = self.net(x)
        return out * 2 if x.shape[0] > 1 else out


def unfaithful():
    return Unfaithful().eval()
'''


def _factory_config(tmp_path) -> str:
    (tmp_path / "factories.py").write_text(FACTORIES)
    path = write_tiny_config(tmp_path, default_policy="source")
    path.write_text("\n".join('factory = "factories.py:unfaithful"' if line.startswith("factory") else line
                              for line in path.read_text().splitlines()))
    return str(path)


def test_auto_falls_back_to_torch_where_onnx_logits_differ_and_onnx_refuses(tmp_path, caplog):
    config = _factory_config(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tta.model"):
        model = load(config, device="cpu", frozen_backend="auto")
    assert model.frozen is None and model.notes[-1] == "source streams run on torch"
    lines = [r.getMessage() for r in caplog.records if r.name == "tta.model"]
    assert len(lines) == 1 and "logits differ by" in lines[0] and "at batch 1 " in lines[0], lines
    with pytest.raises(ConfigError, match="--frozen-backend onnx: .*logits differ by"):
        load(config, device="cpu", frozen_backend="onnx")
    assert load(config, device="cpu", frozen_backend="torch").frozen is None  # torch: never tried


def test_auto_falls_back_where_the_bn_means_differ_or_the_export_fails(tiny_config, monkeypatch, caplog):
    run = onnx_frozen.TorchForward.run

    def shifted(self, x):
        logits, means = run(self, x)
        return logits, [m + 1e-2 for m in means]

    monkeypatch.setattr(onnx_frozen.TorchForward, "run", shifted)
    with caplog.at_level(logging.WARNING, logger="tta.model"):
        assert load(tiny_config, device="cpu", frozen_backend="auto").frozen is None
    assert "stats differ: BN layer 0 input means by 1.00e-02" in caplog.records[-1].getMessage()
    with pytest.raises(ConfigError, match="stats differ"):
        load(tiny_config, device="cpu", frozen_backend="onnx")
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError("no symbolic for this op")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with caplog.at_level(logging.WARNING, logger="tta.model"):
        assert load(tiny_config, device="cpu", frozen_backend="auto").frozen is None
    assert "export failed: RuntimeError: no symbolic for this op" in caplog.records[-1].getMessage()
    with pytest.raises(ConfigError, match="export failed"):
        load(tiny_config, device="cpu", frozen_backend="onnx")


def _onnx_only_config(folder, onnx_path) -> str:
    path = write_tiny_config(folder, default_policy="source", extra_model=f'onnx = "{onnx_path}"')
    path.write_text("\n".join(line for line in path.read_text().splitlines() if not line.startswith("factory")))
    return str(path)


def test_a_configs_own_onnx_file_gets_the_bn_shift_figure(tmp_path, tiny):
    net = tiny_cnn()  # the network without Normalize; the config's mean/std add it
    x = images(5, 16, seed=9)
    with_bn, folded = tmp_path / "with_bn.onnx", tmp_path / "folded.onnx"
    for path, mode in ((with_bn, torch.onnx.TrainingMode.PRESERVE), (folded, torch.onnx.TrainingMode.EVAL)):
        # PRESERVE on an eval-mode network keeps its BatchNormalization nodes; EVAL folds them into the convs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and constant-folding notes
            torch.onnx.export(net, torch.rand(2, 3, 16, 16), str(path), input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False, training=mode)
    model = load(_onnx_only_config(tmp_path / "a", with_bn), device="cpu")
    assert model.module is None and "BN-shift over 2 BatchNormalization nodes" in model.notes[0]

    async def scenario(engine):
        return await engine.infer("s", x)

    result = run_engine(model, scenario)
    np.testing.assert_allclose(result.logits, tiny.module(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert result.bn_shift == pytest.approx(adapter_shift(tiny.module, x), rel=1e-5)

    plain = load(_onnx_only_config(tmp_path / "b", folded), device="cpu")  # BN folded into the convolutions
    assert "no BatchNormalization" in plain.notes[0]
    assert run_engine(plain, scenario).bn_shift is None


def test_ort_threads_follow_torch():
    options = onnx_frozen.session_options()
    assert options.intra_op_num_threads == torch.get_num_threads() and options.inter_op_num_threads == 1


def test_the_server_serves_source_streams_on_onnx_runtime_with_the_bn_shift_parameter(server, tiny):
    """`tta serve` (default --frozen-backend auto): a `source` stream's reply carries tta_bn_shift,
    the figure the torch `source` adapter gives in-process."""
    import grpc
    import tritonclient.grpc as tc

    from clients import infer, logits, parameters, set_policy, tta_grpc

    assert "source streams run on ONNX Runtime" in server._ready.string  # the ready line: the model notes
    client, channel = tc.InferenceServerClient(server.target), grpc.insecure_channel(server.target)
    try:
        set_policy(tta_grpc.AdaptationServiceStub(channel), "wire-source", "source")
        for seed in (21, 22):
            x = images(4, 16, seed)
            result = infer(client, x, stream="wire-source")
            np.testing.assert_allclose(logits(result), tiny.module(torch.from_numpy(x)).detach().numpy(),
                                       rtol=1e-4, atol=1e-5)
            assert parameters(result)["tta_bn_shift"] == pytest.approx(adapter_shift(tiny.module, x), rel=1e-5)
    finally:
        client.close()
        channel.close()
