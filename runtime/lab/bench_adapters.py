"""Adapter-side speed figures for `tta bench` (its `steps` and `cotta` sections).

`cotta_vs_serial` and `grouped_bn_streams` compare two ways of computing the same thing, call by
call on the same batches (see runtime.lab.timing.paired_times), and report the largest output
difference next to the speed ratio: a speed-up only counts at equal outputs. `step_ratios` (the
`steps` section) gives, per adapter, its step over a frozen forward and its reply (predict) over
the source's, the three called in turn on each batch.
"""
from __future__ import annotations

import statistics
import time

import torch

import adapters
from adapters.grouped_norm import grouped
from runtime.lab.timing import _sync, paired_times


def step_ratios(model, names, batches, device, prototypes=None) -> list[dict]:
    """Per adapter: the source's reply (a frozen forward), then the adapter's predict and learn,
    timed call by call on each batch in turn (two warm-up batches). Returns rows: policy; batch;
    ms_per_batch (predict + learn), frozen_ms_per_batch (the source's forward), reply_ms (predict),
    medians; ratio = ms_per_batch / frozen_ms_per_batch; reply_over_source = reply_ms / frozen."""
    device = torch.device(device)
    source = adapters.create("source", model)
    rows = []
    for name in names:
        hp = {"prototypes": prototypes} if name == "mean-teacher" and prototypes is not None else {}
        adapter = adapters.create(name, model, **hp)
        times = []
        for i, x in enumerate(batches):
            marks = [time.perf_counter()]
            for call in (lambda: source.predict(x), lambda: adapter.predict(x), adapter.learn):
                call()
                _sync(device)
                marks.append(time.perf_counter())
            if i >= 2:
                times.append([b - a for a, b in zip(marks, marks[1:])])
        frozen, reply, learn = (list(t) for t in zip(*times))
        step = [r + u for r, u in zip(reply, learn)]
        f, r, t = (statistics.median(v) * 1e3 for v in (frozen, reply, step))
        rows.append({"policy": name, "batch": int(batches[0].shape[0]), "ms_per_batch": t, "frozen_ms_per_batch": f,
                     "ratio": t / f, "reply_ms": r, "reply_over_source": r / f})
    return rows


def cotta_vs_serial(model, batches, device, n_augmentations: int = 32) -> dict:
    """CoTTA: our step over a reference-style step (32 augmented teacher passes one after
    another), same outputs.

    Two CoTTA adapters with the same seed step through the same batches, alternately: ours
    (augmented copies through the teacher in one grouped forward) and the reference style
    (the same adapter with grouping switched off: one teacher pass per copy, as the papers'
    code). threshold=1.0 so that every step takes the augmented path being compared.

    Returns: n_augmentations; batch (images per step); steps (timed steps; two warm-up steps
    before them); ms_per_step (ours, median); serial_ms_per_step (reference style, median);
    speedup (serial_ms_per_step / ms_per_step); max_abs_diff (largest |Δ| between the two
    adapters' outputs over all steps, warm-up included)."""
    device = torch.device(device)
    ours, serial = (adapters.create("cotta", model, threshold=1.0, n_augmentations=n_augmentations, seed=0)
                    for _ in range(2))
    serial._group_teacher = False
    outputs = ([], [])

    def stepper(adapter, out):
        return lambda x: out.append(adapter.step(x))

    t_ours, t_serial = paired_times([stepper(ours, outputs[0]), stepper(serial, outputs[1])], batches, device)
    ms, serial_ms = statistics.median(t_ours) * 1e3, statistics.median(t_serial) * 1e3
    return {"n_augmentations": n_augmentations, "batch": int(batches[0].shape[0]), "steps": len(t_ours),
            "ms_per_step": ms, "serial_ms_per_step": serial_ms, "speedup": serial_ms / ms,
            "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(*outputs))}


def grouped_bn_streams(model, n_streams: int, batch: int, device, policy: str = "bn", repeats: int = 5,
                       size: tuple[int, int] = (32, 32)) -> dict:
    """N test-time-BN streams (`bn`, or `bn-alpha`): N separate forwards, one per stream, over
    one grouped forward of all N batches in which each stream's batch is normalised with its
    own statistics (adapters/grouped_norm.py); the engine's batching of BN streams would use it.
    Each stream gets its own batch of size×size images (its own brightness and contrast, so
    the statistics differ).

    Returns: policy; n_streams; batch (images per stream); repeats (timed rounds, after two
    warm-up rounds); separate_ms (median ms for the N forwards, one per stream);
    grouped_ms (median ms for the one grouped forward, concatenation included);
    speedup (separate_ms / grouped_ms); max_abs_diff (largest |Δ| between the two paths' outputs)."""
    device = torch.device(device)
    streams = [adapters.create(policy, model) for _ in range(n_streams)]
    g = torch.Generator().manual_seed(0)
    xs = [(torch.rand(batch, 3, *size, generator=g) * (0.4 + 0.6 * i / n_streams) + 0.1 * (i % 3)).clamp(0, 1)
          .to(device) for i in range(n_streams)]
    net = streams[0].net  # stateless policies: every stream's network computes the same function
    last = {}

    def separate(xs):
        last["separate"] = torch.cat([s.predict(x) for s, x in zip(streams, xs)])

    def together(xs):
        with torch.no_grad(), grouped(net, len(xs)):
            last["grouped"] = net(torch.cat(xs))

    t_separate, t_grouped = paired_times([separate, together], [xs] * (repeats + 2), device)
    separate_ms, grouped_ms = statistics.median(t_separate) * 1e3, statistics.median(t_grouped) * 1e3
    return {"policy": policy, "n_streams": n_streams, "batch": batch, "repeats": repeats,
            "separate_ms": separate_ms, "grouped_ms": grouped_ms, "speedup": separate_ms / grouped_ms,
            "max_abs_diff": float((last["separate"] - last["grouped"]).abs().max())}


