"""`NormalisationAdapter`: the base of the BN-only adapters (per-stream statistics over the shared source weights).

Its subclasses (source, bn, bn-alpha, bn-ema, unmix-tns) build one network in `_build(model)`
whose parameters are the source's; the per-stream state is the buffers that network owns.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Adapter


class NormalisationAdapter(Adapter):
    """Base of the BN-only adapters: one network that shares the source weights and owns its
    buffers (statistics, components). Its per-stream state is exactly those buffers."""

    deferred_update = False

    def __init__(self, model: nn.Module, **hyperparameters):
        super().__init__(model, **hyperparameters)
        self.net = self._build(model)
        self._remember_generator()
        self._initial = {k: v.detach().clone() for k, v in self.net.state_dict().items()
                         if not _shares_storage(v, model)}

    def _build(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def _predict(self, x):
        return self._observe(self.net, x)

    def _observed_network(self):
        return self.net

    def _reset(self):
        self._load_state(self._initial)

    def _state(self):
        return {k: v.detach().clone() for k, v in self.net.state_dict().items() if k in self._initial}

    def _load_state(self, state):
        own = dict(self.net.named_buffers())
        missing = set(self._initial) - set(state)
        if missing:
            raise ValueError(f"state dict lacks {sorted(missing)[:3]}")
        with torch.no_grad():
            for k, v in state.items():
                target = own.get(k)
                if target is None:
                    raise ValueError(f"unexpected key {k!r} in state dict")
                target.copy_(v)


def _shares_storage(t: torch.Tensor, model: nn.Module) -> bool:
    return any(t.data_ptr() == s.data_ptr() for s in list(model.parameters()) + list(model.buffers()))
