"""`cotta`: CoTTA (Wang et al., CVPR 2022), continual test-time adaptation, in the benchmark
ordering (mariodoebler/test-time-adaptation, classification/methods/cotta.py).

Networks (all with batch-statistics BN): the student (every weight and bias trained by Adam),
the teacher (EMA of the student) and the anchor (source weights, never updated). Per batch:
1. s = student(x);
2. conf = mean over the batch of the anchor's max softmax;
3. t = teacher(x) if conf >= threshold, else the mean of the teacher's logits over
   `n_augmentations` augmented copies of x;
4. loss = mean CE from softmax(t) to the student (symmetric ½/½ with loss="sce");
5. Adam step; teacher ← ema·teacher + (1−ema)·student over all parameters;
6. stochastic restore: each weight element returns to its source value with restore_prob
   (masks drawn on the CPU in named_modules order, after the update);
7. the prediction is t, the teacher's logits from before the update."""
import torch

from .base import Hyperparameter, in_range
from .common import (
    direct_weights_and_biases,
    ema_update,
    own_copy,
    rebind_to_source,
    stochastic_restore,
    symmetric_cross_entropy,
    teacher_cross_entropy,
)
from .gradient import AUGMENT, NORM, NORM_OPTIONS, GradientAdapter
from .grouped_norm import groupable, grouped

# Input elements per grouped teacher forward, by device type. On a GPU the serial passes are
# launch-bound and stacking pays up to large sizes (16.8 M: 5461 images of 3×32×32, 111 of
# 3×224×224; the cap bounds memory). On the CPU the forward is compute-bound and a stacked
# forward is slower per image (demo ResNet-20, 1 thread: 0.92× at 2×8 images, 0.66× at 32×8),
# so there the teacher keeps serial passes (0: no stacking).
MAX_GROUPED_ELEMENTS = {"cuda": 1 << 24, "cpu": 0}

HYPERPARAMETERS = (
    Hyperparameter("lr", 1e-3, float, "(0, 1]", "Adam learning rate", in_range(0, 1, low_open=True)),
    Hyperparameter("betas", (0.9, 0.999), tuple, "two numbers in [0, 1)", "Adam betas",
                   lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)),
    Hyperparameter("ema", 0.999, float, "[0, 1]", "teacher EMA momentum", in_range(0, 1)),
    Hyperparameter("restore_prob", 0.01, float, "[0, 1]",
                   "probability that a weight element is restored to its source value after each step",
                   in_range(0, 1)),
    Hyperparameter("threshold", 0.92, float, "[0, 1]",
                   "anchor-confidence threshold below which the teacher averages augmented passes "
                   "(0.92 CIFAR10, 0.72 CIFAR100, 0.1 ImageNet)", in_range(0, 1)),
    Hyperparameter("n_augmentations", 32, int, "integer in [1, 1024]", "augmented teacher passes",
                   in_range(1, 1024)),
    Hyperparameter("loss", "ce", str, "ce | sce",
                   "ce: teacher-to-student cross-entropy (CIFAR); sce: symmetric ½/½ (ImageNet-style)",
                   lambda v: v in ("ce", "sce")),
    AUGMENT, NORM, NORM_OPTIONS,
)


class CoTTA(GradientAdapter):
    name = "cotta"
    summary = ("CoTTA: weight-averaged teacher, augmentation-averaged pseudo-labels and stochastic "
               "restoration to the source weights; updates all weights.")
    HYPERPARAMETERS = HYPERPARAMETERS

    def __init__(self, model, **hyperparameters):
        super().__init__(model, **hyperparameters)
        hp = self.hyperparameters
        self.student = self._norm_network(model).requires_grad_(True)
        self._setup_optimizer(direct_weights_and_biases(self.student), hp["lr"], hp["betas"])
        self.teacher = own_copy(self.student).requires_grad_(False)
        self.anchor = own_copy(self.student)
        rebind_to_source(self.anchor, self.source.state_dict())  # source weights, batch-stat BN
        self.augment = self._augment()
        self._finish_init({"student": self.student, "teacher": self.teacher, "anchor": self.anchor})

    def _observed_network(self):
        return self.student

    def _forward_loss(self, x):
        hp = self.hyperparameters
        student_logits = self._observe(self.student, x)
        with torch.no_grad():
            confidence = torch.softmax(self.anchor(x), dim=1).max(1)[0].mean(0)
            if confidence < hp["threshold"]:
                teacher_logits = self._augmented_teacher(x, hp["n_augmentations"])
            else:
                teacher_logits = self.teacher(x)
        if hp["loss"] == "ce":
            loss = teacher_cross_entropy(student_logits, teacher_logits).mean(0)
        else:
            loss = symmetric_cross_entropy(student_logits, teacher_logits, 0.5).mean(0)
        return teacher_logits, loss

    # False: one teacher pass per augmented copy (the reference's loop); the bench compares both.
    _group_teacher = True

    def _augmented_teacher(self, x, n):
        """Mean teacher logits over n augmented copies of x. The copies are drawn one after
        another, in the reference's order (the teacher draws nothing), then go through the
        teacher stacked, each normalised with its own batch statistics: the serial result."""
        per_pass = MAX_GROUPED_ELEMENTS.get(x.device.type, 0) // x.numel()
        if per_pass < 2 or not (self._group_teacher and groupable(self.teacher)):  # e.g. UnMix-TNS teacher
            return torch.stack([self.teacher(self.augment(x)) for _ in range(n)]).mean(0)
        logits = []
        for start in range(0, n, per_pass):
            groups = min(per_pass, n - start)
            copies = torch.cat([self.augment(x) for _ in range(groups)])
            with grouped(self.teacher, groups):
                logits.append(self.teacher(copies))
        return torch.cat(logits).view(n, x.shape[0], -1).mean(0)

    def _after_step(self):
        hp = self.hyperparameters
        ema_update(self.teacher, self.student, hp["ema"])
        if hp["restore_prob"] > 0:
            stochastic_restore(self.trainable, self.source_weights, hp["restore_prob"], self.generator)
