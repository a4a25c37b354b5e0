"""The adapter contract: the `Adapter` base class, hyperparameter validation and the per-adapter random generator.

Every adapter is a subclass of `Adapter`. Subclasses implement `_predict(x)` (the method's
prediction for a batch, keeping whatever the update needs) and `_learn()` (the update), plus
`_state()` / `_load_state()` for their own tensors. `step(x)` is `predict(x)` then `learn()`,
which is exactly the reference implementations' order. The two families of adapters build on
it in normalisation.py (`NormalisationAdapter`: BN statistics only) and gradient.py
(`GradientAdapter`: weights trained by Adam).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .common import norm_layer_source_stats


def _shown(value: Any, limit: int = 64) -> str:
    """A caller's value for an error message: its repr, cut after `limit` characters (the rule of
    runtime.engine.errors.shown; adapters/ imports nothing of runtime), so a message stays short."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}…({len(value)} chars)"
    text = repr(value)
    return text if len(text) <= 4 * limit else f"{text[:limit]}…({len(text)} chars)"


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter: its default, how to validate it, and what it means."""

    name: str
    default: Any
    kind: type  # float, int, bool, str, tuple or object (no parsing)
    range: str  # human-readable valid range, used in error messages and describe()
    meaning: str
    valid: Callable[[Any], bool] = lambda v: True

    def parse(self, value: Any) -> Any:
        """Convert a value (possibly a wire string) to this hyperparameter's type, then check it."""
        try:
            value = _convert(self.kind, value)
        except (TypeError, ValueError):
            raise ValueError(f"hyperparameter {self.name!r}: cannot read {_shown(value)} as {self.kind.__name__}; "
                             f"valid range: {self.range}") from None
        if not self.valid(value):
            raise ValueError(f"hyperparameter {self.name!r}={_shown(value)} is out of range; valid range: {self.range}")
        return value

    def describe(self) -> dict:
        default = self.default
        if isinstance(default, tuple):
            default = list(default)
        return {"name": self.name, "default": default, "range": self.range, "meaning": self.meaning}


def _convert(kind: type, value: Any) -> Any:
    if value is None or kind is object:
        return value
    if kind is bool:
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(value, (bool, int)):
            return bool(value)
        raise TypeError(value)
    if kind is int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise TypeError(value)
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(value)
        return value
    if kind is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        return tuple(float(v) for v in value)
    if kind is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    raise TypeError(kind)


def in_range(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[Any], bool]:
    def check(v):
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below
    return check


# Hyperparameters every adapter that draws random numbers accepts.
SEED = Hyperparameter("seed", 0, int, "integer in [0, 2^63)", "seed of the adapter's own torch.Generator",
                      lambda v: 0 <= v < 2**63)
GENERATOR = Hyperparameter(
    "generator", None, object, "None, a torch.Generator, or 'global'",
    "random source; 'global' draws from torch's global generator in the reference code's order "
    "(for conformance with the papers' code); default: a fresh CPU generator seeded with `seed`",
    lambda v: v is None or v == "global" or isinstance(v, torch.Generator))


class Adapter:
    """Base class. See DESIGN.md "Adapter protocol" for the contract."""

    name: str = ""
    summary: str = ""
    updates_weights: bool = False
    uses_randomness: bool = False
    adapts: bool = True  # False only for `source`
    deferred_update: bool = True  # False: all the work is in the forward pass, learn() is a no-op
    state_grows: bool = False  # True: state_bytes() changes as the stream learns (a memory bank fills)
    ensemble_size: int = 1  # the prediction is the sum of this many networks' logits
    # predicts with the batch's own normalisation statistics, so a single image is normalised by
    # itself (the collapse guard answers such batches with the source); False where the statistics
    # are the source's mixed in (bn-alpha), running ones (bn-ema, rotta) or none (lame)
    batch_statistics: bool = True
    # normalises with statistics carried over batches (the source's mixed in, or running ones), so
    # one label-correlated batch barely moves them: the guard's label-shift fallback leaves it alone
    running_statistics: bool = False
    HYPERPARAMETERS: tuple[Hyperparameter, ...] = ()

    @classmethod
    def spec(cls) -> tuple[Hyperparameter, ...]:
        extra = (SEED, GENERATOR) if cls.uses_randomness else ()
        return tuple(cls.HYPERPARAMETERS) + extra

    @classmethod
    def validate(cls, given: dict) -> dict:
        spec = {h.name: h for h in cls.spec()}
        unknown = sorted(set(given) - set(spec))
        if unknown:
            raise ValueError(f"adapter {cls.name!r} has no hyperparameter {_shown(unknown[0])}; "
                             f"valid: {', '.join(spec) or 'none'}")
        values = {name: h.default for name, h in spec.items()}
        for name, value in given.items():
            values[name] = spec[name].parse(value)
        return values

    def __init__(self, model: nn.Module, **hyperparameters):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, torch.jit.ScriptModule):
            # its BN layers run compiled code that ignores the train/eval switches and swapped
            # layers adapters rely on: adapting would silently return the source prediction
            raise ValueError("adapters need an eager nn.Module; a TorchScript module cannot be adapted "
                             "(load the Python model class with its state dict instead)")
        self.hyperparameters = self.validate(hyperparameters)
        self.source = model  # never mutated; shared read-only
        self.device = _device_of(model)
        self.generator = self._make_generator()
        self.steps = 0  # number of learn() updates applied
        self._pending = False
        self._pending_bytes = 0  # what the owed update holds (set by subclasses that keep a graph)
        self._owed_input: torch.Tensor | None = None  # a batch predicted elsewhere (owe): learn() runs its forward
        self._observers: list[Callable] = []
        self._observing = False

    # --- randomness -------------------------------------------------------------------
    def _make_generator(self) -> torch.Generator | None:
        """None means: draw from torch's global generator (reference order)."""
        if not self.uses_randomness:
            return None
        g = self.hyperparameters.get("generator")
        if g == "global":
            return None
        if isinstance(g, torch.Generator):
            return g
        gen = torch.Generator(device="cpu")
        gen.manual_seed(self.hyperparameters["seed"])
        return gen

    def _remember_generator(self) -> None:
        """Called once construction (which may draw random numbers) is complete."""
        self._generator_initial = self.generator.get_state() if self.generator is not None else None

    def _reset_generator(self) -> None:
        if self.generator is not None and self._generator_initial is not None:
            self.generator.set_state(self._generator_initial)

    # --- the contract -----------------------------------------------------------------
    def step(self, x: torch.Tensor) -> torch.Tensor:
        """The method's prediction for x, then its update (reference semantics)."""
        logits = self.predict(x)
        self.learn()
        return logits

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction for x; keeps what learn() needs. A still-pending update is applied first,
        so batch t+1 always sees the update from batch t."""
        if self._pending:
            self.learn()
        x = self._check_input(x)
        with torch.no_grad():
            out = self._predict(x)
        self._count_prediction()
        return out.detach()

    def batch_stats_affine(self) -> dict[str, torch.Tensor] | None:
        """Where this adapter's next prediction is the source network with every BatchNorm2d
        normalising by the batch's own statistics, the BN scales and biases it uses that are not
        the source's ({name in the source module: tensor}); None where it is not such a prediction.
        The engine may then compute the prediction elsewhere (runtime/onnx_batch_stats.py) and
        book it with owe()."""
        return None

    def owe(self, x: torch.Tensor) -> None:
        """Book a prediction of x made elsewhere from batch_stats_affine(), as predict(x) would:
        an owed update then runs its own forward pass of x in learn() (its figures taken, the BN
        observers muted: the reply's were taken where it was predicted)."""
        if self._pending:
            self.learn()
        x = self._check_input(x)
        if self.deferred_update:
            self._owed_input = x
            self._pending_bytes = x.numel() * x.element_size()
        self._count_prediction()

    @property
    def owes_forward(self) -> bool:
        """The owed update is of a batch predicted elsewhere (owe): learn() runs its forward too."""
        return self._owed_input is not None

    @property
    def pending(self) -> bool:
        """True when an update (learn()) is owed for the last predicted batch."""
        return self._pending

    @property
    def pending_bytes(self) -> int:
        """Bytes the owed update holds in memory beyond the adapter's state until learn() or
        discard(): the tensors the autograd graph of the last predicted batch saved for backward
        (activations), plus those a deferred loss keeps (each storage once; weights excluded, they
        are state_bytes()), measured at the first batch of each shape, whose graph the later ones
        repeat. 0 when no update is owed, and always 0 for adapters that keep no graph (the
        normalisation adapters)."""
        return self._pending_bytes if self._pending else 0

    def _count_prediction(self) -> None:
        """Book a prediction that has been made (by predict() or batched.predict_together): its
        update is owed (deferred_update), or, when the forward pass was the update, it counts as
        a step."""
        if self.deferred_update:
            self._pending = True
        elif self.adapts:
            self.steps += 1

    def learn(self) -> dict[str, float]:
        """Apply the update for the last predicted batch; returns figures such as the loss."""
        if not self._pending:
            return {}
        if self._owed_input is not None:  # predicted elsewhere: the forward pass the update needs
            x, self._owed_input = self._owed_input, None
            observers, self._observers = self._observers, []
            try:
                with torch.no_grad():  # as in predict(): the subclass enables grad where it needs it
                    self._predict(x)
            except Exception:
                self.discard()
                raise
            finally:
                self._observers = observers
        self._pending, self._pending_bytes = False, 0
        figures = self._learn() or {}
        self.steps += 1
        return figures

    def discard(self) -> None:
        """Forget the pending update of the last predicted batch (prediction-only request)."""
        self._pending, self._pending_bytes, self._owed_input = False, 0, None
        self._discard()

    def reset(self) -> None:
        """Back to the source state: statistics, weights, optimizer and generator."""
        self.discard()
        self._reset()
        self._reset_generator()
        self.steps = 0

    def state_dict(self) -> dict:
        """Everything needed to resume this stream bit for bit (torch.save-able)."""
        if self._pending:
            self.learn()
        state = {"adapter": self.name, "steps": self.steps, "state": self._state()}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("adapter") != self.name:
            raise ValueError(f"state dict is for adapter {state.get('adapter')!r}, not {self.name!r}")
        self.discard()
        self._load_state(state["state"])
        self.steps = int(state["steps"])
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])

    def weight_distance(self) -> float:
        """‖θ − θ_src‖ / ‖θ_src‖ over the adapted weights; 0 for methods that adapt no weights."""
        pairs = self._adapted_weights()
        if not pairs:
            return 0.0
        num = sum(float((p.detach() - s.detach()).pow(2).sum()) for p, s in pairs)
        den = sum(float(s.detach().pow(2).sum()) for _, s in pairs)
        return math.sqrt(num / den) if den > 0 else 0.0

    def state_bytes(self) -> int:
        """Bytes of per-stream state (shared source weights excluded)."""
        return _tensor_bytes(self._state())

    def observe_bn_inputs(self, callback: Callable) -> "_ObserverHandle":
        """callback(layer_name, x, source_mean, source_var) is called on every normalisation
        layer's input during the prediction forward pass of a batch (drift metrics)."""
        self._observers.append(callback)
        if len(self._observers) == 1:
            self._install_observer_hooks()
        return _ObserverHandle(self, callback)

    # --- for subclasses ---------------------------------------------------------------
    def _predict(self, x):
        raise NotImplementedError

    def _learn(self):
        return {}

    def _discard(self):
        pass

    def _reset(self):
        raise NotImplementedError

    def _state(self) -> dict:
        raise NotImplementedError

    def _load_state(self, state: dict) -> None:
        raise NotImplementedError

    def _adapted_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return []

    def _observed_network(self) -> nn.Module:
        """The network whose clean forward pass the BN observers watch."""
        raise NotImplementedError

    # --- helpers ----------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"expected a float tensor of shape (N, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[0] < 1:
            raise ValueError("empty batch")
        return x.to(device=self.device, dtype=torch.float32)

    def _observe(self, fn: Callable, *args):
        """Run fn(*args) with BN observers active (only around the clean prediction pass)."""
        self._observing = bool(self._observers)
        try:
            return fn(*args)
        finally:
            self._observing = False

    def _install_observer_hooks(self) -> None:
        stats = norm_layer_source_stats(self.source)
        hooks = []
        for name, module in self._observed_network().named_modules():
            if name not in stats:
                continue
            mean, var = stats[name]

            def hook(_module, inputs, name=name, mean=mean, var=var):
                if self._observing:
                    for cb in list(self._observers):
                        cb(name, inputs[0].detach(), mean, var)

            hooks.append(module.register_forward_pre_hook(hook))
        self._observer_hooks = hooks

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.hyperparameters.items() if k not in ("generator", "prototypes")}
        return f"{type(self).__name__}({shown})"


class _ObserverHandle:
    def __init__(self, adapter: Adapter, callback: Callable):
        self._adapter, self._callback = adapter, callback

    def remove(self) -> None:
        a = self._adapter
        if self._callback in a._observers:
            a._observers.remove(self._callback)
        if not a._observers:
            for h in getattr(a, "_observer_hooks", []):
                h.remove()
            a._observer_hooks = []


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0
