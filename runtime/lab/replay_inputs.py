"""What `tta replay` runs on: the model (the built-in demo, or the TOML config `tta serve --model`
takes) and the data (the demo's Fashion-MNIST, or the user's --dataset files), as a Stream loader.

A config with a factory adapts as in the server; an ONNX / TorchScript / torch.export-only config
runs `source` only (runtime/engine/policies.py's refusal for anything else). The user's data is
corrupted at the model's input size (runtime/lab/corruptions.py; a 1-channel model's images are
replicated to RGB, corrupted, and turned back into luminance 0.299 R + 0.587 G + 0.114 B) and cached
per (dataset fingerprint, corruption, severity, size, seed) in the bounded cache
(runtime/lab/corruption_cache.py); with `--corruptions none` the datasets are played as recorded.
"""
from __future__ import annotations

import sys
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime import model_config
from runtime.console import Progress
from runtime.lab import corruptions as corr
from runtime.lab import datasets, userdata
from runtime.lab.corruption_cache import CorruptionCache, entry_key

MEMO_BYTES = 2 << 30  # corrupted domains kept in memory between blocks / adapters; beyond: re-read the cache
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


class FrozenModule(nn.Module):
    """A frozen graph (ONNX Runtime / TorchScript / torch.export forward) as a module, for `source`."""

    def __init__(self, forward_fn):
        super().__init__()
        self.forward_fn = forward_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.forward_fn(x.detach().float().cpu().numpy()))).to(x.device)


@dataclass
class ReplayModel:
    name: str
    module: nn.Module
    can_adapt: bool
    platform: str
    expect: userdata.Expect
    prototypes: torch.Tensor | None = None
    fisher_data: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def refusal(self, names: list[str]) -> str | None:
        """The server's message for adapting a frozen graph (runtime/engine/policies.py), or None."""
        if self.can_adapt or all(n == "source" for n in names):
            return None
        return (f"model {self.name!r} is a frozen graph ({self.platform}); it serves only the 'source' policy. "
                f"To adapt, give the model config a [model] factory for the same network")


def load_model(path: str | None, device: str) -> ReplayModel:
    """The demo model (no path) or a model config; ConfigError (a ValueError) when the config is wrong."""
    if not path:
        from runtime.demo.model import build_demo_model, load_prototypes

        module = build_demo_model().to(device)
        meta = {"name": "demo", "config": "built-in", "platform": "pytorch_torch", "input": [3, 32, 32],
                "classes": 10, "fingerprint": model_config.module_fingerprint(module)}
        return ReplayModel("demo", module, True, "pytorch_torch", userdata.Expect(3, 32, 32, 10, "the demo model"),
                           load_prototypes().to(device), None, meta)
    loaded = model_config.load(path, device=device, default_policy="source")
    module = loaded.module if loaded.module is not None else FrozenModule(loaded.frozen)
    meta = {"name": loaded.name, "config": str(Path(path).resolve()), "platform": loaded.platform,
            "input": loaded.input_shape(), "classes": loaded.num_classes, "fingerprint": loaded.fingerprint}
    expect = userdata.Expect(loaded.channels, loaded.height, loaded.width, loaded.num_classes,
                             f"model {loaded.name!r}")
    return ReplayModel(loaded.name, module, loaded.can_adapt(), loaded.platform, expect, loaded.prototypes,
                       loaded.fisher_data, meta)


class DataSource:
    """The demo's data: corrupted Fashion-MNIST images per (domain, severity), plus the clean labels.
    kind: "full" (the test split: Debian package or --data-dir), "slice" (the shipped 2 000 images),
    "auto" (full when installed; with --data-dir, that folder or an error)."""

    def __init__(self, kind: str = "auto", data_dir=None, cache_dir=None, seed: int = 0, show_progress: bool = True):
        if data_dir and kind == "slice":
            raise ValueError("--data-dir is for the full Fashion-MNIST test split; drop it or --data slice")
        if kind == "auto" and data_dir:
            kind = "full"  # a folder the user named must be usable: load_split raises DatasetMissing
        if kind == "auto":
            try:
                datasets.load_split("test", data_dir)
                kind = "full"
            except datasets.DatasetMissing:
                print("note: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); "
                      "using the shipped 2 000-image demo slice", file=sys.stderr)
                kind = "slice"
        self.kind, self.data_dir, self.cache_dir, self.seed = kind, data_dir, cache_dir, seed
        self.show_progress = show_progress
        self.recorded = None
        if kind == "slice":
            raw, self.labels = datasets.load_demo_slice_raw()
            self.clean = datasets.to_model_input(raw)
        else:
            self.clean = None
            raw, self.labels = datasets.load_split("test", data_dir)
        name = "fashion-mnist demo slice" if kind == "slice" else "fashion-mnist test"
        self.meta = [{"name": name, "path": str(datasets.DEMO_SLICE if kind == "slice" else datasets.data_dir(data_dir)),
                      "samples": len(self.labels), "dtype": "uint8",
                      "fingerprint": userdata.fingerprint(raw, self.labels)}]
        self._memo: dict[tuple[str, int], np.ndarray] = {}

    def __call__(self, domain: str, severity: int) -> tuple[np.ndarray, np.ndarray]:
        key = (domain, severity)
        if key not in self._memo:
            if self.kind == "slice":
                self._memo[key] = corr.corrupt(self.clean, domain, severity, seed=self.seed)
            else:
                # uint8 (the cache's own format): 4× less memory than float32, and exact
                self._memo[key], _ = corr.corrupted_split(domain, severity, "test", seed=self.seed,
                                                          data_dir=self.data_dir, cache=self.cache_dir,
                                                          show_progress=self.show_progress, as_uint8=True)
        return self._memo[key], self.labels

    def cache_line(self) -> str | None:
        return None


def corrupt_to_uint8(x: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """NCHW uint8 or float32 [0, 1] images with 1 or 3 channels -> corrupted uint8 NCHW, same shape."""
    images = x.astype(np.float32) / 255 if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
    gray = images.shape[1] == 1
    out = corr.corrupt(np.repeat(images, 3, axis=1) if gray else images, name, severity, seed)
    if gray:
        out = np.tensordot(out, LUMA, axes=([1], [0]))[:, None]
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


class UserSource:
    """The user's datasets as a Stream loader: corrupted (one dataset, the corruption cache) or as
    recorded (`recorded`: domain name -> labels, one domain per dataset)."""

    def __init__(self, sets: list[userdata.Dataset], corrupt: bool, cache: CorruptionCache | None, seed: int = 0,
                 show_progress: bool = True):
        self.kind = "user"
        self.sets = {d.name: d for d in userdata.unique_names(sets)}
        self.corrupt, self.cache, self.seed, self.show_progress = corrupt, cache, seed, show_progress
        if corrupt:
            if len(sets) != 1:
                raise userdata.DataError("several --dataset files are successive domains with --corruptions none "
                                         "only; to corrupt them, concatenate them into one .npz")
            (only,) = sets
            c, h, w = only.x.shape[1:]
            if c not in (1, 3) or min(h, w) < corr.MIN_SIDE:
                raise userdata.DataError(f"the corruptions need 1- or 3-channel images of at least {corr.MIN_SIDE}x"
                                         f"{corr.MIN_SIDE} px, the model takes [{c}, {h}, {w}]; use --corruptions none")
            self.labels, self.recorded = only.y, None
        else:
            self.labels, self.recorded = None, {name: d.y for name, d in self.sets.items()}
        self.meta = [d.describe() for d in self.sets.values()]
        self._memo: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def __call__(self, domain: str, severity: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.corrupt:
            d = self.sets[domain]
            return d.x, d.y
        (d,) = self.sets.values()
        key = (domain, severity)
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key], d.y
        cache_key = entry_key(d.fingerprint, domain, severity, d.x.shape[1:], self.seed)
        x = self.cache.get(cache_key, d.x.shape) if self.cache else None
        if x is None:
            x = np.empty(d.x.shape, np.uint8)
            bar = Progress(total=len(x), desc=f"{domain} s{severity}", disable=not self.show_progress)
            for k, start in enumerate(range(0, len(x), 1000)):  # chunk k seeded by (seed, k), as corrupted_split
                x[start:start + 1000] = corrupt_to_uint8(d.x[start:start + 1000], domain, severity,
                                                         zlib.crc32(f"{self.seed}/{k}".encode()))
                bar.update(min(1000, len(x) - start))
            bar.close()
            if self.cache:
                self.cache.put(cache_key, x)
        self._memo[key] = x
        while sum(a.nbytes for a in self._memo.values()) > MEMO_BYTES and len(self._memo) > 1:
            self._memo.popitem(last=False)
        return x, d.y

    def cache_line(self) -> str | None:
        return self.cache.line() if self.cache and self.corrupt else None
