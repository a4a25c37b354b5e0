"""Tiny BN networks for the adapter tests (random weights, non-trivial BN statistics)."""
import copy

import torch
from torch import nn


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def tiny_cnn(seed: int = 0, classes: int = 10) -> nn.Module:
    """conv-BN-ReLU ×2, pool, linear: the shape of a CIFAR ResNet in miniature."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))
    return randomise_bn(model, seed).eval()


def bn_only(channels: int = 3, seed: int = 0) -> nn.Module:
    """A single BatchNorm2d whose output is the logits (flattened): for hand-computed checks."""
    return randomise_bn(nn.Sequential(nn.BatchNorm2d(channels), nn.Flatten()), seed).eval()


def stream(n_batches: int = 4, batch: int = 8, seed: int = 1, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    # a drifting stream: brightness and contrast change from batch to batch
    return [(torch.rand(batch, 3, size, size, generator=g) * (0.5 + 0.1 * i) + 0.05 * i).clamp(0, 1)
            for i in range(n_batches)]


def confident_cnn(scale: float = 12.0) -> nn.Module:
    """tiny_cnn with a sharper head: its entropies straddle 0.4·ln 10, so entropy filters have work to do."""
    model = tiny_cnn()
    with torch.no_grad():
        model[-1].weight.mul_(scale)
        model[-1].bias.mul_(scale)
    return model


def batch_stat_copy(model: nn.Module) -> nn.Module:
    """A copy whose BN layers normalise with the batch's own statistics (test-time BN)."""
    net = copy.deepcopy(model).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    return net


def entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits, 1)
    return -(p * torch.log(p)).sum(1)
