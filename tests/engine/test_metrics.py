"""Drift signals and the metrics registry: definitions checked on hand-made inputs, label
cardinality bounded, and the signals move when the demo model's input drifts."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest

from runtime import drift
from runtime.metrics import OTHER, Metrics


def test_bn_shift_is_standardised_mean_shift():
    probe = drift.BNShift()
    mean, var = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 4.0])
    x = torch.randn(64, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x - x.mean(dim=(0, 2, 3), keepdim=True)  # exactly zero-mean per channel
    probe("layer", x + mean.view(1, 2, 1, 1), mean, var)  # at the source mean
    assert probe.take() == pytest.approx(0.0, abs=1e-5)
    probe("layer", x + torch.tensor([2.0, 5.0]).view(1, 2, 1, 1), mean, var)  # +2 sigma in both channels
    probe("other", x + mean.view(1, 2, 1, 1), mean, var)
    assert probe.take() == pytest.approx((2.0 + 0.0) / 2, abs=1e-4)  # mean over layers
    assert probe.take() is None  # consumed


def test_entropy_confidence_and_marginal_collapse():
    uniform = np.zeros((4, 10))
    certain = np.full((4, 10), -50.0)
    certain[:, 3] = 50.0
    f_uniform, f_certain = drift.batch_figures(uniform), drift.batch_figures(certain)
    assert np.allclose(f_uniform["entropy"], 1.0) and np.allclose(f_uniform["confidence"], 0.1)
    assert np.allclose(f_certain["entropy"], 0.0, atol=1e-9) and np.allclose(f_certain["confidence"], 1.0)

    spread, collapsed = drift.Marginal(10), drift.Marginal(10)
    for i in range(50):
        spread_logits = np.full((8, 10), -50.0)
        spread_logits[np.arange(8), (np.arange(8) + i) % 10] = 50.0  # confident, but over all classes
        spread_value = spread.update(drift.softmax(spread_logits))
        collapsed_value = collapsed.update(drift.softmax(certain))  # always class 3
    assert spread_value > 0.95
    assert collapsed_value < 0.05


def test_untracked_streams_roll_up_under_other():
    metrics = Metrics("m", tracked_streams=["cam-1"])
    figures = drift.batch_figures(np.zeros((2, 10)))
    for stream in ("cam-1", "cam-2", "cam-3", "cam-4"):
        metrics.batch(stream, "bn", 2, figures, 0.5, 0.9, 0.001, 0.002)
        metrics.feedback(stream, "bn", 1, 2)
    text = generate_latest(metrics.registry).decode()
    assert 'stream="cam-1"' in text and f'stream="{OTHER}"' in text
    assert 'stream="cam-2"' not in text and 'stream="cam-3"' not in text
    assert 'tta_bn_shift_count{model="m",policy="bn",stream="_other"} 3.0' in text
    assert 'tta_feedback_labels_total{model="m",policy="bn",stream="_other"} 6.0' in text
    assert 'tta_online_accuracy_ratio{model="m",policy="bn",stream="cam-1"} 0.5' in text
    # latest-value gauges only for tracked streams: a roll-up of "latest" would mean nothing
    assert 'tta_stream_bn_shift{model="m",policy="bn",stream="_other"}' not in text


def test_drift_signals_rise_on_corrupted_demo_data():
    """The demo model on clean vs heavily corrupted Fashion-MNIST: BN shift and entropy rise."""
    demo_model = pytest.importorskip("runtime.demo.model")
    from runtime.lab.corruptions import corrupt
    from runtime.lab.datasets import DEMO_SLICE, load_demo_slice

    if not all(p.is_file() for p in (demo_model.WEIGHTS, demo_model.PROTOTYPES, DEMO_SLICE)):
        pytest.skip("demo assets not built yet (tta train-demo)")
    from runtime.engine import Engine
    from runtime.model_config import load

    model = load(device="cpu", default_policy="source")
    x, _ = load_demo_slice()
    clean = np.ascontiguousarray(x[:128])
    noisy = corrupt(clean, "gaussian_noise", 5, seed=0).astype(np.float32)

    async def scenario():
        engine = Engine(model)
        try:
            a = await engine.infer("clean", clean)
            b = await engine.infer("noisy", noisy)
            return a, b
        finally:
            engine.close()

    a, b = asyncio.run(scenario())
    assert b.bn_shift > 2 * a.bn_shift
    assert b.entropy > a.entropy
