"""`bn-alpha`: alpha-BN (Schneider et al. 2020), the source statistics as a prior.

Per BatchNorm2d and batch: μ = (1−α)·μ_src + α·μ_batch and σ² = (1−α)·σ²_src + α·σ²_batch,
where σ²_batch is the UNBIASED batch variance (the reference reads it off a momentum-1.0 BN),
then y = γ·(x − μ)/sqrt(σ² + eps) + β. Stateless across batches; batch size 1 works."""
import torch
import torch.nn.functional as F
from torch import nn

from .base import Hyperparameter, in_range
from .common import NormLayer, set_submodule, share_copy
from .normalisation import NormalisationAdapter

ALPHA = Hyperparameter("alpha", 0.1, float, "[0, 1]",
                       "weight of the current batch's statistics against the source statistics",
                       in_range(0.0, 1.0))


class AlphaBatchNorm2d(NormLayer):
    def __init__(self, bn: nn.BatchNorm2d, alpha: float):
        super().__init__()
        self.alpha, self.eps = alpha, bn.eps
        self.weight, self.bias = bn.weight, bn.bias  # the BN's own parameters (shared or copied by the caller)
        self.register_buffer("source_mean", bn.running_mean)
        self.register_buffer("source_var", bn.running_var)

    def forward(self, x):
        n = x.numel() // x.shape[1]
        if n < 2:
            raise ValueError("alpha-BN needs at least 2 values per channel (batch × height × width)")
        with torch.no_grad():  # the reference's batch statistics are BN buffers: no gradient
            batch_mean, batch_var = unbiased_batch_statistics(x)
        mean = (1 - self.alpha) * self.source_mean + self.alpha * batch_mean
        var = (1 - self.alpha) * self.source_var + self.alpha * batch_var
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)


def unbiased_batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and unbiased variance of x (N, C, ...), computed as the reference
    gets them, bit for bit: the running statistics of a momentum-1.0 BN after one train-mode
    pass (r ← 1·stat + 0·r). ATen's statistics pass alone, without the normalised output, and
    several times faster on the CPU than x.mean plus x.var."""
    c = x.shape[1]
    mean = torch.zeros(c, device=x.device, dtype=x.dtype)
    var = torch.ones(c, device=x.device, dtype=x.dtype)
    torch.batch_norm_update_stats(x, mean, var, 1.0)
    return mean, var


def convert_to_alpha_bn(net: nn.Module, alpha: float = 0.1) -> nn.Module:
    """Swap every BatchNorm2d of `net` (in place) for alpha-BN."""
    for name, m in list(net.named_modules()):
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
            set_submodule(net, name, AlphaBatchNorm2d(m, alpha))
    return net


class AlphaBatchNorm(NormalisationAdapter):
    name = "bn-alpha"
    batch_statistics = False
    running_statistics = True
    summary = ("alpha-BN: mix source and current-batch BN statistics with weight alpha; stateless, "
               "works at batch size 1.")
    HYPERPARAMETERS = (ALPHA,)

    def _build(self, model):
        net = share_copy(model, share_buffers=True).eval()
        return convert_to_alpha_bn(net, self.hyperparameters["alpha"])
