"""Grouped batch norm: G batches in one forward give what G serial forwards give (≤ 1e-5), and
CoTTA's grouped teacher reproduces the reference's serial loop step after step."""
import pytest
import torch
from torch import nn

import adapters
import adapters.cotta
from adapter_models import randomise_bn, stream, tiny_cnn
from adapters.common import configure_batch_stats
from adapters.grouped_norm import groupable, grouped
from runtime.demo.model import build_demo_model

MODELS = {"tiny": (tiny_cnn, 16), "resnet20": (build_demo_model, 32)}


def batches(n, batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    # each batch its own brightness and contrast, so the groups' statistics differ
    return [(torch.rand(batch, 3, size, size, generator=g) * (0.3 + 0.05 * i) + 0.02 * i).clamp(0, 1)
            for i in range(n)]


@pytest.mark.parametrize("vectorised", [True, False], ids=["vectorised", "per-slice"])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("policy", ["bn", "bn-alpha"])
def test_grouped_forward_equals_serial_forwards(model_name, policy, vectorised):
    factory, size = MODELS[model_name]
    net = adapters.create(policy, factory()).net
    xs = batches(12, 6, size)
    with torch.no_grad():
        serial = torch.cat([net(x) for x in xs])
        with grouped(net, len(xs), vectorised):
            together = net(torch.cat(xs))
        plain = net(torch.cat(xs))  # outside the block: statistics of the whole stack again
    assert (together - serial).abs().max() <= 1e-5
    assert (plain - serial).abs().max() > 1e-3  # without grouping the stack would change the result


@pytest.mark.parametrize("vectorised", [True, False], ids=["vectorised", "per-slice"])
def test_train_mode_running_statistics_advance_once_per_group(vectorised):
    torch.manual_seed(0)
    make = lambda: randomise_bn(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(),  # noqa: E731
                                              nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=None)))
    serial_net, grouped_net = make().train(), make().train()
    grouped_net.load_state_dict(serial_net.state_dict())
    xs = [torch.randn(7, 5) * (1 + i) for i in range(4)]
    with torch.no_grad():
        serial = torch.cat([serial_net(x) for x in xs])
        with grouped(grouped_net, 4, vectorised):
            together = grouped_net(torch.cat(xs))
    assert (together - serial).abs().max() <= 1e-5
    for (name, a), b in zip(serial_net.state_dict().items(), grouped_net.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    assert int(grouped_net[1].num_batches_tracked) == 4


@pytest.mark.parametrize("vectorised", [True, False], ids=["vectorised", "per-slice"])
def test_the_block_restores_the_layers_even_after_an_error(vectorised):
    net = configure_batch_stats(tiny_cnn())
    x = torch.cat(batches(2, 4, 16))
    before = net(x)
    with pytest.raises(ValueError, match="cannot be split into 3 equal groups"):
        with grouped(net, 3, vectorised):
            net(x)
    assert torch.equal(net(x), before)
    assert not any("forward" in m.__dict__ for m in net.modules())


def test_stateful_layers_are_not_groupable():
    assert groupable(adapters.create("bn", tiny_cnn()).net)
    assert groupable(adapters.create("bn-alpha", tiny_cnn()).net)
    unmix = adapters.create("unmix-tns", tiny_cnn()).net
    assert not groupable(unmix)
    with pytest.raises(ValueError, match="cannot be grouped"):
        with grouped(unmix, 2):
            pass


@pytest.fixture
def stacking_on_cpu(monkeypatch):
    """CoTTA stacks its teacher passes on CUDA only (slower on the CPU); here on the CPU too."""
    monkeypatch.setitem(adapters.cotta.MAX_GROUPED_ELEMENTS, "cpu", 1 << 24)


def run_cotta(model, xs, group, **hp):
    a = adapters.create("cotta", model, threshold=1.0, seed=3, **hp)  # threshold 1: always augment
    a._group_teacher = group
    outputs = [a.step(x) for x in xs]
    return a, outputs


@pytest.mark.parametrize("model_name,norm", [("tiny", "bn"), ("tiny", "bn-alpha"), ("resnet20", "bn")])
def test_cotta_grouped_teacher_equals_the_serial_loop_over_steps(model_name, norm, stacking_on_cpu, monkeypatch):
    factory, size = MODELS[model_name]
    model = factory()
    xs = batches(4, 8, size, seed=5)
    hp = dict(norm=norm, n_augmentations=32, restore_prob=0.05)
    passes = []
    monkeypatch.setattr(adapters.cotta, "grouped", _recording(adapters.cotta.grouped, passes))
    ours, ours_out = run_cotta(model, xs, True, **hp)
    assert passes == [32] * 4  # one grouped teacher forward per step
    reference, reference_out = run_cotta(model, xs, False, **hp)
    for step, (a, b) in enumerate(zip(ours_out, reference_out)):
        assert (a - b).abs().max() <= 1e-5, step
    # the same random draws (augmentations, then restore masks) ...
    assert torch.equal(ours.generator.get_state(), reference.generator.get_state())
    source = dict(model.named_parameters())
    for (key, p), q in zip(ours.student.named_parameters(), reference.student.parameters()):
        assert torch.equal(p == source[key], q == source[key]), key  # last step restored the same elements
    # ... and the same networks. Compared by output, not weight by weight: a conv bias right
    # before a batch-statistics BN has a gradient of pure rounding noise (~1e-9), which Adam's
    # g / (|g| + eps) blows up to steps of ~lr, different in any two summation orders, while
    # the BN cancels that bias exactly.
    probe = batches(1, 8, size, seed=9)[0]
    with torch.no_grad():
        for name in ("student", "teacher"):
            difference = getattr(ours, name)(probe) - getattr(reference, name)(probe)
            assert difference.abs().max() <= 1e-5, name


def test_cotta_splits_large_stacks_into_several_grouped_passes(monkeypatch):
    model, xs = tiny_cnn(), stream(2, batch=4)
    reference, reference_out = run_cotta(model, xs, False, n_augmentations=7)
    # room for 3 copies of a (4, 3, 16, 16) batch per pass: passes of 3, 3 and 1 copies
    monkeypatch.setitem(adapters.cotta.MAX_GROUPED_ELEMENTS, "cpu", 3 * 4 * 3 * 16 * 16)
    passes = []
    monkeypatch.setattr(adapters.cotta, "grouped", _recording(adapters.cotta.grouped, passes))
    _, ours_out = run_cotta(model, xs, True, n_augmentations=7)
    assert passes == [3, 3, 1, 3, 3, 1]
    for a, b in zip(ours_out, reference_out):
        assert (a - b).abs().max() <= 1e-5


def test_cotta_keeps_serial_teacher_passes_on_the_cpu(monkeypatch):
    passes = []
    monkeypatch.setattr(adapters.cotta, "grouped", _recording(adapters.cotta.grouped, passes))
    run_cotta(tiny_cnn(), stream(1), True, n_augmentations=4)
    assert passes == []


def test_cotta_under_unmix_tns_keeps_serial_teacher_passes(stacking_on_cpu):
    model, xs = tiny_cnn(), stream(2)
    ours, ours_out = run_cotta(model, xs, True, norm="unmix-tns", n_augmentations=4)
    _, reference_out = run_cotta(model, xs, False, norm="unmix-tns", n_augmentations=4)
    assert not groupable(ours.teacher)
    for a, b in zip(ours_out, reference_out):
        assert torch.equal(a, b)


def _recording(context, calls):
    def wrapper(net, groups, *args):
        calls.append(groups)
        return context(net, groups, *args)
    return wrapper


def test_bench_figures_compare_equal_outputs(stacking_on_cpu):
    from runtime.lab.bench_adapters import cotta_vs_serial, grouped_bn_streams

    model = tiny_cnn()
    cotta = cotta_vs_serial(model, stream(4, batch=4), "cpu", n_augmentations=4)
    assert cotta["steps"] == 2 and cotta["n_augmentations"] == 4 and cotta["batch"] == 4
    assert cotta["max_abs_diff"] <= 1e-5
    assert cotta["speedup"] == pytest.approx(cotta["serial_ms_per_step"] / cotta["ms_per_step"])
    streams = grouped_bn_streams(model, 3, 4, "cpu", policy="bn-alpha", repeats=1, size=(16, 16))
    assert streams["n_streams"] == 3 and streams["policy"] == "bn-alpha"
    assert streams["max_abs_diff"] <= 1e-5 and streams["separate_ms"] > 0 and streams["grouped_ms"] > 0
