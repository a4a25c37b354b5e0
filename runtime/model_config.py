"""Model config (TOML): which network to serve, how its input looks, its labels and default policy.

    name = "demo"                                   # the model name clients send
    [model]
    factory = "runtime.demo.model:build_demo_model" # or "path/to/file.py:build"; an nn.Module
    factory_args = { pretrained = false }
    weights = "demo_resnet.pt"                      # state dict loaded into the factory's module; required,
                                                    # unless factory_weights = true (the factory returns the
                                                    # trained network itself, e.g. pretrained=True) or
                                                    # random_weights = true (untrained on purpose: tests)
    # torchscript = "model.pt"  |  exported = "model.pt2"  |  onnx = "model.onnx"
    prototypes = "prototypes.pt"                    # (classes, D) tensor for mean-teacher
    fisher_data = "fisher.npz"                      # source images for eata's Fisher (x: uint8 NHWC
                                                    # or float32 NCHW in [0, 1]); without: ETA
    [input]
    size = [32, 32]                                 # H, W; images are resized to it
    channels = 3
    # mean = [0.49, 0.48, 0.45]; std = [0.25, 0.24, 0.26]   # if the network expects normalised input
    [output]
    labels = ["T-shirt/top", ...]                   # or labels_file = "labels.txt" (one per line)
    [policy]
    default = "bn"
    hyperparameters = {}                            # wire strings or TOML values
    [streams]
    tracked = ["cam-1"]                             # streams with their own metric labels

Paths are relative to the TOML file. Adapters see [0, 1] pixels: when `mean`/`std` are given the
runtime wraps the network as Normalize -> network. Only a real `nn.Module` (a factory) can adapt:
TorchScript, torch.export and ONNX artifacts are frozen graphs whose BatchNorm layers adapters
cannot reach, so they serve streams whose policy is `source` (ONNX through ONNX Runtime), unless
the config also gives a factory for the same network.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from runtime import onnx_batch_stats, onnx_frozen
from runtime.onnx_frozen import FrozenForward, TorchForward

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DEMO_CONFIG = Path(__file__).resolve().parent / "assets" / "demo" / "model.toml"


class ConfigError(ValueError):
    """The model config is wrong; the message says what to fix."""


class Normalize(nn.Module):
    """(x - mean) / std per channel, so that adapters and clients deal in [0, 1] pixels; buffers, so
    they travel with the state dict (the demo and benchmark networks start with one too)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Normalized(nn.Module):
    def __init__(self, network: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.network = network

    def forward(self, x):
        return self.network(self.normalize(x))


@dataclass
class LoadedModel:
    """A model ready to serve: an adaptable nn.Module and/or a frozen forward function."""

    name: str
    platform: str
    channels: int
    height: int
    width: int
    labels: list[str]
    num_classes: int
    default_policy: str
    default_hyperparameters: dict[str, str]
    tracked_streams: list[str]
    device: torch.device
    module: nn.Module | None = None  # what adapters wrap (eval mode, [0, 1] input)
    # float32 NCHW [0, 1] -> logits; .run(x) adds the BN layers' input means, .bn_shift(...) the figure
    frozen: FrozenForward | None = None
    # the reply of batch-statistics policies on ONNX Runtime (runtime/onnx_batch_stats.py), or None
    batch_stats: FrozenForward | None = None
    prototypes: torch.Tensor | None = None
    fisher_data: torch.Tensor | None = None  # float32 NCHW [0, 1] source images for eata's Fisher
    source_path: str = ""
    notes: list[str] = field(default_factory=list)
    # SHA-256 over the source weights (the adaptable module's state dict: keys, dtypes, shapes,
    # bytes; else the frozen graph file): every state file is bound to it (runtime/checkpoints.py)
    fingerprint: str = ""

    def can_adapt(self) -> bool:
        return self.module is not None

    def input_shape(self) -> list[int]:
        return [self.channels, self.height, self.width]


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _import_factory(spec: str, base: Path) -> Callable[..., nn.Module]:
    """"package.module:function" or "path/to/file.py:function"."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(f"[model] factory {spec!r} must look like 'package.module:function' or 'file.py:function'")
    if target.endswith(".py"):
        path = _resolve(base, target)
        if not path.is_file():
            raise ConfigError(f"[model] factory file {path} does not exist")
        module_name = f"_tta_factory_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"[model] factory module {target!r} cannot be imported: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"[model] factory {spec!r}: {attr!r} is not a function of {target}")
    return fn


def _load_labels(base: Path, output: dict) -> list[str] | None:
    if "labels" in output:
        return [str(v) for v in output["labels"]]
    if "labels_file" in output:
        path = _resolve(base, output["labels_file"])
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return None


def _torch_load(path: Path):
    if not path.is_file():
        raise ConfigError(f"file {path} named in the model config does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


MAX_FISHER_IMAGES = 10000


def _fisher_data(path: Path, channels: int, height: int, width: int) -> torch.Tensor:
    """eata's source images from an .npz (`x`: uint8 NHWC, or float32 NCHW in [0, 1]), never pickled."""
    if not path.is_file():
        raise ConfigError(f"file {path} named in the model config does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            x = data["x"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: fisher_data must be an .npz with an array 'x' ({e})") from None
    if x.ndim != 4 or not 0 < len(x) <= MAX_FISHER_IMAGES:
        raise ConfigError(f"{path}: fisher_data 'x' must hold 1 to {MAX_FISHER_IMAGES} images, got shape {list(x.shape)}")
    if x.dtype == np.uint8 and x.shape[1:] == (height, width, channels):
        return torch.from_numpy(x.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
    if x.dtype == np.float32 and x.shape[1:] == (channels, height, width):
        return torch.from_numpy(np.clip(x, 0.0, 1.0))
    raise ConfigError(f"{path}: fisher_data 'x' must be uint8 [N, {height}, {width}, {channels}] or float32 "
                      f"[N, {channels}, {height}, {width}] in [0, 1], got {x.dtype} {list(x.shape)}")


def module_fingerprint(module: nn.Module) -> str:
    """SHA-256 over a module's state dict in order: each entry's key, dtype and shape, then its bytes."""
    h = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        h.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode() + b"\n")
        if tensor.numel():
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load(path: str | Path | None = None, device: str | torch.device | None = None,
         default_policy: str | None = None, tracked: list[str] | None = None,
         frozen_backend: str = "torch") -> LoadedModel:
    """Load a model config (a TOML file, or a directory holding model.toml, e.g. KServe's
    /mnt/models); no path means the built-in demo model. frozen_backend: what runs the `source`
    streams of a PyTorch model (runtime/onnx_frozen.py): torch (here the default; the adapter),
    onnx (ONNX Runtime, or ConfigError where it is not exact) or auto (`tta serve`'s default)."""
    path = Path(path) if path else DEMO_CONFIG
    if path.is_dir():
        path = path / "model.toml"
    if not path.is_file():
        raise ConfigError(f"model config {path} does not exist")
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    base = path.parent
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(cfg.get("name") or path.stem)
    mcfg, icfg, ocfg = cfg.get("model", {}), cfg.get("input", {}), cfg.get("output", {})
    pcfg, scfg = cfg.get("policy", {}), cfg.get("streams", {})

    channels = int(icfg.get("channels", 3))
    size = icfg.get("size")
    if size is None or len(size) != 2:
        raise ConfigError(f"{path}: [input] size = [H, W] is required")
    height, width = int(size[0]), int(size[1])
    mean, std = icfg.get("mean"), icfg.get("std")
    if (mean is None) != (std is None):
        raise ConfigError(f"{path}: [input] give both mean and std, or neither")
    if mean is not None and (len(mean) != channels or len(std) != channels):
        raise ConfigError(f"{path}: [input] mean and std need {channels} values (one per channel)")

    def wrap(m: nn.Module, set_eval: bool = True) -> nn.Module:
        if set_eval:  # torch.export modules refuse eval(); they were exported in inference mode
            m = m.eval()
        if mean is None:
            return m.to(device)
        wrapped = Normalized(m, mean, std)  # in eval mode as its network (a wrapper left in training
        return (wrapped.eval() if set_eval else wrapped).to(device)  # mode once leaked into the ONNX export)

    module, frozen, platform, notes, frozen_file = None, None, "", [], None
    if "factory" in mcfg:
        network = _import_factory(mcfg["factory"], base)(**dict(mcfg.get("factory_args", {})))
        if not isinstance(network, nn.Module):
            raise ConfigError(f"[model] factory {mcfg['factory']!r} returned {type(network).__name__}, not an nn.Module")
        untrained = [k for k in ("random_weights", "factory_weights") if mcfg.get(k) is True]
        for key in ("random_weights", "factory_weights"):
            if not isinstance(mcfg.get(key, False), bool):
                raise ConfigError(f"{path}: [model] {key} must be true or false, not {mcfg[key]!r}")
        if "weights" in mcfg and untrained:
            raise ConfigError(f"{path}: [model] give weights or {untrained[0]} = true, not both")
        if "weights" not in mcfg and not untrained:
            raise ConfigError(
                f"{path}: [model] factory {mcfg['factory']!r} has no weights: the network would serve (and adapt "
                f"from) whatever its factory initialises it with, random unless the factory loads trained weights. "
                f"Add weights = \"model.pt\" (a state dict of the factory's network); or, if the factory returns "
                f"the trained network itself (e.g. pretrained=True), factory_weights = true; or, to serve untrained "
                f"weights on purpose (tests), random_weights = true")
        if "weights" in mcfg:
            state = _torch_load(_resolve(base, mcfg["weights"]))
            try:
                network.load_state_dict(state)
            except RuntimeError as e:
                raise ConfigError(f"[model] weights {mcfg['weights']} do not fit the factory's network: {e}") from None
        module = wrap(network)
        platform = "pytorch_torch"
    if "onnx" in mcfg:
        frozen_file = _resolve(base, mcfg["onnx"])
        if not frozen_file.is_file():
            raise ConfigError(f"[model] onnx file {frozen_file} does not exist")
        frozen, note = onnx_frozen.onnx_file_forward(frozen_file, device, mean, std)
        platform = platform or "onnxruntime_onnx"
        notes.append(note)
    for key, loader, plat in (("torchscript", lambda p: torch.jit.load(p, map_location="cpu"), "pytorch_libtorch"),
                              ("exported", lambda p: torch.export.load(p).module(), "pytorch_export")):
        if key in mcfg and frozen is None:
            p = _resolve(base, mcfg[key])
            if not p.is_file():
                raise ConfigError(f"[model] {key} file {p} does not exist")
            frozen = TorchForward(wrap(loader(str(p)), set_eval=key == "torchscript"), device)
            platform, frozen_file = platform or plat, p
    if module is None and frozen is None:
        raise ConfigError(f"{path}: [model] needs one of factory, torchscript, exported, onnx")
    if module is None:
        notes.append("frozen graph only: streams can run the `source` policy; add a factory to adapt")

    # warm-up forward: checks the network accepts the configured input and counts classes
    probe = np.full((2, channels, height, width), 0.5, dtype=np.float32)
    try:
        if module is not None:
            with torch.no_grad():
                out = module(torch.from_numpy(probe).to(device)).cpu().numpy()
        else:
            out = frozen(probe)
        if frozen is not None and module is not None:
            frozen(probe)
    except Exception as e:  # noqa: BLE001 - any failure means the config does not describe the model
        raise ConfigError(f"{path}: the model does not run on input [N, {channels}, {height}, {width}]: {e}") from None
    if out.ndim != 2:
        raise ConfigError(f"{path}: the model must return logits [N, classes], returned shape {list(out.shape)}")
    if frozen_backend not in ("torch", "onnx", "auto"):
        raise ConfigError(f"frozen backend {frozen_backend!r}: choose torch, onnx or auto")
    batch_stats = None
    if frozen is None and module is not None and frozen_backend != "torch":
        frozen, note, why = onnx_frozen.for_module(module, device, (channels, height, width), frozen_backend)
        if why and frozen_backend == "onnx":
            raise ConfigError(f"--frozen-backend onnx: ONNX Runtime does not serve the model exactly: {why}")
        notes.append(note)
        if frozen is not None:  # one knob: where source streams run on ONNX Runtime, so may these replies
            batch_stats, why = onnx_batch_stats.for_module(module, device, (channels, height, width))
            notes.append("bn, tent, sar, eata and deyo reply on ONNX Runtime where they predict with batch statistics"
                         if batch_stats is not None else f"batch-statistics policies reply with torch ({why})")
    num_classes = int(out.shape[1])
    labels = _load_labels(base, ocfg) or [str(i) for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ConfigError(f"{path}: {len(labels)} labels for a model with {num_classes} classes")

    prototypes = None
    if "prototypes" in mcfg:
        prototypes = _torch_load(_resolve(base, mcfg["prototypes"])).float().to(device)

    fisher_data = None
    if "fisher_data" in mcfg:
        fisher_data = _fisher_data(_resolve(base, mcfg["fisher_data"]), channels, height, width).to(device)

    policy = default_policy or str(pcfg.get("default", "source"))
    hyper = {k: (v if isinstance(v, str) else str(v)) for k, v in dict(pcfg.get("hyperparameters", {})).items()}
    if default_policy:  # a policy given on the command line comes without the config's hyperparameters
        hyper = {}
    if policy != "source" and module is None:
        raise ConfigError(f"default policy {policy!r} needs an adaptable model: {path} has only a frozen graph; "
                          f"use policy 'source' or add [model] factory")
    tracked_streams = list(dict.fromkeys(["default", *scfg.get("tracked", []), *(tracked or [])]))
    return LoadedModel(name=name, platform=platform, channels=channels, height=height, width=width,
                       labels=labels, num_classes=num_classes, default_policy=policy,
                       default_hyperparameters=hyper, tracked_streams=tracked_streams, device=device,
                       module=module, frozen=frozen, batch_stats=batch_stats, prototypes=prototypes, fisher_data=fisher_data,
                       source_path=str(path), notes=notes,
                       fingerprint=module_fingerprint(module) if module is not None else file_fingerprint(frozen_file))
