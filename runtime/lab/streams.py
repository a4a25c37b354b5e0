"""Benchmark streams, ordered exactly as the reference benchmark orders them (ADAPTERS.md §6).

Settings:
  continual                    domains in order at one severity; reset only before the first
  reset_each_shift             the same, reset before every domain (TENT-online*)
  gradual                      every domain at severities 1 2 3 4 5 4 3 2 1 (the first one too)
  mixed_domains                all domains concatenated, shuffled once, one long stream
  correlated, reset_each_shift_correlated, gradual_correlated, mixed_domains_correlated
                               the same, then reordered by label (δ = 0: stable sort by label;
                               δ > 0: sort_by_dirichlet)
("mixed" and "mixed_correlated" are accepted for the mixed_domains ones, "continual_correlated"
for "correlated".)

Sample order per (domain, severity) loader: python `random` and numpy's global RNG are re-seeded
with the seed; the sample list (index, label) is shuffled with random.shuffle (the same
permutation for every domain, since every domain holds the same test images in the same order);
random.sample(k=n) when n is given; then the label ordering. We restore both global RNG states
afterwards, so callers' random streams are left as they were (this changes no ordering).

`n` is the benchmark's NUM_EX: samples per loader, so for mixed_domains it is the size of the
whole mixed stream (the replay command passes n_per_domain × domains there).

Recorded data (`recorded=`, `tta replay --corruptions none`): the domains are the user's datasets,
each with its own labels and size, at no severity (0). They play in their recorded order (the
first n when n is given, no shuffle); mixed_domains shuffles them together as above, and the
label orderings of *_correlated apply to the recorded order. gradual needs corruptions.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from runtime.lab.corruptions import CORRUPTIONS

BASE_SETTINGS = ["continual", "reset_each_shift", "gradual", "mixed_domains"]
SETTINGS = BASE_SETTINGS + ["correlated", "reset_each_shift_correlated", "gradual_correlated",
                            "mixed_domains_correlated"]
ALIASES = {"mixed": "mixed_domains", "mixed_correlated": "mixed_domains_correlated",
           "continual_correlated": "correlated"}
GRADUAL_SEVERITIES = [1, 2, 3, 4, 5, 4, 3, 2, 1]
MIXED = "mixed"

# (x (N, C, H, W) float32 in [0, 1] or uint8 in [0, 255], y int64 (N,)) of one domain at one severity
Loader = Callable[[str, int], tuple[np.ndarray, np.ndarray]]


def canonical_setting(setting: str) -> str:
    setting = ALIASES.get(setting, setting)
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS + list(ALIASES))}")
    return setting


def sort_by_dirichlet(delta: float, samples: Sequence[tuple[int, int]], timeout: float = 120.0) -> list:
    """Reorder (item, label) samples into Y label-correlated chunks with Dirichlet(δ) class shares
    (ADAPTERS.md §6, after NOTE). Draws from numpy's global RNG, as the reference does."""
    labels = np.array([label for _, label in samples])
    n = len(samples)
    num_classes = int(labels.max()) + 1
    chunks_n = num_classes
    start = time.monotonic()
    while True:
        chunks: list[list[int]] = [[] for _ in range(chunks_n)]
        parts: list[list[np.ndarray]] = [[] for _ in range(chunks_n)]  # parts[j][k]: class k's share of chunk j
        for k in range(num_classes):
            idx_k = np.where(labels == k)[0]
            np.random.shuffle(idx_k)
            q = np.random.dirichlet(np.repeat(delta, chunks_n))
            q = np.array([p * (len(chunk) < n / chunks_n) for p, chunk in zip(q, chunks)])  # full chunks get none
            q = q / q.sum()
            splits = (np.cumsum(q) * len(idx_k)).astype(int)[:-1]
            for j, part in enumerate(np.split(idx_k, splits)):
                chunks[j] += part.tolist()
                parts[j].append(part)
        if min(len(chunk) for chunk in chunks) >= 10:
            break
        if time.monotonic() - start > timeout:
            raise ValueError(f"sort_by_dirichlet: no split with ≥ 10 samples per chunk after {timeout:.0f} s "
                             f"(δ={delta}, {n} samples)")
    ordered = []
    for j in range(chunks_n):
        for k in np.random.permutation(num_classes):
            ordered += [samples[i] for i in parts[j][k]]
    return ordered


def sample_order(labels: np.ndarray, seed: int = 1, n: int | None = None, correlated: bool = False,
                 delta: float = 0.0, shuffle: bool = True) -> np.ndarray:
    """Indices into one loader's samples in the order the benchmark presents them (shuffle=False:
    the given order, its first n)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        random.seed(seed)
        np.random.seed(seed)
        samples = [(i, int(label)) for i, label in enumerate(labels)]
        if shuffle:
            random.shuffle(samples)
        if n is not None and n != -1:
            samples = random.sample(samples, k=min(n, len(samples))) if shuffle else samples[:n]
        if correlated:
            if delta > 0:
                samples = sort_by_dirichlet(delta, samples)
            else:
                samples.sort(key=lambda s: s[1])  # stable: within a class, the shuffled order
        return np.array([i for i, _ in samples], dtype=np.int64)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@dataclass(frozen=True)
class Block:
    """One loader of the benchmark: a domain at a severity, and whether the model resets before it."""
    domain: str
    severity: int
    reset: bool


def schedule(setting: str, corruptions: Sequence[str] = CORRUPTIONS, severity: int = 5) -> list[Block]:
    setting = canonical_setting(setting)
    base = setting.replace("_correlated", "") if setting != "correlated" else "continual"
    if base == "mixed_domains":
        return [Block(MIXED, severity, True)]
    if base == "gradual":
        return [Block(c, s, i == 0 and j == 0) for i, c in enumerate(corruptions)
                for j, s in enumerate(GRADUAL_SEVERITIES)]
    return [Block(c, severity, base == "reset_each_shift" or i == 0) for i, c in enumerate(corruptions)]


@dataclass
class StreamBatch:
    x: np.ndarray          # float32 (B, C, H, W) in [0, 1]
    y: np.ndarray          # int64 (B,)
    domains: np.ndarray    # int64 (B,): index of each sample's corruption in the stream's list
    domain: str            # the block's domain ("mixed" for mixed_domains)
    severity: int
    reset: bool            # reset the adapter before this batch
    block: int             # index of the block in the schedule


class Stream:
    """A benchmark stream: iterate for StreamBatch-es; len() is the number of batches."""

    def __init__(self, setting: str, load: Loader, labels: np.ndarray | None, corruptions: Sequence[str] = CORRUPTIONS,
                 severity: int = 5, batch_size: int = 200, n: int | None = None, seed: int = 1, delta: float = 0.0,
                 recorded: dict[str, np.ndarray] | None = None):
        if batch_size < 1:
            raise ValueError("batch size must be >= 1")
        self.setting = canonical_setting(setting)
        self.recorded = recorded
        if recorded is not None:  # the user's own domains, each with its labels
            if not recorded:
                raise ValueError("no recorded domains")
            if self.setting.startswith("gradual"):
                raise ValueError("gradual plays severities 1..5..1 of corruptions; recorded data "
                                 "(--corruptions none) has none: choose another setting")
            corruptions, severity = list(recorded), 0
            self.domain_labels = {d: np.asarray(y) for d, y in recorded.items()}
        else:
            unknown = [c for c in corruptions if c not in CORRUPTIONS]
            if unknown:
                raise ValueError(f"unknown corruption(s) {unknown}; choose from {', '.join(CORRUPTIONS)}")
            self.domain_labels = {c: np.asarray(labels) for c in corruptions}
        self.load, self.labels = load, None if labels is None else np.asarray(labels)
        self.corruptions, self.severity = list(corruptions), severity
        self.batch_size, self.n, self.seed, self.delta = batch_size, n, seed, delta
        self.correlated = self.setting.endswith("correlated")
        self.blocks = schedule(self.setting, self.corruptions, severity)

    def _domains(self, block: Block) -> list[str]:
        return self.corruptions if block.domain == MIXED else [block.domain]

    def _block_size(self, block: Block) -> int:
        total = sum(len(self.domain_labels[d]) for d in self._domains(block))
        return total if self.n is None or self.n == -1 else min(self.n, total)

    def __len__(self) -> int:
        return sum(-(-self._block_size(b) // self.batch_size) for b in self.blocks)

    def num_samples(self) -> int:
        return sum(self._block_size(b) for b in self.blocks)

    def _block_data(self, block: Block) -> tuple[list[np.ndarray], np.ndarray]:
        xs = []
        for d in self._domains(block):
            x, y = self.load(d, block.severity)
            if not np.array_equal(y, self.domain_labels[d]):
                raise ValueError(f"domain {d} s{block.severity}: labels differ from the clean split's")
            xs.append(x)
        return xs, np.concatenate([self.domain_labels[d] for d in self._domains(block)])

    def __iter__(self) -> Iterator[StreamBatch]:
        for b, block in enumerate(self.blocks):
            xs, labels = self._block_data(block)
            starts = np.cumsum([0] + [len(x) for x in xs])
            shuffle = self.recorded is None or block.domain == MIXED
            order = sample_order(labels, self.seed, self.n, self.correlated, self.delta, shuffle)
            first_domain = 0 if block.domain == MIXED else self.corruptions.index(block.domain)
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                part = np.searchsorted(starts, idx, side="right") - 1  # which domain array
                within = idx - starts[part]  # which image in it
                x = np.stack([xs[p][i] for p, i in zip(part, within)])
                x = x.astype(np.float32) / 255 if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
                yield StreamBatch(x=x, y=labels[idx], domains=part + first_domain, domain=block.domain,
                                  severity=block.severity, reset=block.reset and start == 0, block=b)
