"""The worker's order and admission (runtime/engine/jobs.py): streams take turns, a batch whose
client deadline passed is never run, and the queue is bounded in time as well as in count."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from conftest import run_engine
from runtime.engine import EngineError


def batch(seed: int, size: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).random((size, 3, 16, 16), dtype=np.float32)


def test_streams_take_turns_behind_a_backlog(tiny):
    """A stream that queued 6 batches does not make a stream that queued 1 wait for all 6."""
    async def scenario(engine):
        order = []
        busy = engine.jobs.submit(lambda: time.sleep(0.3))  # everything below queues up behind it
        futures = [engine.enqueue_infer("hog", batch(i)) for i in range(6)]
        futures.append(engine.enqueue_infer("polite", batch(9)))
        for name, f in zip([f"hog-{i}" for i in range(6)] + ["polite"], futures):
            f.add_done_callback(lambda _, name=name: order.append(name))
        await asyncio.gather(busy, *futures)
        return order, [r.step for r in [f.result() for f in futures[:6]]]

    order, hog_steps = run_engine(tiny, scenario)
    assert order.index("polite") == 1, order  # right after the hog's first batch
    assert [o for o in order if o.startswith("hog")] == [f"hog-{i}" for i in range(6)]  # its own order kept
    assert hog_steps == sorted(hog_steps)


def test_a_batch_whose_deadline_passed_is_never_run(tiny):
    async def scenario(engine):
        await engine.set_policy("late", "tent", {"lr": "0.01"})
        await engine.infer("late", batch(0))
        before = await engine.get_stream("late")
        busy = engine.jobs.submit(lambda: time.sleep(0.3))
        late = engine.enqueue_infer("late", batch(1), deadline=time.monotonic() + 0.05)
        on_time = engine.enqueue_infer("late", batch(2), deadline=time.monotonic() + 30)
        await busy
        with pytest.raises(EngineError) as e:
            await late
        result = await on_time
        after = await engine.get_stream("late")
        return before, after, e.value, result, engine.metrics.rejected.labels("tiny", "deadline")._value.get()

    before, after, error, result, dropped = run_engine(tiny, scenario)
    assert error.code == "DEADLINE_EXCEEDED" and "not run" in error.message
    assert after["batches"] == before["batches"] + 1  # only the batch that was on time
    assert after["step"] == before["step"] + 1 and result.step == before["step"]  # ... and learned from once
    assert dropped == 1


def test_the_queue_is_bounded_in_time(tiny):
    """With a measured time per batch, a batch that would wait longer than max_queue_wait is
    refused at once; one that fits is queued."""
    async def scenario(engine):
        for i in range(3):
            await engine.infer("s", batch(i))
        measured = engine.jobs.seconds_per_job
        engine.jobs.seconds_per_job = 0.1  # say a batch takes 0.1 s: 2 waiting = 0.2 s, at the bound
        busy = engine.jobs.submit(lambda: time.sleep(0.3))
        admitted = [engine.enqueue_infer(f"s{i}", batch(i)) for i in range(3)]
        with pytest.raises(EngineError) as e:
            engine.enqueue_infer("s9", batch(9))
        await asyncio.gather(busy, *admitted)
        return measured, e.value, engine.metrics.rejected.labels("tiny", "wait")._value.get()

    measured, error, rejected = run_engine(tiny, scenario, max_queue_wait=0.25)
    assert measured > 0
    assert error.code == "RESOURCE_EXHAUSTED" and "behind" in error.message and "--max-queue-wait" in error.message
    assert rejected == 1


def test_a_stream_refused_for_a_full_queue_gets_in_when_it_comes_back(tiny):
    """Closed-loop clients fill the queue again the moment they get a reply; a stream refused for
    a full queue takes one of the extra places when it retries, a stream never refused does not."""
    async def scenario(engine):
        busy = engine.jobs.submit(lambda: time.sleep(0.3))
        queued = [engine.enqueue_infer(f"s{i}", batch(i)) for i in range(4)]  # 4 of 4
        with pytest.raises(EngineError) as refused:
            engine.enqueue_infer("late", batch(9))
        retried = engine.enqueue_infer("late", batch(9))  # still full: an extra place (4 // 4 = 1)
        with pytest.raises(EngineError) as fresh:
            engine.enqueue_infer("fresh", batch(8))
        with pytest.raises(EngineError) as again:
            engine.enqueue_infer("other", batch(7))  # refused once ...
        with pytest.raises(EngineError) as beyond:
            engine.enqueue_infer("other", batch(7))  # ... but the one extra place is taken
        await asyncio.gather(busy, retried, *queued)
        return refused.value, fresh.value, again.value, beyond.value

    errors = run_engine(tiny, scenario, max_queue=4)
    assert all(e.code == "RESOURCE_EXHAUSTED" and "queue is full" in e.message for e in errors)


def test_streams_refused_for_a_full_queue_are_told_to_come_back_in_turn(tiny):
    """Each refusal for a full queue says when to retry (sent as gRPC's retry pushback): the k-th
    stream refused is due after about k batches (seconds_per_job each), so refused clients come
    back in the order they were refused, spread out; a stream refused again keeps its turn."""
    async def scenario(engine):
        busy = engine.jobs.submit(lambda: time.sleep(0.3))
        queued = [engine.enqueue_infer(f"s{i}", batch(i)) for i in range(4)]  # 4 of 4
        engine.jobs.seconds_per_job = 0.1
        hints = {}
        for name in ("a", "b", "c"):
            with pytest.raises(EngineError) as refused:
                engine.enqueue_infer(name, batch(5))
            hints[name] = refused.value.retry_after
        retried = engine.enqueue_infer("a", batch(5))  # an extra place (4 // 4 = 1) ...
        with pytest.raises(EngineError) as again:
            engine.enqueue_infer("b", batch(6))  # ... taken: b is told its turn again, not a later one
        await asyncio.gather(busy, retried, *queued)
        return hints, again.value

    hints, again = run_engine(tiny, scenario, max_queue=4)
    assert 0.09 <= hints["a"] <= 0.11 and 0.18 <= hints["b"] <= 0.22 and 0.27 <= hints["c"] <= 0.33, hints
    assert again.code == "RESOURCE_EXHAUSTED" and "retry in about" in again.message
    assert 0 < again.retry_after <= hints["b"]


def test_refusals_for_the_wait_say_when_to_retry(tiny):
    async def scenario(engine):
        for i in range(3):
            await engine.infer("s", batch(i))
        engine.jobs.seconds_per_job = 1.0
        busy = engine.jobs.submit(lambda: time.sleep(0.3))
        admitted = engine.enqueue_infer("s1", batch(1))
        with pytest.raises(EngineError) as late:  # 1 s behind, with 0.5 s to its deadline
            engine.enqueue_infer("s2", batch(2), deadline=time.monotonic() + 0.5)
        await asyncio.gather(busy, admitted)
        return late.value

    error = run_engine(tiny, scenario)
    assert error.code == "RESOURCE_EXHAUSTED" and "deadline" in error.message
    assert 0.5 <= error.retry_after <= 1.0  # within the second half of the second the queue takes
