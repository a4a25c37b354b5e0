"""ExportStream: a stream's adapted state as a file the client keeps, checked before it leaves.

Runs on the worker (engine/control.py `export_stream`, after the stream's owed update). The live
adapter is only read (`state_dict()`): the graph and the checks are built on twins, fresh adapters
of the stream's policy with that state loaded, so an export never changes what the stream answers.

- onnx: one graph computing what the stream would answer for a batch now, without updating: each
  normalisation layer becomes explicit ops for what it computes in the stream's prediction (batch
  statistics; bn-alpha's mix; bn-ema's two passes; UnMix-TNS's per-sample mixture, components not
  moved; running statistics kept as BN ops). Mean-teacher: student + teacher; CoTTA: the teacher
  without the augmentation ensemble (said in the note). ONNX Runtime must reproduce the stream's
  own answer on two probe batches (8 and 3 samples) within TOLERANCE.
- safetensors: the weights and BN buffers under the factory's names (no Normalize wrapper), only
  where the model in eval mode answers as the stream does (source, rotta); checked the same way.
Refusals (FAILED_PRECONDITION) come before any probe runs and say why and what to do instead.
"""
from __future__ import annotations

import copy
import io
import re
import warnings

import numpy as np
import torch
from torch import nn

import adapters
from adapters.bn_alpha import AlphaBatchNorm2d
from adapters.common import NormLayer, set_submodule
from adapters.rotta import RobustBatchNorm
from adapters.unmix_tns import UnMixTNS1d, UnMixTNS2d
from runtime.engine.errors import EngineError, shown
from runtime.model_config import LoadedModel, Normalized

FORMATS = ("onnx", "safetensors")
TOLERANCE = 1e-4  # max |logits difference| between the export and the stream's own answer
PROBE_SIZES = (8, 3)  # the check's batch sizes: two, so that no batch size is baked into the graph
# An ONNX file is one protobuf message, which cannot exceed 2 GiB; an export is about the size of the
# model's weights (twice for mean-teacher's two members), so this bounds it by the model's size and keeps
# what the worker holds in memory (the file, while it is streamed back in chunks) below that too.
MAX_EXPORT_BYTES = 2**31 - 2**24
BATCH_STATISTICS = ("bn", "bn-alpha", "tent", "eata", "sar", "deyo", "cotta", "mean-teacher")
_NO_STATE_DICT = {"bn-ema": "folds each batch's statistics into its running ones before answering it",
                  "unmix-tns": "mixes its components with each sample's own statistics",
                  "lame": "adjusts its outputs over the batch's feature graph (and adapts no weight)"}

_TRAINED = "the adapted normalisation weights; BN with each batch's own statistics"
_WHAT = {
    "source": "the source model in eval mode (BN with its running statistics)",
    "bn": "the source weights; BN normalises with each batch's own mean and variance",
    "bn-alpha": "the source weights; BN mixes the source statistics with each batch's (alpha)",
    "bn-ema": "the stream's running BN statistics with the batch folded in by momentum, as the stream answers "
              "(two passes: the first measures the batch, the second normalises)",
    "unmix-tns": "the stream's UnMix-TNS components, mixed per sample as the stream answers (the graph does not "
                 "move the components)",
    "tent": _TRAINED, "eata": _TRAINED, "sar": _TRAINED, "deyo": _TRAINED,
    "mean-teacher": "student + teacher logits (the stream's ensemble answer); both with each batch's own BN "
                    "statistics; the projector and prototypes (training only) are not exported",
    "cotta": "the teacher with each batch's own BN statistics, WITHOUT CoTTA's augmentation ensemble (the stream "
             "averages augmented teacher passes when the anchor model is unsure of a batch: those answers differ); "
             "the student and anchor are not exported",
    "rotta": "the teacher (robust BN with its global statistics, eval mode), which answers the stream; the student "
             "and the memory bank are not exported",
}


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise EngineError("INVALID_ARGUMENT", f"export format {shown(fmt)}: choose onnx or safetensors")
    return fmt


def _refuse(message: str) -> EngineError:  # no exact export: the reason, and what to do instead
    return EngineError("FAILED_PRECONDITION", message)


def export_stream(stream, model: LoadedModel, policies, fmt: str) -> dict:
    """The stream (resident, its owed update applied) exported as `fmt`: {data, file_name, format,
    note, policy, step}. Reads the live adapter's state only."""
    check_format(fmt)
    policy = stream.policy
    if stream.adapter is None and not model.can_adapt():
        raise _refuse(f"model {model.name!r} is a frozen graph ({model.platform}): its streams serve it unchanged, "
                      f"so there is nothing adapted to export (the model file itself is the export)")
    state = stream.adapter.state_dict() if stream.adapter is not None else None

    def twin():
        """A fresh adapter of the stream's policy in the stream's state (a `source` stream on the
        frozen path has no adapter: the source model's)."""
        if state is None:
            return adapters.create("source", model.module)
        adapter = policies.build(policy, stream.hyperparameters)
        adapter.load_state_dict(state)
        return adapter

    members = 2 if policy == "mean-teacher" and fmt == "onnx" else 1
    size = members * sum(t.numel() * t.element_size() for t in (*model.module.parameters(), *model.module.buffers()))
    if size > MAX_EXPORT_BYTES:
        raise EngineError("RESOURCE_EXHAUSTED", f"the export would hold about {size / 2**20:.0f} MiB, beyond the "
                                                f"{MAX_EXPORT_BYTES / 2**20:.0f} MiB a single ONNX file can hold")
    graph = _graph(twin()) if fmt == "onnx" else _state_dict_policy(policy)
    probes = _probes(model)
    references = [_answer(twin(), x) for x in probes]
    if fmt == "onnx":
        data, what, difference = _onnx(policy, *graph, probes, references)
    else:
        data, what, difference = _safetensors(twin(), model, probes, references, stream, policy)
    if len(data) > MAX_EXPORT_BYTES:
        raise EngineError("RESOURCE_EXHAUSTED", f"the export is {len(data) / 2**20:.0f} MiB, beyond the "
                                                f"{MAX_EXPORT_BYTES / 2**20:.0f} MiB bound")
    step = stream.step
    note = (f"stream {stream.id!r} ({policy}, step {step}) of model {model.name!r} as {fmt}: {what}. "
            + (f"Input 'input': float32 [N, {model.channels}, {model.height}, {model.width}] pixels in [0, 1], "
               "the configured mean/std normalisation inside the graph; output 'logits'. A snapshot: the graph "
               "does not adapt, and the collapse guard's per-batch decisions (source fallbacks) are not in it. "
               if fmt == "onnx" else
               "Load with safetensors.torch.load_file and load_state_dict into the config's factory network, "
               "in eval mode; it takes the input the factory network takes (the server's mean/std "
               "normalisation is not in the file). ")
            + f"Checked: max |logits difference| {difference:.1e} from the stream's answer on probe batches of "
            f"{' and '.join(map(str, PROBE_SIZES))} (bound {TOLERANCE:g}).")
    return {"data": data, "file_name": f"{_safe(model.name)}-{_safe(stream.id)}-step{step}.{fmt}",
            "format": fmt, "note": note, "policy": policy, "step": step}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:64] or "stream"


def _probes(model: LoadedModel) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)  # its own: the global generator is left alone
    shape = (model.channels, model.height, model.width)
    return [torch.rand((n, *shape), generator=generator).to(model.device) for n in PROBE_SIZES]


def _answer(adapter, x: torch.Tensor) -> np.ndarray:
    """What the stream answers for x: its adapter's prediction (CoTTA: its teacher's plain pass)."""
    if adapter.name == "cotta":
        with torch.no_grad():
            return adapter.teacher(x).float().cpu().numpy()
    logits = adapter.predict(x).float().cpu().numpy()
    adapter.discard()
    return logits


def _difference(got: list[np.ndarray], references: list[np.ndarray]) -> float:
    """Max |a − b| over the probes; inf for a wrong shape, NaN when either side has one."""
    if any(a.shape != b.shape for a, b in zip(got, references)):
        return float("inf")
    return float(np.max([np.abs(a.astype(np.float64) - b).max() for a, b in zip(got, references)]))


# ---------------------------------------------------------------------------- onnx
def _graph(adapter) -> tuple[nn.Module, str]:
    """A module computing the adapter's answer for a batch, without updating (takes the twin apart)."""
    name, hp = adapter.name, adapter.hyperparameters
    if name == "tent" and hp["steps"] > 1:
        raise _refuse(f"tent with steps={hp['steps']} takes {hp['steps'] - 1} update(s) on each batch before "
                      f"answering it: no fixed graph computes that answer (with steps=1 it exports)")
    if name == "lame":
        raise _refuse("lame cannot be exported exactly: its answer iterates a fixed point over the batch's feature "
                      "graph and stops when the energy settles, after a number of steps that depends on the batch, "
                      "which a fixed graph cannot follow; its network is the unadapted source model (export a "
                      "`source` stream for it)")
    if name not in _WHAT:
        raise _refuse(f"policy {name!r} has no exact export")
    if name == "bn-ema":
        return _TwoPasses(adapter.net), _WHAT[name]
    if name == "mean-teacher":
        return _Sum(_explicit(adapter.student), _explicit(adapter.teacher)), _WHAT[name]
    if name in ("cotta", "rotta"):  # rotta predicts with its teacher in eval mode (robust BN's global statistics)
        return _explicit(adapter.teacher.eval() if name == "rotta" else adapter.teacher), _WHAT[name]
    return _explicit(adapter.net), _WHAT[name]


def _onnx(policy: str, module: nn.Module, what: str, probes, references) -> tuple[bytes, str, float]:
    import onnxruntime as ort

    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():  # the exporter's notes on constants are noise here
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (probes[0],), buffer, dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as e:  # noqa: BLE001 - an operator the exporter lacks: a refusal, not a crash
        raise _refuse(f"policy {policy!r}: the network does not export to ONNX "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    data, options = buffer.getvalue(), ort.SessionOptions()
    options.log_severity_level = 3  # its notes on unused initializers are noise here
    session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    got = [session.run(None, {"input": x.cpu().numpy()})[0] for x in probes]
    difference = _difference(got, references)
    if not difference <= TOLERANCE:
        raise _refuse(f"policy {policy!r}: ONNX Runtime does not reproduce the stream's answer (max |logits "
                      f"difference| {difference:.2e} > {TOLERANCE:g}); not exported")
    return data, what, difference


def _explicit(net: nn.Module) -> nn.Module:
    """net in eval mode with each normalisation layer replaced by explicit ops for what it computes
    now; forward hooks (feature captures) dropped."""
    for name, m in list(net.named_modules()):
        replacement = _replacement(m, name)
        if replacement is not None:
            set_submodule(net, name, replacement)
    for name, m in net.named_modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        if m.training and isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.instancenorm._InstanceNorm)):
            raise _refuse(f"layer {name!r} ({type(m).__name__}) runs in training mode in the stream's prediction: "
                          f"its answer is random or keeps state, no exact export")
    return net.eval()


def _replacement(m: nn.Module, name: str) -> nn.Module | None:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if m.training or m.running_mean is None:  # what F.batch_norm does: the batch's statistics
            return _BatchStatistics(m.weight, m.bias, m.eps)
        return None  # running statistics: kept as a BatchNormalization op
    if isinstance(m, AlphaBatchNorm2d):
        return _BatchStatistics(m.weight, m.bias, m.eps, m.alpha, m.source_mean, m.source_var, unbiased=True)
    if isinstance(m, UnMixTNS2d):
        return _UnMixFixed(m)
    if isinstance(m, NormLayer) and not isinstance(m, (UnMixTNS1d, RobustBatchNorm)):  # those two: plain ops
        raise _refuse(f"layer {name!r} ({type(m).__name__}) has no exact export")
    return None


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:  # a constant of the graph
    return None if t is None else t.detach().clone()


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased variance, values per channel) of x over every dim but the channel, shaped to
    broadcast; the count is computed in the graph (any batch size)."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    count = torch.ones_like(x[:, :1]).sum()
    return mean, (centred * centred).mean(dim=dims, keepdim=True), count


def _normalise(x, mean, var, eps, weight, bias) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


class _BatchStatistics(nn.Module):
    """BN with μ = (1−α)·μ_src + α·μ_batch, σ² likewise (σ²_batch biased, or unbiased for alpha-BN)."""

    def __init__(self, weight, bias, eps, alpha=1.0, source_mean=None, source_var=None, unbiased=False):
        super().__init__()
        self.eps, self.alpha, self.unbiased = eps, alpha, unbiased
        self.register_buffer("weight", _detached(weight))
        self.register_buffer("bias", _detached(bias))
        self.register_buffer("source_mean", _detached(source_mean))
        self.register_buffer("source_var", _detached(source_var))

    def forward(self, x):
        mean, var, count = _stats(x)
        if self.unbiased:
            var = var * count / (count - 1)
        if self.alpha != 1.0:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            mean = (1 - self.alpha) * self.source_mean.view(shape) + self.alpha * mean
            var = (1 - self.alpha) * self.source_var.view(shape) + self.alpha * var
        return _normalise(x, mean, var, self.eps, self.weight, self.bias)


class _FoldedStatistics(nn.Module):
    """bn-ema's BN: first pass (measure) normalises with the batch's statistics, as train mode does,
    and folds them into the running ones (momentum f, unbiased variance); the second normalises
    with the result, as the stream's eval-mode pass does."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps = bn.eps
        self.factor = bn.momentum if bn.momentum is not None else 1.0 / (float(bn.num_batches_tracked) + 1)
        for key in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(key, _detached(getattr(bn, key)))
        self.measure, self.mean, self.var = True, None, None

    def forward(self, x):
        if not self.measure:
            return _normalise(x, self.mean, self.var, self.eps, self.weight, self.bias)
        mean, var, count = _stats(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        f = self.factor
        self.mean = (1 - f) * self.running_mean.view(shape) + f * mean
        self.var = (1 - f) * self.running_var.view(shape) + f * (var * count / (count - 1))
        return _normalise(x, mean, var, self.eps, self.weight, self.bias)


class _TwoPasses(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.layers = []
        for name, m in list(net.named_modules()):
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                layer = _FoldedStatistics(m) if m.running_mean is not None else _BatchStatistics(m.weight, m.bias,
                                                                                                  m.eps)
                set_submodule(net, name, layer)
                self.layers.append(layer)
            elif isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                raise _refuse(f"bn-ema measures each batch in training mode, where {name!r} drops activations at "
                              f"random: its statistics cannot be reproduced exactly")
        self.net = _explicit(net)

    def forward(self, x):
        for layer in self.layers:
            layer.measure = True
        self.net(x)
        for layer in self.layers:
            layer.measure = False
        return self.net(x)


class _UnMixFixed(nn.Module):
    """UnMixTNS2d's normalisation of a batch with its components as they are (no update)."""

    def __init__(self, m: UnMixTNS2d):
        super().__init__()
        self.temperature, self.eps = m.temperature, m.eps
        for key in ("weight", "bias", "component_means", "component_vars"):
            self.register_buffer(key, _detached(getattr(m, key)))

    def forward(self, x):
        inst_mean = x.mean(dim=(2, 3))
        centred = x - inst_mean[:, :, None, None]
        inst_var = (centred * centred).mean(dim=(2, 3))
        means, variances = self.component_means, self.component_vars
        sim = nn.functional.normalize(inst_mean, dim=1) @ nn.functional.normalize(means, dim=1).t()
        p = torch.softmax(sim / self.temperature, dim=1).unsqueeze(-1)
        mean_mix = (1.0 - p) * means.unsqueeze(0) + p * inst_mean.unsqueeze(1)
        var_mix = (1.0 - p) * variances.unsqueeze(0) + p * inst_var.unsqueeze(1)
        mean = mean_mix.mean(dim=1)
        var = var_mix.mean(dim=1) + (mean_mix ** 2).mean(dim=1) - mean ** 2
        y = (x - mean[:, :, None, None]) / torch.sqrt(var[:, :, None, None] + self.eps)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class _Sum(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.first(x) + self.second(x)


# ---------------------------------------------------------------------------- safetensors
def _state_dict_policy(policy: str) -> None:
    """Refuse a safetensors export unless the model in eval mode answers as this policy's stream."""
    why = _NO_STATE_DICT.get(policy, "normalises with each batch's own statistics" if policy in BATCH_STATISTICS else "")
    if why:
        raise _refuse(f"policy {policy!r} {why}: a state dict loaded into the model in eval mode cannot "
                      f"reproduce the stream's answers; export it with --format onnx (the graph computes them)")
    if policy not in ("source", "rotta"):
        raise _refuse(f"policy {policy!r} has no exact safetensors export; try --format onnx")


def _safetensors(adapter, model: LoadedModel, probes, references, stream, policy) -> tuple[bytes, str, float]:
    from safetensors.torch import load, save

    net = adapter.teacher if adapter.name == "rotta" else adapter.net  # the network that answers, in eval mode
    source, own = model.module.state_dict(), net.state_dict()
    unknown = sorted(set(own) - set(source))
    if unknown:
        raise _refuse(f"policy {adapter.name!r}: its network has tensors the model does not ({unknown[0]!r}); "
                      f"try --format onnx")
    full = {k: own.get(k, v).detach() for k, v in source.items()}  # e.g. num_batches_tracked: the source's
    wrapped = isinstance(model.module, Normalized)
    tensors = {(k.removeprefix("network.") if wrapped else k): v.cpu().contiguous().clone()
               for k, v in full.items() if not (wrapped and k.startswith("normalize."))}
    metadata = {"tta.model": model.name, "tta.stream": stream.id, "tta.policy": policy, "tta.step": str(stream.step),
                "tta.model_fingerprint": model.fingerprint}
    data = save(tensors, metadata=metadata)
    loaded = load(data)  # the check reads the bytes back, as a user would
    check = {("network." if wrapped else "") + k: v for k, v in loaded.items()}
    if wrapped:
        check.update({k: v for k, v in source.items() if k.startswith("normalize.")})
    user = copy.deepcopy(model.module)  # a copy, in eval mode (as the user runs it; the shared module is not ours)
    user.load_state_dict(check)
    with torch.no_grad():
        got = [user.eval()(x).float().cpu().numpy() for x in probes]
    difference = _difference(got, references)
    if not difference <= TOLERANCE:
        raise _refuse(f"policy {adapter.name!r}: the exported state dict does not reproduce the stream's answer (max "
                      f"|logits difference| {difference:.2e}); try --format onnx")
    what = ("the source weights and BN statistics (nothing adapted)" if adapter.name == "source" else
            "rotta's teacher (robust BN's global statistics as BN running statistics), which answers the stream")
    return data, f"{what}; {len(tensors)} tensors", difference
