"""Grouped batch normalisation: G batches stacked into one forward pass, each normalised with
its own batch statistics, so every group's output is what it would have been alone.

A batch-statistics BN mixes the samples of its batch; stacking G batches (CoTTA's augmented
copies, or the batches of G streams) into one forward would normalise them with the statistics
of the whole stack. Inside `grouped(net, G)` every such layer instead splits its (G·B, C, ...)
input into G consecutive groups of B and normalises each with that group's mean and variance,
with the same arithmetic as ATen's batch norm (scale = γ/√(σ²+ε), shift = β − μ·scale,
y = x·scale + shift). Grouped: torch BatchNorm1d/2d/3d in batch-statistics mode (running
statistics, when tracked, are updated group after group as G serial passes would) and alpha-BN.
Two implementations, same results: vectorised (one statistics reduction and one addcmul per
layer, whatever G: what pays on a GPU, where the serial passes are kernel-launch bound) and, on
the CPU by default, the layer's own forward on each group's slice (ATen's CPU batch norm is ~3×
faster than a strided var_mean there, and the convolutions are still batched).
Layers that do not mix samples (eval-mode BN, LayerNorm, GroupNorm, UnMix-TNS BN1d) need nothing.
Not groupable: UnMix-TNS BN2d (each pass moves the components the next pass normalises with)
and any other of our NormLayers; `groupable(net)` says whether a network can be grouped, and
callers fall back to serial passes when it cannot.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn

from .bn_alpha import AlphaBatchNorm2d
from .common import NormLayer
from .unmix_tns import UnMixTNS1d


def group_statistics(x: torch.Tensor, groups: int, unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance), each (G, C), of each group of x (G·B, C, ...) over batch and space."""
    if x.shape[0] % groups:
        raise ValueError(f"a batch of {x.shape[0]} cannot be split into {groups} equal groups")
    values = x.reshape(groups, x.shape[0] // groups, x.shape[1], -1)
    if values.shape[1] * values.shape[3] < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)} "
                         f"in {groups} groups")
    var, mean = torch.var_mean(values, dim=(1, 3), correction=int(unbiased))
    return mean, var


def grouped_batch_norm(x: torch.Tensor, groups: int, mean: torch.Tensor, var: torch.Tensor,
                       weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Normalise each of the G groups of x (G·B, C, ...) with its own statistics mean, var (G, C).
    The statistics may be the groups' own (group_statistics) or per-stream running statistics."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    values = x.reshape(groups, x.shape[0] // groups, x.shape[1], -1)
    return torch.addcmul(shift[:, None, :, None], values, scale[:, None, :, None]).reshape(x.shape)


def _batch_norm_forward(m: nn.modules.batchnorm._BatchNorm, groups: int, x: torch.Tensor) -> torch.Tensor:
    mean, var = group_statistics(x, groups)
    if m.training and m.track_running_stats and m.running_mean is not None:
        _update_running_stats(m, x, groups, mean, var)
    return grouped_batch_norm(x, groups, mean, var, m.weight, m.bias, m.eps)


@torch.no_grad()
def _update_running_stats(m, x, groups, mean, var) -> None:
    """What G serial train-mode passes leave in the running statistics (one update per group)."""
    n = x.numel() // x.shape[1] // groups
    unbiased = var * (n / (n - 1))
    for g in range(groups):  # G small (C,) updates; order matters, as in the serial passes
        m.num_batches_tracked.add_(1)
        f = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
        m.running_mean.copy_(f * mean[g] + (1 - f) * m.running_mean)
        m.running_var.copy_(f * unbiased[g] + (1 - f) * m.running_var)


def _alpha_bn_forward(m: AlphaBatchNorm2d, groups: int, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # alpha-BN's batch statistics carry no gradient (see bn_alpha.py)
        batch_mean, batch_var = group_statistics(x, groups, unbiased=True)
    mean = (1 - m.alpha) * m.source_mean + m.alpha * batch_mean
    var = (1 - m.alpha) * m.source_var + m.alpha * batch_var
    return grouped_batch_norm(x, groups, mean, var, m.weight, m.bias, m.eps)


def _grouped_forward(m: nn.Module):
    """The grouped forward for m; None when m does not mix samples; raises when m cannot be grouped."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        uses_batch_stats = m.training or m.running_mean is None
        return _batch_norm_forward if uses_batch_stats else None
    if isinstance(m, AlphaBatchNorm2d):
        return _alpha_bn_forward
    if isinstance(m, UnMixTNS1d):
        return None  # source statistics: per sample
    if isinstance(m, NormLayer) or (isinstance(m, nn.modules.instancenorm._InstanceNorm)
                                    and m.training and m.track_running_stats):
        raise _NotGroupable(f"{type(m).__name__} keeps state across passes; it cannot be grouped")
    return None


class _NotGroupable(ValueError):
    pass


def groupable(net: nn.Module) -> bool:
    """Whether every sample-mixing layer of net can be grouped."""
    try:
        for m in net.modules():
            _grouped_forward(m)
    except _NotGroupable:
        return False
    return True


def _per_slice_forward(m: nn.Module, groups: int, x: torch.Tensor) -> torch.Tensor:
    """The layer's own forward on each group's slice, in order (running statistics included)."""
    return torch.cat([type(m).forward(m, part) for part in x.split(x.shape[0] // groups)])


def _dispatch(m: nn.Module, vectorised: bool | None, groups: int, x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] % groups:
        raise ValueError(f"a batch of {x.shape[0]} cannot be split into {groups} equal groups")
    if vectorised if vectorised is not None else x.is_cuda:
        return _grouped_forward(m)(m, groups, x)
    return _per_slice_forward(m, groups, x)


@contextmanager
def grouped(net: nn.Module, groups: int, vectorised: bool | None = None):
    """Within the block, net's batch-statistics norm layers normalise each of `groups`
    consecutive equal parts of their input with that part's own statistics.
    vectorised: None = vectorised on CUDA tensors, per slice on the CPU; True/False force one."""
    swapped = [m for m in net.modules() if _grouped_forward(m) is not None]
    try:
        for m in swapped:
            # an instance attribute shadows the class's forward; hooks on m still run
            m.forward = functools.partial(_dispatch, m, vectorised, groups)
        yield net
    finally:
        for m in swapped:
            m.__dict__.pop("forward", None)
