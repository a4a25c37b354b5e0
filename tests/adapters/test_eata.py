"""EATA's update rule against a hand computation: the entropy and redundancy filters, the sample
weights, Adam, the Fisher information and its penalty, ETA without source data, and a checkpoint
round trip."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import adapters
from adapter_models import batch_stat_copy, confident_cnn, entropy, stream
from runtime.state_format import Unpacker, pack_body, read_body, strict_json

MARGIN = 0.4 * math.log(10)
AFFINE = ["1.weight", "1.bias", "4.weight", "4.bias"]





def hand_fisher(model, data, batch_size):
    net = batch_stat_copy(model)
    total = {n: 0.0 for n in AFFINE}
    batches = data.split(batch_size)
    for x in batches:
        params = {n: net.get_parameter(n).detach().clone().requires_grad_(True) for n in AFFINE}
        logits = functional_call(net, params, (x,))
        labels = logits.argmax(1)
        loss = -torch.log_softmax(logits, 1)[torch.arange(len(x)), labels].mean()
        for n, g in zip(AFFINE, torch.autograd.grad(loss, list(params.values()))):
            total[n] = total[n] + g ** 2
    return {n: t / len(batches) for n, t in total.items()}


def hand_eata(model, batches, lr=1e-3, d_margin=0.4, alpha=0.0, fisher=None):
    """EATA from the paper's equations with Adam written out; returns the parameters and m."""
    net = batch_stat_copy(model)
    source = {n: net.get_parameter(n).detach().clone() for n in AFFINE}
    theta = dict(source)
    m1 = {n: torch.zeros_like(t) for n, t in theta.items()}
    m2 = {n: torch.zeros_like(t) for n, t in theta.items()}
    avg, t = None, 0
    for x in batches:
        params = {n: v.clone().requires_grad_(True) for n, v in theta.items()}
        logits = functional_call(net, params, (x,))
        e, p = entropy(logits), logits.softmax(1)
        keep = e < MARGIN
        if avg is not None:
            keep = keep & (F.cosine_similarity(avg[None], p, dim=1).abs() < d_margin)
        if not keep.any():
            continue
        w = torch.exp(MARGIN - e.detach())
        loss = (e * w)[keep].mean()
        if fisher is not None:
            loss = loss + sum(alpha * (fisher[n] * (params[n] - source[n]) ** 2).sum() for n in AFFINE)
        grads = dict(zip(AFFINE, torch.autograd.grad(loss, list(params.values()))))
        t += 1
        for n in AFFINE:
            m1[n] = 0.9 * m1[n] + 0.1 * grads[n]
            m2[n] = 0.999 * m2[n] + 0.001 * grads[n] ** 2
            step = lr * (m1[n] / (1 - 0.9 ** t)) / ((m2[n] / (1 - 0.999 ** t)).sqrt() + 1e-8)
            theta[n] = theta[n] - step
        mean = p[keep].detach().mean(0)
        avg = mean if avg is None else 0.9 * avg + 0.1 * mean
    return theta, avg


@pytest.mark.parametrize("d_margin", [0.4, 0.995])
def test_three_steps_match_the_hand_computation(d_margin):
    model = confident_cnn()
    batches = stream(3)
    a = adapters.create("eata", model, d_margin=d_margin)
    for i in (1, 3):
        for x in batches[a.steps:i]:
            a.step(x)
        theta, avg = hand_eata(model, batches[:i], d_margin=d_margin)
        for n, p in a.trainable:
            assert torch.allclose(p, theta[n], atol=1e-6), (d_margin, i, n)
        assert torch.allclose(a.probs, avg, atol=1e-6)
    assert a.weight_distance() > 0


def test_the_filters_select_the_reliable_and_non_redundant_samples():
    model = confident_cnn()
    x0, x1 = stream(2)
    bn = adapters.create("bn", model)
    l0, l1 = bn.step(x0), bn.step(x1)  # batch statistics: what EATA's first prediction sees
    reliable0 = entropy(l0) < MARGIN
    assert 0 < int(reliable0.sum()) < len(x0)
    a = adapters.create("eata", model, d_margin=0.999)
    a.predict(x0)
    figures = a.learn()
    assert (figures["reliable"], figures["selected"]) == (int(reliable0.sum()),) * 2  # no average yet
    assert torch.allclose(a.probs, l0.softmax(1)[reliable0].mean(0), atol=1e-6)
    logits = a.predict(x1)
    cos = F.cosine_similarity(a.probs[None], logits.softmax(1), dim=1).abs()
    figures = a.learn()
    reliable1 = entropy(logits) < MARGIN
    assert figures["reliable"] == int(reliable1.sum())
    assert figures["selected"] == int((reliable1 & (cos < 0.999)).sum())
    assert figures["selected"] < figures["reliable"]  # the redundancy filter removed some
    assert a.selected == [int(reliable0.sum()) + figures["reliable"], int(reliable0.sum()) + figures["selected"]]
    del l1


def test_nothing_selected_means_no_step_and_no_average():
    model = confident_cnn()
    a = adapters.create("eata", model, margin_e0=0.01)
    a.predict(stream(1)[0])
    figures = a.learn()
    assert figures["selected"] == 0 and "loss" not in figures
    assert a.probs is None and a.weight_distance() == 0
    assert a.optimizer.state_dict()["state"] == {}


def test_the_fisher_is_the_mean_squared_gradient_of_the_pseudo_label_loss():
    model = confident_cnn()
    data = stream(1, batch=20, seed=7)[0]
    a = adapters.create("eata", model, fisher_data=data, fisher_batch_size=8)  # batches of 8, 8 and 4
    expected = hand_fisher(model, data, 8)
    assert sorted(a.fishers) == sorted(AFFINE)
    for n in AFFINE:
        assert torch.allclose(a.fishers[n], expected[n], rtol=1e-5, atol=1e-10), n
    assert all(p.grad is None for _, p in a.trainable)


def test_the_fisher_term_changes_the_update_as_the_hand_computation_says():
    model = confident_cnn()
    batches = stream(3)
    data = stream(1, batch=16, seed=7)[0]
    alpha = 5000.0
    a = adapters.create("eata", model, fisher_data=data, fisher_alpha=alpha, fisher_batch_size=16, d_margin=0.999)
    eta = adapters.create("eata", model, d_margin=0.999)
    for x in batches:
        a.step(x)
        eta.step(x)
    theta, _ = hand_eata(model, batches, d_margin=0.999, alpha=alpha, fisher=hand_fisher(model, data, 16))
    for n, p in a.trainable:
        assert torch.allclose(p, theta[n], atol=1e-6), n
    # the penalty pulls towards the source: the first step is the same (θ = θ_src), then it differs
    assert a.weight_distance() < eta.weight_distance()


def test_eta_without_source_samples_or_with_alpha_zero():
    model = confident_cnn()
    data = stream(1, batch=8, seed=7)[0]
    assert adapters.create("eata", model).fishers is None
    assert adapters.create("eata", model, fisher_data=data, fisher_alpha=0.0).fishers is None
    with pytest.raises(ValueError, match="fisher_data"):
        adapters.create("eata", model, fisher_data=torch.zeros(3, 16, 16))


def test_a_discarded_batch_leaves_the_average_untouched():
    model = confident_cnn()
    x0, x1 = stream(2)
    a = adapters.create("eata", model)
    a.step(x0)
    before = a.probs.clone()
    a.predict(x1)
    a.discard()
    assert torch.equal(a.probs, before) and a.steps == 1


def test_checkpoint_round_trip_through_the_state_format():
    model = confident_cnn()
    batches = stream(5)
    data = stream(1, batch=8, seed=7)[0]
    a = adapters.create("eata", model, fisher_data=data, fisher_alpha=100.0)
    for x in batches[:3]:
        a.step(x)
    metadata, tensors = read_body(pack_body(a.state_dict(), "s", "m"))
    state = Unpacker(tensors)(strict_json(metadata["record"]))
    b = adapters.create("eata", model, fisher_data=data, fisher_alpha=100.0)
    b.load_state_dict(state)
    assert torch.equal(a.probs, b.probs) and a.selected == b.selected
    for x in batches[3:]:
        assert torch.equal(a.step(x), b.step(x))
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(a.trainable, b.trainable))
    # a fresh ETA stream (no probs yet) round-trips too: None survives the skeleton
    c = adapters.create("eata", model)
    metadata, tensors = read_body(pack_body(c.state_dict(), "s", "m"))
    c.load_state_dict(Unpacker(tensors)(strict_json(metadata["record"])))
    assert c.probs is None and c.fishers is None


def test_streams_on_one_model_share_the_fisher_and_a_wrong_shape_is_refused():
    model = confident_cnn()
    data = stream(1, batch=8, seed=7)[0]
    a = adapters.create("eata", model, fisher_data=data)
    b = adapters.create("eata", model, fisher_data=data)
    assert b.fishers is a.fishers  # computed once
    a.step(stream(1)[0])
    assert torch.equal(b.fishers["1.weight"], adapters.create("eata", model, fisher_data=data.clone()).fishers["1.weight"])
    with pytest.raises(ValueError, match="fisher_data"):
        adapters.create("eata", model, fisher_data=torch.rand(4, 1, 16, 16))  # one channel: the model takes 3
