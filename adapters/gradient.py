"""`GradientAdapter`: the base of the weight-updating adapters (a student network trained by Adam, one step per batch).

Also the hyperparameters they share (NORM, NORM_OPTIONS, AUGMENT) and `build_normalised_network`,
the copy of the model with its BN layers configured for `norm` that they train. The norm layers
come from the BN-only adapters' modules (bn_alpha.py, unmix_tns.py), which never import this one.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .augment import CottaAugment
from .base import Adapter, Hyperparameter
from .bn_alpha import AlphaBatchNorm, convert_to_alpha_bn
from .common import configure_batch_stats, own_copy, share_copy
from .unmix_tns import UnMixTNS, convert_to_unmix_tns

NORM = Hyperparameter(
    "norm", "bn", str, "bn | bn-alpha | unmix-tns",
    "normalisation under the weight update: bn = batch statistics (the reference); bn-alpha or "
    "unmix-tns swap in those layers first, as UnMix-TNS's authors stacked them",
    lambda v: v in ("bn", "bn-alpha", "unmix-tns"))
NORM_OPTIONS = Hyperparameter(
    "norm_options", None, object, "None or a dict of the norm adapter's hyperparameters",
    "hyperparameters of the `norm` layers (e.g. {'k': 16} for unmix-tns)",
    lambda v: v is None or isinstance(v, dict))
AUGMENT = Hyperparameter(
    "augment", None, object, "None or a callable batch -> batch in [0, 1]",
    "test-time augmentation; None: the CoTTA 'hard' transform drawn from the adapter's generator",
    lambda v: v is None or callable(v))

# norm (other than "bn") -> the BN-only adapter that owns those layers and their hyperparameters
NORM_ADAPTERS: dict[str, type[Adapter]] = {"bn-alpha": AlphaBatchNorm, "unmix-tns": UnMixTNS}


class GradientAdapter(Adapter):
    """Base of the weight-updating adapters: a student network trained by Adam, one step per
    batch. Subclasses build their networks and implement `_forward_loss(x) -> (prediction,
    loss)` and `_after_step()`; `loss` may be a function computing it in learn(), after the reply,
    for the passes only the update needs."""

    updates_weights = True
    uses_randomness = True
    # the prediction is the student network alone, its BN layers with batch statistics, and only
    # BN affine parameters trained (tent, sar, eata, deyo): with norm=bn and one step a batch,
    # batch_stats_affine() lets the engine compute the reply elsewhere
    student_replies = False

    def _norm_network(self, model: nn.Module, own_weights: bool = True) -> nn.Module:
        norm = self.hyperparameters["norm"]
        options = dict(self.hyperparameters["norm_options"] or {})
        if norm != "bn":
            layers = NORM_ADAPTERS[norm]  # the BN-only adapter whose layers `norm` swaps in validates its options
            options = {k: v for k, v in layers.validate(options).items() if k not in ("seed", "generator")}
        elif options:
            raise ValueError("hyperparameter 'norm_options' is only for norm='bn-alpha' or 'unmix-tns'")
        return build_normalised_network(model, norm, self.generator, options, own_weights=own_weights)

    def batch_stats_affine(self):
        hp = self.hyperparameters
        if not self.student_replies or hp.get("norm", "bn") != "bn" or hp.get("steps", 1) != 1:
            return None
        return dict(self.trainable)

    def _augment(self):
        return self.hyperparameters["augment"] or CottaAugment(self.generator)

    def _setup_optimizer(self, params: list[tuple[str, nn.Parameter]], lr: float, betas=(0.9, 0.999)) -> None:
        self.trainable = params
        # foreach: one fused kernel per Adam operation over all parameters instead of a loop
        # (torch's default on CUDA already; on the CPU it gives the same numbers, bit for bit)
        self.optimizer = torch.optim.Adam([p for _, p in params], lr=lr, betas=betas, weight_decay=0.0,
                                          foreach=True)
        source_state = self.source.state_dict()
        self.source_weights = {name: source_state[name] for name, _ in params}

    def _finish_init(self, networks: dict[str, nn.Module]) -> None:
        """Record the networks whose state is per-stream, and the initial state for reset()."""
        self.networks = networks
        self._weights_at: set[int] | None = None  # storages of all weights, found at the first prediction
        self._graph_bytes: dict[tuple, int] = {}  # input (shape, dtype, device) -> bytes its graph holds
        self._initial = self._state()
        self._remember_generator()

    def _predict(self, x):
        # What the graph saves depends on the batch's shape (the filtered subsets of sar, eata and
        # deyo change it by a few index tensors at most): measured at the first batch of each
        # shape, by hooks that cost a Python call per saved tensor, and reused after that.
        key = (tuple(x.shape), x.dtype, x.device)
        held = self._graph_bytes.get(key)
        if held is None:
            saved = _SavedTensors()
            with saved, torch.enable_grad():
                prediction, loss = self._forward_loss(x)
            held = saved.bytes_held(loss, exclude=self._weight_storages())
            if len(self._graph_bytes) >= 64:
                self._graph_bytes.pop(next(iter(self._graph_bytes)))
            self._graph_bytes[key] = held
        else:
            with torch.enable_grad():
                prediction, loss = self._forward_loss(x)
        self._loss = loss
        self._pending_bytes = held
        return prediction

    def _weight_storages(self) -> set[int]:
        """Storages of the weights and buffers (the source's and the stream's own, counted in
        state_bytes), which the graph saves but does not hold beyond the stream's state. Found
        once: loading a state, resetting and every update write into the same tensors."""
        if self._weights_at is None:
            modules = [self.source, *self.networks.values()]
            self._weights_at = {t.untyped_storage().data_ptr() for m in modules
                                for t in (*m.parameters(), *m.buffers())}
        return self._weights_at

    def _learn(self):
        loss, self._loss = self._loss, None
        with torch.enable_grad():
            if callable(loss):  # the part of the loss the prediction does not need: computed after the reply
                loss = loss()
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self._after_step()
        return {"loss": float(loss.detach())}

    def _discard(self):
        self._loss = None
        self.optimizer.zero_grad()

    def _forward_loss(self, x):
        raise NotImplementedError

    def _after_step(self):
        pass

    def _reset(self):
        self._load_state(self._initial)

    def _state(self):
        # Per-stream tensors only: whatever shares storage with the source model is left out.
        shared = {t.data_ptr() for t in list(self.source.parameters()) + list(self.source.buffers())}
        state = {name: {k: v.detach().clone() for k, v in net.state_dict().items() if v.data_ptr() not in shared}
                 for name, net in self.networks.items()}
        state["optimizer"] = _clone(self.optimizer.state_dict())
        return state

    def _load_state(self, state):
        with torch.no_grad():
            for name, net in self.networks.items():
                own = net.state_dict()
                expected = set(self._initial[name]) if hasattr(self, "_initial") else set(state[name])
                if set(state.get(name, {})) != expected:
                    raise ValueError(f"state dict does not match this adapter's {name!r} network")
                for k, v in state[name].items():
                    own[k].copy_(v)
        self.optimizer.load_state_dict(_clone(state["optimizer"]))

    def _adapted_weights(self):
        return [(p, self.source_weights[name]) for name, p in self.trainable]

    def state_bytes(self) -> int:
        """Per-stream bytes, counted without copying, with Adam's two moments per trained
        parameter included from the start (Adam allocates them at the first step), so that a
        memory budget sees the size the stream will have."""
        shared = {t.data_ptr() for t in list(self.source.parameters()) + list(self.source.buffers())}
        own = sum(v.numel() * v.element_size() for net in self.networks.values()
                  for v in net.state_dict().values() if v.data_ptr() not in shared)
        moments = sum(2 * p.numel() * p.element_size()
                      for group in self.optimizer.param_groups for p in group["params"])
        return own + moments


class _SavedTensors:
    """Observes, without changing, what autograd saves for backward inside the `with` block:
    a saved tensor goes into the graph as a detached alias (same storage, same version
    counter; returning the tensor itself would make a reference cycle through its grad_fn
    that outlives a discarded graph), and a weak reference to that alias tells afterwards
    whether the graph still holds it (a graph already backpropagated, as in tent's extra
    steps, has let go of its tensors)."""

    def __init__(self):
        self._saved: list[weakref.ref] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        alias = tensor.detach()
        self._saved.append(weakref.ref(alias))
        return alias

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    def bytes_held(self, loss, exclude: set[int]) -> int:
        """Bytes of the storages the graph still holds, plus those of the tensors a deferred
        loss (a closure) keeps for learn(); each storage counted once, `exclude` left out."""
        tensors = [t for t in (ref() for ref in self._saved) if t is not None]
        if callable(loss):
            cells = getattr(loss, "__closure__", None) or ()
            tensors += [v for v in map(_cell_value, cells) if isinstance(v, torch.Tensor)]
        elif isinstance(loss, torch.Tensor):
            tensors.append(loss)
        storages: dict[int, int] = {}
        for t in tensors:
            try:
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # a tensor without a plain storage
                storages[id(t)] = t.numel() * t.element_size()
        return sum(n for ptr, n in storages.items() if ptr not in exclude)


def _unpack(alias: torch.Tensor) -> torch.Tensor:
    return alias


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell (a variable not yet assigned)
        return None


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def build_normalised_network(model: nn.Module, norm: str, generator, norm_options: dict,
                             own_weights: bool = True) -> nn.Module:
    """A copy of `model` with its BN layers configured for `norm`, for a weight-updating adapter
    to train: "bn" = the reference batch-statistics configuration; "bn-alpha" and "unmix-tns"
    swap in those layers (as UnMix-TNS's authors did before building the method). With
    own_weights=False the weights stay shared with the source and the caller owns what it trains."""
    net = own_copy(model) if own_weights else share_copy(model)
    if norm == "unmix-tns":
        convert_to_unmix_tns(net, generator=generator, **norm_options)
    elif norm == "bn-alpha":
        convert_to_alpha_bn(net, **norm_options)
    elif norm != "bn":
        raise ValueError(f"hyperparameter 'norm'={norm!r}: valid: bn, bn-alpha, unmix-tns")
    return configure_batch_stats(net)
