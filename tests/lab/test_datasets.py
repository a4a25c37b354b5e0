"""Fashion-MNIST loading, the model-input transform and the shipped demo assets."""
import gzip
import struct

import numpy as np
import pytest
import torch
from torch import nn

from runtime.demo.model import DEMO_ASSETS, build_demo_model, load_prototypes
from runtime.lab import datasets


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def fake_dataset(folder, n: int = 20, compress: bool = True):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = np.arange(n) % 10
    for img, lab in datasets._FILES.values():
        write_idx(folder / img, x, compress)
        write_idx(folder / lab, y, compress)
    return x, y


@pytest.mark.parametrize("compress", [False, True])
def test_idx_files_plain_and_gzipped(tmp_path, compress):
    x, y = fake_dataset(tmp_path, compress=compress)
    got_x, got_y = datasets.load_split("test", tmp_path)
    assert np.array_equal(got_x, x) and np.array_equal(got_y, y)
    assert got_x.dtype == np.uint8 and got_y.dtype == np.int64


def test_env_variable_and_flag_choose_the_folder(tmp_path, monkeypatch):
    fake_dataset(tmp_path)
    monkeypatch.setenv(datasets.ENV_DIR, str(tmp_path))
    assert datasets.data_dir() == tmp_path
    assert datasets.data_dir("/elsewhere") == datasets.Path("/elsewhere")  # the flag wins
    assert len(datasets.load_split("train")[0]) == 20


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(datasets.DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        datasets.load_split("test", tmp_path)


def test_to_model_input_pads_and_replicates():
    img = np.full((2, 28, 28), 255, np.uint8)
    img[1] = 51
    out = datasets.to_model_input(img)
    assert out.shape == (2, 3, 32, 32) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.all(out[:, :, :2] == 0) and np.all(out[:, :, :, 30:] == 0)  # 2 px zero border
    assert np.array_equal(out[:, 0], out[:, 2])  # grey in three channels
    assert np.allclose(out[1, :, 2:30, 2:30], 0.2)


def test_demo_slice_is_class_balanced_model_input():
    x, y = datasets.load_demo_slice()
    assert x.shape == (2000, 3, 32, 32) and x.dtype == np.float32 and y.dtype == np.int64
    assert 0 <= x.min() and x.max() <= 1
    assert np.bincount(y, minlength=10).tolist() == [200] * 10
    assert len(datasets.FASHION_LABELS) == 10


def test_demo_model_is_a_small_bn_resnet_with_shipped_weights():
    model = build_demo_model()
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) <= 2_000_000
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 19  # ResNet-20
    assert isinstance(list(model.modules())[-1], nn.Linear)
    assert (DEMO_ASSETS / "demo_resnet.pt").stat().st_size <= 5 * 2 ** 20
    protos = load_prototypes()
    assert protos.shape == (10, 64) and protos.dtype == torch.float32


def test_demo_model_is_accurate_on_the_clean_slice():
    x, y = datasets.load_demo_slice()
    model = build_demo_model()
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(x[i:i + 500])).argmax(1) for i in range(0, 2000, 500)])
    assert (pred.numpy() == y).mean() >= 0.90


def test_demo_slice_comes_from_the_real_test_split():
    """Needs the full dataset: CI installs it with `apt-get install dataset-fashion-mnist`."""
    try:
        x_test, y_test = datasets.load_split("test")
    except datasets.DatasetMissing as e:
        pytest.fail(f"this test needs the full Fashion-MNIST test split: {e}")
    assert x_test.shape == (10000, 28, 28) and np.bincount(y_test).tolist() == [1000] * 10
    with np.load(datasets.DEMO_SLICE) as data:
        idx = data["test_index"]
        assert np.array_equal(data["x"], x_test[idx]) and np.array_equal(data["y"], y_test[idx])

