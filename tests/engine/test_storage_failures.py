"""A state dir that fills up or turns read-only: the failure is told (a status with the cause,
never INTERNAL; tta_state_durable and health "tta.state"; which streams a shutdown could not
save), nothing is learned from a batch answered with an error, Delete forgets nothing it could
not remove, and idle streams expire after --stream-ttl."""
from __future__ import annotations

import errno
import os
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ServerProcess, run_engine
from runtime.engine import EngineError


def batch(seed: int, size: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).random((size, 3, 16, 16), dtype=np.float32)


def failing(store, error: int):
    """Make every write of the StateStore fail with `error` while the returned flag is set."""
    on = {"fail": False}

    def wrap(method):
        def write(*args, **kwargs):
            if on["fail"]:
                raise OSError(error, os.strerror(error), str(store.root / "streams" / "x.pt"))
            return method(*args, **kwargs)
        return write

    for name in ("save_stream", "save_snapshot", "delete_stream"):
        setattr(store, name, wrap(getattr(store, name)))
    return on


def test_a_full_state_dir_is_told_and_nothing_is_lost_from_memory(tiny, tmp_path):
    async def scenario(engine):
        fault = failing(engine.store, errno.ENOSPC)
        await engine.set_policy("s", "tent", {"lr": "0.01"})
        await engine.infer("s", batch(0))
        fault["fail"] = True
        errors = {}
        for what, call in (("snapshot", lambda: engine.snapshot("s", "x")), ("delete", lambda: engine.delete_stream("s"))):
            with pytest.raises(EngineError) as e:
                await call()
            errors[what] = e.value
        served = await engine.infer("s", batch(1))  # inference goes on, from memory
        durable_while_full = engine.durable, engine.metrics.durable.labels("tiny")._value.get()
        listed = [s["stream_id"] for s in await engine.list_streams()]
        saved, failed = engine.table.checkpoint(changed_only=False, reason="periodic")
        fault["fail"] = False
        name, _ = await engine.snapshot("s", "x")
        return errors, served, durable_while_full, listed, (saved, failed), name, engine.durable

    errors, served, durable_while_full, listed, checkpointed, name, durable_after = run_engine(
        tiny, scenario, state_dir=str(tmp_path))
    for what, error in errors.items():
        assert error.code == "RESOURCE_EXHAUSTED", (what, error.code)
        assert "the state directory is full" in error.message and "No space left" in error.message
        assert str(tmp_path) not in error.message  # no server paths for the client
    assert "was not deleted" in errors["delete"].message and listed == ["s"]  # Delete forgot nothing
    assert served.step == 1
    assert durable_while_full == (False, 0.0)
    assert checkpointed == (0, ["s"])
    assert name == "x" and durable_after is True


def test_a_read_only_state_dir_keeps_streams_in_memory_and_answers_unavailable(tiny, tmp_path):
    async def scenario(engine):
        fault = failing(engine.store, errno.EROFS)
        for stream in ("a", "b"):
            await engine.set_policy(stream, "tent", {})
            await engine.infer(stream, batch(0))
        fault["fail"] = True
        engine.table.memory_budget = 1  # both over budget: eviction must fail and keep them
        await engine.infer("a", batch(1))
        resident = {s["stream_id"]: s["resident"] for s in await engine.list_streams()}
        with pytest.raises(EngineError) as e:
            await engine.snapshot("b", "")
        return resident, e.value

    resident, error = run_engine(tiny, scenario, state_dir=str(tmp_path))
    assert resident == {"a": True, "b": True}
    assert error.code == "UNAVAILABLE" and "cannot be used (Read-only file system)" in error.message


def test_a_batch_answered_with_an_error_is_not_learned(tiny):
    async def scenario(engine):
        await engine.set_policy("s", "tent", {"lr": "0.01"})
        first = await engine.infer("s", batch(0))
        remember = engine.table.remember

        def broken(*args):
            engine.table.remember = remember
            raise RuntimeError("bookkeeping failed after the prediction")
        engine.table.remember = broken
        with pytest.raises(EngineError) as e:
            await engine.infer("s", batch(1))
        third = await engine.infer("s", batch(2))
        return first.step, e.value.code, third.step, (await engine.get_stream("s"))["step"]

    first, code, third, step = run_engine(tiny, scenario)
    assert code == "INTERNAL"
    assert (first, third, step) == (0, 1, 2)  # the failed batch taught the stream nothing


def test_idle_streams_expire_after_the_ttl_also_across_a_restart(tiny, tmp_path):
    async def first(engine):
        for stream in ("idle", "busy"):
            await engine.set_policy(stream, "bn", {})
        for _ in range(12):  # 1.2 s: "busy" keeps being used, "idle" is not
            await engine.infer("busy", batch(0))
            time.sleep(0.1)
        streams = [s["stream_id"] for s in await engine.list_streams()]
        return streams, engine.metrics.expired.labels("tiny")._value.get()

    streams, expired = run_engine(tiny, first, state_dir=str(tmp_path), stream_ttl=0.6)
    assert streams == ["busy"] and expired == 1
    assert not any(p.name.startswith("idle") for p in (tmp_path / "streams").iterdir())

    async def checkpoint(engine):
        await engine.infer("old", batch(0))
        return await engine.drain_and_checkpoint()

    assert run_engine(tiny, checkpoint, state_dir=str(tmp_path)) == (1, [])
    past = time.time() - 3600  # "old" was last written an hour ago
    for p in (tmp_path / "streams").glob("old.pt*"):
        os.utime(p, (past, past))

    async def restarted(engine):
        time.sleep(0.3)  # one expiry tick
        await engine.infer("busy", batch(1))
        return [s["stream_id"] for s in await engine.list_streams()]

    assert run_engine(tiny, restarted, state_dir=str(tmp_path), stream_ttl=60) == ["busy"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs (root only); skipped where mounting is not allowed."""
    mount = tmp_path / "state"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_a_real_server_on_a_full_tmpfs(tiny_config, small_tmpfs):
    """A real `tta serve` whose state dir fills up: inference goes on, Snapshot is
    RESOURCE_EXHAUSTED, health "tta.state" turns NOT_SERVING, and SIGTERM says which streams it
    could not save and exits 1."""
    server = ServerProcess("--model", str(tiny_config), "--state-dir", str(small_tmpfs), "--checkpoint-interval", "0")
    try:
        client = tc.InferenceServerClient(server.target)
        inp = tc.InferInput("input", [4, 3, 16, 16], "FP32")
        inp.set_data_from_numpy(batch(0))
        stream = f"full-{uuid.uuid4().hex[:6]}"
        client.infer("tiny", [inp], parameters={"stream_id": stream})
        assert _health(server.target, "tta.state") == health_pb2.HealthCheckResponse.SERVING
        filler = Path(small_tmpfs) / "filler"
        with open(filler, "wb") as f:  # fill the file system to the last byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        ctl = subprocess.run([os.sys.executable, "-m", "runtime.cli", "ctl", "--target", server.target,
                              "snapshot", stream], capture_output=True, text=True, timeout=60)
        assert ctl.returncode != 0 and "RESOURCE_EXHAUSTED" in ctl.stderr and "is full" in ctl.stderr, ctl.stderr
        assert str(small_tmpfs) not in ctl.stderr
        client.infer("tiny", [inp], parameters={"stream_id": stream})  # still served from memory
        deadline = time.monotonic() + 10
        while _health(server.target, "tta.state") != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health tta.state stayed SERVING on a full state dir"
            time.sleep(0.2)
        client.close()
    finally:
        code = server.stop()
    assert code == 1
    assert "could not be checkpointed" in server.stderr() and repr(stream) in server.stderr()
