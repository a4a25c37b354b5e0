"""SAR's update rule against a hand computation: reliable-sample filter, SAM's two passes, SGD with
momentum, model recovery, the skipped top layers, and a checkpoint round trip."""
import math

import torch
from torch import nn
from torch.func import functional_call

import adapters
from adapter_models import batch_stat_copy, confident_cnn, entropy, randomise_bn, stream
from runtime.state_format import Unpacker, pack_body, read_body, strict_json

MARGIN = 0.4 * math.log(10)





def hand_sar_steps(model, batches, lr=1e-3, momentum=0.9, rho=0.05):
    """SAR written out from the paper's equations, one dict of affine parameters, no optimizer."""
    net = batch_stat_copy(model)
    names = [n for n, _ in net.named_parameters() if n.split(".")[0] in ("1", "4")]
    theta = {n: net.get_parameter(n).detach().clone() for n in names}
    buf = None
    for x in batches:
        params = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
        e = entropy(functional_call(net, params, (x,)))
        keep = e < MARGIN
        g = torch.autograd.grad(e[keep].mean(), list(params.values()))
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        shifted = {n: (theta[n] + rho * gi / (norm + 1e-12)).requires_grad_(True) for n, gi in zip(names, g)}
        e2 = entropy(functional_call(net, shifted, (x,)))[keep]
        g2 = torch.autograd.grad(e2[e2 < MARGIN].mean(), list(shifted.values()))
        buf = list(g2) if buf is None else [momentum * b + gi for b, gi in zip(buf, g2)]
        theta = {n: theta[n] - lr * b for n, b in zip(names, buf)}
    return theta


def test_one_and_two_steps_match_the_hand_computation():
    model = confident_cnn()
    batches = stream(2)
    a = adapters.create("sar", model, reset_constant_em=0.0)
    for i in (1, 2):
        a.step(batches[i - 1])
        expected = hand_sar_steps(model, batches[:i])
        for n, p in a.trainable:
            assert torch.allclose(p, expected[n], atol=1e-6), (i, n)
    assert a.weight_distance() > 0


def test_the_sharpness_aware_gradient_is_not_plain_entropy_sgd():
    model = confident_cnn()
    x = stream(1)[0]
    sharp = adapters.create("sar", model, rho=0.5, lr=0.1, reset_constant_em=0.0)
    flat = adapters.create("sar", model, rho=0.0, lr=0.1, reset_constant_em=0.0)
    sharp.step(x)
    flat.step(x)
    # rho = 0: the plain SGD step on the filtered mean entropy
    net = batch_stat_copy(model)
    params = {n: net.get_parameter(n).detach().clone().requires_grad_(True) for n, _ in flat.trainable}
    e = entropy(functional_call(net, params, (x,)))
    g = torch.autograd.grad(e[e < MARGIN].mean(), list(params.values()))
    for (n, p), gi in zip(flat.trainable, g):
        assert torch.allclose(p, params[n] - 0.1 * gi, atol=1e-7), n
    assert max(float((p - q).detach().abs().max()) for (_, p), (_, q) in zip(sharp.trainable, flat.trainable)) > 1e-5


def test_reliable_samples_are_those_below_the_margin():
    model = confident_cnn()
    x = stream(1)[0]
    logits = adapters.create("bn", model).step(x)
    expected = int((entropy(logits) < MARGIN).sum())
    assert 0 < expected < x.shape[0]  # the filter has work to do on this batch
    a = adapters.create("sar", model)
    a.predict(x)
    assert a.learn()["reliable"] == expected
    # a margin no sample passes: no loss reported (a NaN would trip the guard), weights unchanged
    b = adapters.create("sar", model, margin_e0=0.01)
    b.predict(x)
    figures = b.learn()
    assert figures["reliable"] == 0 and "loss" not in figures
    assert b.weight_distance() == 0


def test_recovery_restores_the_source_weights_and_keeps_the_momentum():
    model = confident_cnn()
    batches = stream(2)
    a = adapters.create("sar", model, reset_constant_em=10.0)  # any finite ema is below it
    a.predict(batches[0])
    figures = a.learn()
    assert figures["recovered"] == 1.0 and a.recoveries == 1 and a.ema is None
    assert a.weight_distance() == 0
    # as in the reference, SGD's momentum survives the recovery: the next step moves by lr·(0.9·b + g)
    buffers = [a.optimizer.state[p]["momentum_buffer"].clone() for _, p in a.trainable]
    assert any(float(b.abs().max()) > 0 for b in buffers)
    a.step(batches[1])
    fresh = adapters.create("sar", model, reset_constant_em=0.0)
    fresh.step(batches[1])
    assert not all(torch.equal(p, q) for (_, p), (_, q) in zip(a.trainable, fresh.trainable))
    a.reset()
    assert a.optimizer.state_dict()["state"] == {} and a.recoveries == 0


def test_ema_is_the_moving_average_of_the_second_pass_loss():
    model = confident_cnn()
    a = adapters.create("sar", model, reset_constant_em=0.0)
    seen = []
    for x in stream(3):
        a.predict(x)
        seen.append(a.learn()["loss_sharp"])
    expected = seen[0]
    for v in seen[1:]:
        expected = 0.9 * expected + (1 - 0.9) * v
    assert a.ema == expected


def test_the_top_layers_are_not_trained():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("layer3", nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    model.add_module("layer4", nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    model.add_module("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)))
    randomise_bn(model)
    a = adapters.create("sar", model.eval())
    assert [n for n, _ in a.trainable] == ["layer3.1.weight", "layer3.1.bias"]
    shared = {p.data_ptr() for p in model.parameters()}
    assert a.net.get_parameter("layer4.1.weight").data_ptr() in shared


def test_checkpoint_round_trip_through_the_state_format():
    model = confident_cnn()
    batches = stream(5)
    a = adapters.create("sar", model)
    for x in batches[:3]:
        a.step(x)
    assert a.ema is not None
    metadata, tensors = read_body(pack_body(a.state_dict(), "s", "m"))
    state = Unpacker(tensors)(strict_json(metadata["record"]))
    b = adapters.create("sar", model)
    b.load_state_dict(state)
    assert b.ema == a.ema and b.steps == a.steps
    for x in batches[3:]:
        assert torch.equal(a.step(x), b.step(x))
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(a.trainable, b.trainable))
