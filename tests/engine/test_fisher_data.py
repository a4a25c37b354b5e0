"""eata's source images come from the model config (`[model] fisher_data`), never from the wire."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import write_tiny_config
from runtime.engine import EngineError
from runtime.engine.policies import Policies
from runtime.model_config import ConfigError, load


def test_fisher_data_from_the_config_reaches_eata_and_only_eata(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)  # uint8 NHWC
    np.savez(tmp_path / "fisher.npz", x=x)
    model = load(str(write_tiny_config(tmp_path, extra_model='fisher_data = "fisher.npz"')))
    assert list(model.fisher_data.shape) == [12, 3, 16, 16]
    assert float(model.fisher_data.max()) <= 1.0
    np.testing.assert_allclose(model.fisher_data[3, 1].numpy(), x[3, :, :, 1] / 255.0, rtol=1e-6)
    policies = Policies(model)
    eata = policies.build("eata", {})
    assert eata.fishers is not None and eata.fishers  # EATA, with the Fisher term
    assert policies.build("eata", {"fisher_alpha": "0"}) is not None
    with pytest.raises(EngineError) as wire:
        policies.build("eata", {"fisher_data": "x"})
    assert wire.value.code == "INVALID_ARGUMENT" and "cannot be set over the wire" in wire.value.message
    described, _ = policies.describe()
    eata_hp = next(d for d in described if d["name"] == "eata")["hyperparameters"]
    assert "fisher_data" not in {h["name"] for h in eata_hp}


def test_without_fisher_data_eata_is_eta(tmp_path):
    model = load(str(write_tiny_config(tmp_path)))
    assert model.fisher_data is None and Policies(model).build("eata", {}).fishers is None


@pytest.mark.parametrize("array, why", [
    (np.zeros((4, 8, 8, 3), np.uint8), "must be uint8 [N, 16, 16, 3]"),
    (np.zeros((4, 3, 16, 16), np.float64), "must be uint8"),
    (np.zeros((0, 3, 16, 16), np.float32), "1 to"),
])
def test_bad_fisher_data_is_refused_at_load(tmp_path, array, why):
    np.savez(tmp_path / "fisher.npz", x=array)
    with pytest.raises(ConfigError) as e:
        load(str(write_tiny_config(tmp_path, extra_model='fisher_data = "fisher.npz"')))
    assert why in str(e.value)


def test_a_pickled_fisher_file_is_refused(tmp_path):
    np.savez(tmp_path / "fisher.npz", x=np.array([[[[object()]]]], dtype=object))  # an object array: pickled
    with pytest.raises(ConfigError) as e:
        load(str(write_tiny_config(tmp_path, extra_model='fisher_data = "fisher.npz"')))
    assert "fisher_data" in str(e.value)
