"""`lame`: LAME (Boudiaf et al., CVPR 2022, "Parameter-free Online Test-time Adaptation").

Output-only: the network is the source model in eval mode (source BN statistics), no weight
moves. Per batch of N samples with classifier probabilities p and features f (the input of the
model's final nn.Linear, captured with a forward hook, L2-normalised):
1. unary u = −log(p + 1e-10); kernel W (N×N) from the features, by `affinity`:
   rbf   W_ij = exp(−‖f_i − f_j‖² / 2σ²), σ = mean over i of the distance to its knn-th nearest
         point, the sample itself counted (so knn=5 is the 4th true neighbour), as the reference;
   kNN   W_ij = 1 when j is among the knn nearest points of i other than i itself;
   linear W = f fᵀ;
   with force_symmetry, W ← (W + Wᵀ)/2;
2. Y₀ = softmax(−u); repeat max_steps times: Z = −u + λ·W Y, Y = softmax(Z), stopping once the
   energy Σ u·Y − λ·(W Y)·Y + Y·log Y changes by ≤ 1e-8 of its value (from the third step on);
3. the reply is Z of the last step: its softmax is LAME's assignment Y exactly.
`sigma` is accepted for config compatibility but, as in the reference, none of the affinities
read it. A batch of one sample has no neighbours: it is answered with the model's own logits
(the reference buffers single images in a sliding window instead). When σ is 0 (each sample has
knn identical copies) the reference answers NaN; we take the kernel's limit, W_ij = [f_i = f_j]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Hyperparameter, in_range
from .common import share_copy
from .normalisation import NormalisationAdapter

HYPERPARAMETERS = (
    Hyperparameter("affinity", "rbf", str, "rbf | kNN | linear", "how the batch's features are linked",
                   lambda v: v in ("rbf", "kNN", "linear")),
    Hyperparameter("knn", 5, int, "integer >= 1", "neighbours per sample (kNN; the bandwidth for rbf)",
                   lambda v: v >= 1),
    Hyperparameter("sigma", 1.0, float, "(0, inf)", "unused by the reference's affinities (rbf derives its "
                   "bandwidth from knn); kept so reference configs carry over", lambda v: v > 0),
    Hyperparameter("force_symmetry", False, bool, "true | false", "symmetrise the kernel, W ← (W + Wᵀ)/2"),
    Hyperparameter("bound_lambda", 1.0, float, "[0, inf)", "weight λ of the Laplacian term", lambda v: v >= 0),
    Hyperparameter("max_steps", 100, int, "integer in [1, 10000]", "most fixed-point iterations per batch",
                   in_range(1, 10000)),
)


class LAME(NormalisationAdapter):
    name = "lame"
    batch_statistics = False
    summary = ("LAME: Laplacian-regularised assignment of the batch's outputs over its feature graph; no "
               "weight or statistics update (built for label-correlated streams).")
    HYPERPARAMETERS = HYPERPARAMETERS

    def _build(self, model):
        net = share_copy(model, share_buffers=True).eval()  # nothing is mutated: share it all
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("lame needs a model whose classifier is a final nn.Linear (its input are the features)")
        linears[-1].register_forward_hook(self._capture_features)
        self._features = None
        return net

    def _capture_features(self, _module, inputs, _output):
        self._features = inputs[0]

    def _predict(self, x):
        logits = self._observe(self.net, x)
        features, self._features = self._features.flatten(1), None
        if x.shape[0] == 1:
            return logits
        hp = self.hyperparameters
        unary = -torch.log(logits.softmax(dim=1) + 1e-10)
        kernel = affinity(F.normalize(features, p=2, dim=-1), hp["affinity"], hp["knn"])
        if hp["force_symmetry"]:
            kernel = 1 / 2 * (kernel + kernel.t())
        return laplacian_assignment(unary, kernel, hp["bound_lambda"], hp["max_steps"])


def _distances(features: torch.Tensor) -> torch.Tensor:
    # the explicit difference, not cdist: the same rounding as the reference and an exact 0 diagonal
    return torch.norm(features.unsqueeze(0) - features.unsqueeze(1), dim=-1, p=2)


def affinity(features: torch.Tensor, kind: str, knn: int) -> torch.Tensor:
    """The N×N kernel over L2-normalised features (module docstring, step 1)."""
    n = features.shape[0]
    if kind == "linear":
        return features @ features.t()
    dist = _distances(features)
    if kind == "kNN":
        nearest = dist.topk(min(knn + 1, n), dim=-1, largest=False).indices[:, 1:]  # drop the sample itself
        return torch.zeros(n, n, device=features.device).scatter_(-1, nearest, 1.0)
    sigma = dist.topk(k=min(knn, n), dim=-1, largest=False).values[:, -1].mean()
    if float(sigma) == 0:
        # every sample has knn identical copies (repeated frames): the reference divides 0 by 0 and
        # answers NaN; the kernel's limit as sigma -> 0 links exactly the identical samples
        return (dist == 0).to(features.dtype)
    return torch.exp(-dist ** 2 / (2 * sigma ** 2))


def laplacian_assignment(unary: torch.Tensor, kernel: torch.Tensor, bound_lambda: float,
                         max_steps: int) -> torch.Tensor:
    """The fixed-point iteration (module docstring, step 2); returns the last step's exponent Z."""
    y = (-unary).softmax(-1)
    previous = float("inf")
    for i in range(max_steps):
        pairwise = bound_lambda * kernel.matmul(y)
        exponent = -unary + pairwise
        y = exponent.softmax(-1)
        energy = (unary * y - bound_lambda * pairwise * y + y * torch.log(y.clip(1e-20))).sum().item()
        if i > 1 and abs(energy - previous) <= 1e-8 * abs(previous):
            break
        previous = energy
    return exponent
