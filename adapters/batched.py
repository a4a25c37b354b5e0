"""Several streams' batches in one forward pass (cross-stream batching).

Streams whose adapters carry no state from one batch to the next (`source`: eval-mode BN;
`bn`: batch statistics; `bn-alpha`: batch statistics mixed with the source's) and have equal
hyperparameters compute the same function of each batch; only their batch-statistics layers mix
the samples of a batch. Stacked into one forward pass with each batch normalised by its own
statistics (grouped_norm.grouped), every stream gets exactly the logits its own pass would give
(tests/adapters/test_batched.py), while the convolutions run once over the whole stack.
`bn-ema` and `unmix-tns` carry statistics from batch to batch per stream, and the
weight-updating adapters keep per-stream weights: they are predicted one stream at a time.
"""
from __future__ import annotations

from contextlib import ExitStack

import torch

from .base import Adapter
from .bn import BatchNormTest
from .bn_alpha import AlphaBatchNorm
from .common import norm_layer_source_stats
from .grouped_norm import grouped
from .source import Source

BATCHABLE = (Source, BatchNormTest, AlphaBatchNorm)


def batch_key(adapter: Adapter, x: torch.Tensor) -> tuple | None:
    """Batches whose keys are equal can share one forward pass; None: this one cannot."""
    if type(adapter) not in BATCHABLE or adapter.pending:
        return None
    settings = tuple(sorted((k, repr(v)) for k, v in adapter.hyperparameters.items()))
    return adapter.name, id(adapter.source), settings, tuple(x.shape), x.dtype, x.device


def predict_together(adapters: list[Adapter], xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each adapter's predict(x) for its own x, in one forward pass. All must share a batch_key.
    Each adapter's BN-input observers (drift metrics) see their own batch only."""
    keys = {batch_key(a, x) for a, x in zip(adapters, xs)}
    if len(keys) != 1 or None in keys:
        raise ValueError("predict_together needs adapters of one batchable kind with equal hyperparameters "
                         "and batches of equal shape")
    lead, size = adapters[0], xs[0].shape[0]
    stacked = torch.cat([a._check_input(x) for a, x in zip(adapters, xs)])
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(grouped(lead.net, len(adapters)))
        if any(a._observers for a in adapters):
            _feed_observers(stack, lead, adapters, size)
        out = lead.net(stacked)
    for a in adapters:
        a._count_prediction()  # as predict() does
    return list(out.detach().split(size))


def _feed_observers(stack: ExitStack, lead: Adapter, adapters: list[Adapter], size: int) -> None:
    """Pre-hooks on the lead's norm layers (removed on exit) that hand each adapter's observers
    the slice of the stacked input that is its batch."""
    stats = norm_layer_source_stats(lead.source)
    for name, module in lead.net.named_modules():
        if name not in stats:
            continue
        mean, var = stats[name]

        def hook(_module, inputs, name=name, mean=mean, var=var):
            for a, part in zip(adapters, inputs[0].detach().split(size)):
                for callback in a._observers:
                    callback(name, part, mean, var)

        stack.callback(module.register_forward_pre_hook(hook).remove)
