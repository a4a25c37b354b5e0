"""`eata`: EATA (Niu et al., ICML 2022, "Efficient Test-Time Model Adaptation without Forgetting").

Entropy minimisation of the normalisation layers' affine parameters (BN with batch statistics,
Adam, as tent) on the samples worth learning from, with an anti-forgetting Fisher penalty.
With C classes and E₀ = margin_e0·ln C, per batch:
1. logits = net(x) (the reply); e = entropy(softmax(logits)); S₁ = {i : e_i < E₀} (reliable);
2. with m the moving average of the selected samples' probabilities (none at first):
   S₂ = {i ∈ S₁ : |cos(m, softmax(logits_i))| < d_margin} (not redundant), S₂ = S₁ without m;
   m ← mean over S₂ of the probabilities (first time) or 0.9·m + 0.1·that mean (S₂ empty: kept);
3. L = mean over S₂ of e_i / exp(e_i − E₀) (weight detached) + Σ_θ fisher_alpha·F_θ·(θ − θ_src)²;
4. one Adam step on L when S₂ is not empty.
The Fisher F_θ is the mean over the batches of `fisher_data` (source images, float NCHW in
[0, 1], fisher_batch_size at a time) of the squared gradient of the cross-entropy to the model's
own argmax labels, at the source weights, through the same batch-statistics network. Without
fisher_data (or with fisher_alpha = 0) there is no penalty: the source-free ETA variant.
Steps 2–4 change the state in learn(), after the reply; a discarded batch leaves m untouched."""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from .base import Hyperparameter, in_range
from .common import entropy, norm_affine_parameters, own_parameters
from .gradient import GradientAdapter, build_normalised_network

# (source id, data id, data version, batch size, device) -> (weakref data, weakref source, Fisher)
_FISHERS: dict[tuple, tuple] = {}

HYPERPARAMETERS = (
    Hyperparameter("lr", 1e-3, float, "(0, 1]", "Adam learning rate", in_range(0, 1, low_open=True)),
    Hyperparameter("margin_e0", 0.4, float, "(0, inf)", "reliable samples have entropy < margin_e0·ln(classes)",
                   lambda v: v > 0),
    Hyperparameter("d_margin", 0.4, float, "(0, 1]", "a sample is redundant when the absolute cosine similarity of its probabilities "
                   "with their moving average is >= d_margin", in_range(0, 1, low_open=True)),
    Hyperparameter("fisher_alpha", 1.0, float, "[0, inf)", "weight of the Fisher anti-forgetting penalty "
                   "(0, or no fisher_data: ETA)", lambda v: v >= 0),
    Hyperparameter("fisher_data", None, object, "None or a float tensor (N, C, H, W) in [0, 1]",
                   "source images for the Fisher information, shipped with the model (reference: 2000); "
                   "None: ETA, no penalty",
                   lambda v: v is None or (isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[0] >= 1
                                           and v.is_floating_point())),
    Hyperparameter("fisher_batch_size", 200, int, "integer >= 1", "batch size of the Fisher passes (reference: "
                   "the test batch size)", lambda v: v >= 1),
)


class EATA(GradientAdapter):
    name = "eata"
    student_replies = True
    summary = ("EATA: entropy minimisation of the normalisation affine parameters on reliable, non-redundant "
               "samples, with a Fisher penalty against forgetting (ETA without source samples).")
    uses_randomness = False
    HYPERPARAMETERS = HYPERPARAMETERS

    def __init__(self, model, **hyperparameters):
        super().__init__(model, **hyperparameters)
        hp = self.hyperparameters
        self.net = build_normalised_network(model, "bn", None, {}, own_weights=False)  # the reference: batch-stat BN
        names = [name for name, _ in norm_affine_parameters(self.net)]
        own_parameters(self.net, names)
        self._setup_optimizer([(n, self.net.get_parameter(n)) for n in names], hp["lr"])
        self.fishers = None
        if hp["fisher_alpha"] > 0 and hp["fisher_data"] is not None:
            self.fishers = self._cached_fisher(hp["fisher_data"], hp["fisher_batch_size"])
        self.probs: torch.Tensor | None = None  # the moving average m
        self.selected = [0, 0]  # samples after the first and the second filter, over the stream
        self._finish_init({"net": self.net})

    def _observed_network(self):
        return self.net

    def _cached_fisher(self, data: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
        """The Fisher depends only on the source model and the data: every stream on the same model
        config shares one computation (a server builds an adapter per stream). Never written in place."""
        key = (id(self.source), id(data), data._version, batch_size, str(self.device))
        hit = _FISHERS.get(key)
        if hit is not None and hit[0]() is data and hit[1]() is self.source:
            return hit[2]
        try:
            fishers = self._fisher(data, batch_size)
        except RuntimeError as e:  # e.g. images of another size or channel count than the model takes
            raise ValueError(f"hyperparameter 'fisher_data' of shape {tuple(data.shape)}: the model cannot "
                             f"run on it ({str(e).splitlines()[0][:200]})") from None
        while len(_FISHERS) >= 4:
            _FISHERS.pop(next(iter(_FISHERS)))
        _FISHERS[key] = (weakref.ref(data), weakref.ref(self.source), fishers)
        return fishers

    def _fisher(self, data: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
        """Mean squared gradient of CE(logits, argmax logits) per batch, at the source weights."""
        total: dict[str, torch.Tensor] = {}
        batches = data.split(batch_size)
        with torch.enable_grad():
            for x in batches:
                logits = self.net(x.to(self.device, torch.float32))
                F.cross_entropy(logits, logits.max(1)[1]).backward()
                for name, p in self.trainable:
                    if p.grad is not None:
                        square = p.grad.detach().clone() ** 2
                        total[name] = square + total[name] if name in total else square
                self.optimizer.zero_grad()
        return {name: f / len(batches) for name, f in total.items()}

    def _forward_loss(self, x):
        hp = self.hyperparameters
        logits = self._observe(self.net, x)
        margin = hp["margin_e0"] * math.log(logits.shape[1])
        e = entropy(logits)
        first = torch.where(e < margin)
        e = e[first]
        probs = logits[first].softmax(1)
        if self.probs is not None:
            similarity = F.cosine_similarity(self.probs.unsqueeze(dim=0), probs, dim=1)
            second = torch.where(torch.abs(similarity) < hp["d_margin"])
            e, probs = e[second], probs[second]
        self._update = (first[0].numel(), e.numel(), probs.detach())
        weighted = e.mul(1 / torch.exp(e.clone().detach() - margin))
        loss = weighted.mean(0)
        if self.fishers is not None:
            penalty = 0
            for name, p in self.trainable:
                if name in self.fishers:
                    penalty += hp["fisher_alpha"] * (self.fishers[name] * (p - self.source_weights[name]) ** 2).sum()
            loss = loss + penalty
        return logits, loss

    def _learn(self):
        loss, self._loss = self._loss, None
        n_first, n_second, probs = self._update
        self._update = None
        figures = {"reliable": float(n_first), "selected": float(n_second)}
        if n_second:  # all filtered out: no step (the loss is NaN)
            with torch.enable_grad():
                loss.backward()
            self.optimizer.step()
            figures["loss"] = float(loss.detach())
        self.optimizer.zero_grad()
        with torch.no_grad():
            if n_second:
                mean = probs.mean(0)
                self.probs = mean if self.probs is None else 0.9 * self.probs + (1 - 0.9) * mean
        self.selected = [self.selected[0] + n_first, self.selected[1] + n_second]
        return figures

    def _discard(self):
        super()._discard()
        self._update = None

    def state_bytes(self) -> int:
        """The base's count plus the Fisher and the moving average of the probabilities."""
        extra = [*(self.fishers or {}).values(), *([self.probs] if self.probs is not None else [])]
        return super().state_bytes() + sum(t.numel() * t.element_size() for t in extra)

    def _state(self):
        state = super()._state()
        state["probs"] = None if self.probs is None else self.probs.clone()
        state["selected"] = list(self.selected)
        state["fishers"] = None if self.fishers is None else {k: v.clone() for k, v in self.fishers.items()}
        return state

    def _load_state(self, state):
        super()._load_state(state)
        self.probs = None if state["probs"] is None else state["probs"].detach().clone().to(self.device)
        self.selected = [int(v) for v in state["selected"]]
        fishers = state["fishers"]
        if fishers is not None and set(fishers) != {n for n, _ in self.trainable}:
            raise ValueError("state dict's Fisher does not match this adapter's trained parameters")
        self.fishers = None if fishers is None else {k: v.detach().clone().to(self.device) for k, v in fishers.items()}

    def __repr__(self) -> str:
        shown = dict(self.hyperparameters)
        if shown["fisher_data"] is not None:
            shown["fisher_data"] = f"tensor{tuple(shown['fisher_data'].shape)}"
        return f"{type(self).__name__}({shown})"
