"""Benchmark streams follow the reference ordering rules of ADAPTERS.md §6."""
import random

import numpy as np
import pytest

from runtime.lab import streams
from runtime.lab.corruptions import CORRUPTIONS

N = 50
LABELS = np.arange(N) % 10
DOMAINS = ["gaussian_noise", "fog", "contrast"]
BIG = 200  # Dirichlet chunking needs >= 10 samples in each of the 10 chunks
BIG_LABELS = np.arange(BIG) % 10


def fake_loader(domain, severity, n=N):
    """Image i of a domain carries its identity: pixel (0,0,0) = i/255, (1,0,0) = domain, (2,0,0) = severity."""
    x = np.zeros((n, 3, 32, 32), np.uint8)
    x[:, 0, 0, 0] = np.arange(n)
    x[:, 1, 0, 0] = CORRUPTIONS.index(domain)
    x[:, 2, 0, 0] = severity
    return x, np.arange(n) % 10


def big_loader(domain, severity):
    return fake_loader(domain, severity, BIG)


def ids(batch):
    """(domain index, image index, severity) of each sample of a batch, read back from its pixels."""
    px = np.round(batch.x[:, :, 0, 0] * 255).astype(int)
    return px[:, 1], px[:, 0], px[:, 2]


def reference_shuffle(n_items, seed=1, k=None):
    random.seed(seed)
    items = list(range(n_items))
    random.shuffle(items)
    return random.sample(items, k) if k is not None else items


def collect(stream):
    blocks = {}
    for batch in stream:
        d, i, s = ids(batch)
        blocks.setdefault(batch.block, []).append((batch, d, i, s))
    return blocks


def test_continual_same_permutation_per_domain_and_one_reset():
    stream = streams.Stream("continual", fake_loader, LABELS, DOMAINS, severity=5, batch_size=16, seed=1)
    blocks = collect(stream)
    assert len(blocks) == 3 and len(stream) == 3 * 4  # 50 samples, batches of 16, last one partial
    expected = reference_shuffle(N)
    for b, parts in blocks.items():
        order = np.concatenate([i for _, _, i, _ in parts])
        assert order.tolist() == expected
        assert all((d == CORRUPTIONS.index(DOMAINS[b])).all() and (s == 5).all() for _, d, _, s in parts)
        assert [len(batch.x) for batch, *_ in parts] == [16, 16, 16, 2]  # drop_last=False
        assert all((batch.y == LABELS[i]).all() and (batch.domains == b).all() for batch, _, i, _ in parts)
    resets = [batch.reset for parts in blocks.values() for batch, *_ in parts]
    assert resets == [True] + [False] * 11


def test_reset_each_shift_resets_before_every_domain():
    stream = streams.Stream("reset_each_shift", fake_loader, LABELS, DOMAINS, batch_size=25)
    assert [(b.reset, b.block) for b in stream] == [(True, 0), (False, 0), (True, 1), (False, 1), (True, 2), (False, 2)]


def test_subsampling_uses_random_sample_after_the_shuffle():
    stream = streams.Stream("continual", fake_loader, LABELS, DOMAINS[:2], batch_size=7, n=20, seed=3)
    for parts in collect(stream).values():
        assert np.concatenate([i for _, _, i, _ in parts]).tolist() == reference_shuffle(N, seed=3, k=20)


def test_gradual_plays_1_to_5_to_1_for_every_domain_including_the_first():
    stream = streams.Stream("gradual", fake_loader, LABELS, DOMAINS[:2], severity=5, batch_size=N)
    seen = [(b.domain, b.severity, b.reset) for b in stream]
    sev = [1, 2, 3, 4, 5, 4, 3, 2, 1]
    assert seen == ([(DOMAINS[0], s, i == 0) for i, s in enumerate(sev)] + [(DOMAINS[1], s, False) for s in sev])
    assert all((ids(b)[2] == b.severity).all() for b in stream)  # the loader was asked for that severity


def test_mixed_domains_is_one_shuffled_stream_of_all_domains():
    stream = streams.Stream("mixed", fake_loader, LABELS, DOMAINS, batch_size=32, seed=1)
    batches = list(stream)
    assert {b.block for b in batches} == {0} and batches[0].reset and not any(b.reset for b in batches[1:])
    d = np.concatenate([ids(b)[0] for b in batches])
    i = np.concatenate([ids(b)[1] for b in batches])
    position = np.array([DOMAINS.index(CORRUPTIONS[k]) for k in d]) * N + i  # index into the concatenation
    assert position.tolist() == reference_shuffle(3 * N)
    assert np.array_equal(np.concatenate([b.domains for b in batches]), position // N)  # index into DOMAINS


def test_correlated_delta_0_is_a_stable_sort_by_label():
    stream = streams.Stream("correlated", fake_loader, LABELS, DOMAINS[:1], batch_size=N, seed=1)
    batch = next(iter(stream))
    expected = sorted(reference_shuffle(N), key=lambda i: LABELS[i])  # Python's sort is stable
    assert ids(batch)[1].tolist() == expected
    assert np.all(np.diff(batch.y) >= 0)


@pytest.mark.parametrize("delta, runs, per_200", [(0.01, 22, 1.42), (0.1, 47, 1.90), (1.0, 90, 2.74), (10, 98, 2.92)])
def test_dirichlet_chunking_matches_the_measured_reference_statistics(delta, runs, per_200):
    labels = np.repeat(np.arange(10), 1000)  # CIFAR-10-like: 10 × 1 000, seed 1 (ADAPTERS.md §6 table)
    order = streams.sample_order(labels, seed=1, correlated=True, delta=delta)
    assert sorted(order.tolist()) == list(range(10000))
    seq = labels[order]
    assert 1 + int((seq[1:] != seq[:-1]).sum()) == runs
    assert round(np.mean([len(set(seq[i:i + 200])) for i in range(0, 10000, 200)]), 2) == per_200


def test_dirichlet_output_is_y_chunks_of_single_class_runs():
    labels = np.repeat(np.arange(10), 100)
    random.seed(0)
    np.random.seed(5)
    samples = [(i, int(label)) for i, label in enumerate(labels)]
    out = streams.sort_by_dirichlet(0.1, samples)
    assert sorted(out) == samples
    seq = np.array([label for _, label in out])
    assert 1 + int((seq[1:] != seq[:-1]).sum()) <= 10 * 10  # at most Y runs in each of the Y chunks


def test_every_domain_gets_the_same_class_order_under_dirichlet():
    stream = streams.Stream("correlated", big_loader, BIG_LABELS, DOMAINS, batch_size=BIG, delta=0.1)
    orders = [ids(b)[1].tolist() for b in stream]
    assert orders[0] == orders[1] == orders[2]
    assert orders[0] != sorted(orders[0], key=lambda i: BIG_LABELS[i])  # not simply sorted by label


def test_building_a_stream_leaves_the_global_random_generators_alone():
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    list(streams.Stream("correlated", big_loader, BIG_LABELS, DOMAINS, batch_size=BIG, delta=0.1))
    assert (random.random(), np.random.rand()) == expected


def test_settings_and_aliases():
    assert streams.canonical_setting("mixed") == "mixed_domains"
    assert streams.canonical_setting("mixed_correlated") == "mixed_domains_correlated"
    with pytest.raises(ValueError, match="unknown setting"):
        streams.canonical_setting("shuffled")
    with pytest.raises(ValueError, match="unknown corruption"):
        streams.Stream("continual", fake_loader, LABELS, ["rain"])
    assert [b.reset for b in streams.schedule("reset_each_shift_correlated", DOMAINS)] == [True] * 3
    assert len(streams.schedule("gradual_correlated", DOMAINS)) == 27
