"""Update rules, checked against hand computations on tiny models: these fail on a wrong rule,
not only on a wrong shape (ADAPTERS.md, "Tests that would catch wrong update rules")."""
import copy

import pytest
import torch
import torch.nn.functional as F

import adapters
from adapter_models import bn_only, stream, tiny_cnn
from adapters.augment import CottaAugment
from adapters.common import ema_update, stochastic_restore, symmetric_cross_entropy


def bn_layer(model):
    return model[0]


def affine(bn, y):
    return y * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


# --- BN-1, alpha-BN, BN-EMA -----------------------------------------------------------

def test_bn_normalises_with_the_biased_batch_variance():
    model = bn_only()
    x = torch.rand(4, 3, 5, 5)
    bn = bn_layer(model)
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    expected = affine(bn, (x - mean) / torch.sqrt(var + bn.eps)).flatten(1)
    assert torch.allclose(adapters.create("bn", model).step(x), expected, atol=1e-5)


def test_alpha_bn_batch_statistics_are_a_momentum_one_bn_running_statistics_bit_for_bit():
    from adapters.bn_alpha import unbiased_batch_statistics
    for shape in [(4, 3, 5, 5), (1, 6, 7, 3), (32, 16, 8, 8)]:
        x = torch.randn(shape) * 2 + 0.3
        reference = torch.nn.BatchNorm2d(shape[1], affine=False, momentum=1.0).train()
        reference(x)  # the reference's alpha-BN reads its statistics off this layer
        mean, var = unbiased_batch_statistics(x)
        assert torch.equal(mean, reference.running_mean) and torch.equal(var, reference.running_var)


def test_alpha_bn_mixes_source_and_unbiased_batch_statistics():
    model = bn_only()
    x = torch.rand(4, 3, 5, 5)
    bn = bn_layer(model)
    n = 4 * 5 * 5
    for alpha in (0.1, 1.0):
        mean = (1 - alpha) * bn.running_mean + alpha * x.mean((0, 2, 3))
        var = (1 - alpha) * bn.running_var + alpha * x.var((0, 2, 3), unbiased=False) * n / (n - 1)
        expected = affine(bn, (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)).flatten(1)
        assert torch.allclose(adapters.create("bn-alpha", model, alpha=alpha).step(x), expected, atol=1e-5)
    # alpha = 1 is not BN-1: the variance differs by n/(n-1)
    assert not torch.allclose(adapters.create("bn-alpha", model, alpha=1.0).step(x),
                              adapters.create("bn", model).step(x), atol=1e-4)


def test_bn_ema_updates_running_statistics_then_predicts_with_them():
    model = bn_only()
    bn = bn_layer(model)
    a = adapters.create("bn-ema", model)
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    for x in stream(3, batch=4, size=5):
        mean = 0.9 * mean + 0.1 * x.mean((0, 2, 3))
        var = 0.9 * var + 0.1 * x.var((0, 2, 3), unbiased=True)
        expected = affine(bn, (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)).flatten(1)
        assert torch.allclose(a.step(x), expected, atol=1e-5)
    assert torch.allclose(a.net[0].running_mean, mean, atol=1e-6)
    assert torch.equal(bn.running_mean, model[0].running_mean)  # source untouched


# --- UnMix-TNS --------------------------------------------------------------------------

def unmix_reference(x, M, V, bn, tau=0.07, lam=0.1):
    """UnMix-TNS for one layer, written out loop by loop from the paper's equations."""
    B, C = x.shape[:2]
    K = M.shape[0]
    m_i, v_i = x.mean((2, 3)), x.var((2, 3), unbiased=False)
    out = torch.empty_like(x)
    p = torch.empty(B, K)
    for b in range(B):
        s = torch.stack([F.cosine_similarity(m_i[b], M[k], dim=0) for k in range(K)])
        p[b] = torch.softmax(s / tau, 0)
        mu_hat = torch.stack([(1 - p[b, k]) * M[k] + p[b, k] * m_i[b] for k in range(K)])
        var_hat = torch.stack([(1 - p[b, k]) * V[k] + p[b, k] * v_i[b] for k in range(K)])
        mu = mu_hat.mean(0)
        var = var_hat.mean(0) + (mu_hat ** 2).mean(0) - mu ** 2
        out[b] = (x[b] - mu.view(C, 1, 1)) / torch.sqrt(var.view(C, 1, 1) + bn.eps)
    new_M = M + lam * torch.stack([sum(p[b, k] * (m_i[b] - M[k]) for b in range(B)) / B for k in range(K)])
    new_V = V + lam * torch.stack([sum(p[b, k] * (v_i[b] - V[k]) for b in range(B)) / B for k in range(K)])
    return affine(bn, out).flatten(1), new_M, new_V


def test_unmix_tns_initialisation_spreads_the_source_statistics():
    model = bn_only(channels=64)
    bn = bn_layer(model)
    layer = adapters.create("unmix-tns", model, k=16).net[0]
    assert torch.allclose(layer.component_vars, 0.5 * bn.running_var.expand(16, -1))
    # in expectation the equal-weight mixture has the source mean and variance
    spread = (layer.component_means - bn.running_mean) / bn.running_var.sqrt()
    assert abs(float(spread.mean())) < 0.1
    assert abs(float((spread ** 2).mean()) - 0.5 * 16 / 15) < 0.15


@pytest.mark.parametrize("k,batch", [(4, 6), (16, 3), (4, 1)])
def test_unmix_tns_forward_and_component_update(k, batch):
    model = bn_only()
    bn = bn_layer(model)
    a = adapters.create("unmix-tns", model, k=k, batch_size_max=4)
    layer = a.net[0]
    for x in stream(3, batch=batch, size=5):
        M, V = layer.component_means.clone(), layer.component_vars.clone()
        lam = 1 - 0.9 ** (batch / 4)  # momentum scaled by the actual batch size
        expected, new_M, new_V = unmix_reference(x, M, V, bn, lam=lam)
        assert torch.allclose(a.step(x), expected, atol=1e-5)  # normalised with PRE-update components
        assert torch.allclose(layer.component_means, new_M, atol=1e-6)  # divided by B, all K moved
        assert torch.allclose(layer.component_vars, new_V, atol=1e-6)


@pytest.mark.parametrize("k,batch", [(16, 6), (4, 1), (1, 3)])
def test_unmix_tns_fused_forward_matches_the_reference_arithmetic(k, batch):
    """Without autograd the layer runs fused (one statistics pass, K and B contracted as matrix
    products, one batch norm over the instance channels): the reference path's function, to
    float rounding, components included. With autograd recording it runs the reference path."""
    model = tiny_cnn()
    fused = adapters.create("unmix-tns", model, k=k, batch_size_max=4).net
    plain = copy.deepcopy(fused)
    layers = [m for m in plain.modules() if hasattr(m, "_forward_reference")]
    for m in layers:
        m.forward = m._forward_reference
    for x in stream(3, batch=batch, size=12):
        with torch.no_grad():
            assert torch.allclose(fused(x), plain(x), rtol=1e-5, atol=1e-5)
        for a, b in zip(fused.buffers(), plain.buffers()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    layer = layers[0]
    del layer.forward  # the class's dispatch again
    x = torch.rand(batch, layer.weight.numel(), 6, 6, requires_grad=True)
    layer(x).sum().backward()  # the reference path: gradients through the instance statistics
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_unmix_tns_with_one_component_is_instance_norm():
    model = bn_only()
    bn = bn_layer(model)
    a = adapters.create("unmix-tns", model, k=1, batch_size_max=5)  # λ = momentum at B = 5
    layer = a.net[0]
    assert torch.equal(layer.component_means[0], bn.running_mean)
    x = stream(1, batch=5, size=6)[0]
    M = layer.component_means.clone()
    m_i = x.mean((2, 3))
    inst = (x - m_i.view(5, 3, 1, 1)) / torch.sqrt(x.var((2, 3), unbiased=False).view(5, 3, 1, 1) + bn.eps)
    assert torch.allclose(a.step(x), affine(bn, inst).flatten(1), atol=1e-5)
    # p ≡ 1: the component moves by λ·mean_b(m_i − M), dividing by B
    assert torch.allclose(layer.component_means, M + 0.1 * (m_i - M).mean(0, keepdim=True), atol=1e-6)


# --- losses, EMA, contrastive -------------------------------------------------------------

def test_sce_with_half_is_symmetric():
    a, b = torch.randn(6, 10), torch.randn(6, 10)
    assert torch.allclose(symmetric_cross_entropy(a, b, 0.5), symmetric_cross_entropy(b, a, 0.5))
    assert not torch.allclose(symmetric_cross_entropy(a, b, 0.2), symmetric_cross_entropy(b, a, 0.2))


def test_ema_covers_all_parameters_but_no_buffers():
    teacher, student = tiny_cnn(0), tiny_cnn(1)
    student.train()(torch.rand(4, 3, 8, 8))  # move the student's buffers
    before = copy.deepcopy(teacher)
    ema_update(teacher, student, 0.9)
    for (name, t), s, b in zip(teacher.named_parameters(), student.parameters(), before.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s), name
    for t, b in zip(teacher.buffers(), before.buffers()):
        assert torch.equal(t, b)


def test_fused_ema_is_bit_identical_to_the_reference_loop():
    teacher, student = tiny_cnn(0), tiny_cnn(1)
    expected = [0.999 * t.data + (1 - 0.999) * s.data for t, s in zip(teacher.parameters(), student.parameters())]
    ema_update(teacher, student, 0.999)
    for (name, t), e in zip(teacher.named_parameters(), expected):
        assert torch.equal(t, e), name


def test_fused_restore_is_bit_identical_to_one_draw_per_parameter():
    model, moved = tiny_cnn(0), tiny_cnn(1)
    params = list(moved.named_parameters())
    source = dict(model.named_parameters())
    g = torch.Generator().manual_seed(4)
    expected = []
    for name, p in params:  # the reference loop: torch.rand(p.shape) per parameter, in order
        mask = (torch.rand(p.shape, generator=g) < 0.3).float()
        expected.append(source[name] * mask + p.detach() * (1.0 - mask))
    stochastic_restore(params, source, 0.3, torch.Generator().manual_seed(4))
    for (name, p), e in zip(params, expected):
        assert torch.equal(p, e), name
    assert any(p.ne(source[name]).any() for name, p in params)  # not everything was restored


def test_contrastive_loss_positives_are_the_other_two_views():
    model = tiny_cnn()
    a = adapters.create("mean-teacher", model, prototypes=torch.randn(10, 16))
    views = torch.randn(5, 3, 16)
    z = F.normalize(a.projector(torch.cat(torch.unbind(views, 1), 0)), dim=1)  # view-major rows
    total = 0.0
    for i in range(15):
        sims = torch.stack([z[i] @ z[j] / 0.1 for j in range(15)])
        denominator = torch.logsumexp(torch.stack([sims[j] for j in range(15) if j != i]), 0)
        positives = [j for j in range(15) if j != i and j % 5 == i % 5]
        assert len(positives) == 2
        total += -sum(sims[j] - denominator for j in positives) / 2
    assert torch.allclose(a._contrastive(views), total / 15, atol=1e-5)


# --- CoTTA ----------------------------------------------------------------------------------

def test_cotta_returns_the_teacher_prediction_from_before_the_update():
    model = tiny_cnn()
    a = adapters.create("cotta", model, threshold=0.0, restore_prob=0.0)
    x = stream(1)[0]
    teacher_before = copy.deepcopy(a.teacher)
    out = a.step(x)
    assert torch.allclose(out, teacher_before(x), atol=1e-6)
    assert not torch.allclose(a.teacher(x), teacher_before(x), atol=1e-7)  # the teacher did move


def test_cotta_one_step_is_adam_then_ema():
    model = tiny_cnn()
    a = adapters.create("cotta", model, threshold=0.0, restore_prob=0.0, lr=1e-3, ema=0.99)
    x = stream(1)[0]
    student = copy.deepcopy(a.student)
    t = a.teacher(x).detach()
    loss = -(t.softmax(1) * student(x).log_softmax(1)).sum(1).mean()
    grads = torch.autograd.grad(loss, list(student.parameters()))
    a.step(x)
    for (name, p), g, p0, t1 in zip(a.student.named_parameters(), grads, student.parameters(),
                                     a.teacher.parameters()):
        # Adam's first step moves every element by lr · g / (|g| + eps) (bias-corrected moments)
        assert torch.allclose(p, p0 - 1e-3 * g / (g.abs() + 1e-8), atol=1e-6), name
        assert torch.allclose(t1, 0.99 * p0 + 0.01 * p, atol=1e-6), name


def test_cotta_restore_probability_one_resets_the_student_every_step():
    model = tiny_cnn()
    a = adapters.create("cotta", model, restore_prob=1.0, n_augmentations=2)
    for x in stream(2):
        a.step(x)
        for (name, p), source in zip(a.student.named_parameters(), model.parameters()):
            assert torch.equal(p, source), name
    assert a.teacher.state_dict()["0.weight"].ne(model[0].weight).any()  # the teacher still learned


def test_cotta_threshold_zero_uses_the_plain_teacher_and_draws_nothing():
    model = tiny_cnn()
    a = adapters.create("cotta", model, threshold=0.0, restore_prob=0.0)
    state = a.generator.get_state()
    a.step(stream(1)[0])
    assert torch.equal(a.generator.get_state(), state)


def test_cotta_threshold_one_averages_augmented_teacher_passes():
    model = tiny_cnn()
    a = adapters.create("cotta", model, threshold=1.0, restore_prob=0.0, n_augmentations=5, seed=7)
    x = stream(1)[0]
    g = torch.Generator().manual_seed(7)
    augment = CottaAugment(g)
    teacher = copy.deepcopy(a.teacher)
    expected = torch.stack([teacher(augment(x)) for _ in range(5)]).mean(0)
    assert torch.allclose(a.step(x), expected, atol=1e-6)


def test_cotta_restore_masks_follow_the_generator_in_module_order():
    model = tiny_cnn()
    a = adapters.create("cotta", model, threshold=0.0, restore_prob=0.3, seed=11)
    student = copy.deepcopy(a.student)
    x = stream(1)[0]
    # replay: the same Adam step on a copy, then masks drawn in named_modules order
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    loss = -(a.teacher(x).softmax(1) * student(x).log_softmax(1)).sum(1).mean()
    loss.backward()
    optimizer.step()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for (_name, p), source in zip(student.named_parameters(), model.parameters()):
            mask = (torch.rand(p.shape, generator=g) < 0.3).float()
            p.copy_(source * mask + p * (1 - mask))
    a.step(x)
    for (name, p), q in zip(a.student.named_parameters(), student.parameters()):
        assert torch.allclose(p, q, atol=1e-7), name


# --- mean teacher -------------------------------------------------------------------------

def test_mean_teacher_predicts_student_plus_teacher():
    model = tiny_cnn()
    a = adapters.create("mean-teacher", model, prototypes=torch.randn(10, 16))
    x = stream(1)[0]
    student, teacher = copy.deepcopy(a.student), copy.deepcopy(a.teacher)
    assert torch.allclose(a.step(x), student(x) + teacher(x), atol=1e-5)


def test_mean_teacher_without_prototypes_is_the_sce_mean_teacher():
    model = tiny_cnn()
    a = adapters.create("mean-teacher", model, seed=2)
    x = stream(1)[0]
    student, teacher = copy.deepcopy(a.student), copy.deepcopy(a.teacher)
    x_aug = CottaAugment(torch.Generator().manual_seed(2))(x)
    t = teacher(x)
    expected = (0.5 * symmetric_cross_entropy(student(x), t) + 0.5 * symmetric_cross_entropy(student(x_aug), t)).mean()
    figures = (a.predict(x), a.learn())[1]
    assert abs(figures["loss"] - float(expected.detach())) < 1e-5


# --- TENT -----------------------------------------------------------------------------------

def test_tent_minimises_entropy_of_the_affine_parameters():
    model = tiny_cnn()
    a = adapters.create("tent", model, lr=1e-3)
    x = stream(1)[0]
    net = copy.deepcopy(a.net)
    out = net(x)
    loss = -(out.softmax(1) * out.log_softmax(1)).sum(1).mean()
    params = [net.get_parameter(n) for n, _ in a.trainable]
    grads = torch.autograd.grad(loss, params)
    assert torch.allclose(a.step(x), out, atol=1e-6)  # prediction = forward before the update
    for (name, p), g, p0 in zip(a.trainable, grads, params):
        assert torch.allclose(p, p0 - 1e-3 * g / (g.abs() + 1e-8), atol=1e-6), name
    assert torch.equal(a.net[0].weight, model[0].weight)  # convolutions are not trained


# --- augmentation -------------------------------------------------------------------------

def test_augmentation_is_one_draw_per_batch_and_stays_in_range():
    x = torch.rand(1, 3, 16, 16).expand(4, -1, -1, -1).contiguous()
    out = CottaAugment(torch.Generator().manual_seed(0))(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    # identical images get the identical transform; only the per-pixel noise (std 0.005) differs
    assert (out[0] - out[1]).abs().max() < 0.05
    assert (out - x).abs().mean() > 0.01
    again = CottaAugment(torch.Generator().manual_seed(0))(x)
    assert torch.equal(out, again)


def test_augmentation_without_generator_draws_from_the_global_generator():
    x = torch.rand(2, 3, 16, 16)
    torch.manual_seed(4)
    first = CottaAugment(None)(x)
    torch.manual_seed(4)
    assert torch.equal(first, CottaAugment(None)(x))
    assert torch.equal(first, CottaAugment(torch.Generator().manual_seed(4))(x))
