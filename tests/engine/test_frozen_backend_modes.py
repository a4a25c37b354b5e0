"""Loading a model with the ONNX frozen path must not change the torch model: the export once left
the Normalize wrapper (and so the network) in training mode, and `auto`'s timing run then moved
the source BN statistics and changed the model's fingerprint."""
from __future__ import annotations

import pytest
import torch

from conftest import write_tiny_config
from runtime.model_config import load


@pytest.mark.parametrize("backend", ["onnx", "auto"])
def test_the_onnx_frozen_path_leaves_the_source_model_untouched(tmp_path, backend):
    config = write_tiny_config(tmp_path)
    plain = load(str(config), device="cpu")
    model = load(str(config), device="cpu", frozen_backend=backend)
    assert not model.module.training and not any(m.training for m in model.module.modules())
    bn = model.module.network[1]
    assert torch.equal(bn.running_mean, plain.module.network[1].running_mean)
    assert model.fingerprint == plain.fingerprint
