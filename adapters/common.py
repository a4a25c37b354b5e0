"""Helpers shared by several adapters: model copies, BN facts and configuration, losses, EMA, restore.

Written once here, for both families of adapters: structural copies that share or own the source
weights, the source BN statistics and the reference batch-statistics configuration, the trainable
parameter sets, the entropy and cross-entropy losses, the teacher EMA and CoTTA's stochastic
restore. It imports nothing from the other adapter modules."""
from __future__ import annotations

import copy

import torch
from torch import nn

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class NormLayer(nn.Module):
    """Marker base for the normalisation layers our adapters swap in (alpha-BN, UnMix-TNS),
    so that weight-updating adapters recognise them as normalisation layers."""


# --- copies ---------------------------------------------------------------------------

def share_copy(model: nn.Module, share_buffers: bool = False) -> nn.Module:
    """A structural copy whose parameters ARE the source's (same storage) while module flags,
    and unless `share_buffers` the buffers, are its own. BN-only adapters use it: per-stream
    statistics, shared weights."""
    # New Parameter objects over the same storage: the copy's flags (requires_grad) and .grad
    # are its own, so nothing done to the copy reaches the source model.
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
    if share_buffers:
        memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def own_copy(model: nn.Module) -> nn.Module:
    """A full copy (weights included), for networks whose weights get updated."""
    net = copy.deepcopy(model)
    for p in net.parameters():
        p.grad = None
    return net


def own_parameters(net: nn.Module, names: list[str]) -> None:
    """Give `net` its own trainable copy of the named parameters (the rest stay shared)."""
    for name in names:
        module_name, _, pname = name.rpartition(".")
        module = net.get_submodule(module_name) if module_name else net
        setattr(module, pname, nn.Parameter(getattr(module, pname).detach().clone()))


def rebind_to_source(net: nn.Module, source_state: dict[str, torch.Tensor]) -> None:
    """Point every parameter of `net` at the source storage (read-only, no gradient)."""
    for name, _ in list(net.named_parameters()):
        module_name, _, pname = name.rpartition(".")
        module = net.get_submodule(module_name) if module_name else net
        setattr(module, pname, nn.Parameter(source_state[name].detach(), requires_grad=False))


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


# --- batch-norm facts and configuration -----------------------------------------------

def norm_layer_source_stats(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (running_mean, running_var)} of the source BN layers (no copies)."""
    return {name: (m.running_mean, m.running_var) for name, m in model.named_modules()
            if isinstance(m, BATCH_NORMS) and m.running_mean is not None and m.running_var is not None}


def configure_batch_stats(net: nn.Module) -> nn.Module:
    """The reference configuration of CoTTA, RMT and TENT: eval mode; every BatchNorm2d
    normalises with batch statistics in both modes and keeps no running state; BatchNorm1d in
    train mode. Our own NormLayers are left as they are."""
    net.eval()
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
        elif isinstance(m, nn.BatchNorm1d):
            m.train()
    return net


def direct_weights_and_biases(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every parameter named `weight` or `bias` directly on a module, in named_modules order
    (the reference's trainable set and restore order)."""
    found = []
    for module_name, m in net.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if pname in ("weight", "bias"):
                found.append((f"{module_name}.{pname}" if module_name else pname, p))
    return found


def norm_affine_parameters(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Affine parameters of normalisation layers (TENT's trainable set)."""
    kinds = BATCH_NORMS + (nn.LayerNorm, nn.GroupNorm, NormLayer)
    return [(n, p) for n, p in direct_weights_and_biases(net)
            if isinstance(net.get_submodule(n.rpartition(".")[0]) if "." in n else net, kinds)]


def copy_into(dst: nn.Module, src_state: dict) -> None:
    dst.load_state_dict(src_state, strict=True)


def detached_state(net: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# --- losses ---------------------------------------------------------------------------

def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy of softmax(logits)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def teacher_cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample CE from the teacher's softmax to the student (CoTTA's CIFAR loss)."""
    return -(teacher.softmax(1) * student.log_softmax(1)).sum(1)


def symmetric_cross_entropy(x: torch.Tensor, x_teacher: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per-sample SCE: (1-α)·CE(teacher→x) + α·CE(x→teacher)."""
    return (-(1 - alpha) * (x_teacher.softmax(1) * x.log_softmax(1)).sum(1)
            - alpha * (x.softmax(1) * x_teacher.log_softmax(1)).sum(1))


# --- teacher and restore --------------------------------------------------------------

@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ' ← m·θ' + (1−m)·θ over ALL parameters (buffers untouched), as the reference does.
    Fused over the parameter list, with the reference's rounding: m·θ' and (1−m)·θ are each
    rounded, then added (an add with alpha= would fuse the second product and differ)."""
    teacher_params = [t.data for t in teacher.parameters()]
    scaled_student = torch._foreach_mul([s.data for s in student.parameters()], 1 - momentum)
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, scaled_student)


@torch.no_grad()
def stochastic_restore(params: list[tuple[str, nn.Parameter]], source: dict[str, torch.Tensor],
                       probability: float, generator) -> None:
    """Each element of each weight/bias goes back to its source value with `probability`.
    Masks are drawn on the CPU in named_modules order, then moved. One draw of all the elements
    gives the same numbers as one torch.rand(p.shape) per parameter (the CPU generator fills
    element by element), and the fused update keeps the reference's arithmetic
    source·mask + p·(1 − mask)."""
    if not params:
        return
    values = [p.data for _, p in params]
    sizes = [v.numel() for v in values]
    drawn = (torch.rand(sum(sizes), generator=generator) < probability).to(values[0].device)

    def per_parameter(flat):
        return [m.view(v.shape) for m, v in zip(flat.float().split(sizes), values)]

    keep = torch._foreach_mul(values, per_parameter(~drawn))  # ~mask as floats is exactly 1 − mask
    restored = torch._foreach_mul([source[name] for name, _ in params], per_parameter(drawn))
    torch._foreach_add_(restored, keep)
    torch._foreach_copy_(values, restored)
