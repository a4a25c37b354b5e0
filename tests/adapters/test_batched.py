"""Cross-stream batching: several streams' batches in one forward pass give each stream what
its own forward pass gives, drift observers included."""
from __future__ import annotations

import pytest
import torch

import adapters
from adapter_models import tiny_cnn
from adapters.batched import batch_key, predict_together
from conftest import run_engine
from runtime.demo.model import build_demo_model
from runtime.drift import BNShift

torch.set_num_threads(1)


def batches(n: int, size: int = 8, seed: int = 3, pixels: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # each stream sees a different shift: per-stream statistics really differ
    return [(torch.rand(size, 3, pixels, pixels, generator=g) * (0.3 + 0.1 * i) + 0.05 * i).clamp(0, 1)
            for i in range(n)]


@pytest.mark.parametrize("policy,hp", [("source", {}), ("bn", {}), ("bn-alpha", {"alpha": 0.3})])
@pytest.mark.parametrize("net", ["tiny", "demo"])
def test_stacked_streams_get_their_own_outputs_and_drift(policy, hp, net):
    model, pixels = (tiny_cnn(), 16) if net == "tiny" else (build_demo_model().eval(), 32)
    xs = batches(6, pixels=pixels)
    alone, together = [], []
    for group in (alone, together):
        for _ in xs:
            a = adapters.create(policy, model, **hp)
            probe = BNShift()
            a.observe_bn_inputs(probe)
            group.append((a, probe))
    want = [a.predict(x) for (a, _), x in zip(alone, xs)]
    got = predict_together([a for a, _ in together], xs)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # the stacked pass is not the same as normalising the whole stack at once
    if policy != "source":
        pooled = adapters.create(policy, model, **hp).predict(torch.cat(xs)).split(len(xs[0]))
        assert max((p - w).abs().max() for p, w in zip(pooled, want)) > 1e-3
    for (a, pa), (b, pb) in zip(alone, together):
        assert pb.take() == pytest.approx(pa.take(), rel=1e-5)
        assert a.steps == b.steps


def test_only_stateless_adapters_with_equal_settings_share_a_pass():
    model, x = tiny_cnn(), batches(1)[0]
    key = batch_key(adapters.create("bn", model), x)
    assert key == batch_key(adapters.create("bn", model), x)
    assert key != batch_key(adapters.create("bn", model), x[:4])  # another batch size
    assert batch_key(adapters.create("bn-alpha", model, alpha=0.1), x) != \
        batch_key(adapters.create("bn-alpha", model, alpha=0.2), x)
    for stateful in ("bn-ema", "unmix-tns", "tent"):
        assert batch_key(adapters.create(stateful, model), x) is None
    with pytest.raises(ValueError, match="one batchable kind"):
        predict_together([adapters.create("bn", model), adapters.create("source", model)], [x, x])


# --- in the engine ---------------------------------------------------------------------------
def test_engine_groups_queued_batches_of_streams_and_keeps_each_streams_order(tiny):
    import asyncio
    import time

    import numpy as np

    xs = {f"g{i}": [b.numpy() for b in batches(3, size=4, seed=10 + i)] for i in range(5)}
    policies = {"g0": "bn", "g1": "bn", "g2": "bn", "g3": "bn-alpha", "g4": "source"}

    async def scenario(engine):
        for stream, policy in policies.items():
            await engine.set_policy(stream, policy, {})
        busy = engine.jobs.submit(lambda: time.sleep(0.3))  # everything below queues up behind it
        futures = [engine.enqueue_infer(stream, xs[stream][t]) for t in range(3) for stream in policies]
        await busy
        results = await asyncio.gather(*futures)
        return results, engine.metrics.grouped_batches.labels("tiny")._sum.get()

    results, grouped_total = run_engine(tiny, scenario, max_group=64)
    # queue order g0..g4, g0..g4, ...: each run of bn streams (g0-g2) forms a group of 3; bn-alpha
    # and source differ in kind, and a stream never joins a group twice
    assert grouped_total == 3 * 3
    by_stream = {}
    for r in results:
        by_stream.setdefault(r.stream_id, []).append(r)
    for stream, policy in policies.items():
        want = adapters.create(policy, tiny.module)
        for t, r in enumerate(by_stream[stream]):
            np.testing.assert_allclose(r.logits, want.predict(torch.from_numpy(xs[stream][t])).numpy(),
                                       rtol=1e-5, atol=1e-5)
        assert [r.step for r in by_stream[stream]] == ([0, 0, 0] if policy == "source" else [1, 2, 3])
    assert by_stream["g0"][0].bn_shift != by_stream["g1"][0].bn_shift  # drift measured per stream


def test_a_control_operation_between_batches_ends_the_group(tiny):
    import asyncio
    import time

    async def scenario(engine):
        for stream in ("c0", "c1"):
            await engine.set_policy(stream, "bn", {})
        busy = engine.jobs.submit(lambda: time.sleep(0.3))
        first = engine.enqueue_infer("c0", batches(1, size=4)[0].numpy())
        switch = asyncio.ensure_future(engine.set_policy("c1", "source", {}))
        await asyncio.sleep(0)
        second = engine.enqueue_infer("c1", batches(1, size=4)[0].numpy())
        await busy
        return await first, await switch, await second, engine.metrics.grouped_batches.labels("tiny")._sum.get()

    first, switched, second, grouped_total = run_engine(tiny, scenario, max_group=64)
    assert grouped_total == 0 and second.policy == "source" and switched["policy"] == "source"
