"""Dynamic batching in the engine: concurrent batches of frozen streams (and a frozen stream's
consecutive batches) share one forward pass, within --max-group batches and --group-samples
samples; a group waits for more only when arrivals are measurably due and waiting pays; adapting
streams are never merged into another adaptation step, and no stream's batches are reordered."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from conftest import run_engine
from runtime.engine.engine import GroupWait
from runtime.model_config import load


@pytest.fixture(scope="module")
def tiny_onnx(tiny_config):
    """The tiny model whose `source` streams run the frozen (ONNX Runtime) forward."""
    return load(tiny_config, device="cpu", frozen_backend="onnx")


def images(n: int, size: int = 1, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((size, 3, 16, 16), dtype=np.float32) for _ in range(n)]


def grouped(engine) -> tuple[float, float]:
    """(batches predicted in groups, groups) so far."""
    histogram = engine.metrics.grouped_batches.labels(engine.model.name)
    count = sum(bucket.get() for bucket in histogram._buckets)
    return histogram._sum.get(), count


async def behind_a_busy_job(engine, submit):
    """Queue everything `submit` queues while the worker is busy, so it all waits together."""
    busy = engine.jobs.submit(lambda: time.sleep(0.3))
    futures = submit()
    await busy
    return await asyncio.gather(*futures)


def test_concurrent_single_images_of_frozen_streams_share_one_forward(tiny_onnx):
    xs = images(16)

    async def scenario(engine):
        for i in range(16):
            await engine.set_policy(f"f{i}", "source", {})
        results = await behind_a_busy_job(engine, lambda: [engine.enqueue_infer(f"f{i}", x) for i, x in enumerate(xs)])
        return results, grouped(engine)

    results, (batches, groups) = run_engine(tiny_onnx, scenario)
    assert (batches, groups) == (16, 1)
    for i, (r, x) in enumerate(zip(results, xs)):
        assert r.stream_id == f"f{i}" and r.policy == "source"
        np.testing.assert_allclose(r.logits, tiny_onnx.frozen(x), rtol=1e-5, atol=1e-5)  # its own answer


def test_a_frozen_streams_queued_batches_share_a_forward_and_keep_their_order(tiny_onnx):
    xs = images(5, size=2, seed=1)

    async def scenario(engine):
        await engine.set_policy("one", "source", {})
        results = await behind_a_busy_job(engine, lambda: [engine.enqueue_infer("one", x, request_id=f"r{t}")
                                                             for t, x in enumerate(xs)])
        return results, grouped(engine), await engine.get_stream("one")

    results, (batches, groups), info = run_engine(tiny_onnx, scenario)
    assert (batches, groups) == (5, 1)
    assert [r.request_id for r in results] == [f"r{t}" for t in range(5)]
    for r, x in zip(results, xs):
        np.testing.assert_allclose(r.logits, tiny_onnx.frozen(x), rtol=1e-5, atol=1e-5)
    assert info["samples"] == 10


def test_a_group_stops_at_group_samples_and_max_group(tiny_onnx):
    xs = images(8, size=4, seed=2)

    async def scenario(engine):
        for i in range(8):
            await engine.set_policy(f"s{i}", "source", {})
        await behind_a_busy_job(engine, lambda: [engine.enqueue_infer(f"s{i}", x) for i, x in enumerate(xs)])
        return grouped(engine)

    assert run_engine(tiny_onnx, scenario, group_samples=10) == (8, 4)  # 4 + 4; a third would make 12
    assert run_engine(tiny_onnx, scenario, max_group=3, group_samples=64) == (8, 3)  # 3 + 3 + 2
    assert run_engine(tiny_onnx, scenario, max_group=1) == (0, 0)  # off


def test_an_adapting_streams_batches_are_never_merged_into_one_step(tiny):
    xs = images(4, size=4, seed=3)

    async def scenario(engine):
        await engine.set_policy("learner", "tent", {})
        results = await behind_a_busy_job(engine, lambda: [engine.enqueue_infer("learner", x) for x in xs])
        return results, grouped(engine)

    results, counts = run_engine(tiny, scenario)
    assert counts == (0, 0)
    assert [r.step for r in results] == [0, 1, 2, 3]  # each batch sees the update of the one before


def test_a_batch_waits_for_another_that_is_due(tiny_onnx):
    async def scenario(engine):
        for stream in ("w0", "w1", "w2"):
            await engine.set_policy(stream, "source", {})
        await asyncio.gather(*[engine.enqueue_infer("w0", x) for x in images(4)])  # arrivals 0 ms apart
        first = engine.enqueue_infer("w1", images(1, seed=5)[0])
        await asyncio.sleep(0.05)  # the worker already holds `first` and waits for company
        second = engine.enqueue_infer("w2", images(1, seed=6)[0])
        before = grouped(engine)
        await asyncio.gather(first, second)
        after = grouped(engine)
        return after[0] - before[0], after[1] - before[1]

    assert run_engine(tiny_onnx, scenario, group_wait=1.0) == (2, 1)


def test_a_lone_client_stops_waiting_once_waiting_brings_nobody(tiny_onnx):
    async def scenario(engine):
        await engine.set_policy("alone", "source", {})
        latencies = []
        for x in images(12):  # one request at a time, 10 ms apart: arrivals are due within the wait
            started = time.monotonic()
            await engine.infer("alone", x)
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.01)
        return latencies

    latencies = run_engine(tiny_onnx, scenario, group_wait=0.2)
    # waits that bring nobody lower the measured gain: at most the first few requests wait
    assert sum(latency > 0.15 for latency in latencies) <= 4
    assert all(latency < 0.1 for latency in latencies[6:])


def test_group_wait_decides_from_measured_arrivals_and_gain():
    wait = GroupWait(0.001)
    assert not GroupWait(0.0).worth_it(0.0)  # off
    assert not wait.worth_it(0.01)  # batches arrive 10 ms apart: nobody is due within 1 ms
    assert wait.worth_it(0.0005)
    for _ in range(5):
        wait.waited(0)  # waiting brought nobody
    tries = [wait.worth_it(0.0005) for _ in range(GroupWait.PROBE_EVERY)]
    assert tries.count(True) == 1  # one probe, then it waits again only if that brings someone
    wait.waited(3)
    assert wait.worth_it(0.0005)


def test_frozen_batches_of_different_sizes_share_a_forward(tiny_onnx):
    xs = [images(1, size=n, seed=n)[0] for n in (1, 3, 2, 5)]

    async def scenario(engine):
        for i in range(4):
            await engine.set_policy(f"m{i}", "source", {})
        results = await behind_a_busy_job(engine, lambda: [engine.enqueue_infer(f"m{i}", x) for i, x in enumerate(xs)])
        return results, grouped(engine)

    results, counts = run_engine(tiny_onnx, scenario)
    assert counts == (4, 1)
    for r, x in zip(results, xs):
        assert r.logits.shape == (len(x), 10)
        np.testing.assert_allclose(r.logits, tiny_onnx.frozen(x), rtol=1e-5, atol=1e-5)
        assert r.bn_shift == pytest.approx(tiny_onnx.frozen.bn_shift(tiny_onnx.frozen.run(x)[1]), rel=1e-5)
