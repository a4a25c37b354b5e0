"""The reply of batch-statistics policies on ONNX Runtime (runtime/onnx_batch_stats.py): the graph
answers as torch's batch-statistics forward does, with the stream's own BN scales and biases; a
policy predicted there and owing its update (Adapter.owe) learns exactly what it learns when torch
predicts; the engine takes the path only for the policies and models it fits."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch
from torch import nn

import adapters
from adapter_models import tiny_cnn
from conftest import run_engine
from runtime import onnx_batch_stats
from runtime.engine.stream import Stream
from runtime.guard import GuardConfig
from runtime.model_config import load

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_onnx(tiny_config):
    return load(tiny_config, device="cpu", frozen_backend="onnx")


def batches(n: int, size: int = 8, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((size, 3, 16, 16), dtype=np.float32) for _ in range(n)]


def test_the_graph_answers_as_torchs_batch_statistics_forward_with_the_streams_affine_parameters():
    model = tiny_cnn(seed=3).eval()
    forward, why = onnx_batch_stats.for_module(model, CPU, (3, 16, 16))
    assert forward is not None, why
    x = batches(1)[0]
    bn = adapters.create("bn", model)
    np.testing.assert_allclose(forward.run_with(x, {})[0], bn.predict(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
    tent = adapters.create("tent", model, lr=0.05)
    for b in batches(3, seed=1):  # trained scales and biases, far enough from the source's to matter
        tent.step(torch.from_numpy(b))
    affine = tent.batch_stats_affine()
    assert affine and forward.accepts(affine)
    got, want = forward.run_with(x, affine)[0], tent.predict(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(got - forward.run_with(x, {})[0]).max() > 1e-3  # ... and the affine inputs are used


def test_owing_an_update_learns_exactly_what_predicting_it_does():
    model = tiny_cnn(seed=4).eval()
    xs = [torch.from_numpy(b) for b in batches(4, seed=2)]
    for name in ("tent", "sar", "eata", "deyo"):
        seed = {"seed": 1} if "seed" in {h["name"] for h in adapters.describe(name)["hyperparameters"]} else {}
        predicted, owed = adapters.create(name, model, **seed), adapters.create(name, model, **seed)
        for x in xs:
            predicted.predict(x)
            owed.owe(x)
            assert owed.pending and owed.pending_bytes == x.numel() * 4
        predicted.learn()
        owed.learn()
        assert predicted.steps == owed.steps == len(xs)
        for (k, a), (_, b) in zip(sorted(predicted.batch_stats_affine().items()), sorted(owed.batch_stats_affine().items())):
            assert torch.equal(a, b), (name, k)  # bit for bit: the same forward, later


def test_a_discarded_owed_update_is_not_learned():
    model = tiny_cnn(seed=5).eval()
    tent = adapters.create("tent", model, lr=0.1)
    before = {k: v.clone() for k, v in tent.batch_stats_affine().items()}
    tent.owe(torch.from_numpy(batches(1)[0]))
    tent.discard()
    assert not tent.pending and tent.pending_bytes == 0 and tent.steps == 0
    tent.learn()
    assert all(torch.equal(v, before[k]) for k, v in tent.batch_stats_affine().items())


def test_only_batch_statistics_predictions_offer_the_path():
    model = tiny_cnn(seed=6).eval()
    assert adapters.create("bn", model).batch_stats_affine() == {}
    for name in ("tent", "sar", "eata", "deyo"):
        assert adapters.create(name, model).batch_stats_affine(), name
    assert adapters.create("tent", model, steps=2).batch_stats_affine() is None  # predicts after an update
    assert adapters.create("tent", model, norm="bn-alpha").batch_stats_affine() is None
    for name in ("source", "bn-alpha", "bn-ema", "unmix-tns", "mean-teacher", "cotta", "lame", "rotta"):
        assert adapters.create(name, model).batch_stats_affine() is None, name


def test_models_it_does_not_fit_get_no_forward_and_say_why():
    with_1d = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    forward, why = onnx_batch_stats.for_module(with_1d, CPU, (3, 8, 8))
    assert forward is None and "BatchNorm2d" in why
    no_affine = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.Flatten()).eval()
    assert onnx_batch_stats.for_module(no_affine, CPU, (3, 8, 8))[0] is None


def test_the_engine_replies_there_and_the_stream_learns_as_with_torch(tiny_onnx, monkeypatch):
    assert tiny_onnx.batch_stats is not None
    runs = []
    run_with = tiny_onnx.batch_stats.run_with
    monkeypatch.setattr(tiny_onnx.batch_stats, "run_with", lambda x, affine: runs.append(len(x)) or run_with(x, affine))
    xs = batches(5, seed=7)

    async def scenario(engine):
        await engine.set_policy("s", "tent", {"lr": "0.01"})
        replies = []
        for x in xs:  # a client that pauses after each reply: the owed update fits in the pause
            replies.append((await engine.enqueue_infer("s", x)).logits)
            await asyncio.sleep(0.2)
        engine.table.learn_owed(engine.table.get("s"))
        return replies, {k: v.clone() for k, v in engine.table.get("s").adapter.batch_stats_affine().items()}

    replies, learned = run_engine(tiny_onnx, scenario, guard=GuardConfig(action="off"))
    assert runs == [8] * len(xs)
    reference = adapters.create("tent", tiny_onnx.module, lr=0.01)
    for x, got in zip(xs, replies):
        np.testing.assert_allclose(got, reference.step(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
    for k, v in reference.batch_stats_affine().items():
        assert torch.equal(learned[k], v), k


def test_while_other_batches_wait_a_policy_that_owes_its_update_replies_with_torch(tiny_onnx, monkeypatch):
    runs = []
    run_with = tiny_onnx.batch_stats.run_with
    monkeypatch.setattr(tiny_onnx.batch_stats, "run_with", lambda x, affine: runs.append(len(x)) or run_with(x, affine))
    a, b = batches(2, seed=8)

    async def scenario(engine):
        for sid in ("a", "b", "n"):
            await engine.set_policy(sid, "bn" if sid == "n" else "tent", {})
        busy = engine.jobs.submit(lambda: time.sleep(0.3))
        queued = [engine.enqueue_infer("a", a), engine.enqueue_infer("n", a), engine.enqueue_infer("b", b)]
        await busy
        return await asyncio.gather(*queued)

    run_engine(tiny_onnx, scenario, guard=GuardConfig(action="off"), max_group=1)
    # a waited behind n and b: torch; bn owes nothing: always there; b ran with nothing queued
    assert runs == [8, 8]


def test_a_client_that_sends_back_to_back_is_not_made_to_wait_for_a_forward_more():
    stream = Stream(id="s", policy="tent", hyperparameters={})
    assert stream.update_fits_pause()  # nothing known yet
    stream.owed_update_seconds = 0.05
    for t in range(5):  # replies at t, the next batch 1 ms later
        stream.replied_at = float(t)
        stream.arrived(t + 0.001)
    assert not stream.update_fits_pause()
    for t in range(5, 10):  # a client that now pauses 0.2 s
        stream.replied_at = float(t)
        stream.arrived(t + 0.2)
    assert stream.update_fits_pause()
