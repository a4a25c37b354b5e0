"""examples/cifar10: the factory builds the CIFAR ResNet-20 the shared weights were trained as
(its accuracy on the shared JPEG CIFAR-10 test set is the published 88 %). Runs only where
../shared/data (or $TTA_CIFAR10_DIR) holds the files; nothing else depends on them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from runtime.model_config import load

DATA = Path(os.environ.get("TTA_CIFAR10_DIR", REPO.parent / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "cifar10_test.npz").is_file()
                                or not (DATA / "resnet20_jpegcifar_ft3.npz").is_file(),
                                reason=f"CIFAR-10 files not in {DATA} (examples/cifar10/README.md)")


@needs_data
def test_the_example_model_scores_what_its_weights_were_published_with():
    model = load(str(REPO / "examples" / "cifar10" / "model.toml"))
    assert model.name == "cifar10-resnet20" and model.num_classes == 10 and model.labels[0] == "airplane"
    with np.load(DATA / "cifar10_test.npz", allow_pickle=False) as d:
        pick = np.random.default_rng(0).permutation(len(d["y"]))[:1000]
        x, y = d["x"][pick], d["y"][pick]
    with torch.no_grad():
        predicted = model.module(torch.from_numpy(x.astype(np.float32) / 255).permute(0, 3, 1, 2)).argmax(1)
    accuracy = float((predicted.numpy() == y).mean())
    assert 0.85 <= accuracy <= 0.92, accuracy  # 88.1 % on the full test set


def test_the_binary_converter_writes_what_replay_reads(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 5).astype(np.uint8)
    pixels = rng.integers(0, 256, (5, 3, 32, 32)).astype(np.uint8)  # channel-major, as the binary version
    records = np.concatenate([labels[:, None], pixels.reshape(5, -1)], axis=1)
    records.tofile(tmp_path / "test_batch.bin")
    script = REPO / "examples" / "cifar10" / "from_binary.py"
    subprocess.run([sys.executable, str(script), str(tmp_path / "test_batch.bin"), str(tmp_path / "t.npz")],
                   check=True, capture_output=True)
    with np.load(tmp_path / "t.npz", allow_pickle=False) as d:
        assert d["x"].shape == (5, 32, 32, 3) and d["x"].dtype == np.uint8
        np.testing.assert_array_equal(d["y"], labels)
        np.testing.assert_array_equal(d["x"][2, 4, 7], pixels[2, :, 4, 7])  # NHWC from channel-major
    (tmp_path / "bad.bin").write_bytes(b"\0" * 10)
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "bad.bin"), str(tmp_path / "b.npz")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "not a whole number" in bad.stderr
