"""The built-in demo model: a CIFAR-style ResNet-20 with BatchNorm, trained on Fashion-MNIST.

Architecture (He et al. 2016, CIFAR ResNet; 0.27 M parameters): Normalize -> 3×3 conv 3→16,
BN, ReLU -> three stages of 3 BasicBlocks (16/32/64 channels, stages 2 and 3 stride 2,
parameter-free "option A" shortcuts) -> global average pool -> nn.Linear(64, 10).
Parameter names follow the usual CIFAR ResNet layout (conv1, bn1, layer{1,2,3}.{0,1,2}.*,
linear), so CIFAR ResNet-20 weights load into it too (with their own Normalize).

The model takes float32 NCHW pixels in [0, 1] (3×32×32, see runtime.lab.datasets.to_model_input):
normalisation is the first module, as the adapters contract asks. The final nn.Linear is the
classifier; its input (64-d pooled features) is the "encoder" output used by mean-teacher.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from runtime.model_config import Normalize

DEMO_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"
WEIGHTS = DEMO_ASSETS / "demo_resnet.pt"
PROTOTYPES = DEMO_ASSETS / "prototypes.pt"

# Mean and std of the padded 3×32×32 Fashion-MNIST train images (all channels equal;
# the 2-px zero border lowers them from 0.2860/0.3530 on 28×28).
FASHION_MEAN = (0.2190, 0.2190, 0.2190)
FASHION_STD = (0.3318, 0.3318, 0.3318)
NUM_CLASSES = 10


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # option A: subsample spatially and zero-pad channels, no parameters
        self.pad = (planes - in_planes) // 2 if (stride != 1 or in_planes != planes) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class ResNetCifar(nn.Module):
    def __init__(self, blocks_per_stage: int = 3, num_classes: int = NUM_CLASSES,
                 mean=FASHION_MEAN, std=FASHION_STD):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for i, (planes, stride) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
            layers = []
            for b in range(blocks_per_stage):
                layers.append(BasicBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():  # He init, as in the CIFAR ResNet papers
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def build_demo_model(pretrained: bool = True, weights: str | Path | None = None) -> nn.Module:
    """The demo ResNet-20 in eval mode, with the shipped weights unless pretrained=False."""
    model = ResNetCifar()
    if pretrained:
        path = Path(weights) if weights else WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"demo weights {path} are missing; `tta train-demo` writes them")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def load_prototypes(path: str | Path | None = None) -> torch.Tensor:
    """Class prototypes (10 × 64 float32) of the demo model, for the mean-teacher adapter."""
    return torch.load(Path(path) if path else PROTOTYPES, map_location="cpu", weights_only=True)
