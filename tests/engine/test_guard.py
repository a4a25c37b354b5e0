"""The collapse guard (runtime/guard.py): each reason fires on a constructed case and stays quiet on
a healthy one, and on a label-sorted replay stream the guarded TENT is no worse than the source
while the unguarded one is."""
import json

import numpy as np
import pytest

from runtime import cli
from runtime.guard import FALLBACK, GuardConfig, StreamGuard

C = 10
RNG = np.random.default_rng(0)


def confident(labels, margin=6.0):
    """Logits sure of the given classes (max probability ~0.99)."""
    logits = RNG.normal(0, 0.1, (len(labels), C))
    logits[np.arange(len(labels)), labels] += margin
    return logits


def iid(n=64):
    return confident(RNG.integers(0, C, n))


def feed(guard, batches, **signals):
    """Verdicts of a sequence of (adapted, source) logit pairs with the same extra signals."""
    return [guard.observe(a, s, **signals) for a, s in batches]


def test_a_healthy_stream_raises_nothing_and_takes_snapshots():
    guard = StreamGuard()
    for step in range(1, 31):
        x = iid()
        assert guard.observe(x, x + RNG.normal(0, 0.5, x.shape), loss=0.3, weight_distance=0.05, bn_shift=0.2) is None
        assert guard.snapshot_due(step) == (step % 10 == 0)
    assert sum(guard.counts.values()) == 0


@pytest.mark.parametrize("signals", [
    {"loss": float("nan")}, {"weight_distance": float("inf")}, {"weights_finite": False}, {"nan_logits": True}])
def test_non_finite_fires_at_once_and_blocks_the_snapshot(signals):
    guard = StreamGuard()
    adapted, source = iid(), iid()
    if signals.pop("nan_logits", False):
        adapted[3, 2] = np.nan
    assert guard.observe(adapted, source, **signals) == "non_finite"
    assert guard.action("non_finite") == "rollback" and not guard.healthy() and not guard.snapshot_due(10)
    assert guard.counts["non_finite"] == 1


def test_marginal_collapse_against_the_source_level_after_patience():
    guard = StreamGuard(GuardConfig(patience=3))
    # the source spreads over the classes; the adapted model answers class 0 for everything
    verdicts = feed(guard, [(confident(np.zeros(64, int)), iid()) for _ in range(6)])
    first = verdicts.index("marginal_collapse")
    assert all(v is None for v in verdicts[:first]) and first >= 2  # patience: not on the first batch
    assert guard.figures["marginal_entropy"] < guard.figures["marginal_floor"]


def test_a_source_that_is_itself_concentrated_is_not_a_collapse():
    # fog-like: the source piles onto 2 classes; an adapted model with the same spread is fine
    guard = StreamGuard(GuardConfig(min_source_confidence=1.0))  # isolate the collapse test
    two = lambda: confident(RNG.integers(0, 2, 64))
    assert feed(guard, [(two(), two()) for _ in range(10)]) == [None] * 10


def test_without_source_logits_the_absolute_floor_applies():
    guard = StreamGuard(GuardConfig(patience=2))
    assert feed(guard, [(confident(np.zeros(64, int)), None)] * 3)[-1] == "marginal_collapse"
    assert feed(StreamGuard(), [(iid(), None) for _ in range(5)]) == [None] * 5


def test_weight_runaway_needs_patience_and_a_large_distance():
    guard = StreamGuard(GuardConfig(patience=2, max_weight_distance=1.0))
    x = iid()
    assert [guard.observe(x, x, weight_distance=d) for d in (0.5, 3.0, 0.5, 3.0, 3.0)] == \
        [None, None, None, None, "weight_runaway"]


def test_bn_shift_jump_without_recovery_fires_a_short_jump_does_not():
    guard = StreamGuard(GuardConfig(bn_jump_patience=4))
    x = iid()
    shifts = [0.2] * 5 + [2.0, 2.0, 0.2] + [0.2] * 3  # a jump that recovers: a domain change followed
    assert all(guard.observe(x, x, bn_shift=s) is None for s in shifts)
    verdicts = [guard.observe(x, x, bn_shift=2.0) for _ in range(4)]
    assert verdicts == [None, None, None, "bn_shift_jump"]


def test_label_sorted_batches_fall_back_when_the_source_is_sure():
    guard = StreamGuard()
    for _ in range(5):
        x = iid()
        assert guard.observe(x, x) is None  # the long-run marginal of an i.i.d. stream
    sorted_batch = confident(np.full(64, 3))
    normalised = confident(np.full(64, 3), margin=2.0)  # batch statistics removed part of the class signal
    assert guard.observe(normalised, sorted_batch) == "label_shift"
    assert guard.action("label_shift") == FALLBACK and guard.figures["label_kl"] > 1.0
    # the same class mix but a source that is unsure (fog-like): the adapted model keeps the batch
    assert guard.observe(confident(np.full(64, 3), margin=0.3), confident(np.full(64, 3), margin=0.5)) is None
    # a source confidently wrong (impulse-like) on an i.i.d. batch the adapted model is surer of
    assert guard.observe(iid(), confident(np.full(64, 3), margin=4.0)) is None  # source sure: 0.86
    assert guard.figures["adapted_confidence"] > guard.figures["source_confidence"]


def unsure(labels, margin=2.5):
    """Logits leaning to the given classes, unsure of them (confidence ~0.57: noise- or fog-like)."""
    return confident(labels, margin=margin)


def test_a_label_sorted_stream_falls_back_even_when_the_source_is_unsure():
    # runs of one class, 64 images each; the source leans to the right class but is unsure, and the
    # adapted model is surer (noise-like: the batch test's confidence gate lets these through)
    guard = StreamGuard()
    verdicts = []
    for b in range(24):
        labels = np.full(64, b % C)
        verdicts.append(guard.observe(confident(labels, margin=4.0), unsure(labels)))
    assert guard.figures["source_confidence"] < 0.7 < guard.figures["adapted_confidence"]
    assert verdicts[:7] == [None] * 7  # half the window first: a few batches are no stream
    assert verdicts[8:] == ["label_shift"] * 16 and guard.figures["label_kl_median"] > 0.3
    # the same without the stream-level test: the batch test alone lets every batch through
    alone = StreamGuard(GuardConfig(label_runs=0))
    assert all(alone.observe(confident(np.full(64, b % C), margin=4.0), unsure(np.full(64, b % C))) is None
               for b in range(24))


def test_an_iid_stream_whose_source_turns_biased_is_not_label_correlated():
    # a domain change at batch 20: the source then piles onto classes 0-1 on an i.i.d. stream (the
    # adapted model keeps spreading); the long run follows, and the median over 16 batches ignores
    # the few batches that are still far from it
    guard = StreamGuard()
    verdicts = []
    for b in range(60):
        labels = RNG.integers(0, C, 64)
        source = unsure(labels) if b < 20 else unsure(RNG.integers(0, 2, 64))
        verdicts.append(guard.observe(confident(labels, margin=3.0), source))
    assert verdicts[:20] == [None] * 20
    assert verdicts.count("label_shift") <= 4  # at most a few batches right after the change
    assert verdicts[40:] == [None] * 20


def test_adapters_with_running_statistics_get_no_label_shift_fallback():
    # bn-alpha, bn-ema and rotta normalise with statistics carried over batches: a label-sorted
    # batch barely moves them, so neither label-shift test answers them with the source
    import adapters
    from runtime.guard import Guarded

    running = {name for name, cls in adapters.REGISTRY.items() if cls.running_statistics}
    assert running == {"bn-alpha", "bn-ema", "rotta"}

    class Running:
        running_statistics, batch_statistics, ensemble_size = True, False, 1

        def discard(self):
            pass

    for statistics in (True, False):
        guarded = Guarded(GuardConfig())
        adapter = Running() if statistics else type("Batch", (Running,), {"running_statistics": False})()
        verdicts = []
        for b in range(24):
            labels = np.full(64, b % C)
            source = confident(labels)
            early = guarded.fallback_for_stream(source, adapter)
            verdicts.append(early.reason if early else guarded.judge(adapter, confident(labels, margin=2.0),
                                                                     source, None, None).reason)
        assert ("label_shift" in verdicts) is not statistics, verdicts


def asked(guard, batches):
    """Feed (adapted, source) pairs as the engine does: the source's logits only where the guard
    asks for them; returns, per batch, whether it asked, and the verdicts."""
    wanted, verdicts = [], []
    for adapted, source in batches:
        wanted.append(guard.wants_source())
        if wanted[-1] and guard.correlated_stream(source):  # the stream-level test first, as the callers
            verdicts.append("label_shift")
            continue
        verdicts.append(guard.observe(adapted, source if wanted[-1] else None))
    return wanted, verdicts


def test_a_calm_stream_asks_for_the_source_on_every_nth_batch_only():
    guard = StreamGuard(GuardConfig(source_every=4))
    batches = [(x, x) for x in (iid() for _ in range(40))]
    wanted, verdicts = asked(guard, batches)
    assert all(wanted[:16]) and verdicts == [None] * 40  # young: its label_runs window fills first
    assert wanted[16:] == [False, False, False, True] * 6
    every = StreamGuard(GuardConfig(source_every=1))
    assert all(asked(every, batches)[0])


def test_a_stream_showing_label_shift_or_a_running_signal_asks_on_every_batch():
    guard = StreamGuard(GuardConfig(source_every=4))
    asked(guard, [(x, x) for x in (iid() for _ in range(20))])
    assert not guard.wants_source()
    # a sampled batch that is label-shifted: from then on every batch, while it lasts
    wanted, verdicts = asked(guard, [(confident(np.full(64, c), margin=2.0), confident(np.full(64, c)))
                                     for c in np.repeat(np.arange(C), 2)])
    first = wanted.index(True)  # met with a long run that missed the batches before: no verdict yet, but dense
    assert first <= 3 and verdicts[first] is None and verdicts[first + 1] == "label_shift" and all(wanted[first:])
    # a collapse signal running (without the source: the floor of its last known marginal)
    calm = StreamGuard(GuardConfig(source_every=4))
    asked(calm, [(x, x) for x in (iid() for _ in range(20))])
    running, verdict = [], None
    while verdict is None and len(running) < 30:
        signal = calm._runs["marginal_collapse"] > 0
        running.append((signal, calm.wants_source()))
        verdict = calm.observe(confident(np.zeros(64, int)), iid() if running[-1][1] else None)
    assert verdict == "marginal_collapse" and any(not w for _, w in running)  # sampled until the signal ran
    assert all(w for signal, w in running if signal)
    calm.after_action()  # after an action the collapse marginals are new: the next batch has the source
    assert calm.wants_source()


def test_small_batches_fall_back_and_off_observes_nothing():
    guard = StreamGuard(GuardConfig(min_batch=16))
    assert guard.observe(iid(1), iid(1)) == "small_batch" and guard.action("small_batch") == FALLBACK
    assert guard.observe(iid(16), iid(16)) is None
    off = StreamGuard(GuardConfig(action="off"))
    assert off.observe(iid(1), iid(1), loss=float("nan")) is None and not off.snapshot_due(10)


def test_after_action_restarts_the_counters():
    guard = StreamGuard(GuardConfig(patience=2))
    x = iid()
    guard.observe(x, x, weight_distance=5.0)
    guard.after_action()
    assert guard.observe(x, x, weight_distance=5.0) is None  # the count restarted


def test_bad_config_is_refused():
    with pytest.raises(ValueError):
        GuardConfig(action="explode")
    with pytest.raises(ValueError):
        GuardConfig(patience=0)


# ----------------------------------------------------------------------------- replay

REPLAY = ["replay", "--data", "slice", "--corruptions", "shot_noise,jpeg_compression", "--n-per-domain", "192",
          "--batch-size", "64", "--setting", "correlated", "--delta", "0", "--adapter", "source,tent",
          "--threads", "1", "--no-progress", "--json"]


def replay(capsys, *extra):
    assert cli.main(REPLAY + list(extra)) == 0
    return {r["adapter"]: r for r in json.loads(capsys.readouterr().out)["results"]}


@pytest.mark.parametrize("stress", [[], ["--hp", "tent.lr=0.01"]], ids=["default-lr", "lr-x10"])
def test_guarded_tent_is_no_worse_than_source_on_a_label_sorted_stream(capsys, stress):
    unguarded = replay(capsys, "--guard", "off", *stress)
    guarded = replay(capsys, "--guard", "rollback", *stress)
    source = guarded["source"]["mean"]
    assert unguarded["source"]["mean"] == source and guarded["source"]["guard"] == {}  # source is never guarded
    assert unguarded["tent"]["mean"] > source + 5  # the failure the guard is for
    assert guarded["tent"]["mean"] <= source + 0.5
    assert guarded["tent"]["guard"]["verdicts"].get("label_shift", 0) > 0
    assert guarded["tent"]["guard"]["actions"]["fallback"] == sum(guarded["tent"]["guard"]["verdicts"].values())


def test_replay_refuses_a_bad_guard_flag(capsys):
    assert cli.main(REPLAY[:-1] + ["--guard", "rollback", "--guard-patience", "0"]) == 2
    assert "error:" in capsys.readouterr().err


def test_an_ensembles_summed_logits_are_compared_as_their_mean():
    """Mean teacher predicts student + teacher logits; summed, they look surer than the source on
    a label-sorted batch and slip past label_shift; as their mean they do not."""
    import adapters
    from adapter_models import tiny_cnn
    from runtime.guard import comparable_logits

    mean_teacher = adapters.create("mean-teacher", tiny_cnn())
    assert mean_teacher.ensemble_size == 2 and adapters.create("tent", tiny_cnn()).ensemble_size == 1
    sorted_batch = confident(np.full(64, 3))
    member = confident(np.full(64, 3), margin=3.5)  # each network less sure than the source, their sum surer
    for summed_as_is, want in ((True, None), (False, "label_shift")):
        guard = StreamGuard()
        for _ in range(5):
            x = iid()
            guard.observe(x, x)
        summed = member * 2
        shown = summed if summed_as_is else comparable_logits(mean_teacher, summed)
        assert guard.observe(shown, sorted_batch) == want
