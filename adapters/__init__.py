"""Online test-time adaptation methods, in pure PyTorch: the registry and the public API.

    import adapters
    adapters.available()
    adapters.describe("cotta")
    a = adapters.create("cotta", model, lr=1e-3)     # model: nn.Module on [0, 1] NCHW input
    logits = a.step(x)                               # prediction, then the update
    logits = a.predict(x); a.learn()                 # the same, split (reply before the update)
    a.reset(); sd = a.state_dict(); a.load_state_dict(sd)

ADAPTERS.md (shared/) is the specification; each file restates its method.
"""
from __future__ import annotations

import json

from .base import Adapter
from .bn import BatchNormTest
from .bn_alpha import AlphaBatchNorm
from .bn_ema import BatchNormEMA
from .cotta import CoTTA
from .deyo import DeYO
from .eata import EATA
from .lame import LAME
from .mean_teacher import MeanTeacher
from .rotta import RoTTA
from .sar import SAR
from .source import Source
from .tent import Tent
from .unmix_tns import UnMixTNS

REGISTRY: dict[str, type[Adapter]] = {
    cls.name: cls for cls in (Source, BatchNormTest, AlphaBatchNorm, BatchNormEMA, UnMixTNS, Tent, MeanTeacher, CoTTA,
                              LAME, SAR, EATA, RoTTA, DeYO)
}

__all__ = ["Adapter", "available", "describe", "create", "coerce", "REGISTRY"]


def available() -> list[str]:
    return list(REGISTRY)


def _lookup(name: str) -> type[Adapter]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown adapter {name!r}; available: {', '.join(REGISTRY)}") from None


def describe(name: str) -> dict:
    cls = _lookup(name)
    return {"name": cls.name, "summary": cls.summary, "updates_weights": cls.updates_weights,
            "hyperparameters": [h.describe() for h in cls.spec()]}


def coerce(name: str, values: dict) -> dict:
    """Parse hyperparameters given as strings (e.g. from the wire) into their types.
    `norm_options` may be given as a JSON object."""
    cls = _lookup(name)
    out = {}
    for key, value in values.items():
        if key == "norm_options" and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError("hyperparameter 'norm_options' must be a JSON object, e.g. {\"k\": 16}") from None
        out[key] = value
    typed = cls.validate(out)
    return {k: typed[k] for k in out}


def create(name: str, model, **hyperparameters) -> Adapter:
    """A new adapter of the given method over `model` (left untouched)."""
    return _lookup(name)(model, **hyperparameters)
