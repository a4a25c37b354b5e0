"""`unmix-tns`: UnMix-TNS (Tomar et al., ICLR 2024), test-time normalisation with K statistics
components per BN layer, for non-i.i.d. (label-correlated) streams.

Each BatchNorm2d becomes a layer with components M, V ∈ R^{K×C}. A sample's instance mean is
softly assigned to the components by cosine similarity (softmax with temperature τ); its
normalisation statistics mix the components with its own instance statistics (law of total
variance over K uniform components); afterwards every component moves towards the batch,
weighted by the assignments, with λ = 1 − (1 − momentum)^(B / batch_size_max). A sample's output
depends only on itself and the components, so batch size 1 works. BatchNorm1d layers normalise
with the source statistics. All the work is in the forward pass."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Hyperparameter, in_range
from .common import NormLayer, set_submodule, share_copy
from .normalisation import NormalisationAdapter

HYPERPARAMETERS = (
    Hyperparameter("k", 16, int, "integer in [1, 1024] (>= 2 for any mixing)",
                   "number of statistics components per BN layer (paper: 16; 128 for mixed domains); "
                   "bounded because every component costs 2 floats per BN channel per stream",
                   in_range(1, 1024)),
    Hyperparameter("temperature", 0.07, float, "(0, inf)", "softmax temperature of the component assignment",
                   lambda v: v > 0),
    Hyperparameter("init_noise", 0.5, float, "[0, 1)",
                   "alpha_init: share of the source variance spread into the components' means at start",
                   in_range(0.0, 1.0, high_open=True)),
    Hyperparameter("momentum", None, float, "None or (0, 1]",
                   "component momentum at batch_size_max; None: each BN layer's own momentum (0.1)",
                   lambda v: v is None or 0.0 < v <= 1.0),
    Hyperparameter("batch_size_max", 64, int, "integer >= 1",
                   "batch size at which `momentum` applies; λ = 1-(1-momentum)^(B/batch_size_max)",
                   lambda v: v >= 1),
    Hyperparameter("batch_size", None, int, "None or integer >= 1",
                   "fix B in the momentum formula (the reference uses the configured test batch size); "
                   "None: the actual size of each batch", lambda v: v is None or v >= 1),
)


class _UnMixTNSBase(NormLayer):
    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, k: int, temperature: float, init_noise: float,
                 momentum: float, batch_size_max: int, batch_size: int | None, generator):
        super().__init__()
        self.k, self.temperature, self.eps = k, temperature, bn.eps
        self.momentum, self.batch_size_max, self.batch_size = momentum, batch_size_max, batch_size
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("source_mean", bn.running_mean)
        self.register_buffer("source_var", bn.running_var)
        means = bn.running_mean.repeat(k, 1)  # (K, C)
        variances = bn.running_var.repeat(k, 1)
        coeff = init_noise if k > 1 else 0.0
        if k > 1:
            if generator is None:  # reference order: randn_like on the buffers' device
                eps = torch.randn_like(means)
            else:
                eps = torch.randn(means.shape, generator=generator).to(means.device)
            means = means + math.sqrt(coeff * k / (k - 1)) * variances.sqrt() * eps
        self.register_buffer("component_means", means)
        self.register_buffer("component_vars", (1 - coeff) * variances)


class UnMixTNS2d(_UnMixTNSBase):
    def forward(self, x):
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or self.bias.requires_grad):
            return self._forward_reference(x)
        return self._forward_fused(x)

    def _forward_reference(self, x):
        """The reference's arithmetic, op for op; used whenever autograd records (UnMix-TNS
        under a gradient method): gradients flow through the instance statistics."""
        b, c = x.shape[:2]
        inst_mean = x.mean(dim=(2, 3))  # (B, C); not detached: gradients flow when stacked under TENT/CoTTA
        inst_var = x.var(dim=(2, 3), unbiased=False)
        p = self._assignments(inst_mean).unsqueeze(-1)  # (B, K, 1)
        mean_mix = (1.0 - p) * self.component_means.unsqueeze(0) + p * inst_mean.unsqueeze(1)  # (B, K, C)
        var_mix = (1.0 - p) * self.component_vars.unsqueeze(0) + p * inst_var.unsqueeze(1)
        mean = mean_mix.mean(dim=1)
        var = var_mix.mean(dim=1) + (mean_mix ** 2).mean(dim=1) - mean ** 2
        with torch.no_grad():  # move the components AFTER this batch's statistics were formed
            lam = self._lambda(b)
            self.component_means += lam * (p * (inst_mean.unsqueeze(1) - self.component_means.unsqueeze(0))).mean(0)
            self.component_vars += lam * (p * (inst_var.unsqueeze(1) - self.component_vars.unsqueeze(0))).mean(0)
        y = (x - mean.view(b, c, 1, 1)) / torch.sqrt(var.view(b, c, 1, 1) + self.eps)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

    @torch.no_grad()
    def _forward_fused(self, x):
        """The same function without autograd, in fewer passes (same results to float rounding:
        tests/adapters/test_adapters_rules.py): instance statistics from one mean and one norm
        of the centred values (torch's var is a slow Welford pass on the CPU); the (B, K, C)
        mixtures and the component update contracted over K and B as matrix products; the
        output as one eval-mode batch norm over the (B·C) instance channels."""
        b, c = x.shape[:2]
        flat = x.reshape(b * c, -1)
        inst_mean = flat.mean(dim=1)
        inst_var = torch.linalg.vector_norm(flat - inst_mean.unsqueeze(1), dim=1).square_().div_(flat.shape[1])
        inst_mean, inst_var = inst_mean.view(b, c), inst_var.view(b, c)
        p = self._assignments(inst_mean)
        mean, var = mixture_statistics(p, self.component_means, self.component_vars, inst_mean, inst_var)
        self._move_components(p, inst_mean, inst_var, self._lambda(b))  # after this batch's statistics
        y = F.batch_norm(x.reshape(1, b * c, *x.shape[2:]), mean.reshape(-1), var.reshape(-1),
                         self.weight.repeat(b), self.bias.repeat(b), False, 0.0, self.eps)
        return y.view(x.shape)

    @torch.no_grad()
    def _assignments(self, inst_mean):
        sim = F.normalize(inst_mean, dim=1) @ F.normalize(self.component_means, dim=1).t()  # (B, K)
        return torch.softmax(sim / self.temperature, dim=1)

    def _lambda(self, b: int) -> float:
        return 1 - (1 - self.momentum) ** ((self.batch_size or b) / self.batch_size_max)

    def _move_components(self, p, inst_mean, inst_var, lam):
        """M ← M + λ·mean_b p[b, k]·(m_b − M_k), as (λ/B)·(pᵀm − (Σ_b p[b, k])·M_k); V alike."""
        weight = p.sum(0).unsqueeze(1)  # (K, 1)
        scale = lam / p.shape[0]
        for components, stats in ((self.component_means, inst_mean), (self.component_vars, inst_var)):
            components.add_(torch.addmm(components * -weight, p.t(), stats), alpha=scale)


def mixture_statistics(p, means, variances, inst_mean, inst_var):
    """Step 4 of UnMix-TNS contracted over K: with q = 1 − p and μ̂[b, k] = q·M_k + p·m_b,
    mean_k μ̂ = (q M + (Σ_k p)·m)/K, mean_k v̂ = (q V + (Σ_k p)·v)/K and
    mean_k μ̂² = (q² M² + 2·m·((q p) M) + (Σ_k p²)·m²)/K; σ̄² = mean_k v̂ + mean_k μ̂² − μ̄²."""
    k = p.shape[1]
    q = 1.0 - p
    p_sum = p.sum(1, keepdim=True)
    mean = torch.addmm(inst_mean * p_sum, q, means).div_(k)
    second = torch.addmm(inst_mean.square() * p.square().sum(1, keepdim=True), q.square(), means.square())
    second.add_(inst_mean * (q * p).mm(means), alpha=2.0)
    var = torch.addmm(inst_var * p_sum, q, variances).add_(second).div_(k).sub_(mean.square())
    return mean, var


class UnMixTNS1d(_UnMixTNSBase):
    def forward(self, x):
        y = (x - self.source_mean.unsqueeze(0)) / torch.sqrt(self.source_var.unsqueeze(0) + self.eps)
        return y * self.weight.view(1, -1) + self.bias.view(1, -1)


def convert_to_unmix_tns(net: nn.Module, generator=None, k: int = 16, temperature: float = 0.07,
                         init_noise: float = 0.5, momentum: float | None = None, batch_size_max: int = 64,
                         batch_size: int | None = None) -> nn.Module:
    """Swap every BatchNorm2d/1d of `net` (in place, named_modules order: the order the
    initial noise is drawn in) for UnMix-TNS layers."""
    targets = [(n, m) for n, m in net.named_modules()
               if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and m.running_mean is not None]
    for name, bn in targets:
        if bn.weight is None:
            raise ValueError(f"unmix-tns needs affine BN layers; {name!r} has affine=False")
        layer_momentum = momentum if momentum is not None else (bn.momentum if bn.momentum is not None else 0.1)
        kind = UnMixTNS2d if isinstance(bn, nn.BatchNorm2d) else UnMixTNS1d
        set_submodule(net, name, kind(bn, k, temperature, init_noise, layer_momentum, batch_size_max,
                                      batch_size, generator))
    return net


class UnMixTNS(NormalisationAdapter):
    name = "unmix-tns"
    summary = ("UnMix-TNS: K statistics components per BN layer, mixed per sample; robust to "
               "label-correlated (non-i.i.d.) streams; works at batch size 1.")
    uses_randomness = True
    HYPERPARAMETERS = HYPERPARAMETERS

    def _build(self, model):
        net = share_copy(model, share_buffers=True).eval()
        options = {h.name: self.hyperparameters[h.name] for h in HYPERPARAMETERS}
        return convert_to_unmix_tns(net, generator=self.generator, **options)
