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
        b, c = x.shape[:2]
        inst_mean = x.mean(dim=(2, 3))  # (B, C); not detached: gradients flow when stacked under TENT/CoTTA
        inst_var = x.var(dim=(2, 3), unbiased=False)
        with torch.no_grad():
            sim = F.normalize(inst_mean, dim=1) @ F.normalize(self.component_means, dim=1).t()  # (B, K)
            p = torch.softmax(sim / self.temperature, dim=1).unsqueeze(-1)  # (B, K, 1)
        mean_mix = (1.0 - p) * self.component_means.unsqueeze(0) + p * inst_mean.unsqueeze(1)  # (B, K, C)
        var_mix = (1.0 - p) * self.component_vars.unsqueeze(0) + p * inst_var.unsqueeze(1)
        mean = mean_mix.mean(dim=1)
        var = var_mix.mean(dim=1) + (mean_mix ** 2).mean(dim=1) - mean ** 2
        with torch.no_grad():  # move the components AFTER this batch's statistics were formed
            lam = 1 - (1 - self.momentum) ** ((self.batch_size or b) / self.batch_size_max)
            self.component_means += lam * (p * (inst_mean.unsqueeze(1) - self.component_means.unsqueeze(0))).mean(0)
            self.component_vars += lam * (p * (inst_var.unsqueeze(1) - self.component_vars.unsqueeze(0))).mean(0)
        y = (x - mean.view(b, c, 1, 1)) / torch.sqrt(var.view(b, c, 1, 1) + self.eps)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


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
