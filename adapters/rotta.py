"""`rotta`: RoTTA (Yuan et al., CVPR 2023), robust test-time adaptation for correlated, changing
streams, in the benchmark's version (mariodoebler/test-time-adaptation, classification/methods/rotta.py).

Networks: the student, whose BN layers are swapped for robust BN (RBN) and whose RBN/LN/GN
affine parameters Adam trains, and the teacher, an EMA of the student over all parameters.
RBN keeps global statistics μ, σ² (from the source's). In train mode it normalises with
μ' = (1−alpha)·μ + alpha·μ_b and σ'² = (1−alpha)·σ² + alpha·σ²_b (biased batch variance, the
gradient flows through the batch term) and keeps μ', σ'²; in eval mode it normalises with μ, σ².
Per batch:
1. t = teacher(x), eval mode: the prediction; ŷ = argmax t, u = −Σ p·log(p + 1e-6), p = softmax t;
2. after the reply, sample by sample: the sample (ŷ, u) is offered to the memory bank, then
   every item in it ages by 1; every `update_frequency` samples of the stream, one update on
   the memory M (both networks in train mode): L = mean_i w_i·CE(softmax teacher(M_i) →
   student(aug(M_i))), w = e^(−a)/(1 + e^(−a)), a = age/memory_size; Adam step;
   teacher ← (1−nu)·teacher + nu·student.
Memory bank (category-balanced, with timeliness): capacity memory_size, memory_size/K per
class; an item's score is lambda_t/(1 + e^(−age/memory_size)) + lambda_u·u/ln K (old or
uncertain: first out). A sample of class c is admitted (1) when c is under its share and the
bank has room; (2) when c is under its share, the bank is full and the highest-scoring item of
the fullest classes scores more than the newcomer at age 0: that item is dropped; (3) when c is
at its share, by rule (2) within c. Ties go to the last item in class, then insertion, order.

Departures: K is read off the first batch's logits; the reference's update call passes an
argument its loss function does not take (`loss_calculation(x)`), fixed in the comparison."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import Hyperparameter, in_range
from .common import (
    BATCH_NORMS,
    NormLayer,
    ema_update,
    norm_affine_parameters,
    own_copy,
    set_submodule,
    teacher_cross_entropy,
)
from .gradient import AUGMENT, GradientAdapter

HYPERPARAMETERS = (
    Hyperparameter("lr", 1e-3, float, "(0, 1]", "Adam learning rate", in_range(0, 1, low_open=True)),
    Hyperparameter("betas", (0.9, 0.999), tuple, "two numbers in [0, 1)", "Adam betas",
                   lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)),
    Hyperparameter("memory_size", 64, int, "integer in [1, 4096]", "capacity of the memory bank (samples)",
                   in_range(1, 4096)),
    Hyperparameter("update_frequency", 64, int, "integer in [1, 65536]",
                   "one update every this many samples of the stream (the reference: = memory_size)",
                   in_range(1, 65536)),
    Hyperparameter("nu", 0.001, float, "[0, 1]", "teacher EMA rate: teacher ← (1−nu)·teacher + nu·student",
                   in_range(0, 1)),
    Hyperparameter("alpha", 0.05, float, "[0, 1]", "robust-BN momentum of the global statistics",
                   in_range(0, 1)),
    Hyperparameter("lambda_t", 1.0, float, "[0, inf)", "weight of age (timeliness) in the eviction score",
                   lambda v: v >= 0),
    Hyperparameter("lambda_u", 1.0, float, "[0, inf)", "weight of uncertainty in the eviction score",
                   lambda v: v >= 0),
    AUGMENT,
)


class RobustBatchNorm(NormLayer):
    """RBN: global statistics moved by an EMA of the batch statistics in train mode, used as they
    are in eval mode (so batch size 1 and one-class batches are normalised sensibly)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, alpha: float):
        super().__init__()
        self.alpha, self.eps = alpha, bn.eps
        self.weight = nn.Parameter(bn.weight.detach().clone()) if bn.weight is not None else None
        self.bias = nn.Parameter(bn.bias.detach().clone()) if bn.bias is not None else None
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            batch_var, batch_mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], unbiased=False)
            mean = (1 - self.alpha) * self.running_mean + self.alpha * batch_mean
            var = (1 - self.alpha) * self.running_var + self.alpha * batch_var
            with torch.no_grad():
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
        else:
            mean, var = self.running_mean, self.running_var
        x = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            x = x * self.weight.view(shape)
        if self.bias is not None:
            x = x + self.bias.view(shape)
        return x


def convert_to_robust_bn(net: nn.Module, alpha: float) -> nn.Module:
    """Swap every BN layer of `net` that has running statistics (in place) for RBN."""
    for name, m in list(net.named_modules()):
        if isinstance(m, BATCH_NORMS) and m.running_mean is not None and m.running_var is not None:
            set_submodule(net, name, RobustBatchNorm(m, alpha))
    return net


class MemoryBank:
    """RoTTA's category-balanced memory with timeliness (CSTU). Items are [sample, uncertainty,
    age] in per-class lists; scores use Python floats, as the reference, so ties break alike."""

    def __init__(self, capacity: int, lambda_t: float, lambda_u: float):
        self.capacity, self.lambda_t, self.lambda_u = capacity, lambda_t, lambda_u
        self.num_classes = 0
        self.items: list[list[list]] = []

    def set_classes(self, k: int) -> None:
        if self.num_classes == 0:
            if k < 2:
                raise ValueError("rotta needs a classifier with at least 2 classes")
            self.num_classes, self.items = k, [[] for _ in range(k)]
        elif k != self.num_classes:
            raise ValueError(f"rotta's memory bank holds {self.num_classes} classes, the logits have {k}")

    def __len__(self) -> int:
        return sum(len(c) for c in self.items)

    def sample_shape(self) -> torch.Size | None:
        return next((c[0][0].shape for c in self.items if c), None)

    def score(self, age: int, uncertainty: float) -> float:
        return (self.lambda_t / (1 + math.exp(-age / self.capacity))
                + self.lambda_u * uncertainty / math.log(self.num_classes))

    def add(self, sample: torch.Tensor, label: int, uncertainty: float) -> bool:
        score = self.score(0, uncertainty)
        if len(self.items[label]) < self.capacity / self.num_classes:
            admitted = len(self) < self.capacity or self._evict(self._fullest_classes(), score)
        else:
            admitted = self._evict([label], score)
        if admitted:
            self.items[label].append([sample.detach().clone(), uncertainty, 0])
        for per_class in self.items:  # every item ages, the newcomer included
            for item in per_class:
                item[2] += 1
        return admitted

    def _fullest_classes(self) -> list[int]:
        most = max(len(c) for c in self.items)
        return [k for k, c in enumerate(self.items) if len(c) == most]

    def _evict(self, classes: list[int], score: float) -> bool:
        """Drop the highest-scoring item of `classes` if it scores above `score`: room was made."""
        best = None
        for k in classes:
            for i, (_, u, age) in enumerate(self.items[k]):
                s = self.score(age, u)
                if best is None or s >= best[0]:
                    best = (s, k, i)
        if best is None:
            return True
        if best[0] > score:
            self.items[best[1]].pop(best[2])
            return True
        return False

    def batch(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory as one batch, in class then insertion order, and each item's age / capacity."""
        flat = [item for per_class in self.items for item in per_class]
        ages = torch.tensor([item[2] / self.capacity for item in flat], dtype=torch.float32, device=device)
        return torch.stack([item[0] for item in flat]), ages

    def state(self) -> dict:
        flat = [(k, item) for k, per_class in enumerate(self.items) for item in per_class]
        data = torch.stack([item[0] for _, item in flat]) if flat else torch.zeros(0)
        return {"num_classes": self.num_classes, "data": data.detach().clone(),
                "classes": torch.tensor([k for k, _ in flat], dtype=torch.int64),
                "uncertainty": torch.tensor([item[1] for _, item in flat], dtype=torch.float64),
                "age": torch.tensor([item[2] for _, item in flat], dtype=torch.int64)}

    def load(self, state: dict, device) -> None:
        n, k, classes = len(state["classes"]), int(state["num_classes"]), state["classes"]
        if not (len(state["uncertainty"]) == len(state["age"]) == n and (n == 0 or len(state["data"]) == n)) \
                or n > self.capacity or (n and (k < 2 or int(classes.min()) < 0 or int(classes.max()) >= k)):
            raise ValueError("state dict's rotta memory bank is inconsistent")
        self.num_classes, self.items = k, [[] for _ in range(k)]
        for i, (label, u, age) in enumerate(zip(state["classes"].tolist(), state["uncertainty"].tolist(),
                                                 state["age"].tolist())):
            self.items[label].append([state["data"][i].to(device).clone(), float(u), int(age)])


class RoTTA(GradientAdapter):
    name = "rotta"
    batch_statistics = False
    running_statistics = True
    summary = ("RoTTA: robust BN, a category-balanced memory bank with timeliness and an EMA teacher; "
               "built for label-correlated, changing streams and small batches.")
    HYPERPARAMETERS = HYPERPARAMETERS
    state_grows = True  # the memory bank fills up to memory_size images

    def __init__(self, model, **hyperparameters):
        super().__init__(model, **hyperparameters)
        hp = self.hyperparameters
        self.student = convert_to_robust_bn(own_copy(model), hp["alpha"]).requires_grad_(False)
        params = norm_affine_parameters(self.student)
        for _, p in params:
            p.requires_grad_(True)
        self._setup_optimizer(params, hp["lr"], hp["betas"])
        self.teacher = own_copy(self.student).requires_grad_(False)
        self.memory = MemoryBank(hp["memory_size"], hp["lambda_t"], hp["lambda_u"])
        self.seen = 0  # samples of the stream so far: the update clock
        self._batch = None
        self.augment = self._augment()
        self._finish_init({"student": self.student, "teacher": self.teacher})

    def _observed_network(self):
        return self.teacher

    def _predict(self, x):
        shape = self.memory.sample_shape()
        if shape is not None and x.shape[1:] != shape:
            raise ValueError(f"rotta's memory bank holds images of shape {tuple(shape)}, got {tuple(x.shape[1:])}")
        self.teacher.eval()
        logits = self._observe(self.teacher, x)
        self.memory.set_classes(logits.shape[1])
        p = logits.softmax(1)
        self._batch = (x, p.argmax(1), (-p * torch.log(p + 1e-6)).sum(1))
        self._pending_bytes = x.numel() * x.element_size()  # the batch waits for the memory bank
        return logits

    def _learn(self):
        x, labels, uncertainty = self._batch
        self._batch = None
        figures = {}
        for sample, label, u in zip(x.unbind(0), labels.tolist(), uncertainty.tolist()):
            self.memory.add(sample, label, u)
            self.seen += 1
            if self.seen % self.hyperparameters["update_frequency"] == 0:
                figures = {"loss": self._update()}
        return figures

    def _update(self) -> float:
        data, ages = self.memory.batch(self.device)
        self.student.train()
        self.teacher.train()  # the teacher's RBN statistics move on the memory, as in the reference
        with torch.enable_grad():
            strong = self.augment(data)
            with torch.no_grad():
                teacher_logits = self.teacher(data)
            weight = torch.exp(-ages) / (1 + torch.exp(-ages))
            loss = (teacher_cross_entropy(self.student(strong), teacher_logits) * weight).mean()
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        ema_update(self.teacher, self.student, 1 - self.hyperparameters["nu"])  # 1 − nu: the reference's rounding
        return float(loss.detach())

    def _discard(self):
        self._batch = None
        self.optimizer.zero_grad()

    def _state(self):
        state = super()._state()
        state["memory"] = self.memory.state()
        state["seen"] = self.seen
        return state

    def _load_state(self, state):
        if "memory" not in state or "seen" not in state:
            raise ValueError("state dict lacks rotta's memory bank")
        memory = MemoryBank(self.memory.capacity, self.memory.lambda_t, self.memory.lambda_u)
        memory.load(state["memory"], self.device)  # checked before anything is overwritten
        super()._load_state(state)
        self.memory, self.seen = memory, int(state["seen"])

    def state_bytes(self) -> int:
        """Networks and Adam moments, plus the memory bank at capacity once the image size is
        known (it fills within memory_size samples) and 24 bytes per item of bookkeeping."""
        shape = self.memory.sample_shape()
        per_item = 24 + (shape.numel() * 4 if shape is not None else 0)
        return super().state_bytes() + self.hyperparameters["memory_size"] * per_item
