"""A model config whose factory gets no weights is refused at load (issue 17, part 3), unless it
says so: `random_weights = true` (untrained on purpose) or `factory_weights = true` (the factory
returns the trained network itself)."""
from __future__ import annotations

import pytest

from conftest import TINY_FACTORY
from runtime.model_config import ConfigError, load

BASE = f'name = "w"\n[model]\nfactory = "{TINY_FACTORY}:tiny_cnn"\n{{extra}}\n[input]\nsize = [16, 16]\n'


def config(tmp_path, extra: str = ""):
    path = tmp_path / "model.toml"
    path.write_text(BASE.format(extra=extra))
    return path


def test_a_factory_without_weights_is_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(config(tmp_path), device="cpu")
    message = str(e.value)
    assert "has no weights" in message and "random_weights = true" in message and "factory_weights = true" in message
    assert 'weights = "model.pt"' in message


@pytest.mark.parametrize("key", ["random_weights", "factory_weights"])
def test_saying_so_explicitly_loads(tmp_path, key):
    model = load(config(tmp_path, f"{key} = true"), device="cpu")
    assert model.module is not None and model.num_classes == 10


def test_weights_file_and_flag_or_a_non_boolean_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        load(config(tmp_path, 'random_weights = true\nweights = "w.pt"'), device="cpu")
    with pytest.raises(ConfigError, match="must be true or false"):
        load(config(tmp_path, 'random_weights = "yes"'), device="cpu")
    with pytest.raises(ConfigError, match="has no weights"):
        load(config(tmp_path, "random_weights = false"), device="cpu")


def test_the_demo_config_has_weights():
    assert load(None, device="cpu").module is not None
