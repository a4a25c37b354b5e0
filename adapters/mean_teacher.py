"""`mean-teacher`: Robust Mean Teacher (RMT, Döbler et al., CVPR 2023), source-free.

Student (all weights and biases, batch-statistics BN) trained by Adam; teacher = EMA of the
student. The "encoder" is everything up to the input of the model's final nn.Linear (captured
with a forward hook) and the classifier is that layer. Per batch:
1. f = enc(x), o = cls(f); f_a, o_a likewise for one augmented copy of x; o_t = teacher(x);
2. L_st = mean_b ½·SCE(o, o_t) + ½·SCE(o_a, o_t), SCE with α = sce_alpha;
3. with source prototypes P (Y×D): nearest prototype of each f by cosine, views
   V = [P[nn], f, f_a] → contrastive loss (SupCon, SimCLR mode, all anchors, temperature) on
   projector(V), projector = Linear(D, d)·ReLU·Linear(d, d) trained in a second Adam group;
4. L = L_st + lambda_contrast·L_con; Adam step; teacher EMA over all parameters;
5. the prediction is o + o_t, computed before the update.

A server has no source data, so the prototypes ship with the model (`prototypes=`); without
them the contrastive term is off and this is the SCE mean teacher. reset() returns to the source
weights (the reference returns to its post-warm-up state, which needs source data)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Hyperparameter, in_range
from .common import direct_weights_and_biases, ema_update, own_copy, symmetric_cross_entropy
from .gradient import AUGMENT, NORM, NORM_OPTIONS, GradientAdapter

HYPERPARAMETERS = (
    Hyperparameter("lr", 1e-3, float, "(0, 1]", "Adam learning rate (student and projector)",
                   in_range(0, 1, low_open=True)),
    Hyperparameter("ema", 0.999, float, "[0, 1]", "teacher EMA momentum", in_range(0, 1)),
    Hyperparameter("sce_alpha", 0.5, float, "[0, 1]", "weight of the reverse term of the symmetric CE",
                   in_range(0, 1)),
    Hyperparameter("lambda_contrast", 1.0, float, "[0, inf)", "weight of the contrastive loss",
                   lambda v: v >= 0),
    Hyperparameter("temperature", 0.1, float, "(0, inf)", "contrastive temperature", lambda v: v > 0),
    Hyperparameter("projection_dim", 128, int, "integer >= 1", "projector width", lambda v: v >= 1),
    Hyperparameter("prototypes", None, object, "None or a float tensor (classes × feature dim)",
                   "class prototypes of the source features at the final Linear's input, computed "
                   "offline from source data and shipped with the model; None: contrastive term off",
                   lambda v: v is None or (isinstance(v, torch.Tensor) and v.dim() == 2)),
    AUGMENT, NORM, NORM_OPTIONS,
)


class MeanTeacher(GradientAdapter):
    ensemble_size = 2  # the prediction is student + teacher logits, as in the reference
    name = "mean-teacher"
    summary = ("Robust Mean Teacher (source-free): symmetric-CE mean teacher with augmentation and, "
               "with prototypes shipped with the model, a contrastive loss against them.")
    HYPERPARAMETERS = HYPERPARAMETERS

    def __init__(self, model, **hyperparameters):
        super().__init__(model, **hyperparameters)
        hp = self.hyperparameters
        self.student = self._norm_network(model).requires_grad_(True)
        self._setup_optimizer(direct_weights_and_biases(self.student), hp["lr"])
        self.teacher = own_copy(self.student).requires_grad_(False)
        self.classifier = _final_linear(self.student)
        self.classifier.register_forward_hook(self._capture_features)
        self._features = None
        networks = {"student": self.student, "teacher": self.teacher}
        self.prototypes = None
        if hp["prototypes"] is not None:
            self.prototypes = hp["prototypes"].detach().to(self.device, torch.float32)
            if self.prototypes.shape[1] != self.classifier.in_features:
                raise ValueError(f"hyperparameter 'prototypes' has feature dim {self.prototypes.shape[1]}, "
                                 f"the final Linear takes {self.classifier.in_features}")
            self.projector = self._make_projector(self.prototypes.shape[1], hp["projection_dim"])
            self.optimizer.add_param_group({"params": list(self.projector.parameters()), "lr": hp["lr"]})
            networks["projector"] = self.projector
        self.augment = self._augment()
        self._finish_init(networks)

    def _make_projector(self, dim: int, width: int) -> nn.Module:
        if self.generator is None:  # reference: default nn.Linear init from the global generator
            return nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width)).to(self.device)
        layers = [nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width)]
        with torch.no_grad():
            for layer in (layers[0], layers[2]):  # nn.Linear's default init, from our generator
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=self.generator)
                bound = 1 / math.sqrt(layer.in_features)
                nn.init.uniform_(layer.bias, -bound, bound, generator=self.generator)
        return nn.Sequential(*layers).to(self.device)

    def _capture_features(self, _module, inputs, _output):
        self._features = inputs[0]

    def _observed_network(self):
        return self.student

    def _encode_classify(self, x):
        logits = self.student(x)
        return self._features.flatten(1), logits

    def _forward_loss(self, x):
        hp = self.hyperparameters
        features, logits = self._observe(self._encode_classify, x)
        with torch.no_grad():
            logits_teacher = self.teacher(x)

        def loss():
            # the augmented view serves the update only, so its pass runs in learn(), after the
            # reply; its draws come from the adapter's generator in the same order as in the
            # reference, and the teacher (batch statistics, no running state) is unaffected by
            # the order of the passes: the results are the reference's bit for bit
            features_aug, logits_aug = self._encode_classify(self.augment(x))
            sce = lambda a, b: symmetric_cross_entropy(a, b, hp["sce_alpha"])  # noqa: E731
            total = (0.5 * sce(logits, logits_teacher) + 0.5 * sce(logits_aug, logits_teacher)).mean(0)
            if self.prototypes is not None:
                with torch.no_grad():
                    similarity = F.cosine_similarity(self.prototypes.unsqueeze(1), features.unsqueeze(0), dim=-1)
                    nearest = similarity.argmax(dim=0)
                views = torch.stack([self.prototypes[nearest], features, features_aug], dim=1)
                total = total + hp["lambda_contrast"] * self._contrastive(views)
            return total
        return logits + logits_teacher, loss

    def _contrastive(self, views: torch.Tensor) -> torch.Tensor:
        """SupCon in its unsupervised mode, all anchors: for each of the 3B projected views the
        positives are the same sample's two other views; the rest are negatives."""
        n_views, batch = views.shape[1], views.shape[0]
        tau = self.hyperparameters["temperature"]
        z = F.normalize(self.projector(torch.cat(torch.unbind(views, dim=1), dim=0)), p=2, dim=1)
        logits = torch.div(z @ z.T, tau)
        logits = logits - logits.max(dim=1, keepdim=True)[0].detach()
        not_self = 1.0 - torch.eye(n_views * batch, device=z.device)
        positives = torch.eye(batch, device=z.device).repeat(n_views, n_views) * not_self
        log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
        mean_log_prob_positive = (positives * log_prob).sum(1) / positives.sum(1)
        return (-mean_log_prob_positive).view(n_views, batch).mean()  # temperature / base temperature = 1

    def _after_step(self):
        ema_update(self.teacher, self.student, self.hyperparameters["ema"])


def _final_linear(net: nn.Module) -> nn.Linear:
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("mean-teacher needs a model whose classifier is a final nn.Linear")
    return linears[-1]
