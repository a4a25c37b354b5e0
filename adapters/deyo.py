"""`deyo`: DeYO (Lee et al., ICLR 2024), destroy your object: entropy minimisation on the samples
whose prediction is confident and relies on the object's shape, in the benchmark's version
(mariodoebler/test-time-adaptation, classification/methods/deyo.py).

Network and trainable set as TENT (batch-statistics BN, Adam on the normalisation layers'
affine parameters), except that modules named like a ResNet's layer4, a ViT's blocks 9–11 or a
final `norm` are left frozen, as in the reference. Per batch, with K classes:
1. o = net(x): the prediction; e = entropy(softmax o);
2. after the reply: keep S1 = {e < margin·ln K}; x' = the S1 images with their structure
   destroyed (`aug_type`: patch = cut into patch_len × patch_len tiles shuffled per image, one
   torch.rand per tile from the generator; pixel = one random permutation of the pixel
   positions for the batch; occ = a square of occlusion_size at (row_start, column_start) set to
   the image's channel means); o' = net(x') without gradient (batch statistics of x');
3. PLPD_i = p_i[ŷ_i] − p'_i[ŷ_i], ŷ = argmax p, p = softmax o, p' = softmax o';
   keep S2 = {i in S1: PLPD_i > plpd};
4. L = mean over S2 of e_i·c_i, c_i = reweight_ent/exp(e_i − margin_e0·ln K) + reweight_plpd/exp(−PLPD_i)
   (c without gradient); one Adam step. No update when S1 or S2 is empty."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Hyperparameter, in_range
from .common import entropy, norm_affine_parameters, own_parameters
from .gradient import NORM, NORM_OPTIONS, GradientAdapter

HYPERPARAMETERS = (
    Hyperparameter("lr", 1e-3, float, "(0, 1]", "Adam learning rate", in_range(0, 1, low_open=True)),
    Hyperparameter("margin", 0.5, float, "[0, inf)", "entropy filter: keep samples with entropy < margin·ln K",
                   lambda v: v >= 0),
    Hyperparameter("margin_e0", 0.4, float, "[0, inf)",
                   "entropy reference of the sample weights, times ln K (the reference's EATA margin_e0)",
                   lambda v: v >= 0),
    Hyperparameter("plpd", 0.2, float, "[-1, 1]",
                   "PLPD filter: keep samples whose pseudo-label probability drops by more than this "
                   "when the object's structure is destroyed", in_range(-1, 1)),
    Hyperparameter("reweight_ent", True, bool, "true | false", "weight samples by exp(−(entropy − margin_e0·ln K))"),
    Hyperparameter("reweight_plpd", True, bool, "true | false", "weight samples by exp(PLPD)"),
    Hyperparameter("aug_type", "patch", str, "patch | pixel | occ",
                   "how the object's structure is destroyed: shuffled tiles, shuffled pixels or an occluded square",
                   lambda v: v in ("patch", "pixel", "occ")),
    Hyperparameter("patch_len", 4, int, "integer in [1, 64]", "tiles per side for aug_type=patch",
                   in_range(1, 64)),
    Hyperparameter("occlusion_size", 112, int, "integer >= 0", "side of the occluded square for aug_type=occ",
                   lambda v: v >= 0),
    Hyperparameter("row_start", 56, int, "integer >= 0", "first row of the occluded square", lambda v: v >= 0),
    Hyperparameter("column_start", 56, int, "integer >= 0", "first column of the occluded square",
                   lambda v: v >= 0),
    NORM, NORM_OPTIONS,
)


def _frozen_by_reference(parameter_name: str) -> bool:
    """The reference adapts no top blocks: ResNet layer4, ViT blocks 9-11 and the final norm."""
    module = parameter_name.rpartition(".")[0]
    return (any(s in module for s in ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm."))
            or module == "norm")


def destroy_structure(x: torch.Tensor, hp: dict, generator) -> torch.Tensor:
    """x' of DeYO for a batch (B, C, H, W): its object's shape destroyed, its colours kept."""
    x = x.detach().clone()
    b, c = x.shape[:2]
    side = x.shape[-1]  # the reference sizes everything by the width
    if hp["aug_type"] == "occ":
        mean = x.view(b, c, -1).mean(dim=2)[:, :, None, None]
        r, q, s = hp["row_start"], hp["column_start"], hp["occlusion_size"]
        window = x[:, :, r:r + s, q:q + s]
        window.copy_(mean.expand_as(window))
        return x
    if hp["aug_type"] == "pixel":
        order = torch.randperm(x.shape[-2] * x.shape[-1], generator=generator).to(x.device)
        return x.reshape(b, c, -1)[:, :, order].reshape(x.shape)
    n = hp["patch_len"]
    tiled = side // n * n
    x = _resize(x, tiled)  # a whole number of tiles
    h = w = tiled // n
    tiles = x.view(b, c, n, h, n, w).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c, h, w)
    order = torch.argsort(torch.rand(b, n * n, generator=generator), dim=-1).to(x.device)
    tiles = tiles[torch.arange(b, device=x.device).unsqueeze(-1), order]
    x = tiles.view(b, n, n, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b, c, tiled, tiled)
    return _resize(x, side)


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """Square resize as torchvision's Resize on tensors (bilinear, antialiased; a no-op at the same size)."""
    if tuple(x.shape[-2:]) == (side, side):
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def deyo_loss(net, x: torch.Tensor, logits: torch.Tensor, hp: dict, generator):
    """DeYO's loss for a batch predicted as `logits` (with their graph): (loss or None when every
    sample is filtered out, the indices kept, their weights)."""
    k = logits.shape[1]
    ent = entropy(logits)
    kept = torch.where(ent < hp["margin"] * math.log(k))[0]
    if len(kept) == 0:
        return None, kept, None
    with torch.no_grad():
        logits_prime = net(destroy_structure(x[kept], hp, generator))
    prob, prob_prime = logits[kept].softmax(1), logits_prime.softmax(1)
    label = prob.argmax(dim=1, keepdim=True)
    plpd = (prob.gather(1, label) - prob_prime.gather(1, label)).reshape(-1)
    second = torch.where(plpd > hp["plpd"])[0]
    if len(second) == 0:
        return None, kept[second], None
    ent, plpd = ent[kept][second], plpd[second]
    weight = None
    if hp["reweight_ent"] or hp["reweight_plpd"]:
        e = ent.detach()
        weight = (float(hp["reweight_ent"]) * (1.0 / torch.exp(e - hp["margin_e0"] * math.log(k)))
                  + float(hp["reweight_plpd"]) * (1.0 / torch.exp(-1.0 * plpd.detach())))
        ent = ent.mul(weight)
    return ent.mean(0), kept[second], weight


class DeYO(GradientAdapter):
    name = "deyo"
    student_replies = True
    summary = ("DeYO: entropy minimisation on the normalisation layers' affine parameters, only on samples "
               "that are confident and whose prediction drops when the object's shape is destroyed (PLPD).")
    HYPERPARAMETERS = HYPERPARAMETERS

    def __init__(self, model, **hyperparameters):
        super().__init__(model, **hyperparameters)
        self.net = self._norm_network(model, own_weights=False)
        names = [name for name, _ in norm_affine_parameters(self.net) if not _frozen_by_reference(name)]
        own_parameters(self.net, names)
        self._setup_optimizer([(n, self.net.get_parameter(n)) for n in names], self.hyperparameters["lr"])
        self._finish_init({"net": self.net})

    def _observed_network(self):
        return self.net

    def _forward_loss(self, x):
        logits = self._observe(self.net, x)
        # the destroyed-structure pass serves the update only: it runs in learn(), after the reply
        return logits, lambda: deyo_loss(self.net, x, logits, self.hyperparameters, self.generator)

    def _learn(self):
        loss, self._loss = self._loss, None
        with torch.enable_grad():
            loss, selected, _ = loss()
            if loss is not None:
                loss.backward()
                self.optimizer.step()
        self.optimizer.zero_grad()
        figures = {"selected": float(len(selected))}
        if loss is not None:
            figures["loss"] = float(loss.detach())
        return figures
