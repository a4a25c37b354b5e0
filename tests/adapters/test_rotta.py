"""RoTTA's update rules against hand computations: robust BN, the memory bank's admission and
eviction, the timeliness-weighted loss with one Adam step, the teacher EMA, the update clock, and
a checkpoint round trip through the server's state format."""
import copy
import math

import pytest
import torch

import adapters
from adapter_models import bn_only, stream, tiny_cnn
from adapters.rotta import MemoryBank, RobustBatchNorm, convert_to_robust_bn
from runtime.state_format import Unpacker, pack_body, read_body, strict_json

torch.set_num_threads(1)


def test_robust_bn_mixes_the_biased_batch_statistics_into_its_global_ones():
    model = bn_only()
    bn = model[0]
    rbn = convert_to_robust_bn(copy.deepcopy(model), 0.05)[0]
    assert isinstance(rbn, RobustBatchNorm)
    x = torch.rand(4, 3, 5, 5) * 2 + 1
    mean = 0.95 * bn.running_mean + 0.05 * x.mean((0, 2, 3))
    var = 0.95 * bn.running_var + 0.05 * x.var((0, 2, 3), unbiased=False)
    rbn.train()
    y = rbn(x)
    shape = (1, -1, 1, 1)
    expected = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)
    assert torch.allclose(y, expected, atol=1e-6)
    assert torch.allclose(rbn.running_mean, mean) and torch.allclose(rbn.running_var, var)
    rbn.eval()  # eval: the kept statistics, the batch ignored (works for one image)
    one = x[:1] * 0
    want = (one - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)
    assert torch.allclose(rbn(one), want, atol=1e-6)
    assert torch.allclose(rbn.running_mean, mean)
    assert torch.equal(model[0].running_mean, bn.running_mean)  # the source untouched


def test_the_first_prediction_is_the_source_models():
    model = tiny_cnn()
    x = stream(1)[0]
    assert torch.allclose(adapters.create("rotta", model).predict(x), model(x), atol=1e-5)


def _bank(lambda_t=1.0, lambda_u=1.0):
    bank = MemoryBank(capacity=4, lambda_t=lambda_t, lambda_u=lambda_u)
    bank.set_classes(3)  # 4/3 places per class
    return bank


def _contents(bank):
    return [[(float(item[0]), item[1], item[2]) for item in per_class] for per_class in bank.items]


def test_memory_bank_admits_and_evicts_by_class_balance_and_score():
    bank = _bank()
    sample = lambda v: torch.tensor(float(v))  # noqa: E731
    for v, label, u in [(0, 0, 0.1), (1, 0, 0.2), (2, 1, 0.3), (3, 1, 0.4)]:
        assert bank.add(sample(v), label, u)  # room, and each class under its share
    assert _contents(bank) == [[(0, 0.1, 4), (1, 0.2, 3)], [(2, 0.3, 2), (3, 0.4, 1)], []]
    # class 2 under its share, bank full: the highest score of the fullest classes (0 and 1) goes;
    # scores (ln 3): 0.731+0.091, 0.679+0.182, 0.622+0.273, 0.562+0.364 -> item 3, though the youngest
    score = lambda age, u: 1 / (1 + math.exp(-age / 4)) + u / math.log(3)  # noqa: E731
    assert max(range(4), key=lambda i: score(4 - i, 0.1 * (i + 1))) == 3
    assert bank.add(sample(4), 2, 0.05)
    assert _contents(bank) == [[(0, 0.1, 5), (1, 0.2, 4)], [(2, 0.3, 3)], [(4, 0.05, 1)]]
    # an uncertain newcomer scores above every candidate of the fullest class (0): refused, all age
    assert score(0, 1.0) > max(score(5, 0.1), score(4, 0.2))
    assert not bank.add(sample(5), 2, 1.0)
    assert _contents(bank) == [[(0, 0.1, 6), (1, 0.2, 5)], [(2, 0.3, 4)], [(4, 0.05, 2)]]
    # class 0 at its share: eviction within class 0 only (item 1 scores higher than item 0: it goes)
    assert bank.add(sample(6), 0, 0.0)
    assert _contents(bank) == [[(0, 0.1, 7), (6, 0.0, 1)], [(2, 0.3, 5)], [(4, 0.05, 3)]]


def test_the_timeliness_weight_decides_with_lambda_u_zero():
    bank = _bank(lambda_u=0.0)  # age only: the oldest of the fullest classes goes
    for v, label, u in [(0, 0, 0.1), (1, 0, 0.2), (2, 1, 0.3), (3, 1, 0.4)]:
        bank.add(torch.tensor(float(v)), label, u)
    assert bank.add(torch.tensor(4.0), 2, 0.05)
    assert [[float(item[0]) for item in c] for c in bank.items] == [[1.0], [2.0, 3.0], [4.0]]


def test_one_update_matches_a_hand_computation():
    model = tiny_cnn()
    lr, nu = 1e-3, 0.01
    a = adapters.create("rotta", model, memory_size=4, update_frequency=4, nu=nu, lr=lr, augment=lambda x: x * 0.9)
    x = stream(1, batch=4)[0]
    a.predict(x)
    student, teacher = copy.deepcopy(a.student), copy.deepcopy(a.teacher)
    figures = a.learn()
    # the memory at the update (the update is at the batch's last sample: the memory as it is now)
    flat = [item for c in a.memory.items for item in c]
    data = torch.stack([item[0] for item in flat])
    ages = torch.tensor([item[2] / 4 for item in flat])
    w = torch.exp(-ages) / (1 + torch.exp(-ages))
    student.train()
    teacher.train()
    with torch.no_grad():
        target = teacher(data).softmax(1)
    loss = (-(target * student(data * 0.9).log_softmax(1)).sum(1) * w).mean()
    assert abs(figures["loss"] - float(loss.detach())) < 1e-6
    loss.backward()
    trained = {n for n, _ in a.trainable}
    assert trained == {"1.weight", "1.bias", "4.weight", "4.bias"}
    ours = dict(a.student.named_parameters())
    for n, p in student.named_parameters():
        if n in trained:  # Adam's first step: −lr·g/(|g| + eps)
            assert torch.allclose(ours[n], p - lr * p.grad / (p.grad.abs() + 1e-8), atol=1e-7), n
        else:
            assert torch.equal(ours[n], p), n
    for n, p in a.teacher.named_parameters():  # EMA over all parameters
        assert torch.allclose(p, (1 - nu) * dict(teacher.named_parameters())[n] + nu * ours[n], atol=1e-7), n
    # both networks' RBN statistics moved once, the teacher's on the memory, the student's on its augmentation
    for net, ref in ((a.teacher, teacher), (a.student, student)):
        assert torch.allclose(net.get_submodule("1").running_mean, ref.get_submodule("1").running_mean)


def test_updates_follow_the_sample_clock_not_the_batches():
    a = adapters.create("rotta", tiny_cnn(), memory_size=6, update_frequency=3)
    updates = []
    for x in stream(3, batch=4):  # 12 samples: updates after samples 3, 6, 9, 12
        a.predict(x)
        a.learn()
        updates.append(max((s["step"].item() for s in a.optimizer.state.values()), default=0))
    assert updates == [1, 2, 4] and a.seen == 12 and len(a.memory) <= 6


def _through_state_format(state):
    body = pack_body(state, "stream-1", "fingerprint")
    metadata, tensors = read_body(body)
    return Unpacker(tensors)(strict_json(metadata["record"]))


def test_checkpoint_through_the_state_format_resumes_bit_for_bit():
    model = tiny_cnn()
    batches = stream(6, batch=5)
    for fresh in (True, False):  # an empty memory bank, then a full one mid-way in the update clock
        a = adapters.create("rotta", model, memory_size=8, update_frequency=7)
        if not fresh:
            for x in batches[:3]:
                a.step(x)
            assert len(a.memory) > 0 and a.seen % 7
        b = adapters.create("rotta", model, memory_size=8, update_frequency=7, seed=99)
        b.load_state_dict(_through_state_format(a.state_dict()))
        assert b.seen == a.seen and len(b.memory) == len(a.memory)
        for x in batches[3:]:
            assert torch.equal(a.step(x), b.step(x))
        assert torch.equal(a.memory.state()["data"], b.memory.state()["data"])
        assert a.memory.state()["age"].tolist() == b.memory.state()["age"].tolist()


def test_reset_empties_the_memory_bank():
    a = adapters.create("rotta", tiny_cnn(), memory_size=8, update_frequency=4)
    for x in stream(2):
        a.step(x)
    assert len(a.memory) and a.seen == 16
    a.reset()
    assert len(a.memory) == 0 and a.seen == 0 and a.memory.num_classes == 0


def test_an_inconsistent_memory_bank_is_refused_before_anything_changes():
    a = adapters.create("rotta", tiny_cnn(), memory_size=8, update_frequency=4)
    a.step(stream(1)[0])
    state = a.state_dict()
    before = a.state_dict()
    bad = dict(state, state=dict(state["state"], memory=dict(state["state"]["memory"])))
    bad["state"]["memory"]["classes"] = torch.full_like(state["state"]["memory"]["classes"], 10)
    b = adapters.create("rotta", tiny_cnn(), memory_size=8, update_frequency=4)
    b.load_state_dict(before)
    with pytest.raises(ValueError, match="memory bank"):
        b.load_state_dict(bad)
    x = stream(2)[1]
    assert torch.equal(a.step(x), b.step(x))
