"""State files you can trust: no pickle (safetensors + a strictly validated JSON skeleton), bit
for bit round trips, an HMAC under --state-key-file, files bound to their stream and model, the
old pickle format refused unread, and client messages without server paths."""
from __future__ import annotations

import collections
import hashlib
import io
import math
import os
import struct
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import safetensors.torch
import torch

import adapters
from conftest import REPO, ServerProcess, run_engine, write_tiny_config
from runtime.checkpoints import (
    HEADER_BYTES,
    KEY_ID_BYTES,
    LEGACY_MAGIC,
    MAGIC,
    PLAIN,
    CorruptCheckpoint,
    StateStore,
    decode,
    encode,
)
from runtime.engine import EngineError
from runtime.model_config import load

torch.set_num_threads(1)
K1, K2 = b"k1-" + b"a" * 29, b"k2-" + b"b" * 29


def batch(i: int, size: int = 4) -> np.ndarray:
    return np.random.default_rng([11, i]).random((size, 3, 16, 16), dtype=np.float32)


def rejected(engine, reason: str) -> float:
    return engine.metrics.state_files_rejected.labels("tiny", reason)._value.get()


def same(a, b, where: str = "record") -> None:
    """a and b are equal in type and value everywhere: tensors bit for bit (dtype, shape, bytes),
    floats by their bits (NaN, -0.0), int vs bool vs float, tuple vs list, key types, OrderedDict
    and its _metadata."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} became {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.contiguous().reshape(-1).view(torch.uint8).tolist() == b.reshape(-1).view(torch.uint8).tolist(), where
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{where}: {a!r} became {b!r}"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b) and [type(k) for k in a] == [type(k) for k in b], f"{where}: keys differ"
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
        assert hasattr(a, "_metadata") == hasattr(b, "_metadata"), f"{where}: _metadata"
        if hasattr(a, "_metadata"):
            same(a._metadata, b._metadata, f"{where}._metadata")
    else:
        assert a == b, f"{where}: {a!r} became {b!r}"


def round_trip(record, key=None, fingerprint="fp"):
    return decode(encode(record, "s", key, fingerprint), "s", key, fingerprint)


def plain_file(metadata: dict[str, str], tensors: dict | None = None) -> bytes:
    """A keyless state file with any metadata (what someone who can write the state dir can make)."""
    body = safetensors.torch.save(tensors or {}, metadata=metadata)
    kid = bytes(KEY_ID_BYTES)
    return MAGIC + PLAIN + kid + hashlib.sha256(MAGIC + PLAIN + kid + body).digest() + body


def skeleton_file(skeleton: str, tensors: dict | None = None) -> bytes:
    return plain_file({"format": "tta-state-2", "stream_id": "s", "model": "fp", "record": skeleton}, tensors)


# --- the format: data only, exactly what was saved ------------------------------------------
CASES = [("source", {}), ("bn", {}), ("bn-alpha", {}), ("bn-ema", {}), ("unmix-tns", {}), ("tent", {"lr": 0.01}),
         ("mean-teacher", {}), ("cotta", {"lr": 0.01, "n_augmentations": 4}),
         ("cotta", {"lr": 0.01, "n_augmentations": 4, "norm": "unmix-tns"}), ("lame", {}),
         ("sar", {"margin_e0": 1.0}), ("eata", {"margin_e0": 1.0}), ("rotta", {"update_frequency": 4}),
         ("deyo", {"margin": 1.0, "plpd": -1.0})]


@pytest.mark.parametrize("name,hp", CASES, ids=[f"{n}{'+' + h['norm'] if 'norm' in h else ''}" for n, h in CASES])
def test_every_adapter_resumes_bit_for_bit_after_a_round_trip(tiny, name, hp):
    """Optimizer state (int keys, tuples of betas, param lists), generator states (uint8
    tensors), BN buffers: the decoded state dict is the saved one in every type and bit, and an
    adapter loaded from it continues exactly as the original does (random augmentations included)."""
    assert set(adapters.available()) <= {n for n, _ in CASES}, "a new adapter needs a case here"
    if any(h["name"] == "seed" for h in adapters.describe(name)["hyperparameters"]):
        hp = {**hp, "seed": 3}
    original = adapters.create(name, tiny.module, **hp)
    for i in range(3):
        original.step(torch.from_numpy(batch(i)))
    state = original.state_dict()
    record = {"stream_id": "s", "policy": name, "hyperparameters": {k: str(v) for k, v in hp.items()},
              "adapter": state, "step": original.steps,
              "counters": {"batches": 3, "bn_shift": float("nan"), "last_loss": float("inf"),
                           "entropy": -0.0, "weight_distance": 1e-310, "feedback_labels": 0}}
    back = round_trip(record, key=K1)
    same(record, back)
    resumed = adapters.create(name, tiny.module, **hp)
    resumed.load_state_dict(back["adapter"])
    for i in range(3, 6):
        x = torch.from_numpy(batch(i))
        assert torch.equal(resumed.step(x), original.step(x)), f"{name}: batch {i} differs after the round trip"


def test_every_supported_value_comes_back_with_its_type(tiny):
    od = collections.OrderedDict([("w", torch.arange(6, dtype=torch.float64).reshape(2, 3).t()), ("n", 1)])
    od._metadata = {"": {"version": 2}, "bn": {"version": 2}}
    record = {
        "none": None, "true": True, "one": 1, "one.0": 1.0, "big": 2**70, "neg": -5, "str": "ünï\u2028\0",
        "floats": [float("nan"), float("-inf"), float("inf"), -0.0, 5e-324, 1.7976931348623157e308],
        "tuple": (0.9, 0.999), "list": [0, 1], "nested": ((), [], {}, [()]),
        "int keys": {0: {"step": torch.tensor(3.0)}, 1: "x", "0": "str zero"},
        "odict": od,
        "tensors": [torch.zeros(0), torch.tensor(7), torch.tensor([True, False]), torch.ones(2, dtype=torch.bfloat16),
                    torch.tensor([float("nan"), -0.0]), torch.randint(0, 255, (5,), dtype=torch.uint8),
                    torch.Generator().manual_seed(5).get_state()],
        "numpy": np.float64(0.5),
    }
    w = torch.arange(12.0).reshape(3, 4)
    record["views"] = [w, w, w[1], w.t(), w.expand(2, 3, 4)]  # shared memory, views: saved as copies
    back = round_trip(record)
    assert back.pop("numpy") == 0.5 and type(back["odict"]) is collections.OrderedDict
    record.pop("numpy")
    same(record, back)


def test_a_record_that_is_not_plain_data_is_not_written(tmp_path):
    store = StateStore(tmp_path)
    for bad in ({"x": object()}, {"x": {1.5: "float key"}}, {"x": torch.zeros(2, dtype=torch.complex64)},
                {"x": {"set"}}, {"x": torch.nn.Linear(1, 1)}):
        with pytest.raises(TypeError):
            store.save_stream("s", bad)
    assert not store.stream_path("s").exists()


@pytest.mark.parametrize("skeleton,tensors", [
    ('{"dict":[["x",{"pickle":"gASV"}]]}', None),  # unknown node
    ('{"dict":[["x",{"tensor":"t0"}],["y",{"tensor":"t0"}]]}', {"t0": torch.ones(1)}),  # one tensor used twice
    ('{"dict":[["x",{"tensor":"t9"}]]}', {"t0": torch.ones(1)}),  # a missing tensor
    ('{"dict":[]}', {"t0": torch.ones(1)}),  # a tensor nothing refers to
    ('{"dict":[["x",NaN]]}', None),  # JSON has no NaN: non-finite floats are tagged
    ('{"dict":[["x",{"float":"1e999"}]]}', None),
    ('{"dict":[["x",1],["x",2]]}', None),  # duplicate key
    ('{"dict":[[true,1]]}', None),  # bool key
    ('{"dict":[[1.5,1]]}', None),  # float key
    ('{"dict":[["x",{"list":[1],"tuple":[2]}]]}', None),  # two tags in one node
    ('{"list":[]}', None),  # the record is not a dict
    ('{"dict":[["x",' + '{"list":[' * 100 + ']}' * 100 + ']]}', None),  # too deep
    ('{"dict":[["x",' + '[' * 100000 + ']' * 100000 + ']]}', None),  # far too deep for the JSON parser
    ('{"dict":[["x",{"dict":{"a":1}}]]}', None),  # a dict that is not a list of pairs
    ('{"dict":[["x",[1]]]}', None),  # a bare JSON array
    ('not json', None),
])
def test_a_malformed_skeleton_is_refused(skeleton, tensors):
    with pytest.raises(CorruptCheckpoint) as e:
        decode(skeleton_file(skeleton, tensors), "s", None, "fp", "streams/s.pt")
    assert e.value.reason == "format" and str(e.value).startswith("streams/s.pt: ")


def test_malformed_containers_are_refused():
    good = skeleton_file('{"dict":[]}')
    assert decode(good, "s", None, "fp") == {}
    for data in (plain_file({"format": "tta-state-2", "stream_id": "s", "model": "fp"}),  # no record
                 plain_file({"format": "tta-state-3", "stream_id": "s", "model": "fp", "record": '{"dict":[]}'}),
                 MAGIC + PLAIN + bytes(KEY_ID_BYTES) + hashlib.sha256(MAGIC + PLAIN + bytes(KEY_ID_BYTES)).digest(),
                 b"PK\x03\x04 a zip file, say a torch.save archive", b"TTA-CKPT-9\n" + bytes(64)):
        with pytest.raises(CorruptCheckpoint) as e:
            decode(data, "s", None, "fp")
        assert e.value.reason == "format", e.value
    with pytest.raises(CorruptCheckpoint) as e:
        decode(good[:HEADER_BYTES - 1], "s", None, "fp")
    assert e.value.reason == "checksum"


# --- (a) a crafted pickle in the old format never runs --------------------------------------
class Payload:
    """Unpickling this creates the marker file: what a crafted pickle with a shell command would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def legacy_file(obj) -> bytes:
    """The old format, checksum and all: MAGIC-1 + SHA-256(payload) + a torch pickle."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    return LEGACY_MAGIC + hashlib.sha256(payload).digest() + payload


def test_a_crafted_old_format_pickle_is_never_unpickled(tiny, tmp_path, caplog):
    """As a checkpoint (latest and previous) it makes the stream DATA_LOSS at start; as a
    snapshot, Rollback answers DATA_LOSS; the payload never runs; the log says what to do."""
    state, marker = tmp_path / "state", tmp_path / "pwned"

    async def first(engine):
        await engine.set_policy("victim", "tent", {"lr": "0.01"})
        await engine.infer("victim", batch(0))
        await engine.snapshot("victim", "good")
        return await engine.drain_and_checkpoint()

    assert run_engine(tiny, first, state_dir=str(state)) == (1, [])
    store = StateStore(state, model_fingerprint=tiny.fingerprint)
    evil = legacy_file({"stream_id": "evil", "policy": Payload(marker), "hyperparameters": {}, "adapter": None})
    store.stream_path("evil").write_bytes(evil)
    store.stream_path("evil").with_name("evil.pt.prev").write_bytes(evil)
    store.snapshot_path("victim", "good").write_bytes(evil)

    async def second(engine):
        with pytest.raises(EngineError) as infer_error:
            await engine.infer("evil", batch(1))
        with pytest.raises(EngineError) as rollback_error:
            await engine.rollback("victim", "good")
        victim = await engine.infer("victim", batch(1))  # still serving, from its checkpoint
        return infer_error.value, rollback_error.value, victim.step, rejected(engine, "legacy")

    caplog.set_level("ERROR", logger="tta.checkpoints")
    infer_error, rollback_error, victim_step, legacy = run_engine(tiny, second, state_dir=str(state))
    assert not marker.exists(), "the crafted pickle ran"
    assert infer_error.code == "DATA_LOSS" and "older tta-runtime" in infer_error.message
    assert rollback_error.code == "DATA_LOSS" and "older tta-runtime" in rollback_error.message
    assert victim_step == 1  # its checkpoint's step: the snapshot was never applied
    assert legacy == 3  # the latest, the previous, the snapshot
    assert "never loaded" in caplog.text and "delete" in caplog.text and str(state) in caplog.text
    for message in (infer_error.message, rollback_error.message):  # clients hear no server path
        assert str(tmp_path) not in message
    assert "streams/evil.pt" in infer_error.message and "snapshots/victim/good.pt" in rollback_error.message


# --- (b) a file of another stream -----------------------------------------------------------
def test_a_checkpoint_or_snapshot_copied_from_another_stream_is_refused(tiny, tmp_path):
    async def first(engine):
        for stream in ("a", "b", "c"):
            await engine.set_policy(stream, "tent", {"lr": "0.01"})
            await engine.snapshot(stream, "s1")
        for i in range(3):
            await engine.infer("a", batch(i))
        await engine.snapshot("a", "s1")
        return await engine.drain_and_checkpoint()

    assert run_engine(tiny, first, state_dir=str(tmp_path)) == (3, [])
    store = StateStore(tmp_path, model_fingerprint=tiny.fingerprint)
    store.stream_path("b").write_bytes(store.stream_path("a").read_bytes())  # A's checkpoint as B's
    store.snapshot_path("c", "s1").write_bytes(store.snapshot_path("a", "s1").read_bytes())  # A's snapshot as C's
    with pytest.raises(CorruptCheckpoint) as e:
        StateStore(tmp_path, model_fingerprint=tiny.fingerprint).load_snapshot("c", "s1")
    assert e.value.reason == "other_stream" and "another stream ('a')" in str(e.value)

    async def second(engine):
        with pytest.raises(EngineError) as infer_error:
            await engine.infer("b", batch(9))
        with pytest.raises(EngineError) as rollback_error:
            await engine.rollback("c", "s1")
        a = await engine.rollback("a", "s1")  # a's own snapshot is fine
        return infer_error.value, rollback_error.value, a["step"], rejected(engine, "other_stream")

    infer_error, rollback_error, a_step, other = run_engine(tiny, second, state_dir=str(tmp_path))
    assert infer_error.code == "DATA_LOSS" and "another stream" in infer_error.message
    assert rollback_error.code == "DATA_LOSS" and "another stream" in rollback_error.message
    assert a_step == 3 and other == 2  # b's checkpoint (it had no previous one) and c's snapshot


# --- (c), (d) keys ----------------------------------------------------------------------------
def test_a_tampered_file_with_a_recomputed_checksum_is_refused_under_a_key(tmp_path):
    store = StateStore(tmp_path, key=K1)
    store.save_stream("s", {"step": 1, "w": torch.ones(8)})
    path = store.stream_path("s")
    data = path.read_bytes()
    assert data.startswith(MAGIC + b"K")
    body = bytearray(data[HEADER_BYTES:])
    body[-3] ^= 0x01  # one payload byte of the tensor
    signed_part = data[:len(MAGIC) + 1 + KEY_ID_BYTES]
    forged = [
        signed_part + hashlib.sha256(signed_part + body).digest() + body,  # SHA-256 where the HMAC goes
        (MAGIC + PLAIN + bytes(KEY_ID_BYTES) + hashlib.sha256(MAGIC + PLAIN + bytes(KEY_ID_BYTES) + body).digest()
         + body),  # claims to be an unsigned file
        legacy_file({"step": 1}),  # the old format, with its checksum
    ]
    for data, reason in zip(forged, ("signature", "signature", "legacy")):
        path.write_bytes(data)
        with pytest.raises(CorruptCheckpoint) as e:
            StateStore(tmp_path, key=K1).load_stream("s")  # no previous checkpoint to fall back to
        assert e.value.reason == reason, e.value
    # what a keyless server cannot tell: a forged file with a valid SHA-256 (so: trust the dir, or use a key)
    plain = StateStore(tmp_path / "plain")
    plain.save_stream("s", {"step": 1})
    data = plain.stream_path("s").read_bytes()
    body = data[HEADER_BYTES:].replace(b'step\\",1', b'step\\",7')  # the skeleton is JSON in JSON metadata
    head = data[:len(MAGIC) + 1 + KEY_ID_BYTES]
    plain.stream_path("s").write_bytes(head + hashlib.sha256(head + body).digest() + body)
    assert plain.load_stream("s") == {"step": 7}


def test_a_file_signed_with_one_key_is_refused_under_another_and_under_none(tmp_path):
    signed = StateStore(tmp_path, key=K1)
    signed.save_stream("s", {"step": 1})
    signed.save_snapshot("s", "x", {"step": 1})
    assert signed.load_stream("s") == {"step": 1}
    for key, says in ((K2, "signed with another state key"), (None, "this server has no --state-key-file")):
        with pytest.raises(CorruptCheckpoint) as e:
            StateStore(tmp_path, key=key).load_snapshot("s", "x")
        assert e.value.reason == "signature" and says in str(e.value)
    StateStore(tmp_path / "u").save_stream("s", {"step": 1})
    with pytest.raises(CorruptCheckpoint) as e:
        StateStore(tmp_path / "u", key=K1).load_stream("s")
    assert e.value.reason == "signature" and "written without a state key" in str(e.value)
    with pytest.raises(ValueError):
        StateStore(tmp_path, key=b"short")


def test_a_latest_checkpoint_that_does_not_verify_falls_back_to_the_previous_one(tmp_path):
    store = StateStore(tmp_path, key=K1)
    store.save_stream("s", {"step": 1})
    store.save_stream("s", {"step": 2})
    StateStore(tmp_path / "other", key=K2).save_stream("s", {"step": 99})
    store.stream_path("s").write_bytes(StateStore(tmp_path / "other", key=K2).stream_path("s").read_bytes())
    foreign = store.stream_path("s").read_bytes()
    seen = []
    assert StateStore(tmp_path, key=K1, on_reject=seen.append).load_stream("s") == {"step": 1}
    assert seen == ["signature"]
    # intact but signed with another key: left in place (a replica with the wrong key must not push
    # the others back to their previous checkpoints); only damaged files are set aside
    assert store.stream_path("s").read_bytes() == foreign
    assert not list(store.stream_path("s").parent.glob("s.pt.corrupt-*"))


# --- (e) a file of another model ---------------------------------------------------------------
def test_a_checkpoint_of_another_model_is_refused(tiny, tiny_config, tmp_path):
    """Same name, same architecture, other weights (factory seed): another fingerprint."""
    other = load(write_tiny_config(tmp_path / "other", extra_model="factory_args = { seed = 1 }"), device="cpu")
    assert other.fingerprint != tiny.fingerprint and other.name == tiny.name
    assert load(tiny_config, device="cpu").fingerprint == tiny.fingerprint  # stable across loads
    assert len(tiny.fingerprint) == 64

    async def first(engine):
        await engine.set_policy("m", "tent", {})
        await engine.infer("m", batch(0))
        return await engine.drain_and_checkpoint()

    assert run_engine(tiny, first, state_dir=str(tmp_path / "state")) == (1, [])

    async def second(engine):
        with pytest.raises(EngineError) as e:
            await engine.infer("m", batch(1))
        return e.value, rejected(engine, "other_model")

    error, count = run_engine(other, second, state_dir=str(tmp_path / "state"))
    assert error.code == "DATA_LOSS" and "another model" in error.message and count == 1  # no previous one
    assert str(tmp_path) not in error.message


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit: still a supported model format here
def test_a_frozen_model_is_fingerprinted_by_its_graph_file(tmp_path, tiny):
    scripted = torch.jit.script(tiny.module.cpu())
    scripted.save(str(tmp_path / "model.pt"))
    config = tmp_path / "frozen.toml"
    config.write_text('name = "f"\n[model]\ntorchscript = "model.pt"\n[input]\nsize = [16, 16]\n')
    frozen = load(config, device="cpu")
    assert frozen.module is None and frozen.fingerprint == hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest()


# --- the flag, end to end -----------------------------------------------------------------------
def _metric(srv, name: str, reason: str) -> float:
    text = urllib.request.urlopen(f"http://{srv.host}:{srv.metrics_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{reason={reason!r}}} not exposed")


def test_state_key_file_signs_state_and_a_server_without_it_refuses_it(tmp_path, tiny_config):
    import grpc
    import tritonclient.grpc as tc

    from runtime import protos

    pb, pb_grpc = protos.load("tta.v1.adaptation_pb2"), protos.load("tta.v1.adaptation_pb2_grpc")
    state, key_file = tmp_path / "state", tmp_path / "state.key"
    key_file.write_text(K1.hex() + "\n")

    def infer(srv, x):
        client = tc.InferenceServerClient(srv.target)
        try:
            inp = tc.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            return client.infer("tiny", [inp], parameters={"stream_id": "cam"}).as_numpy("logits")
        finally:
            client.close()

    args = ("--model", str(tiny_config), "--state-dir", str(state))
    first = ServerProcess(*args, "--state-key-file", str(key_file))
    try:
        with grpc.insecure_channel(first.target) as channel:
            pb_grpc.AdaptationServiceStub(channel).SetPolicy(pb.SetPolicyRequest(stream_id="cam", policy="tent"))
        infer(first, batch(0))
        infer(first, batch(1))
    finally:
        assert first.stop() == 0
    assert "signed and verified with the state key (key id" in first.stderr()
    assert (state / "streams" / "cam.pt").read_bytes().startswith(MAGIC + b"K")

    second = ServerProcess(*args, "--state-key-file", str(key_file))
    try:
        infer(second, batch(2))
        with grpc.insecure_channel(second.target) as channel:
            info = pb_grpc.AdaptationServiceStub(channel).GetStream(pb.StreamRequest(stream_id="cam"))
        assert info.step == 3 and _metric(second, "tta_state_files_rejected_total", "signature") == 0
    finally:
        assert second.stop() == 0

    third = ServerProcess(*args)  # no key: the signed files are refused, the stream tells DATA_LOSS
    try:
        with pytest.raises(Exception) as e:
            infer(third, batch(3))
        assert "DATA_LOSS" in str(e.value) or "damaged" in str(e.value), e.value
        assert "no --state-key-file" in str(e.value) and str(tmp_path) not in str(e.value)
        assert _metric(third, "tta_state_files_rejected_total", "signature") == 2  # latest and previous
    finally:
        third.stop()
    assert "this server has no --state-key-file" in third.stderr()


@pytest.mark.parametrize("how", ["short file", "empty file", "short env", "missing file"])
def test_a_bad_state_key_stops_the_server_with_exit_code_2(tmp_path, tiny_config, how):
    key_file = tmp_path / "key"
    key_file.write_text({"short file": "only15bytes-abc", "empty file": " \n"}.get(how, ""))
    args = ["--state-key-file", str(key_file if how != "missing file" else tmp_path / "nope")]
    env = {**os.environ, "TTA_STATE_KEY": "short"} if how == "short env" else dict(os.environ)
    if how == "short env":
        args = []
    proc = subprocess.run([sys.executable, "-m", "runtime.server", "--model", str(tiny_config), "--port", "0",
                           "--metrics-port", "-1", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "state key" in proc.stderr and ("at least 16" in proc.stderr or "No such file" in proc.stderr)


def test_decode_never_touches_pickle(monkeypatch):
    """Belt and braces: reading a file with pickle and torch.load disabled still works."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was called")

    data = encode({"t": torch.ones(2), "g": torch.Generator().get_state(), "x": [1, (2.0, math.nan)]}, "s")
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    back = decode(data, "s")
    assert torch.equal(back["t"], torch.ones(2)) and math.isnan(back["x"][1][1])
