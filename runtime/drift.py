"""Label-free drift signals computed per batch (SERVING.md §4.5).

- BN-statistics shift: for every normalisation layer, the standardised shift of the batch's
  per-channel input mean against the source running statistics, |mu_batch - mu_src| / sigma_src,
  averaged over channels, then over layers. 0 on source-like data, grows with the shift.
- prediction entropy H(p) / log C and confidence max p, per sample;
- class-marginal entropy H(mean p) / log C over a sliding window (exponential, ~256 samples) of
  the stream's predictions: near 1 when predictions spread over the classes, near 0 when the
  stream collapses onto one class.
"""
from __future__ import annotations

import math

import numpy as np
import torch

MARGINAL_WINDOW = 256  # samples in the class-marginal window


class BNShift:
    """Collects the BN-statistics shift of one forward pass via adapter.observe_bn_inputs."""

    def __init__(self):
        self.per_layer: list[torch.Tensor] = []  # kept on the device: one synchronisation per batch

    def __call__(self, layer_name: str, x: torch.Tensor, source_mean: torch.Tensor, source_var: torch.Tensor):
        dims = [0] + list(range(2, x.dim()))
        batch_mean = x.float().mean(dim=dims)
        shift = (batch_mean - source_mean.to(batch_mean)).abs() / (source_var.to(batch_mean) + 1e-5).sqrt()
        self.per_layer.append(shift.mean())

    def take(self) -> float | None:
        """The batch's shift (mean over layers), and start afresh for the next batch."""
        if not self.per_layer:
            return None
        value = float(torch.stack(self.per_layer).mean())
        self.per_layer = []
        return value


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def entropy_ratio(p: np.ndarray) -> np.ndarray:
    """Entropy of each row of probabilities, divided by log C (so 0..1)."""
    c = p.shape[-1]
    if c < 2:
        return np.zeros(p.shape[:-1])
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=-1) / math.log(c)


class Marginal:
    """Exponentially weighted class marginal of one stream's predictions."""

    def __init__(self, num_classes: int):
        self.mean = np.full(num_classes, 1.0 / num_classes)
        self.seen = 0

    def update(self, probs: np.ndarray) -> float:
        n = len(probs)
        # weight of the new batch: as if each sample entered an EMA of window MARGINAL_WINDOW;
        # the first samples fill the window instead of mixing with the uniform prior
        window = min(MARGINAL_WINDOW, self.seen + n)
        w = 1.0 - (1.0 - 1.0 / window) ** n
        self.mean = (1 - w) * self.mean + w * probs.mean(axis=0)
        self.seen += n
        return float(entropy_ratio(self.mean[None])[0])


def batch_figures(logits: np.ndarray) -> dict:
    """Per-sample entropy ratio and confidence, predicted classes and probabilities."""
    probs = softmax(logits.astype(np.float64))
    return {"probs": probs, "entropy": entropy_ratio(probs), "confidence": probs.max(axis=1),
            "predicted": probs.argmax(axis=1)}
