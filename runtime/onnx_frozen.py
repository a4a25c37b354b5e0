"""The frozen forward of `source` streams, with the BN-shift drift figure.

A frozen forward answers logits for a float32 NCHW batch in [0, 1] (`forward(x)`), or logits and,
for every BatchNorm layer, the per-sample per-channel mean of that layer's input (`forward.run(x)`,
each N×C), from which `forward.bn_shift(means, rows)` computes drift.BNShift's figure over the
given rows: the mean over layers of the mean over channels of |mean_rows - mu_src| / sqrt(var_src
+ 1e-5). Per-sample means let one forward of several streams' batches give each stream the
figure of its own rows.

- `TorchForward`: a torch module (a TorchScript or torch.export artifact, or the reference of the
  check below); the means come from forward pre-hooks on its BatchNorm layers, put on for the
  one call only (adapters' copies of a source module must not inherit them).
- `OrtForward`: ONNX Runtime on a graph augmented so that ONE run also yields, for every
  BatchNormalization node, ReduceMean of its input X over the spatial axes; the source
  statistics are the node's own mean and var initializers. Used for a PyTorch model exported
  at start (torch.onnx, BatchNorm kept, any batch size) and for a config's own `onnx` file.

`for_module` decides the backend of a PyTorch model's `source` streams: ONNX Runtime when the
export succeeds and, on probe batches of 1 and 8 images, its logits and BN means match torch's.
"""
from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adapters.common import BATCH_NORMS

log = logging.getLogger("tta.model")

BN_EPS = 1e-5  # drift.BNShift's
TOLERANCE = 1e-4  # the check: max |difference| over max |torch's value| (BN means: over max(1, that))
PROBE_SIZES = (1, 8)


def session_options():
    """ONNX Runtime's threads follow torch's (one knob, torch.get_num_threads()); one inter-op
    thread, sequential execution, as torch runs a forward."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused providers and initializers are noise here
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # no spinning between runs: the frozen and the batch-statistics sessions (and torch) take turns
    # on the same cores, and a pool spinning after its run slowed the next session's run by up to 2x
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    found = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        found.insert(0, "CUDAExecutionProvider")
    return found


def session(model: str | Path | bytes, device: torch.device):
    import onnxruntime as ort

    model = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(model, sess_options=session_options(), providers=providers(device))


class FrozenForward:
    """logits = forward(x); logits, bn_means = forward.run(x); forward.bn_shift(bn_means, rows)."""

    backend = ""

    def __init__(self, stats: list[tuple[np.ndarray, np.ndarray]]):
        self.stats = stats  # per BN layer, in the order of run()'s means: (source mean, source var)
        if stats:  # all layers' channels side by side: one vectorised pass per figure
            self._mu = np.concatenate([mu.astype(np.float64) for mu, _ in stats])
            self._scale = 1.0 / np.sqrt(np.concatenate([var.astype(np.float64) for _, var in stats]) + BN_EPS)
            widths = np.array([len(mu) for mu, _ in stats])
            self._starts, self._widths = np.concatenate([[0], np.cumsum(widths)[:-1]]), widths

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def run(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        raise NotImplementedError

    def bn_shift(self, bn_means: list[np.ndarray], rows: slice = slice(None)) -> float | None:
        """drift.BNShift's figure for the batch made of these rows; None without BN layers."""
        if not self.stats:
            return None
        batch_mean = np.concatenate([m[rows] for m in bn_means], axis=1).mean(axis=0, dtype=np.float64)
        shift = np.abs(batch_mean - self._mu) * self._scale  # per channel
        return float((np.add.reduceat(shift, self._starts) / self._widths).mean())  # channels, then layers


def _per_sample_means(x: torch.Tensor) -> torch.Tensor:
    return x.float().mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x.float()


class TorchForward(FrozenForward):
    backend = "torch"

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device = module, device
        self.layers = [m for m in module.modules() if isinstance(m, BATCH_NORMS)
                       and m.running_mean is not None and m.running_var is not None]
        super().__init__([(m.running_mean.detach().double().cpu().numpy(), m.running_var.detach().double().cpu().numpy())
                          for m in self.layers])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.module(torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    def run(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        seen: dict[int, list[torch.Tensor]] = {id(m): [] for m in self.layers}
        hooks = [m.register_forward_pre_hook(lambda mod, inputs: seen[id(mod)].append(_per_sample_means(inputs[0])))
                 for m in self.layers]
        try:
            logits = self(x)
        finally:
            for h in hooks:
                h.remove()
        if any(len(v) != 1 for v in seen.values()):  # a layer skipped or called twice: no figure
            return logits, []
        means = [seen[id(m)][0] for m in self.layers]
        if not means:
            return logits, []
        joined = torch.cat(means, dim=1).cpu().numpy()  # one transfer for all layers
        return logits, np.split(joined, np.cumsum([m.shape[1] for m in means])[:-1], axis=1)

    def bn_shift(self, bn_means, rows=slice(None)):
        return super().bn_shift(bn_means, rows) if bn_means else None


class OrtForward(FrozenForward):
    backend = "onnxruntime"

    def __init__(self, sess, logits_name: str, bn_names: list[str], stats, mean=None, std=None):
        super().__init__(stats)
        self.session, self.logits_name, self.bn_names = sess, logits_name, bn_names
        self.input_name = sess.get_inputs()[0].name
        self.mean = None if mean is None else np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
        self.std = None if std is None else np.asarray(std, np.float32).reshape(1, -1, 1, 1)

    def _feed(self, x: np.ndarray) -> dict:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.mean is not None:  # a config's onnx file of the network without its normalisation
            x = (x - self.mean) / self.std
        return {self.input_name: x}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.logits_name], self._feed(x))[0]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        out = self.session.run([self.logits_name, *self.bn_names], self._feed(x))
        return out[0], out[1:]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]


# ------------------------------------------------------------------------------ the ONNX graph
def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # topological order: an Identity's input is known before it
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    found[node.output[0]] = numpy_helper.to_array(a.t)
        elif node.op_type == "Identity" and node.input[0] in found:  # the exporter's deduplicated initializers
            found[node.output[0]] = found[node.input[0]]
    return found


def _value_types(model) -> dict[str, tuple[int, int | None]]:
    """{value name: (element type, rank or None)} as ONNX shape inference sees them ({} if it cannot)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - unknown types: the taps fall back to the general form
        return {}
    types = {}
    for v in [*inferred.value_info, *inferred.input, *inferred.output]:
        t = v.type.tensor_type
        types[v.name] = (t.elem_type, len(t.shape.dim) if t.HasField("shape") else None)
    return types


def augment(model) -> tuple[object, str, list[str], list[tuple[np.ndarray, np.ndarray]]]:
    """The ONNX model with one more output per BatchNormalization node whose source statistics are
    constants: the per-sample channel means of its input X, N×C (GlobalAveragePool then Flatten on
    an NCHW X, which ONNX Runtime runs in its blocked layout; X itself when N×C; else Reshape to
    [N, C, -1] and ReduceMean; cast to float first unless X is). Returns (model, logits output
    name, mean output names, source stats)."""
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    constants, types = _constants(graph), _value_types(model)
    opset = max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] or [1])
    nodes, names, stats, general = [], [], [], False
    for node in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        mean, var = constants.get(node.input[3]), constants.get(node.input[4])
        if mean is None or var is None or mean.ndim != 1:
            continue
        k = len(names)
        x, out, (elem, rank) = node.input[0], f"tta_bn_mean_{k}", types.get(node.input[0], (0, None))

        def add(op, inputs, **attrs):
            nodes.append(helper.make_node(op, inputs, [f"tta_bn{k}_{op}{len(nodes)}"], name=f"tta_bn{k}_{op}{len(nodes)}",
                                          **attrs))
            return nodes[-1].output[0]
        if elem != TensorProto.FLOAT:
            x = add("Cast", [x], to=TensorProto.FLOAT)
        if rank is not None and rank >= 3:
            x = add("Flatten", [add("GlobalAveragePool", [x])], axis=1)
        elif rank == 2:
            x = add("Identity", [x])
        else:
            general = True
            x = add("Reshape", [x, "tta_bn_flatten_shape"])
            x = add("ReduceMean", [x, "tta_bn_axes"], keepdims=0) if opset >= 18 else \
                add("ReduceMean", [x], axes=[2], keepdims=0)
        nodes[-1].output[0] = out
        graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [None, int(mean.shape[0])]))
        names.append(out)
        stats.append((mean.astype(np.float64), var.astype(np.float64)))
    if general:
        graph.initializer.append(helper.make_tensor("tta_bn_flatten_shape", TensorProto.INT64, [3], [0, 0, -1]))
        if opset >= 18:
            graph.initializer.append(helper.make_tensor("tta_bn_axes", TensorProto.INT64, [1], [2]))
    if names:
        graph.node.extend(nodes)
        onnx.checker.check_model(model)
    return model, graph.output[0].name, names, stats


def ort_forward(model, device: torch.device, mean=None, std=None) -> OrtForward:
    """ONNX Runtime on the augmented graph of an onnx.ModelProto."""
    model, logits_name, names, stats = augment(model)
    return OrtForward(session(model.SerializeToString(), device), logits_name, names, stats, mean, std)


def onnx_file_forward(path: Path, device: torch.device, mean=None, std=None) -> tuple[OrtForward, str]:
    """A config's own `onnx` file on ONNX Runtime, with the BN-shift figure where its graph keeps
    BatchNormalization nodes (an export with BN folded into the convolutions has none)."""
    try:
        import onnx

        forward = ort_forward(onnx.load(str(path)), device, mean, std)
    except Exception as e:  # noqa: BLE001 - an unusual graph still serves, without the figure
        log.warning("%s: cannot add the BN-shift outputs to the graph (%s: %s); its streams report no BN-shift",
                    path, type(e).__name__, e)
        plain = session(path, device)
        return OrtForward(plain, plain.get_outputs()[0].name, [], [], mean, std), \
            "source streams run on ONNX Runtime (no BN-shift figure: the graph could not be augmented)"
    if not forward.stats:
        return forward, "source streams run on ONNX Runtime (no BN-shift figure: the graph has no BatchNormalization)"
    return forward, f"source streams run on ONNX Runtime (BN-shift over {len(forward.stats)} BatchNormalization nodes)"


def export(module: nn.Module, probe: np.ndarray, device: torch.device):
    """The module exported by torch.onnx (TorchScript exporter) as an onnx.ModelProto: BatchNorm
    kept (TrainingMode.PRESERVE on an eval-mode module: no Conv+BN folding), any batch size. Every
    submodule's mode is restored afterwards, whatever the exporter did."""
    import onnx

    modes = [(m, m.training) for m in module.modules()]
    try:
        with tempfile.TemporaryDirectory(prefix="tta-onnx-") as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and constant-folding notes
            path = Path(folder) / "model.onnx"
            torch.onnx.export(module, torch.from_numpy(probe).to(device), str(path), dynamo=False,
                              training=torch.onnx.TrainingMode.PRESERVE, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            return onnx.load(str(path))
    finally:
        for m, training in modes:
            m.train(training)


def probes(channels: int, height: int, width: int) -> list[np.ndarray]:
    """Batches of 1 and 8 images of uniform random pixels in [0, 1] (fixed seed)."""
    rng = np.random.default_rng(0)
    return [rng.random((n, channels, height, width), dtype=np.float32) for n in PROBE_SIZES]


def compare(candidate: FrozenForward, reference: TorchForward, batches: list[np.ndarray]) -> tuple[str, dict]:
    """'' when candidate matches reference on every batch (logits, BN means, BN statistics), else
    why not; and the largest differences seen."""
    worst = {"logits": 0.0, "bn_means": 0.0}
    if len(candidate.stats) != len(reference.stats):
        return (f"BN layers differ: the ONNX graph has {len(candidate.stats)} BatchNormalization nodes with source "
                f"statistics, torch {len(reference.stats)} BN layers"), worst
    for k, ((m1, v1), (m2, v2)) in enumerate(zip(candidate.stats, reference.stats)):
        if m1.shape != m2.shape or not (np.allclose(m1, m2, rtol=1e-6, atol=1e-7) and np.allclose(v1, v2, rtol=1e-6)):
            return f"BN statistics differ (BN layer {k}: source mean/var not torch's)", worst
    for x in batches:
        got, got_means = candidate.run(x)
        want, want_means = reference.run(x)
        if got.shape != want.shape:
            return f"logits differ in shape: {list(got.shape)} against torch's {list(want.shape)}", worst
        diff = float(np.abs(got.astype(np.float64) - want).max())
        worst["logits"] = max(worst["logits"], diff)
        limit = TOLERANCE * max(float(np.abs(want).max()), 1e-12)
        if not diff <= limit:
            return f"logits differ by {diff:.2e} at batch {len(x)} (tolerance {limit:.1e})", worst
        if len(got_means) != len(want_means):
            return f"stats differ: {len(got_means)} BN means against torch's {len(want_means)}", worst
        for k, (a, b) in enumerate(zip(got_means, want_means)):
            d = float(np.abs(a.astype(np.float64) - b).max()) if a.shape == b.shape else float("inf")
            worst["bn_means"] = max(worst["bn_means"], d)
            limit = TOLERANCE * max(1.0, float(np.abs(b).max()))
            if not d <= limit:
                return f"stats differ: BN layer {k} input means by {d:.2e} at batch {len(x)} (tolerance {limit:.1e})", worst
    return "", worst


def for_module(module: nn.Module, device: torch.device, input_shape: tuple[int, int, int],
               backend: str) -> tuple[OrtForward | None, str, str]:
    """ONNX Runtime for the `source` streams of a PyTorch model, where it is exact: (forward or
    None for torch, a note for the model, why not ('' when chosen)). backend: onnx or auto."""
    batches = probes(*input_shape)
    try:
        candidate = ort_forward(export(module, batches[1][:2], device), device)  # traced at batch 2, not 1
    except Exception as e:  # noqa: BLE001 - not every network exports; torch still serves it
        why = f"export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    else:
        why, worst = compare(candidate, TorchForward(module, device), batches)
        if not why:
            return candidate, (f"source streams run on ONNX Runtime ({candidate.provider}; checked against torch: "
                               f"max |Δ| logits {worst['logits']:.1e}, BN means {worst['bn_means']:.1e}; "
                               f"BN-shift over {len(candidate.stats)} layers)"), ""
    if backend == "auto":
        log.warning("--frozen-backend auto: source streams run on torch, not ONNX Runtime: %s", why)
    return None, "source streams run on torch", why
