"""Nothing learned is lost: checksummed atomic checkpoints, periodic checkpoints, per-stream
backpressure, and a kill -9 fault test against real `tta serve` processes."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tc

import adapters
from conftest import ServerProcess, run_engine
from runtime import protos
from runtime.checkpoints import MAGIC, CorruptCheckpoint, StateStore
from runtime.engine import EngineError

torch.set_num_threads(1)
pb, pb_grpc = protos.load("tta.v1.adaptation_pb2"), protos.load("tta.v1.adaptation_pb2_grpc")


def batch(stream: str, i: int, size: int = 4) -> np.ndarray:
    """Batch i of a stream: the same array in every process and round."""
    rng = np.random.default_rng([sum(map(ord, stream)), i])
    return (rng.random((size, 3, 16, 16), dtype=np.float32) * 0.8 + 0.1 * (i % 5) / 5).astype(np.float32)


# --- the store ------------------------------------------------------------------------------
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    store = StateStore(tmp_path)
    store.save_stream("cam/1", {"step": 1})
    store.save_stream("cam/1", {"step": 2})
    path = store.stream_path("cam/1")
    assert path.read_bytes().startswith(MAGIC) and path.with_name(path.name + ".prev").exists()
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit in the payload
    path.write_bytes(bytes(data))
    assert store.load_stream("cam/1") == {"step": 1}  # the previous checkpoint, not the damaged one
    assert len(list(path.parent.glob("*.corrupt-*"))) == 1  # set aside for inspection
    assert store.saved_streams() == ["cam/1"]


def test_damaged_checkpoint_without_a_previous_one_is_refused_not_loaded(tmp_path):
    store = StateStore(tmp_path)
    store.save_stream("s", {"step": 5})
    path = store.stream_path("s")
    path.write_bytes(path.read_bytes()[:-10])  # cut short
    with pytest.raises(CorruptCheckpoint, match="checksum"):
        store.load_stream("s")


def test_crash_leftovers_are_cleared_and_odd_stream_ids_stay_listed(tmp_path):
    store = StateStore(tmp_path)
    for stream_id in (".hidden", "..", "a/b", "x" * 100):
        store.save_stream(stream_id, {"id": stream_id})
    (tmp_path / "streams" / ".s.pt.123.tmp").write_bytes(b"half a write")
    store = StateStore(tmp_path)  # what a restart does
    assert not list((tmp_path / "streams").glob("*.tmp"))
    assert store.saved_streams() == sorted([".hidden", "..", "a/b", "x" * 100])
    assert all(p.parent == tmp_path / "streams" for p in (tmp_path / "streams").iterdir())


# --- the engine -----------------------------------------------------------------------------
def test_periodic_checkpoint_saves_changed_streams_only(tiny, tmp_path):
    async def scenario(engine):
        await engine.set_policy("p", "tent", {"lr": "0.01"})
        for i in range(3):
            await engine.infer("p", batch("p", i))
        written = engine.metrics.checkpoints.labels("tiny", "periodic")._value
        await asyncio.sleep(0.3)  # several intervals: a checkpoint after the change ...
        after_batches = written.get()
        await asyncio.sleep(0.3)  # ... and none in idle intervals
        return after_batches, written.get()

    after_batches, after_idle = run_engine(tiny, scenario, state_dir=str(tmp_path), checkpoint_interval=0.05)
    record = StateStore(tmp_path, model_fingerprint=tiny.fingerprint).load_stream("p")
    # the owed update of the last batch was applied before saving: 3 batches, 3 updates
    assert record["counters"]["batches"] == 3 and record["step"] == 3
    # a checkpoint may land between any two batches (on a loaded machine, between each); idle intervals write nothing
    assert 1 <= after_batches <= 3 and after_idle == after_batches

    want = adapters.create("tent", tiny.module, lr=0.01)
    for i in range(3):
        want.step(torch.from_numpy(batch("p", i)))
    got = adapters.create("tent", tiny.module, lr=0.01)
    got.load_state_dict(record["adapter"])
    x = torch.from_numpy(batch("p", 3))
    assert torch.equal(got.step(x), want.step(x))


def test_one_stream_cannot_fill_the_queue(tiny):
    async def scenario(engine):
        busy = engine.jobs.submit(lambda: time.sleep(0.3))
        queued = [engine.enqueue_infer("hog", batch("hog", i)) for i in range(2)]
        with pytest.raises(EngineError) as e:
            engine.enqueue_infer("hog", batch("hog", 2))
        other = engine.enqueue_infer("polite", batch("polite", 0))  # another stream still gets in
        await asyncio.gather(busy, *queued, other)
        await asyncio.sleep(0)
        await engine.infer("hog", batch("hog", 2))  # room again once its batches were answered
        return e.value, engine.metrics.rejected.labels("tiny", "stream_queue")._value.get()

    error, rejected = run_engine(tiny, scenario, max_stream_queue=2)
    assert error.code == "RESOURCE_EXHAUSTED" and "'hog' already has 2 batches waiting" in error.message
    assert rejected == 1


def test_damaged_state_is_data_loss_and_other_streams_serve(tiny, tmp_path):
    async def first(engine):
        for stream in ("good", "bad"):
            await engine.set_policy(stream, "tent", {})
            await engine.infer(stream, batch(stream, 0))
        return await engine.drain_and_checkpoint()

    assert run_engine(tiny, first, state_dir=str(tmp_path)) == (2, [])
    store = StateStore(tmp_path)
    for p in store.stream_path("bad").parent.glob("bad.pt*"):
        p.write_bytes(p.read_bytes()[:-1])  # both the latest and the previous copy damaged

    async def second(engine):
        with pytest.raises(EngineError) as e:
            await engine.infer("bad", batch("bad", 1))
        good = await engine.infer("good", batch("good", 1))
        return e.value, good.step

    error, good_step = run_engine(tiny, second, state_dir=str(tmp_path))
    assert good_step == 1
    assert error.code == "DATA_LOSS" and "damaged" in error.message and "delete" in error.message


# --- kill -9 --------------------------------------------------------------------------------
STREAMS = {"k-tent": ("tent", {"lr": "0.01"}), "k-bnema": ("bn-ema", {}), "k-cotta": ("cotta", {"lr": "0.01", "n_augmentations": "4"})}
ROUNDS = 20


def test_kill_9_at_random_moments_never_loses_a_completed_checkpoint(tiny, tiny_config, tmp_path):
    """20 times: start a server on the same state dir (checkpoints every 50 ms), check that each
    stream resumes exactly where a completed checkpoint left it (its next reply equals an
    in-process replay of the same batches up to that point), stream batches, kill -9 at a random
    moment. Every state file must stay readable (checksums), whatever the moment."""
    state = tmp_path / "state"
    reference = {s: adapters.create(p, tiny.module, **adapters.coerce(p, hp)) for s, (p, hp) in STREAMS.items()}
    expected: dict[str, list[np.ndarray]] = {s: [] for s in STREAMS}

    def want(stream: str, i: int) -> np.ndarray:  # the reply to batch i of an uninterrupted stream
        while len(expected[stream]) <= i:
            x = torch.from_numpy(batch(stream, len(expected[stream])))
            expected[stream].append(reference[stream].step(x).numpy())
        return expected[stream][i]

    rng = random.Random(7)
    resumed_at = {s: 0 for s in STREAMS}
    sent = {s: 0 for s in STREAMS}
    progressed = 0
    for round_ in range(ROUNDS):
        # guard off: the replies are compared with plain adapters (the guard is tested on its own)
        srv = ServerProcess("--model", str(tiny_config), "--state-dir", str(state), "--checkpoint-interval", "0.05",
                            "--guard", "off")
        client = tc.InferenceServerClient(srv.target)
        channel = grpc.insecure_channel(srv.target)
        control = pb_grpc.AdaptationServiceStub(channel)
        try:
            for stream, (policy, hp) in STREAMS.items():
                try:
                    info = control.GetStream(pb.StreamRequest(stream_id=stream))
                    assert info.policy == policy, (round_, stream, info.policy)
                    k = info.batches
                except grpc.RpcError as e:  # killed before its first checkpoint ever completed
                    assert e.code() == grpc.StatusCode.NOT_FOUND and resumed_at[stream] == 0, (round_, stream, e)
                    control.SetPolicy(pb.SetPolicyRequest(stream_id=stream, policy=policy, hyperparameters=hp))
                    k = 0
                assert k >= resumed_at[stream], f"round {round_}: {stream} went back from {resumed_at[stream]} to {k}"
                assert k <= sent[stream], f"round {round_}: {stream} restored {k} batches, only {sent[stream]} sent"
                progressed += k > resumed_at[stream]
                resumed_at[stream] = k

            sent.update(resumed_at)
            mismatches: list[str] = []
            failures: list[Exception] = []
            stop, replied = threading.Event(), threading.Event()

            def stream_batches():
                try:
                    while not stop.is_set():
                        for stream in STREAMS:
                            i = sent[stream]
                            inp = tc.InferInput("input", [4, 3, 16, 16], "FP32")
                            inp.set_data_from_numpy(batch(stream, i))
                            got = client.infer("tiny", [inp], parameters={"stream_id": stream}).as_numpy("logits")
                            if not np.allclose(got, want(stream, i), rtol=1e-5, atol=1e-5):
                                mismatches.append(f"{stream} batch {i}")
                            sent[stream] = i + 1
                            replied.set()
                except Exception as e:  # noqa: BLE001 - the kill cuts the request in flight
                    failures.append(e)

            for stream in STREAMS:  # the replay runs ahead here, so the sender below is not slowed by it
                want(stream, sent[stream] + 40)
            sender = threading.Thread(target=stream_batches)
            sender.start()
            # the first reply (slow: a fresh process warms up) already proves the resumed state;
            # then the kill comes at a random moment of steady adapting and checkpointing
            assert replied.wait(120), f"round {round_}: no reply: {failures[:1]}"
            time.sleep(rng.uniform(0.0, 1.0))
            srv.proc.kill()  # SIGKILL: no shutdown checkpoint, maybe mid-write
            srv.proc.wait(10)
            stop.set()
            sender.join(30)
            print(f"round {round_}: resumed at {resumed_at}, sent up to {sent}, ended by {[str(f) for f in failures[:1]]}")
            assert not mismatches, f"round {round_}: replies differ from the in-process replay: {mismatches}"
        finally:
            client.close()
            channel.close()
            if srv.proc.poll() is None:
                srv.proc.kill()
        store = StateStore(state, model_fingerprint=tiny.fingerprint)  # every file left reads back verified
        for stream in store.saved_streams():
            store.load_stream(stream)
        assert not list(state.rglob("*.corrupt-*"))
    assert progressed >= ROUNDS // 2, "too few rounds completed a checkpoint to mean anything"
