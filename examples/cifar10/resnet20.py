"""CIFAR-10 ResNet-20 for `tta serve --model` / `tta replay --model` (examples/cifar10/model.toml).

The architecture is the demo model's (runtime/demo/model.py: CIFAR ResNet, option-A shortcuts,
the usual parameter names), with the ImageNet normalisation these weights were trained with.
The weights are numpy state dicts (no pickle): by default the fine-tuned ones of the shared data
folder, `resnet20_jpegcifar_ft3.npz` (88.1 % on its JPEG CIFAR-10 test set). A relative path
is looked up in $TTA_CIFAR10_DIR, then in ../shared/data beside the repository."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime.demo.model import ResNetCifar

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
HERE = Path(__file__).resolve().parent


def find(name: str) -> Path:
    """A data file: absolute, or in $TTA_CIFAR10_DIR, or in the shared data folder beside the repo."""
    path = Path(name)
    if path.is_absolute():
        return path
    folders = [Path(os.environ["TTA_CIFAR10_DIR"])] if os.environ.get("TTA_CIFAR10_DIR") else []
    folders += [HERE.parents[2] / "shared" / "data", HERE]
    for folder in folders:
        if (folder / path).is_file():
            return folder / path
    raise FileNotFoundError(f"{name} not found in {', '.join(str(f) for f in folders)}: set TTA_CIFAR10_DIR "
                            f"(examples/cifar10/README.md says how to get the files)")


def build(weights: str = "resnet20_jpegcifar_ft3.npz") -> nn.Module:
    model = ResNetCifar(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with np.load(find(weights), allow_pickle=False) as arrays:
        state = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("normalize.") for k in missing):
        raise ValueError(f"{weights} is not a CIFAR ResNet-20 state dict (missing {missing}, unexpected {unexpected})")
    return model.eval()
