"""LAME against hand computations: the affinities, the fixed point of the Laplacian-regularised
assignment on a hand-solved two-sample case, an independent implementation on a random batch,
and the facts that it adapts nothing and predicts with the source statistics."""
import math

import torch
from torch import nn

import adapters
from adapter_models import stream, tiny_cnn
from adapters.lame import affinity
from runtime.state_format import Unpacker, pack_body, read_body, strict_json


def linear_probe(features: int, classes: int) -> nn.Module:
    """x (N, features, 1, 1) -> logits = x: the features are the logits, for hand-made cases."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(features, classes))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(classes, features))
        model[1].bias.zero_()
    return model.eval()


def test_two_samples_reach_the_hand_solved_fixed_point():
    # kNN with knn=1 over two samples: W = [[0, 1], [1, 0]]; Y = softmax(log p + W Y), solved in floats
    p = [[0.9, 0.1], [0.4, 0.6]]
    y = [row[:] for row in p]
    for _ in range(500):
        z = [[math.log(p[i][k] + 1e-10) + y[1 - i][k] for k in range(2)] for i in range(2)]
        y = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in z]
    x = torch.log(torch.tensor(p)).view(2, 2, 1, 1)  # logits whose softmax is p
    out = adapters.create("lame", linear_probe(2, 2), affinity="kNN", knn=1).step(x)
    assert torch.allclose(out.softmax(1), torch.tensor(y), atol=1e-6)
    assert out.argmax(1).tolist() == [0, 0]  # the unsure sample follows its confident neighbour
    assert p[1][1] > p[1][0]  # ... against its own prediction


def hand_lame(logits, features, knn, steps=100):
    """rbf LAME written out independently: cdist, sorted distances, energy-based stop."""
    unary = -torch.log(logits.softmax(1) + 1e-10)
    f = features / features.norm(dim=1, keepdim=True)
    dist = torch.cdist(f, f)
    sigma = dist.sort(dim=1).values[:, knn - 1].mean()  # the sample itself is the first
    w = torch.exp(-dist ** 2 / (2 * sigma ** 2))
    y, old = torch.softmax(-unary, 1), None
    for i in range(steps):
        pair = w @ y
        y = torch.softmax(-unary + pair, 1)
        energy = float((unary * y - pair * y + y * torch.log(y.clamp_min(1e-20))).sum())
        if old is not None and i > 1 and abs(energy - old) <= 1e-8 * abs(old):
            break
        old = energy
    return y


def test_rbf_matches_an_independent_implementation_and_moves_the_outputs():
    model = tiny_cnn()
    x = stream(1, batch=12)[0]
    feats = {}
    model[-1].register_forward_hook(lambda m, i, o: feats.update(f=i[0]))
    with torch.no_grad():
        logits = model(x)
    out = adapters.create("lame", model, knn=3).step(x)
    assert torch.allclose(out.softmax(1), hand_lame(logits, feats["f"], 3), atol=1e-5)
    assert float((out.softmax(1) - logits.softmax(1)).abs().max()) > 0.05


def test_the_affinities():
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [7.0, 0.0]])
    knn = affinity(f, "kNN", 1)
    assert knn.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]  # nearest other point
    assert affinity(f, "kNN", 2).sum(1).tolist() == [2, 2, 2, 2] and affinity(f, "kNN", 2).diag().sum() == 0
    sigma = (1 + 1 + 2 + 4) / 4  # knn=2 counts the point itself: the nearest other one
    dist = (f[:, None, 0] - f[None, :, 0]).abs()
    assert torch.allclose(affinity(f, "rbf", 2), torch.exp(-dist ** 2 / (2 * sigma ** 2)))
    assert torch.equal(affinity(f, "linear", 5), f @ f.t())


def test_force_symmetry_averages_the_kernel_with_its_transpose():
    model = tiny_cnn()
    x = stream(1, batch=10)[0]
    plain = adapters.create("lame", model, affinity="kNN", knn=2).step(x)
    sym = adapters.create("lame", model, affinity="kNN", knn=2, force_symmetry=True).step(x)
    assert not torch.allclose(plain, sym)


def test_predicts_with_the_source_statistics_and_adapts_nothing():
    model = tiny_cnn()
    x0, x1 = stream(2)
    a = adapters.create("lame", model, bound_lambda=0.0)  # no Laplacian term: the source softmax
    with torch.no_grad():
        assert torch.allclose(a.step(x0).softmax(1), model(x0).softmax(1), atol=1e-6)
    lame = adapters.create("lame", model)
    first = lame.step(x0)
    lame.step(x1)
    assert torch.equal(lame.step(x0), first)  # no state carried from batch to batch
    assert lame.state_dict()["state"] == {} and lame.state_bytes() == 0 and lame.steps == 3
    assert not lame.updates_weights and not lame.deferred_update


def test_batch_of_one_is_the_model_prediction_and_sigma_is_inert():
    model = tiny_cnn()
    x = stream(1)[0]
    with torch.no_grad():
        assert torch.equal(adapters.create("lame", model).step(x[:1]), model(x[:1]))
    assert torch.equal(adapters.create("lame", model, sigma=0.1).step(x), adapters.create("lame", model,
                                                                                             sigma=10.0).step(x))


def test_checkpoint_round_trip_through_the_state_format():
    model = tiny_cnn()
    batches = stream(3)
    a = adapters.create("lame", model, affinity="linear")
    a.step(batches[0])
    metadata, tensors = read_body(pack_body(a.state_dict(), "s", "m"))
    b = adapters.create("lame", model, affinity="linear")
    b.load_state_dict(Unpacker(tensors)(strict_json(metadata["record"])))
    assert b.steps == 1
    for x in batches[1:]:
        assert torch.equal(a.step(x), b.step(x))


def test_repeated_frames_give_finite_outputs():
    # a batch of identical images: rbf's bandwidth is 0 (the reference divides 0 by 0)
    model = tiny_cnn()
    x = stream(1)[0][:1].repeat(8, 1, 1, 1)
    out = adapters.create("lame", model).step(x)
    assert torch.isfinite(out).all()
    assert torch.equal(affinity(torch.zeros(3, 2), "rbf", 5), torch.ones(3, 3))
