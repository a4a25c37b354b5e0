"""The engine in-process (no gRPC): ordering, eviction to disk, stream limit, model formats.
And, with real subprocesses: graceful shutdown with checkpoint and restore, bind failure."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc

import adapters
from conftest import REPO, ServerProcess, run_engine, write_tiny_config
from runtime.engine import Engine, EngineError
from runtime.model_config import ConfigError, load

torch.set_num_threads(1)


def batches(n: int, size: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(rng.random((size, 3, 16, 16), dtype=np.float32) * (0.6 + 0.1 * i) + 0.05 * i, 0, 1)
            .astype(np.float32) for i in range(n)]


def reference_outputs(model, policy, xs, **hp):
    adapter = adapters.create(policy, model.module, **adapters.coerce(policy, hp))
    return [adapter.step(torch.from_numpy(x)).numpy() for x in xs]


def test_eviction_under_memory_budget_keeps_state(tiny):
    """With room for one tent stream only, alternating streams are evicted to disk and loaded
    back; results stay those of uninterrupted adapters."""
    xa, xb = batches(4, seed=1), batches(4, seed=2)
    want_a = reference_outputs(tiny, "tent", xa, lr="0.01")
    want_b = reference_outputs(tiny, "tent", xb, lr="0.01")
    one_stream = adapters.create("tent", tiny.module).state_bytes()

    async def scenario(engine):
        await engine.set_policy("a", "tent", {"lr": "0.01"})
        await engine.set_policy("b", "tent", {"lr": "0.01"})
        got_a, got_b = [], []
        for t in range(4):
            got_a.append((await engine.infer("a", xa[t])).logits)
            got_b.append((await engine.infer("b", xb[t])).logits)
        streams = {s["stream_id"]: s for s in await engine.list_streams()}
        evictions = engine.metrics.evictions.labels("tiny")._value.get()
        return got_a, got_b, streams, evictions

    got_a, got_b, streams, evictions = run_engine(tiny, scenario, memory_budget_bytes=int(one_stream * 1.5))
    for got, want in zip(got_a + got_b, want_a + want_b):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert evictions >= 6
    assert [streams["a"]["resident"], streams["b"]["resident"]].count(True) == 1
    assert streams["a"]["step"] == 4 and streams["b"]["step"] == 4  # learned state counted in both


def test_stream_limit_is_resource_exhausted(tiny):
    async def scenario(engine):
        x = batches(1)[0]
        await engine.infer("one", x)
        await engine.infer("two", x)
        with pytest.raises(EngineError) as e:
            await engine.infer("three", x)
        await engine.infer("one", x)  # known streams keep working
        await engine.delete_stream("two")
        await engine.infer("three", x)  # room again
        return e.value

    error = run_engine(tiny, scenario, max_streams=2)
    assert error.code == "RESOURCE_EXHAUSTED" and "stream limit of 2" in error.message


def _flat_state(state) -> dict:
    """Every tensor of a (nested) adapter state dict, by path."""
    out = {}
    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            out[prefix] = value.detach().cpu().clone()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)
    walk("", state)
    return out


def test_snapshot_rollback_and_reset_restore_the_adapter_state_exactly(tiny):
    xs = batches(4, seed=8)

    async def scenario(engine):
        await engine.set_policy("s", "cotta", {"lr": "0.01"})
        fresh = _flat_state(engine.table.streams["s"].adapter.state_dict())
        await engine.infer("s", xs[0])
        await engine.infer("s", xs[1])
        await engine.snapshot("s", "two")
        at_snapshot = _flat_state(engine.table.streams["s"].adapter.state_dict())
        await engine.infer("s", xs[2])
        await engine.infer("s", xs[3])
        await engine.get_stream("s")  # applies the pending update
        moved = _flat_state(engine.table.streams["s"].adapter.state_dict())
        await engine.rollback("s", "two")
        rolled_back = _flat_state(engine.table.streams["s"].adapter.state_dict())
        await engine.reset_stream("s")
        reset = _flat_state(engine.table.streams["s"].adapter.state_dict())
        return fresh, at_snapshot, moved, rolled_back, reset

    fresh, at_snapshot, moved, rolled_back, reset = run_engine(tiny, scenario)
    assert at_snapshot.keys() == rolled_back.keys() and fresh.keys() == reset.keys()  # optimizer moments come and go
    assert any(not torch.equal(at_snapshot[k], moved[k]) for k in moved)  # adaptation changed the state
    assert all(torch.equal(at_snapshot[k], rolled_back[k]) for k in at_snapshot)  # bit for bit
    assert all(torch.equal(fresh[k], reset[k]) for k in fresh)


def test_full_queue_is_resource_exhausted(tiny):
    async def scenario(engine):
        busy = engine.jobs.submit(lambda: time.sleep(0.3))
        first = engine.enqueue_infer("q", batches(1)[0])  # waits behind the busy job: the queue is full
        with pytest.raises(EngineError) as e:
            engine.enqueue_infer("q", batches(1)[0])
        await busy
        await first
        # the slot is freed by the finished batch's done-callback, which can run one event-loop
        # step after a waiter that found the future already done
        await asyncio.sleep(0)
        await engine.infer("q", batches(1)[0])  # room again
        return e.value

    error = run_engine(tiny, scenario, max_queue=1)
    assert error.code == "RESOURCE_EXHAUSTED" and "queue is full" in error.message


def test_reply_precedes_update_and_next_batch_sees_it(tiny):
    """The step reported with batch t is t (update not yet applied); batch t+1 sees it."""
    xs = batches(3, seed=3)
    want = reference_outputs(tiny, "tent", xs, lr="0.05")

    async def scenario(engine):
        await engine.set_policy("s", "tent", {"lr": "0.05"})
        # submitted together: FIFO order per stream still holds
        results = await asyncio.gather(*(engine.infer("s", x) for x in xs))
        return results

    results = run_engine(tiny, scenario)
    assert [r.step for r in results] == [0, 1, 2]
    for r, w in zip(results, want):
        np.testing.assert_allclose(r.logits, w, rtol=1e-5, atol=1e-5)


def test_set_policy_lands_between_batches(tiny):
    """Batches and a policy change submitted together: the batches before it run the old policy
    with its full history, the ones after it run the new policy from the source state."""
    xs = batches(6, seed=7)
    want_old = reference_outputs(tiny, "tent", xs[:3], lr="0.05")
    want_new = reference_outputs(tiny, "bn-ema", xs[3:], momentum="0.5")

    async def scenario(engine):
        await engine.set_policy("s", "tent", {"lr": "0.05"})
        jobs = [engine.infer("s", x) for x in xs[:3]]
        jobs.append(engine.set_policy("s", "bn-ema", {"momentum": "0.5"}))
        jobs += [engine.infer("s", x) for x in xs[3:]]
        return await asyncio.gather(*jobs)

    results = run_engine(tiny, scenario)
    before, info, after = results[:3], results[3], results[4:]
    assert info["policy"] == "bn-ema" and info["step"] == 0
    assert [r.policy for r in before] == ["tent"] * 3 and [r.policy for r in after] == ["bn-ema"] * 3
    for r, w in zip(before + after, want_old + want_new):
        np.testing.assert_allclose(r.logits, w, rtol=1e-5, atol=1e-5)


def test_a_request_abandoned_before_its_turn_never_touches_the_stream(tiny):
    """A client whose deadline passes while its batch waits in the queue: the batch is dropped,
    the stream is neither created nor adapted."""
    async def scenario(engine):
        busy = engine.jobs.submit(lambda: time.sleep(0.5))  # the engine is busy with something long
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(engine.infer("impatient", batches(1)[0]), timeout=0.05)
        await busy
        return [s["stream_id"] for s in await engine.list_streams()], engine.jobs.queued

    streams, queued = run_engine(tiny, scenario)
    assert "impatient" not in streams and queued == 0


def _export_onnx(module, path):
    torch.onnx.export(module, torch.rand(2, 3, 16, 16), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False)


def _frozen_config(folder, key, filename, with_factory=False):
    """A tiny-model config naming a frozen artifact (and optionally the factory too)."""
    extra = f'{key} = "{filename}"'
    path = write_tiny_config(folder, default_policy="source", extra_model=extra)
    if not with_factory:
        path.write_text("\n".join(line for line in path.read_text().splitlines() if not line.startswith("factory")))
    return path


def test_onnx_model_serves_source_and_refuses_adaptation(tmp_path, tiny):
    from adapter_models import tiny_cnn

    _export_onnx(tiny_cnn(), tmp_path / "tiny.onnx")  # the network without Normalize; the config adds it
    onnx_only = load(_frozen_config(tmp_path / "a", "onnx", str(tmp_path / "tiny.onnx")), device="cpu")
    assert onnx_only.module is None and onnx_only.platform == "onnxruntime_onnx"
    x = batches(1, seed=4)[0]

    async def scenario(engine):
        out = (await engine.infer("s", x)).logits
        with pytest.raises(EngineError) as e:
            await engine.set_policy("s", "bn", {})
        return out, e.value

    out, error = run_engine(onnx_only, scenario)
    np.testing.assert_allclose(out, tiny.module(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert error.code == "FAILED_PRECONDITION" and "factory" in error.message

    # ONNX for source streams plus the factory for adapting ones
    both = load(_frozen_config(tmp_path / "b", "onnx", str(tmp_path / "tiny.onnx"), with_factory=True), device="cpu")

    async def scenario_both(engine):
        frozen = (await engine.infer("s", x)).logits
        await engine.set_policy("s", "bn", {})
        return frozen, (await engine.infer("s", x)).logits

    frozen, adapted = run_engine(both, scenario_both)
    np.testing.assert_allclose(frozen, out, rtol=1e-5, atol=1e-6)
    want = reference_outputs(tiny, "bn", [x])[0]
    np.testing.assert_allclose(adapted, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["onnx", "auto"])
def test_frozen_backend_exports_a_torch_model_to_onnx_runtime(tiny_config, tiny, backend):
    model = load(tiny_config, device="cpu", default_policy="source", frozen_backend=backend)
    assert any("source streams run on" in note for note in model.notes), model.notes
    if backend == "onnx":
        assert model.frozen is not None and "ONNX Runtime" in model.notes[-1]
    x = batches(1, seed=4)[0]

    async def scenario(engine):
        source = (await engine.infer("s", x)).logits
        await engine.set_policy("s", "bn", {})  # adapting streams still run the torch module
        return source, (await engine.infer("s", x)).logits

    source, adapted = run_engine(model, scenario)
    np.testing.assert_allclose(source, tiny.module(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(adapted, reference_outputs(tiny, "bn", [x])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="choose torch, onnx or auto"):
        load(tiny_config, device="cpu", frozen_backend="tensorrt")


@pytest.mark.parametrize("kind", ["torchscript", "exported"])
def test_torchscript_and_export_load_as_frozen_models(tmp_path, tiny, kind):
    from adapter_models import tiny_cnn

    net = tiny_cnn()
    path = tmp_path / ("tiny.pt" if kind == "torchscript" else "tiny.pt2")
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(net), str(path))
    else:
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.export.save(torch.export.export(net, (torch.rand(2, 3, 16, 16),), dynamic_shapes=({0: batch},)), str(path))
    model = load(_frozen_config(tmp_path / "cfg", kind, str(path)), device="cpu")
    assert model.module is None and not model.can_adapt()
    x = batches(1, seed=5)[0]
    np.testing.assert_allclose(model.frozen(x), tiny.module(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_config_mean_std_wraps_the_network_so_it_takes_pixels(tiny):
    from adapter_models import tiny_cnn

    x = torch.from_numpy(batches(1, seed=9)[0])
    with torch.no_grad():
        np.testing.assert_allclose(tiny.module(x).numpy(), tiny_cnn()((x - 0.5) / 0.25).numpy(), rtol=1e-6, atol=1e-6)
    assert tiny.labels[3] == "three" and tiny.num_classes == 10 and tiny.input_shape() == [3, 16, 16]
    assert tiny.tracked_streams == ["default", "tracked-a", "tracked-b"]


def test_config_errors_are_actionable(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nfactory = "no.such.module:build"\n[input]\nsize = [16, 16]\n')
    with pytest.raises(ConfigError, match="cannot be imported"):
        load(bad)
    bad.write_text(f'[model]\nfactory = "{REPO}/tests/adapter_models.py:tiny_cnn"\nrandom_weights = true\n'
                   f'[input]\nsize = [16, 16]\n'
                   f'[output]\nlabels = ["a", "b"]\n')
    with pytest.raises(ConfigError, match="2 labels for a model with 10 classes"):
        load(bad)


# --- real processes ---------------------------------------------------------------------
def test_sigterm_checkpoints_and_restart_restores_streams(tmp_path, tiny_config, tiny):
    """SIGTERM: exit 0 after saving state; a new server on the same state dir continues each
    stream exactly where it stopped (snapshots included)."""
    state = tmp_path / "state"
    xs = batches(4, seed=6)
    want = reference_outputs(tiny, "tent", xs, lr="0.01")
    import grpc

    from runtime import protos

    pb, pb_grpc = protos.load("tta.v1.adaptation_pb2"), protos.load("tta.v1.adaptation_pb2_grpc")

    def infer(client, x):
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("tiny", [inp], parameters={"stream_id": "kept"}).as_numpy("logits")

    first = ServerProcess("--model", str(tiny_config), "--state-dir", str(state))
    with grpc.insecure_channel(first.target) as channel:
        pb_grpc.AdaptationServiceStub(channel).SetPolicy(
            pb.SetPolicyRequest(stream_id="kept", policy="tent", hyperparameters={"lr": "0.01"}))
        client = tc.InferenceServerClient(first.target)
        got = [infer(client, xs[0]), infer(client, xs[1])]
        pb_grpc.AdaptationServiceStub(channel).Snapshot(pb.SnapshotRequest(stream_id="kept", name="two"))
        client.close()
    assert first.stop() == 0
    assert "checkpointed 1 streams" in first.stderr()

    second = ServerProcess("--model", str(tiny_config), "--state-dir", str(state))
    try:
        client = tc.InferenceServerClient(second.target)
        got += [infer(client, xs[2]), infer(client, xs[3])]
        with grpc.insecure_channel(second.target) as channel:
            info = pb_grpc.AdaptationServiceStub(channel).GetStream(pb.StreamRequest(stream_id="kept"))
        client.close()
    finally:
        assert second.stop() == 0
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert info.policy == "tent" and info.step == 4 and list(info.snapshots) == ["two"] and info.batches == 4


def _scrape_total(srv, name: str, label: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://{srv.host}:{srv.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(name + "{") and label in line)


def test_graceful_shutdown_drains_in_flight_requests(tiny_config):
    """Requests in flight when SIGTERM arrives are answered; afterwards the server is gone."""
    import threading

    # slow updates (cotta); a grace long enough for a loaded CI machine: draining ends as soon as
    # the in-flight requests are answered, the grace is only the upper bound
    srv = ServerProcess("--model", str(tiny_config), "--grace", "120", "--policy", "cotta")
    client = tc.InferenceServerClient(srv.target)
    x = np.random.default_rng(0).random((64, 3, 16, 16), dtype=np.float32)
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    answers, errors = [], []

    def call():
        try:
            answers.append(client.infer("tiny", [inp], parameters={"stream_id": "drain"}).as_numpy("logits"))
        except Exception as e:  # noqa: BLE001 - recorded and asserted below
            errors.append(e)

    client.infer("tiny", [inp], parameters={"stream_id": "warm-up"})  # connected, model warm
    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while _scrape_total(srv, "tta_requests_total", 'method="ModelInfer"') < 3:  # some are in flight
        assert time.monotonic() < deadline
        time.sleep(0.01)
    srv.sigterm()
    for t in threads:
        t.join(150)
    assert srv.stop(timeout=180) == 0
    client.close()
    # every request either completed or was refused cleanly as UNAVAILABLE (never lost midway)
    assert len(answers) + len(errors) == 8
    assert all(e.status() == "StatusCode.UNAVAILABLE" for e in errors), [(e.status(), e.message()) for e in errors]
    assert answers, "requests already in flight must be answered"
    assert "stopped" in srv.stderr()


def test_shutdown_sequence_health_then_refusal_then_exit(tiny_config):
    """SIGTERM: health NOT_SERVING and ServerReady false at once while inference is still served
    (--shutdown-delay), then new batches UNAVAILABLE on an open stream, then exit 0 once the
    client closes it."""
    import queue

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    srv = ServerProcess("--model", str(tiny_config), "--grace", "30", "--shutdown-delay", "3")
    x = batches(1)[0]
    inp = tc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    replies: queue.Queue = queue.Queue()
    streaming = tc.InferenceServerClient(srv.target)
    streaming.start_stream(callback=lambda result, error: replies.put((result, error)))
    streaming.async_stream_infer("tiny", [inp])
    assert replies.get(timeout=30)[1] is None
    client = tc.InferenceServerClient(srv.target)
    channel = grpc.insecure_channel(srv.target)
    health = health_pb2_grpc.HealthStub(channel)
    srv.sigterm()
    deadline = time.monotonic() + 10
    while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "health never became NOT_SERVING"
        time.sleep(0.05)
    assert not client.is_server_ready()
    assert client.infer("tiny", [inp]).as_numpy("logits").shape == (4, 10)  # still served during the delay
    time.sleep(3.5)
    streaming.async_stream_infer("tiny", [inp])
    result, error = replies.get(timeout=30)
    assert error is not None and "UNAVAILABLE" in str(error) and "shutting down" in str(error)
    assert srv.proc.poll() is None  # waits for the open stream, up to --grace
    streaming.stop_stream()
    assert srv.stop() == 0
    channel.close()
    client.close()
    streaming.close()


def test_busy_port_is_reported(server, tiny_config):
    out = subprocess.run([sys.executable, "-m", "runtime.server", "--model", str(tiny_config), "--port",
                          str(server.port), "--metrics-port", "-1"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{server.port}" in out.stderr


def test_control_token_guards_state_changing_rpcs(tiny_config, tmp_path):
    import grpc

    from runtime import protos

    pb, pb_grpc = protos.load("tta.v1.adaptation_pb2"), protos.load("tta.v1.adaptation_pb2_grpc")
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    srv = ServerProcess("--model", str(tiny_config), "--control-token-file", str(token_file))
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.AdaptationServiceStub(channel)
            request = pb.SetPolicyRequest(stream_id="guarded", policy="bn")
            with pytest.raises(grpc.RpcError) as e:
                stub.SetPolicy(request)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                stub.SetPolicy(request, metadata=[("authorization", "Bearer guess")])
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert stub.SetPolicy(request, metadata=[("authorization", "Bearer s3cret")]).policy == "bn"
            assert stub.GetStream(pb.StreamRequest(stream_id="guarded")).policy == "bn"  # read-only: open
        client = tc.InferenceServerClient(srv.target)  # inference stays open
        x = batches(1)[0]
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        assert client.infer("tiny", [inp], parameters={"stream_id": "guarded"}).as_numpy("logits").shape == (4, 10)
        client.close()
        ctl = [sys.executable, "-m", "runtime.cli", "ctl", "--target", srv.target]
        denied = subprocess.run([*ctl, "reset", "guarded"], cwd=REPO, capture_output=True, text=True, timeout=60,
                                env={k: v for k, v in os.environ.items() if k != "TTA_CONTROL_TOKEN"})
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        allowed = subprocess.run([*ctl, "--token", "s3cret", "reset", "guarded"], cwd=REPO, capture_output=True,
                                 text=True, timeout=60)
        assert allowed.returncode == 0, allowed.stderr
    finally:
        assert srv.stop() == 0


def test_tls_serves_tritonclient_and_ctl_and_refuses_plaintext(tiny_config, tmp_path):
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl command not installed (needed to make a test certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    srv = ServerProcess("--model", str(tiny_config), "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        x = batches(1)[0]
        inp = tc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        secure = tc.InferenceServerClient(srv.target, ssl=True, root_certificates=str(cert))
        assert secure.infer("tiny", [inp]).as_numpy("logits").shape == (4, 10)
        secure.close()
        plain = tc.InferenceServerClient(srv.target)
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException) as refused:  # a plaintext client gets no answer
            plain.infer("tiny", [inp], client_timeout=5)
        assert refused.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
        plain.close()
        ctl = [sys.executable, "-m", "runtime.cli", "ctl", "--target", srv.target, "--tls-ca", str(cert), "streams"]
        out = subprocess.run(ctl, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "default: policy bn" in out.stdout, out.stderr
    finally:
        assert srv.stop() == 0


def _collapse_run(tiny, guard, n=30, lr="1.0"):
    """TENT with a huge learning rate on an i.i.d. stream: entropy minimisation drives the
    weights away and the predictions onto one class within a few batches."""
    xs = batches(n, size=32, seed=5)

    async def scenario(engine):
        await engine.set_policy("c", "tent", {"lr": lr})
        trace = []
        for x in xs:
            r = await engine.infer("c", x)
            trace.append((r.class_marginal_entropy, r.confidence, r.step))
        info = await engine.get_stream("c")
        trips = {k[-2:]: v for k, v in _samples(engine.metrics.guard_trips).items()}
        resets = engine.metrics.resets.labels("tiny", "tent", "_other", "guard")._value.get()
        return trace, info, trips, resets

    return run_engine(tiny, scenario, guard=guard)


def _samples(counter) -> dict:
    """label values -> count of a labelled prometheus counter."""
    return {tuple(s.labels.values()): s.value for metric in counter.collect() for s in metric.samples
            if s.name.endswith("_total")}


def test_collapse_guard_resets_a_runaway_stream_to_the_source(tiny):
    from runtime.guard import GuardConfig

    trace, info, trips, resets = _collapse_run(tiny, GuardConfig(action="reset", patience=3))
    assert info["guard_trips"] >= 1 and resets == info["guard_trips"]
    acted = {reason for (reason, action), v in trips.items() if action == "reset" and v > 0}
    assert acted and acted <= {"marginal_collapse", "weight_runaway", "non_finite", "bn_shift_jump"}, trips
    assert sum(v for (_, action), v in trips.items() if action == "reset") == info["guard_trips"]
    # after a reset the step counter starts again from 0
    assert any(later < earlier for (_, _, earlier), (_, _, later) in zip(trace, trace[1:]))


def test_collapse_guard_rolls_back_to_its_last_good_state(tiny):
    from runtime.guard import GuardConfig

    # a milder rate: healthy for a while (good snapshots are kept every 2 updates), then runaway
    trace, info, trips, resets = _collapse_run(tiny, GuardConfig(action="rollback", patience=2, snapshot_every=2),
                                               n=40, lr="0.3")
    rollbacks = sum(v for (_, action), v in trips.items() if action == "rollback")
    assert rollbacks >= 1 and rollbacks + resets == info["guard_trips"], (trips, resets, info["guard_trips"])
    # a rollback returns to an even step (a kept snapshot) greater than 0
    returned = [later for (_, _, earlier), (_, _, later) in zip(trace, trace[1:]) if later < earlier]
    assert any(step > 0 and step % 2 == 0 for step in returned), trace


def test_collapse_guard_off_leaves_the_stream_alone(tiny):
    from runtime.guard import GuardConfig

    trace, info, trips, resets = _collapse_run(tiny, GuardConfig(action="off"))
    assert info["guard_trips"] == 0 and resets == 0 and not any(trips.values())
    assert trace[-1][0] < 0.2 and trace[-1][1] > 0.9  # still collapsed at the end
    assert [step for _, _, step in trace] == list(range(len(trace)))


def test_guard_answers_small_batches_with_the_source_and_does_not_learn_from_them(tiny):
    from runtime.guard import GuardConfig

    xs = batches(3, size=2, seed=8)

    async def scenario(engine):
        await engine.set_policy("one", "tent", {"lr": "0.01"})
        results = [await engine.infer("one", x) for x in xs]
        return results, await engine.get_stream("one")

    results, info = run_engine(tiny, scenario, guard=GuardConfig(min_batch=16))
    source = adapters.create("source", tiny.module)
    for r, x in zip(results, xs):
        np.testing.assert_allclose(r.logits, source.predict(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)
    assert info["step"] == 0 and info["guard_fallbacks"] == 3 and info["batches"] == 3
    assert [r.guard for r in results] == ["small_batch"] * 3  # the reply says so (parameter tta_guard)


def test_running_replica_resumes_a_stream_another_replica_checkpointed(tiny, tmp_path):
    """Scale-in or failover with a shared state dir: replica B is already running when replica A
    checkpoints stream "moved" at shutdown; B's first request for it continues A's state
    exactly, instead of starting from the source model."""
    xs = batches(5, seed=8)
    want = reference_outputs(tiny, "tent", xs, lr="0.01")
    shared = str(tmp_path / "shared")

    async def scenario():
        a = Engine(tiny, state_dir=shared)
        b = Engine(tiny, state_dir=shared)  # started before A saved anything
        try:
            await a.set_policy("moved", "tent", {"lr": "0.01"})
            got = [(await a.infer("moved", x)).logits for x in xs[:3]]
            await a.drain_and_checkpoint()
            got += [(await b.infer("moved", x)).logits for x in xs[3:]]
            info = await b.get_stream("moved")
            restored = b.metrics.restores.labels("tiny", "disk")._value.get()
            return got, info, restored
        finally:
            a.close()
            b.close()

    got, info, restored = asyncio.run(scenario())
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert info["policy"] == "tent" and info["step"] == 5 and info["batches"] == 5 and restored == 1
