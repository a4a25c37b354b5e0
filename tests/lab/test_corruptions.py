"""The corruption suite: contract, determinism, growth with severity, and the cache."""
import numpy as np
import pytest
import torch

from runtime.demo.model import build_demo_model
from runtime.lab import corruptions as corr
from runtime.lab import datasets

# corruptions without random draws: the seed cannot matter
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}
# where the mean pixel change itself grows with every severity step (geometric ones move pixels
# by amounts that need not grow: CIFAR-10-C's elastic severity 1 has the largest affine jitter;
# frost's severities 3 and 4 differ by 0.05 in the image weight only, less than crop noise on 40 images)
MONOTONE_CHANGE = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "zoom_blur",
                   "snow", "fog", "brightness", "contrast", "jpeg_compression"]


@pytest.fixture(scope="module")
def slice_x():
    x, y = datasets.load_demo_slice()
    return x, y


def test_fifteen_corruptions_in_cifar10c_order():
    assert corr.CORRUPTIONS == ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                                "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                                "elastic_transform", "pixelate", "jpeg_compression"]


@pytest.mark.parametrize("name", corr.CORRUPTIONS)
def test_contract_and_determinism(slice_x, name):
    x = slice_x[0][:6]
    for severity in (1, 5):
        out = corr.corrupt(x, name, severity, seed=3)
        assert out.shape == x.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert np.array_equal(out, corr.corrupt(x, name, severity, seed=3))
        assert not np.array_equal(out, x)
        assert np.array_equal(np.round(out * 255) / 255, out)  # uint8 levels, like CIFAR-10-C
    if name not in DETERMINISTIC:
        assert not np.array_equal(corr.corrupt(x, name, 5, seed=3), corr.corrupt(x, name, 5, seed=4))


@pytest.mark.parametrize("name", MONOTONE_CHANGE)
def test_change_grows_with_severity(slice_x, name):
    x = slice_x[0][:40]
    change = [np.abs(corr.corrupt(x, name, s, seed=0) - x).mean() for s in corr.SEVERITIES]
    assert all(a < b for a, b in zip(change, change[1:])), change


# (not glass_blur: as in CIFAR-10-C its severities 1-3 are all one swap pass and about equally hard)
@pytest.mark.parametrize("name", ["gaussian_noise", "impulse_noise", "motion_blur", "frost", "fog", "contrast",
                                  "elastic_transform"])
def test_demo_model_error_rises_with_severity(slice_x, name):
    x, y = slice_x[0][::4], slice_x[1][::4]  # 500 class-balanced images
    model = build_demo_model()
    errors = []
    with torch.no_grad():
        for s in (1, 3, 5):
            pred = model(torch.from_numpy(corr.corrupt(x, name, s, seed=0))).argmax(1).numpy()
            errors.append((pred != y).mean())
    assert errors[0] < errors[1] < errors[2], errors


def test_bad_arguments_are_rejected(slice_x):
    x = slice_x[0][:2]
    with pytest.raises(ValueError, match="unknown corruption"):
        corr.corrupt(x, "rain", 1)
    with pytest.raises(ValueError, match="severity"):
        corr.corrupt(x, "fog", 6)
    with pytest.raises(ValueError, match="expected"):
        corr.corrupt(x[:, :1], "fog", 1)


def test_frost_textures_are_synthetic_and_fixed():
    a = corr.frost_texture(0)
    assert a.shape == (160, 160, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, corr.frost_texture.__wrapped__(0))  # rebuilt from scratch: same texture
    assert not np.array_equal(a, corr.frost_texture(1))


def test_corrupted_split_is_generated_once_then_read_from_the_cache(tmp_path, monkeypatch):
    from test_datasets import fake_dataset

    (tmp_path / "data").mkdir()
    fake_dataset(tmp_path / "data", n=30)
    first_x, first_y = corr.corrupted_split("shot_noise", 2, data_dir=tmp_path / "data", cache=tmp_path / "cache",
                                            show_progress=False)
    assert first_x.shape == (30, 3, 32, 32) and first_x.dtype == np.float32 and len(first_y) == 30
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("regenerated instead of reading the cache")

    monkeypatch.setattr(corr, "corrupt", fail)
    again_x, _ = corr.corrupted_split("shot_noise", 2, data_dir=tmp_path / "data", cache=tmp_path / "cache", n=10)
    assert np.array_equal(again_x, first_x[:10])
    raw, _ = corr.corrupted_split("shot_noise", 2, data_dir=tmp_path / "data", cache=tmp_path / "cache",
                                  as_uint8=True)
    assert raw.dtype == np.uint8 and np.array_equal(raw.astype(np.float32) / 255, first_x)
