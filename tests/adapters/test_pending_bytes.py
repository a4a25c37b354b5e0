"""`adapter.pending_bytes`: what an owed update holds (the saved activations of its batch's graph,
and the tensors a deferred loss keeps), measured by hooks that only observe.

The measure is checked against the process's RSS: holding 32 tent adapters on the demo model,
each owing the update of a batch of 16, grows the RSS by what their pending_bytes add up to
(measured here: 1.24 x with glibc's default allocator, which keeps freed temporaries of the
forward passes on its heap; 1.01 x with MALLOC_MMAP_THRESHOLD_=65536, where every large tensor
is its own mapping). The stated bound is 0.5 x - 2 x.
"""
from __future__ import annotations

import copy
import gc
import os
import types

import pytest
import torch

import adapters
from adapter_models import stream, tiny_cnn
from runtime.demo.model import build_demo_model, load_prototypes

GRADIENT = ("tent", "mean-teacher", "cotta")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _create(name: str, model, **kw):
    if name == "mean-teacher":
        kw.setdefault("prototypes", torch.randn(10, 16, generator=torch.Generator().manual_seed(0)))
    return adapters.create(name, model, **kw)


@pytest.mark.parametrize("name", GRADIENT)
def test_pending_bytes_are_counted_while_owed_and_zero_after(name):
    a = _create(name, tiny_cnn())
    x = stream(1, batch=8)[0]
    assert a.pending_bytes == 0
    a.predict(x)
    held = a.pending_bytes
    # at least the input of the second conv (8 x 8 x 16 x 16 floats) and its BN input
    assert held >= 8 * 8 * 16 * 16 * 4
    a.learn()
    assert a.pending_bytes == 0
    for forget in (a.discard, a.reset, lambda: a.load_state_dict(a.state_dict())):
        a.predict(x)
        assert a.pending_bytes > 0
        forget()
        assert a.pending_bytes == 0


@pytest.mark.parametrize("name", ["source", "bn", "bn-alpha", "bn-ema", "unmix-tns"])
def test_normalisation_adapters_hold_no_graph(name):
    a = adapters.create(name, tiny_cnn())
    a.predict(stream(1, batch=8)[0])
    assert a.pending_bytes == 0


def test_pending_bytes_scale_with_the_batch():
    a = adapters.create("tent", tiny_cnn())
    xs = stream(2, batch=32)
    a.predict(xs[0][:8])
    small = a.pending_bytes
    a.learn()
    a.predict(xs[1])
    assert 3.5 * small < a.pending_bytes < 4.5 * small


def test_a_deferred_loss_counts_the_tensors_it_keeps():
    """mean-teacher computes its augmented pass in learn(): the closure keeps the batch, the
    logits and the features, which count as well (each storage once)."""
    a = _create("mean-teacher", tiny_cnn())
    x = stream(1, batch=8)[0]
    a.predict(x)
    assert callable(a._loss)
    kept = {c.cell_contents.untyped_storage().data_ptr() for c in a._loss.__closure__
            if isinstance(c.cell_contents, torch.Tensor)}
    assert len(kept) >= 3  # x, logits, teacher logits (features share the graph's storages)
    assert a.pending_bytes >= x.numel() * 4


def test_tent_with_several_steps_counts_only_the_graph_still_held():
    """The extra steps' graphs are backpropagated inside predict and let go."""
    x = stream(1, batch=8)[0]
    one = adapters.create("tent", tiny_cnn())
    three = adapters.create("tent", tiny_cnn(), steps=3)
    one.predict(x)
    three.predict(x)
    assert three.pending_bytes == one.pending_bytes


def _unobserved_predict(self, x):
    """GradientAdapter._predict before pending_bytes: no saved-tensor hooks."""
    with torch.enable_grad():
        prediction, loss = self._forward_loss(x)
    self._loss = loss
    return prediction


@pytest.mark.parametrize("name", GRADIENT)
def test_observing_changes_no_output_and_no_weight(name):
    model = tiny_cnn()
    observed, plain = _create(name, model, seed=3), _create(name, copy.deepcopy(model), seed=3)
    plain._predict = types.MethodType(_unobserved_predict, plain)
    for x in stream(4, batch=8):
        assert torch.equal(observed.predict(x), plain.predict(x))
        observed.learn()
        plain.learn()
    for (name_a, p), (name_b, q) in zip(observed.trainable, plain.trainable):
        assert name_a == name_b and torch.equal(p, q)


def test_a_discarded_graph_is_freed():
    """Observing must not keep a graph alive: predicting and discarding over and over leaves the
    RSS where it was (saved tensors returned as they are would form a reference cycle)."""
    a = adapters.create("tent", tiny_cnn())
    x = torch.rand(64, 3, 32, 32)
    for _ in range(3):
        a.predict(x)
        a.discard()
    gc.collect()
    before = _rss()
    per_batch = None
    for _ in range(20):
        a.predict(x)
        per_batch = a.pending_bytes
        a.discard()
    gc.collect()
    assert _rss() - before < 5 * per_batch  # 20 leaked graphs would be 20 x


def test_pending_bytes_explain_the_rss_of_held_updates():
    torch.set_num_threads(1)
    model = build_demo_model()
    x = torch.rand(16, 3, 32, 32)
    warm = adapters.create("tent", model)  # torch's first-use allocations happen here, not below
    warm.step(x)
    warm.step(x)
    gc.collect()
    before = _rss()
    held = [adapters.create("tent", model) for _ in range(32)]
    for a in held:
        a.predict(x)
    gc.collect()
    grown = _rss() - before
    counted = sum(a.pending_bytes + a.state_bytes() for a in held)
    assert counted > 32 * 16 * 16 * 32 * 32 * 4  # at least one 16-channel activation map per sample
    assert 0.5 * counted <= grown <= 2.0 * counted, f"RSS grew {grown / 2**20:.0f} MiB, counted {counted / 2**20:.0f} MiB"
    for a in held:
        a.learn()
        assert a.pending_bytes == 0


def test_demo_model_pending_bytes_per_sample():
    """The sizes docs/BENCHMARKS.md quotes: about 1.44 MiB per sample for each gradient policy on
    the demo model (32 x 32 input)."""
    model = build_demo_model()
    x = torch.rand(8, 3, 32, 32)
    for name, kw in (("tent", {}), ("mean-teacher", {"prototypes": load_prototypes()})):
        a = adapters.create(name, model, **kw)
        a.predict(x)
        assert 1.3 * 2**20 * 8 < a.pending_bytes < 1.6 * 2**20 * 8, (name, a.pending_bytes)
