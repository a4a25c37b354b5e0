"""The reply of batch-statistics policies on ONNX Runtime, where the frozen forward runs there.

`bn`, and TENT, SAR, EATA and DeYO with norm=bn and one step a batch, predict with the source
network in which every BatchNorm2d normalises by the batch's own mean and biased variance, with
the policy's current BN scale and bias. One run of the exported graph gives that prediction when
each BatchNormalization node gets its statistics from its input (ReduceMean over N, H, W) and its
scale and bias as graph inputs, fed per call from the stream's adapter. On the demo model at batch
64 that run takes about 1.15x the frozen forward, torch's train-mode forward 2.4-2.8x
(docs/BENCHMARKS.md). The weight-updating policies then owe their update with its own torch
forward (`Adapter.owe`), which adds a forward to each batch's work; the engine takes this path for
them only while nothing else is queued (runtime/engine/batches.py).

`for_module` builds it only for a PyTorch model whose BN layers are all BatchNorm2d with affine
parameters, and only where, on probe batches of 2 and 8 images and with scale and bias moved off
the source's, its logits and BN input means match torch's within onnx_frozen.TOLERANCE.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from torch import nn

from runtime import onnx_frozen

log = logging.getLogger("tta.model")

PROBE_SIZES = (2, 8)  # batch 1 is answered by the source under the guard; 8 is what probes() gives


class BatchStatsForward(onnx_frozen.OrtForward):
    """logits, bn_means = forward.run_with(x, affine); affine: {parameter name: tensor} of the BN
    scales and biases that differ from the source's (the rest are fed the source's)."""

    backend = "onnxruntime-batch-statistics"

    def __init__(self, sess, logits_name: str, bn_names: list[str], stats, source_affine: dict[str, np.ndarray]):
        super().__init__(sess, logits_name, bn_names, stats)
        self.source_affine = source_affine

    def accepts(self, affine: dict) -> bool:
        """Every tensor the policy trains is a BN scale or bias of the graph."""
        return set(affine) <= set(self.source_affine)

    def run_with(self, x: np.ndarray, affine: dict[str, torch.Tensor]) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = self._feed(x)
        feed.update(self.source_affine)
        feed.update({name: t.detach().float().cpu().numpy() for name, t in affine.items()})
        out = self.session.run([self.logits_name, *self.bn_names], feed)
        return out[0], out[1:]

    def run(self, x: np.ndarray):
        return self.run_with(x, {})

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[0]


def rewrite(model, parameters: set[str]) -> tuple[object, str, list[str], list, dict[str, np.ndarray]]:
    """The augmented graph (onnx_frozen.augment: BN input means as outputs) with every
    BatchNormalization node normalising by its input's batch statistics, its scale and bias made
    graph inputs of the same names. ValueError where the graph is not of that form (a node whose
    input is not 4-D, or whose scale or bias is not one of the module's `parameters`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model, logits_name, names, stats = onnx_frozen.augment(model)
    graph = model.graph
    opset = max([o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] or [1])
    types = onnx_frozen._value_types(model)
    initializers = {t.name: t for t in graph.initializer}
    nodes, affine, epsilons = [], {}, []
    pooled = {n.output[0]: n for n in graph.node if n.op_type == "GlobalAveragePool" and n.name.startswith("tta_bn")}
    taps = {pooled[n.input[0]].input[0]: (pooled[n.input[0]], n) for n in graph.node  # BN input X -> its tap
            if n.op_type == "Flatten" and n.input[0] in pooled and n.output[0] in names}
    moved = {id(n) for pair in taps.values() for n in pair}  # emitted before their BN node instead of at the end
    for node in graph.node:
        if id(node) in moved:
            continue
        if node.op_type != "BatchNormalization":
            nodes.append(node)
            continue
        x, scale, bias = node.input[:3]
        if types.get(x, (0, None))[1] != 4:
            raise ValueError(f"BatchNormalization node {node.name!r}: input is not N×C×H×W")
        for name in (scale, bias):
            if name not in parameters or name not in initializers:
                raise ValueError(f"BatchNormalization node {node.name!r}: {name!r} is not a module parameter")
            affine[name] = numpy_helper.to_array(initializers[name]).astype(np.float32)
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        p = f"tta_bs{len(affine)}_"

        def add(op, inputs, out, **attrs):
            nodes.append(helper.make_node(op, inputs, [p + out], name=p + out, **attrs))
            return p + out

        def mean_over_batch(t, out, keep):
            if opset >= 18:
                return add("ReduceMean", [t, "tta_bs_axes"], out, keepdims=keep)
            return add("ReduceMean", [t], out, axes=[0, 2, 3], keepdims=keep)
        mean = mean_over_batch(x, "mean", 1) if x not in taps else None
        if x in taps:  # the batch mean from the per-sample means augment() taps anyway: one pass over X fewer
            nodes.extend(taps.pop(x))
            per_sample = nodes[-1].output[0]
            mean = add("Reshape", [add("ReduceMean", [per_sample], "mean2", axes=[0], keepdims=1) if opset < 18 else
                                   add("ReduceMean", [per_sample, "tta_bs_axis0"], "mean2", keepdims=1),
                                   "tta_bs_channels"], "mean")
        centred = add("Sub", [x, mean], "centred")  # centred: no E[x²] − E[x]² cancellation
        var = mean_over_batch(add("Mul", [centred, centred], "square"), "var", 1)
        inv_std = add("Reciprocal", [add("Sqrt", [add("Add", [var, p + "eps"], "var_eps")], "std")], "inv_std")
        gain = add("Mul", [inv_std, add("Reshape", [scale, "tta_bs_channels"], "scale")], "gain")
        # elementwise on the centred input: measured faster here than a BatchNormalization node fed these statistics
        nodes.append(helper.make_node("Add", [add("Mul", [centred, gain], "scaled"),
                                              add("Reshape", [bias, "tta_bs_channels"], "bias")],
                                      list(node.output[:1]), name=p + "out"))
        epsilons.append(helper.make_tensor(p + "eps", TensorProto.FLOAT, [], [eps]))
    if not affine:
        raise ValueError("the graph has no BatchNormalization node")
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(epsilons)
    graph.initializer.append(helper.make_tensor("tta_bs_channels", TensorProto.INT64, [4], [1, -1, 1, 1]))
    if opset >= 18:
        graph.initializer.append(helper.make_tensor("tta_bs_axes", TensorProto.INT64, [3], [0, 2, 3]))
        graph.initializer.append(helper.make_tensor("tta_bs_axis0", TensorProto.INT64, [1], [0]))
    kept = [t for t in graph.initializer if t.name not in affine]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for name, value in affine.items():
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    onnx.checker.check_model(model)
    return model, logits_name, names, stats, affine


def for_module(module: nn.Module, device: torch.device, input_shape: tuple[int, int, int]) -> tuple[
        BatchStatsForward | None, str]:
    """The batch-statistics forward of a PyTorch model, or None; and why not ('' when built)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    if device.type != "cpu":
        return None, "not on CUDA (not measured there)"
    if not norms or not all(type(m) is nn.BatchNorm2d and m.affine for m in norms):
        return None, "its normalisation layers are not all BatchNorm2d with affine parameters"
    probe = onnx_frozen.probes(*input_shape)[-1]
    batches = [probe[:n] for n in PROBE_SIZES]
    try:
        model, logits_name, names, stats, affine = rewrite(
            onnx_frozen.export(module, batches[0], device), {n for n, _ in module.named_parameters()})
        forward = BatchStatsForward(onnx_frozen.session(model.SerializeToString(), device), logits_name, names,
                                    stats, affine)
        why = _compare(forward, module, device, batches)
    except Exception as e:  # noqa: BLE001 - torch still serves every policy
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    if why:
        log.info("batch-statistics policies reply with torch, not ONNX Runtime: %s", why)
        return None, why
    return forward, ""


def _compare(forward: BatchStatsForward, module: nn.Module, device: torch.device, batches: list[np.ndarray]) -> str:
    """'' when the graph answers as torch's batch-statistics forward does, with scale and bias moved
    off the source's (so a graph input wired to the wrong layer shows), else how it differs."""
    net = copy.deepcopy(module).eval()
    reference = onnx_frozen.TorchForward(net, device)  # its BN layers found while they have running statistics
    gen = torch.Generator().manual_seed(0)
    moved = {}
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
            with torch.no_grad():
                for pname in ("weight", "bias"):
                    p = getattr(m, pname)
                    p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p))
                    moved[f"{name}.{pname}" if name else pname] = p
    for x in batches:
        got, got_means = forward.run_with(x, moved)
        want, want_means = reference.run(x)
        diff = float(np.abs(got.astype(np.float64) - want).max())
        if not diff <= onnx_frozen.TOLERANCE * max(float(np.abs(want).max()), 1e-12):
            return f"logits differ from torch's by {diff:.2e} at batch {len(x)}"
        if len(got_means) != len(want_means) or any(
                not float(np.abs(a - b).max()) <= onnx_frozen.TOLERANCE * max(1.0, float(np.abs(b).max()))
                for a, b in zip(got_means, want_means)):
            return f"BN input means differ from torch's at batch {len(x)}"
    return ""

