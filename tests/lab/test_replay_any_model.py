"""`tta replay --model CONFIG --dataset FILE|FOLDER`: the user's model and data, end to end on the tiny
model (tests/adapter_models.py, 16×16, 10 classes) and a few generated images: .npz uint8 and float32,
an image folder, recorded domains (--corruptions none), every mismatch refused with exit code 2 and
one line, the bounded and verified corruption cache, and the JSON output."""
import json

import cv2
import numpy as np
import pytest
import torch

from runtime import cli, model_config
from runtime.lab import corruption_cache, corruption_params, corruptions, replay_inputs, streams, userdata

torch.set_num_threads(1)
N = 40
DOMAINS = ["gaussian_noise", "contrast"]


def images(n=N, seed=0, size=16):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return base, (np.arange(n) * 7 + seed) % 10


@pytest.fixture()
def data(tmp_path):
    x, y = images()
    np.savez(tmp_path / "test.npz", x=x, y=y)
    return tmp_path / "test.npz", x, y


def replay(capsys, config, *args, cache=None, json_out=True):
    argv = ["replay", "--model", str(config), *args, "--no-progress", "--seed", "2"]
    argv += ["--cache-dir", str(cache)] if cache else []
    code = cli.main(argv + (["--json"] if json_out else []))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and json_out else out), err


def expect_error(capsys, config, *args, match, cache=None):
    code, _, err = replay(capsys, config, *args, cache=cache)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    return lines[0]


def direct_source_errors(config, x_nchw_uint8, y, domains, n, batch, recorded=False):
    """The benchmark written out by hand for the frozen model: corrupt, order, predict."""
    model = model_config.load(config, device="cpu").module
    errors = {}
    for d in domains:
        if recorded:
            x_d, y_d = x_nchw_uint8[d], y[d]
            order = np.arange(len(y_d))[:n]
        else:
            x_d, y_d = replay_inputs.corrupt_to_uint8(x_nchw_uint8, d, 5, seed=zlib_seed()), y
            order = streams.sample_order(y_d, seed=2, n=n)
        wrong = 0
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            with torch.no_grad():
                pred = model(torch.from_numpy(x_d[idx].astype(np.float32) / 255)).argmax(1).numpy()
            wrong += int((pred != y_d[idx]).sum())
        errors[d] = 100.0 * wrong / len(order)
    return errors


def zlib_seed():
    import zlib
    return zlib.crc32(b"0/0")  # chunk 0 of data seed 0 (fewer than 1000 images: one chunk)


# ----------------------------------------------------------------------------- end to end

def test_npz_uint8_numbers_equal_a_direct_loop_and_json_names_model_and_data(capsys, tiny_config, data, tmp_path):
    path, x, y = data
    code, out, err = replay(capsys, tiny_config, "--dataset", str(path), "--corruptions", ",".join(DOMAINS),
                            "--adapter", "source,bn", "--batch-size", "8", "--n-per-domain", "32",
                            cache=tmp_path / "cache")
    assert code == 0, err
    source, bn = out["results"]
    expected = direct_source_errors(tiny_config, x.transpose(0, 3, 1, 2), y, DOMAINS, 32, 8)
    assert source["errors"] == pytest.approx(expected, abs=1e-9) and source["samples"] == 64
    assert set(bn["errors"]) == set(DOMAINS)
    cfg = out["config"]
    assert cfg["model"]["name"] == "tiny" and cfg["model"]["input"] == [3, 16, 16] and cfg["model"]["classes"] == 10
    assert cfg["model"]["fingerprint"] == model_config.load(tiny_config, device="cpu").fingerprint
    (dataset,) = cfg["datasets"]
    assert dataset["name"] == "test" and dataset["samples"] == N and len(dataset["fingerprint"]) == 64
    assert dataset["fingerprint"] == userdata.fingerprint(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y)
    assert cfg["data"] == "user" and cfg["corruptions"] == DOMAINS and cfg["recorded"] is False
    assert cfg["cache"]["entries"] == 2 and "cache: 2 corrupted sets" in err


def test_float32_nchw_gives_the_same_numbers_as_uint8(capsys, tiny_config, data, tmp_path):
    path, x, y = data
    np.savez(tmp_path / "f.npz", x=x.transpose(0, 3, 1, 2).astype(np.float32) / 255, y=y)
    args = ("--corruptions", "shot_noise", "--adapter", "source,bn", "--batch-size", "10")
    _, a, _ = replay(capsys, tiny_config, "--dataset", str(path), *args, cache=tmp_path / "c")
    _, b, _ = replay(capsys, tiny_config, "--dataset", str(tmp_path / "f.npz"), *args, cache=tmp_path / "c")
    assert [r["errors"] for r in a["results"]] == [r["errors"] for r in b["results"]]
    assert b["config"]["datasets"][0]["dtype"] == "float32"


def test_image_folder_written_with_cv2_equals_the_npz(capsys, tiny_config, data, tmp_path):
    path, x, y = data
    root = tmp_path / "folder"
    for i, (img, label) in enumerate(zip(x, y)):
        (root / f"class_{label}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / f"class_{label}" / f"{i:04d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    args = ("--corruptions", "contrast", "--adapter", "source,bn", "--batch-size", "8")
    _, a, _ = replay(capsys, tiny_config, "--dataset", str(path), *args, cache=tmp_path / "c")
    code, b, err = replay(capsys, tiny_config, "--dataset", str(root), *args, cache=tmp_path / "c")
    assert code == 0, err
    assert [r["errors"] for r in a["results"]] == [r["errors"] for r in b["results"]]  # PNG is lossless
    assert b["config"]["datasets"][0]["name"] == "folder"


def test_folder_images_are_resized_and_converted_to_the_model_channels(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cv2.imwrite(str(tmp_path / "a" / "1.png"), np.full((24, 20), 200, np.uint8))  # gray, larger
    cv2.imwrite(str(tmp_path / "b" / "0.jpg"), np.zeros((8, 8, 3), np.uint8))  # colour, smaller
    d = userdata.load(tmp_path, userdata.Expect(3, 16, 16, 10), show_progress=False)
    assert d.x.shape == (2, 3, 16, 16) and d.x.dtype == np.uint8
    assert list(d.y) == [1, 0]  # by file name across classes: 0.jpg (class b = 1), then 1.png (class a = 0)
    gray = userdata.load(tmp_path, userdata.Expect(1, 16, 16, 2), show_progress=False)
    assert gray.x.shape == (2, 1, 16, 16) and int(gray.x[1].max()) == 200


def test_recorded_domains_play_in_their_order(capsys, tiny_config, tmp_path):
    (xa, ya), (xb, yb) = images(24, seed=1), images(16, seed=2)
    np.savez(tmp_path / "day.npz", x=xa, y=ya)
    np.savez(tmp_path / "night.npz", x=xb, y=yb)
    code, out, err = replay(capsys, tiny_config, "--dataset", str(tmp_path / "day.npz"), "--dataset",
                            str(tmp_path / "night.npz"), "--corruptions", "none", "--adapter", "source,bn",
                            "--batch-size", "8")
    assert code == 0, err
    source = out["results"][0]
    xs = {"day": xa.transpose(0, 3, 1, 2), "night": xb.transpose(0, 3, 1, 2)}
    expected = direct_source_errors(tiny_config, xs, {"day": ya, "night": yb}, ["day", "night"], None, 8, True)
    assert source["errors"] == pytest.approx(expected, abs=1e-9) and source["samples"] == 40
    assert [b["domain"] for b in source["by_block"]] == ["day", "night"]
    assert out["config"]["recorded"] is True and out["config"]["corruptions"] == ["day", "night"]
    assert out["config"]["cache"] is None and "cache:" not in err
    code, text, _ = replay(capsys, tiny_config, "--dataset", str(tmp_path / "day.npz"), "--dataset",
                           str(tmp_path / "night.npz"), "--corruptions", "none", "--adapter", "bn",
                           "--setting", "mixed", json_out=False)
    header = next(line for line in text.splitlines() if line.startswith("| adapter"))
    assert code == 0 and [c.strip() for c in header.split("|")[2:4]] == ["day", "night"]
    assert "severity none (recorded)" in text


def test_stream_keeps_recorded_order_and_sizes():
    y = {"a": np.array([3, 1, 2]), "b": np.array([0, 0])}
    x = {"a": np.arange(3)[:, None, None, None].astype(np.float32), "b": np.full((2, 1, 1, 1), 9, np.float32)}
    s = streams.Stream("continual", lambda d, sev: (x[d], y[d]), None, (), batch_size=2, recorded=y)
    batches = list(s)
    assert [list(b.x.ravel()) for b in batches] == [[0, 1], [2], [9, 9]]
    assert [list(b.domains) for b in batches] == [[0, 0], [0], [1, 1]] and batches[0].reset
    with pytest.raises(ValueError, match="gradual"):
        streams.Stream("gradual", None, None, (), recorded=y)


def test_guard_hp_and_eata_run_on_the_user_model(capsys, tiny_config, data, tmp_path):
    path, _, _ = data
    code, out, err = replay(capsys, tiny_config, "--dataset", str(path), "--corruptions", "fog", "--adapter",
                            "tent,eata", "--hp", "tent.lr=0.01", "--guard", "reset", "--batch-size", "10",
                            cache=tmp_path / "c")
    assert code == 0, err
    tent, eata = out["results"]
    assert tent["hyperparameters"]["lr"] == 0.01 and set(tent["guard"]) == {"verdicts", "actions", "pinned_batches",
                                                                            "batches", "source_forwards",
                                                                            "max_weight_distance"}
    assert 0 < tent["guard"]["source_forwards"] <= tent["guard"]["batches"]
    assert eata["samples"] == N


# ----------------------------------------------------------------------------- clear errors

BAD = [
    ("shape", lambda x, y: dict(x=np.zeros((4, 20, 20, 3), np.uint8), y=y[:4]), "resize the images to 16x16"),
    ("channels", lambda x, y: dict(x=np.zeros((4, 16, 16, 1), np.uint8), y=y[:4]), "1 channel(s)"),
    ("layout", lambda x, y: dict(x=np.zeros((4, 3, 16, 16), np.uint8), y=y[:4]), "transpose it"),
    ("rank", lambda x, y: dict(x=np.zeros((4, 16, 16), np.uint8), y=y[:4]), "has shape [4, 16, 16]"),
    ("dtype", lambda x, y: dict(x=np.zeros((4, 3, 16, 16), np.float64), y=y[:4]), "is float64"),
    ("range", lambda x, y: dict(x=np.full((4, 3, 16, 16), 2.0, np.float32), y=y[:4]), "must lie in [0, 1]"),
    ("labels", lambda x, y: dict(x=x[:4], y=np.array([0, 1, 2, 10])), "labels run 0..10"),
    ("negative", lambda x, y: dict(x=x[:4], y=np.array([0, -1, 2, 3])), "labels run -1..3"),
    ("float labels", lambda x, y: dict(x=x[:4], y=np.zeros(4)), "integer class labels"),
    ("count", lambda x, y: dict(x=x[:4], y=y[:3]), "4 images but 3 labels"),
    ("empty", lambda x, y: dict(x=np.zeros((0, 16, 16, 3), np.uint8), y=y[:0]), "empty"),
    ("pickle", lambda x, y: dict(x=np.array([{"a": 1}] * 4, dtype=object), y=y[:4]), "pickles are refused"),
    ("no y", lambda x, y: dict(x=x[:4]), "no array 'y'"),
]


@pytest.mark.parametrize("case, make, match", BAD, ids=[b[0] for b in BAD])
def test_a_mismatch_is_one_clear_line_and_exit_code_2(capsys, tiny_config, tmp_path, case, make, match):
    x, y = images(4)
    np.savez(tmp_path / "bad.npz", **make(x, y))
    expect_error(capsys, tiny_config, "--dataset", str(tmp_path / "bad.npz"), "--corruptions", "fog", match=match)


def test_bad_files_folders_and_flag_combinations_are_refused(capsys, tiny_config, data, tmp_path):
    path, _, _ = data
    (tmp_path / "notzip.npz").write_text("hello")
    expect_error(capsys, tiny_config, "--dataset", str(tmp_path / "notzip.npz"), match="not a readable .npz")
    expect_error(capsys, tiny_config, "--dataset", str(tmp_path / "missing.npz"), match="no such file or folder")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"x")
    expect_error(capsys, tiny_config, "--dataset", str(tmp_path / "flat"), match="no class sub-folders")
    (tmp_path / "broken" / "cat").mkdir(parents=True)
    (tmp_path / "broken" / "cat" / "a.png").write_bytes(b"not an image")
    expect_error(capsys, tiny_config, "--dataset", str(tmp_path / "broken"), match="cannot decode")
    for k in range(11):
        (tmp_path / "many" / f"c{k:02d}").mkdir(parents=True)
    expect_error(capsys, tiny_config, "--dataset", str(tmp_path / "many"), match="11 class sub-folders")
    (tmp_path / "nofiles" / "cat").mkdir(parents=True)
    expect_error(capsys, tiny_config, "--dataset", str(tmp_path / "nofiles"), match="empty")
    expect_error(capsys, tiny_config, match="--model needs --dataset")
    expect_error(capsys, tiny_config, "--dataset", str(path), "--data", "slice", match="drop them")
    expect_error(capsys, tiny_config, "--dataset", str(path), "--dataset", str(path), "--corruptions", "fog",
                 match="concatenate them")
    expect_error(capsys, tiny_config, "--dataset", str(path), "--corruptions", "none", "--setting", "gradual",
                 match="gradual")
    expect_error(capsys, tiny_config, "--dataset", str(path), "--corruptions", "none,fog", match="cannot be combined")
    expect_error(capsys, tmp_path / "nope.toml", "--dataset", str(path), match="does not exist")


def test_demo_stays_the_default_and_an_unusable_data_dir_is_an_error(capsys, tmp_path):
    assert cli.main(["replay", "--data-dir", str(tmp_path / "nothing"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not found in" in err and "\n" not in err
    assert cli.main(["replay", "--corruptions", "none", "--no-progress"]) == 2
    assert "give --dataset" in capsys.readouterr().err
    assert cli.main(["replay", "--data", "slice", "--adapter", "source", "--corruptions", "fog", "--n-per-domain",
                     "16", "--batch-size", "16", "--no-progress", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["model"]["name"] == "demo" and out["config"]["data"] == "slice"
    assert out["config"]["datasets"][0]["name"] == "fashion-mnist demo slice"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit: still what TorchScript configs hold
def test_a_frozen_graph_runs_source_only_with_the_servers_refusal(capsys, tmp_path, data):
    from adapter_models import tiny_cnn

    path, x, y = data
    torch.jit.trace(tiny_cnn(), torch.rand(2, 3, 16, 16)).save(str(tmp_path / "tiny.pt"))
    config = tmp_path / "frozen.toml"
    config.write_text('name = "frozen"\n[model]\ntorchscript = "tiny.pt"\n[input]\nsize = [16, 16]\nchannels = 3\n')
    line = expect_error(capsys, config, "--dataset", str(path), "--adapter", "source,bn", match="frozen graph")
    assert "it serves only the 'source' policy. To adapt, give the model config a [model] factory" in line
    code, out, err = replay(capsys, config, "--dataset", str(path), "--corruptions", "fog", cache=tmp_path / "c")
    assert code == 0, err
    assert [r["adapter"] for r in out["results"]] == ["source"]
    assert out["config"]["model"]["platform"] == "pytorch_libtorch"


# ----------------------------------------------------------------------------- the cache

def test_cache_is_reused_verified_and_bounded(capsys, tiny_config, data, tmp_path, monkeypatch):
    path, _, _ = data
    cache = tmp_path / "cache"
    args = ("--dataset", str(path), "--corruptions", "fog,contrast,pixelate", "--adapter", "source")
    code, first, err = replay(capsys, tiny_config, *args, cache=cache)
    files = sorted((cache / corruption_cache.FOLDER).glob("*.npy"))
    assert code == 0 and len(files) == 3 and "cache: 3 corrupted sets" in err
    for f in files:  # plain .npy, named by the SHA-256 of its bytes
        import hashlib
        assert f.name.split(".")[-2] == hashlib.sha256(f.read_bytes()).hexdigest()
        assert np.load(f, allow_pickle=False).shape == (N, 3, 16, 16)

    real = corruptions.corrupt
    monkeypatch.setattr(corruptions, "corrupt", lambda *a, **k: pytest.fail("regenerated instead of reusing"))
    code, again, _ = replay(capsys, tiny_config, *args, cache=cache)
    assert code == 0 and again["results"][0]["errors"] == first["results"][0]["errors"]

    monkeypatch.setattr(corruptions, "corrupt", real)  # a tampered entry is found out and regenerated
    target = next(f for f in files if "-fog-" in f.name)
    blob = bytearray(target.read_bytes())
    blob[-1] ^= 0xFF
    target.write_bytes(bytes(blob))
    code, third, err = replay(capsys, tiny_config, *args, cache=cache)
    assert code == 0 and "failed its check" in err and third["results"][0]["errors"] == first["results"][0]["errors"]

    entry_mb = files[0].stat().st_size / 2**20  # the bound: room for two entries, the oldest goes first
    code, out, err = replay(capsys, tiny_config, *args, "--cache-max-mb", f"{2.5 * entry_mb:.6f}", cache=cache)
    left = sorted(p.name for p in (cache / corruption_cache.FOLDER).glob("*.npy"))
    assert code == 0 and len(left) == 2 and out["config"]["cache"]["entries"] == 2
    assert out["config"]["cache"]["evicted"] >= 1 and "oldest removed" in err
    assert out["results"][0]["errors"] == first["results"][0]["errors"]


def test_cache_unit_eviction_order_and_oversized_entries(tmp_path):
    import os
    c = corruption_cache.CorruptionCache(tmp_path, max_mb=3 * 1200 / 2**20)  # three 1 128-byte .npy files
    for i, key in enumerate(["a", "b", "c"]):
        p = c.put(key, np.full((1000,), i, np.uint8))
        os.utime(p, (1000 + i, 1000 + i))
    assert c.get("a", (1000,)) is not None  # read: now the most recently used
    c.put("d", np.zeros(1000, np.uint8))
    assert c.get("b", (1000,)) is None and c.get("a", (1000,)) is not None  # b was the oldest
    assert c.put("big", np.zeros(10_000, np.uint8)) is None and c.summary()["not_written"] == 1
    assert c.get("a", (999,)) is None and c.summary()["rejected"] == 1  # wrong shape: dropped


# ----------------------------------------------------------------------------- corruptions at other sizes

def test_parameters_follow_cifar_then_imagenet_scaled_to_the_size():
    p = corruption_params.parameters
    assert p("motion_blur", 5, 32, 32) == (12, 3) and p("motion_blur", 5, 224, 224) == (20, 15)
    assert p("motion_blur", 5, 16, 16) == (6, 1.5) and p("motion_blur", 5, 112, 112) == (10, 7.5)
    assert p("gaussian_noise", 1, 64, 64) == (0.08,) and p("gaussian_noise", 1, 16, 16) == (0.04,)
    assert p("elastic_transform", 2, 32, 32) == pytest.approx((0.05 * 32, 0.2 * 32, 0.07 * 32))
    assert p("elastic_transform", 2, 224, 224) == pytest.approx((488, 244 * 0.08, 244 * 0.2))
    assert p("glass_blur", 1, 16, 16) == (0.025, 1, 1)  # integer lengths stay >= 1


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 3, 48, 40), (2, 1, 20, 20)])
def test_every_corruption_works_at_other_sizes_and_channels(shape):
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for name in corruptions.CORRUPTIONS:
        out = replay_inputs.corrupt_to_uint8(x, name, 5, seed=1)
        assert out.shape == x.shape and out.dtype == np.uint8, name
        assert np.array_equal(out, replay_inputs.corrupt_to_uint8(x, name, 5, seed=1)), name


def test_the_demo_cache_is_checksummed_too(tmp_path, capsys):
    from test_datasets import fake_dataset

    (tmp_path / "data").mkdir()
    fake_dataset(tmp_path / "data", n=12)
    kw = dict(data_dir=tmp_path / "data", cache=tmp_path / "cache", show_progress=False, as_uint8=True)
    first, _ = corruptions.corrupted_split("fog", 2, **kw)
    (path,) = (tmp_path / "cache").rglob("*.npz")
    assert path.name.startswith("fog-s2-seed0.") and len(path.name.split(".")[1]) == 64
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")  # tampered: found out, regenerated to the same pixels
    again, _ = corruptions.corrupted_split("fog", 2, **kw)
    assert np.array_equal(first, again) and "failed its check" in capsys.readouterr().err
