"""`sar`: SAR (Niu et al., ICLR 2023, "Towards Stable Test-Time Adaptation in Dynamic Wild World").

Sharpness-aware, reliable entropy minimisation of the normalisation layers' affine parameters
(BN with batch statistics, as tent), skipping the top of the network as the reference does
(modules whose name contains `layer4`, `blocks.9`–`blocks.11` or `norm.`, or is `norm`).
With C classes and E₀ = margin_e0·ln C, per batch:
1. logits = net(x) (the reply); e = entropy(softmax(logits)); S₁ = {i : e_i < E₀};
   L₁ = mean over S₁ of e (NaN when S₁ is empty: the gradients are then zero);
2. SAM ascent: g = ∇L₁, ε = rho·g / (‖g‖₂ + 1e-12) over all trained parameters; θ ← θ + ε;
3. e' = entropy(net(x)) at θ + ε; S₂ = {i ∈ S₁ : e'_i < E₀}; L₂ = mean over S₂ of e';
   if L₂ is a number, ema ← L₂ (first time) or 0.9·ema + 0.1·L₂;
4. θ ← θ − ε (the saved values), then one SGD step (lr, momentum, no dampening) with ∇L₂;
5. model recovery: if ema < reset_constant_em, the weights go back to the source and ema is
   forgotten. As in the reference, whose SAM wrapper does not own SGD's state, the momentum
   buffers survive a recovery; reset() clears them too.
The update (steps 2–5) runs in learn(), after the reply."""
from __future__ import annotations

import math

import torch

from .base import Hyperparameter, in_range
from .common import entropy, norm_affine_parameters, own_parameters
from .gradient import GradientAdapter, build_normalised_network

HYPERPARAMETERS = (
    Hyperparameter("lr", 1e-3, float, "(0, 1]", "SGD learning rate", in_range(0, 1, low_open=True)),
    Hyperparameter("momentum", 0.9, float, "[0, 1)", "SGD momentum", in_range(0, 1, high_open=True)),
    Hyperparameter("rho", 0.05, float, "[0, inf)", "SAM neighbourhood radius (L2)", lambda v: v >= 0),
    Hyperparameter("margin_e0", 0.4, float, "(0, inf)", "reliable samples have entropy < margin_e0·ln(classes)",
                   lambda v: v > 0),
    Hyperparameter("reset_constant_em", 0.2, float, "[0, inf)", "recover the source weights when the moving "
                   "average of the second-pass entropy falls below this (0: never)", lambda v: v >= 0),
)

SKIPPED = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")  # the reference's top-of-network rule


def sar_parameters(net) -> list[tuple[str, torch.nn.Parameter]]:
    """The normalisation affine parameters SAR trains: tent's set minus the reference's top layers."""
    def skipped(name):
        module = name.rpartition(".")[0]
        return module == "norm" or any(s in module for s in SKIPPED)
    return [(n, p) for n, p in norm_affine_parameters(net) if not skipped(n)]


class SAR(GradientAdapter):
    name = "sar"
    student_replies = True
    summary = ("SAR: sharpness-aware entropy minimisation of the normalisation affine parameters on reliable "
               "(low-entropy) samples, with recovery of the source weights on collapse.")
    uses_randomness = False
    HYPERPARAMETERS = HYPERPARAMETERS

    def __init__(self, model, **hyperparameters):
        super().__init__(model, **hyperparameters)
        hp = self.hyperparameters
        self.net = build_normalised_network(model, "bn", None, {}, own_weights=False)  # the reference: batch-stat BN
        names = [name for name, _ in sar_parameters(self.net)]
        if not names:
            raise ValueError("sar needs normalisation layers with affine parameters outside the skipped top layers")
        own_parameters(self.net, names)
        self.trainable = [(n, self.net.get_parameter(n)) for n in names]
        self.optimizer = torch.optim.SGD([p for _, p in self.trainable], lr=hp["lr"], momentum=hp["momentum"],
                                         foreach=True)
        source_state = self.source.state_dict()
        self.source_weights = {n: source_state[n] for n in names}
        self.ema: float | None = None
        self.recoveries = 0
        self._x = None
        self._finish_init({"net": self.net})

    def _observed_network(self):
        return self.net

    def _margin(self, logits) -> float:
        return self.hyperparameters["margin_e0"] * math.log(logits.shape[1])

    def _forward_loss(self, x):
        logits = self._observe(self.net, x)
        e = entropy(logits)
        self._reliable = torch.where(e < self._margin(logits))
        self._x = x
        return logits, e[self._reliable].mean(0)

    def _learn(self):
        hp = self.hyperparameters
        loss, x, reliable = self._loss, self._x, self._reliable
        self._loss = self._x = self._reliable = None
        params = [p for _, p in self.trainable]
        with torch.enable_grad():
            loss.backward()
            saved = self._ascend(params, hp["rho"])
            logits = self.net(x)
            e = entropy(logits)[reliable]
            second = e[torch.where(e < self._margin(logits))].mean(0)
            value = second.item()
            if not math.isnan(value):
                self.ema = value if self.ema is None else 0.9 * self.ema + (1 - 0.9) * value
            second.backward()
        with torch.no_grad():
            torch._foreach_copy_(params, saved)  # back to θ; the SGD step uses the gradient taken at θ + ε
        self.optimizer.step()
        self.optimizer.zero_grad()
        # a batch without reliable samples has a NaN mean (and zero gradients): no loss to report, which
        # the guard would take for a diverged update
        figures = {k: v for k, v in (("loss", float(loss.detach())), ("loss_sharp", value)) if math.isfinite(v)}
        figures["reliable"] = float(reliable[0].numel())
        if self.ema is not None and self.ema < hp["reset_constant_em"]:
            self._recover()
            figures["recovered"] = 1.0
        return figures

    @torch.no_grad()
    def _ascend(self, params, rho):
        """SAM's first step: θ ← θ + rho·g/(‖g‖ + 1e-12); returns the θ to come back to."""
        stepped = [p for p in params if p.grad is not None]
        grads = [p.grad for p in stepped]
        norm = torch.norm(torch.stack(torch._foreach_norm(grads, 2)), p=2)  # fused over the list, same numbers
        scale = rho / (norm + 1e-12)
        saved = torch._foreach_mul(params, 1.0)  # copies of θ
        if stepped:
            torch._foreach_add_(stepped, torch._foreach_mul(grads, scale))
        self.optimizer.zero_grad()
        return saved

    def _recover(self):
        with torch.no_grad():
            own = self.net.state_dict()
            for k, v in self._initial["net"].items():
                own[k].copy_(v)
        self.ema = None
        self.recoveries += 1

    def _discard(self):
        super()._discard()
        self._x = self._reliable = None

    def state_bytes(self) -> int:
        """As the base counts it, with SGD's one momentum buffer per trained parameter (Adam has two)."""
        buffers = 1 if self.hyperparameters["momentum"] > 0 else 0
        return super().state_bytes() - (2 - buffers) * sum(p.numel() * p.element_size() for _, p in self.trainable)

    def _state(self):
        state = super()._state()
        state["ema"] = self.ema
        state["recoveries"] = self.recoveries
        return state

    def _load_state(self, state):
        super()._load_state(state)
        ema = state.get("ema")
        self.ema = None if ema is None else float(ema)
        self.recoveries = int(state.get("recoveries", 0))
