"""Label-free collapse guard, one `StreamGuard` per stream, engine-independent.

The caller (the engine, or `tta replay`) feeds it once per batch what it already has, and acts on
the verdict. Every signal below is computed from the model's own outputs, weights and inputs, never
from labels, so it works on an unlabelled request stream.

Signals and reasons (defaults in `GuardConfig`; C = number of classes, n = batch size)

- `non_finite`: NaN/Inf in the adaptation loss, the adapted logits, or the adapted weights (a
  non-finite `weight_distance` means a non-finite weight). Nothing served from such a state can be
  right; acts at once.
- `marginal_collapse`: the class marginal of the *adapted* predicted classes (argmax counts, an
  EMA over `marginal_window` samples, entropy / log C; argmax because TENT at batch 1 answers one
  class with a nearly flat softmax, whose mean looks spread) falls below `collapse_ratio` x the same figure for
  the *source* model's predictions on the same batches, for `patience` batches in a row (under fog
  the frozen model itself piles onto two classes; before any source logits: `collapse_floor`).
- `weight_runaway`: ||theta - theta_src|| / ||theta_src|| over the adapted weights above
  `max_weight_distance` (for `patience` batches). TENT on a collapsing stream keeps growing its
  BN affine parameters; a healthy stream stays well below (see docs/RESULTS.md, "Collapse guard").
- `bn_shift_jump`: the stream's BN-statistics shift (runtime/drift.BNShift) above `bn_jump_factor`
  x its running baseline (EMA over healthy batches) for `bn_jump_patience` batches in a row: a step
  that does not recover (a short jump is a domain change the adapter follows).
- `label_shift` (fallback, see below): the batch's classes are far from i.i.d. The frozen source
  model's batch marginal m_B (mean of its softmax over the batch) is compared with its long-run
  marginal m_L (EMA over `label_window` samples, started at `prior`; without one, uniform worth 4
  samples a class, the window filling up from there):
  KL(m_B || m_L) > `label_kl` + (C-1)/(2n). The (C-1)/(2n) term is the KL an i.i.d. sample of n
  hard labels has by chance (chi-square approximation), so the test does not fire more often on
  small batches. Two more conditions keep it to the batches where the source is the better
  bet: the source is sure of its batch (mean max-probability > `min_source_confidence`); the
  adapted model is *less* sure of it (batch-statistics normalisation of a label-correlated batch
  removes the class signal; on an i.i.d. shifted batch it restores it). A second test leans on no
  confidence: while the median, over its last `label_runs` batches, of each batch's KL beyond
  chance exceeds `label_runs_kl`, the stream is label-correlated and every batch falls back (an
  i.i.d. stream's batches sit near the long run; a sorted or Dirichlet-ordered one keeps changing
  class). Thresholds chosen on the demo model (seed 1), judged on CIFAR-10 and other seeds
  (docs/RESULTS.md, with the figures and a condition tried and dropped).
- `small_batch` (fallback): n < `min_batch`. Methods that predict with batch statistics normalise
  a single image by itself (demo model, batch 1: TENT, CoTTA, mean teacher, BN 80-88 % error
  against the source's 51 %; from two images on adaptation pays on average), so the default falls
  back at batch size 1, for adapters that predict with the batch's own statistics only
  (`adapter.batch_statistics`; not bn-alpha, bn-ema, rotta, lame). Neither label_shift test
  applies to `adapter.running_statistics` ones (bn-alpha, bn-ema, rotta): one label-correlated
  batch barely moves their statistics (demo model, seed 1: they beat the source on every correlated stream).

Why a fallback and not a rollback for the last two: with batch-statistics normalisation the harm
of a label-correlated or single-image batch is in *this batch's* prediction, which no earlier
adapted state predicts better: the source answers it, its update is dropped, the adapted state is
kept. The other four reasons take `GuardConfig.action` (rollback to the last good snapshot, or
reset to source); the caller then clears the stream's guard state with `after_action()`.

Cost: the source's logits, one frozen forward (ONNX Runtime's where the model exports exactly),
on every batch of a young or unquiet stream, on every `source_every`-th of a calm one
(`StreamGuard.wants_source`; a verdict without them: the caller computes them to answer with);
a label-correlated stream is answered by them alone (`Guarded.fallback_for_stream`).
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import numpy as np

from runtime.drift import entropy_ratio, softmax

ACTIONS = ("rollback", "reset", "off")
FALLBACK = "fallback"
ACTING_REASONS = ("non_finite", "marginal_collapse", "weight_runaway", "bn_shift_jump")
FALLBACK_REASONS = ("label_shift", "small_batch")
REASONS = ACTING_REASONS + FALLBACK_REASONS


@dataclass(frozen=True)
class GuardConfig:
    action: str = "rollback"          # rollback | reset | off (off: observe nothing, never act)
    patience: int = 3                 # batches in a row for marginal_collapse / weight_runaway
    snapshot_every: int = 10          # keep a "last good" snapshot every N healthy updates
    collapse_ratio: float = 0.5       # adapted marginal entropy < ratio x source marginal entropy
    collapse_floor: float = 0.2       # ... or below this when no source logits are given
    marginal_window: int = 256        # samples in the collapse marginals' EMA
    max_weight_distance: float = 1.0  # relative distance of the adapted weights from the source
    bn_jump_factor: float = 4.0       # BN shift > factor x its healthy baseline ...
    bn_jump_patience: int = 8         # ... for this many batches in a row
    label_kl: float = 0.3             # KL(batch marginal || long-run marginal) of the source, nats
    label_window: int = 1024          # samples in the source's long-run marginal
    min_source_confidence: float = 0.7
    label_runs: int = 16              # batches whose median KL flags a label-correlated stream (0: off)
    label_runs_kl: float = 0.4        # ... when above this
    min_batch: int = 2                # below: small_batch fallback (batch size 1)
    pin_after: int = 3                # this many rollbacks/resets within pin_window batches pin the
    pin_window: int = 100             # stream to safe_policy (0: never pin)
    safe_policy: str = "source"
    source_every: int = 4             # a calm stream's source forward on every n-th batch only (1: every batch)

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"guard action {self.action!r}: choose from {', '.join(ACTIONS)}")
        if min(self.patience, self.snapshot_every, self.bn_jump_patience, self.min_batch, self.source_every) < 1:
            raise ValueError("guard patience, snapshot_every, bn_jump_patience, min_batch and source_every must be >= 1")
        if self.label_runs < 0:
            raise ValueError("guard label_runs must be >= 0 (0: no stream-level label-shift test)")
        if self.pin_after < 0 or self.pin_window < 1:
            raise ValueError("guard pin_after must be >= 0 (0: never pin) and pin_window >= 1")


def is_guarded(adapter, config: GuardConfig) -> bool:
    """Who is guarded, for the server and `tta replay` alike: every adapting policy while the guard
    is on, statistics-only ones too (bn at batch 1: 80.8 % error against the frozen model's 50.7 %)."""
    return adapter is not None and adapter.adapts and config.action != "off"


@dataclass
class Outcome:
    """What the guard made of one batch: the logits to answer it with and what was done."""
    reply: np.ndarray | None  # the adapted logits, or on a verdict the source's (None: the caller computes them)
    reason: str = ""    # the verdict (REASONS), "" when the batch passed every check
    action: str = ""    # "", "fallback", "rollback" or "reset"
    rolled_back_to: int = 0  # the adapter's step after a rollback
    pin: bool = False        # escalation: pin_after rollbacks/resets within pin_window batches

    @property
    def learn(self) -> bool:
        """Apply this batch's update: only when it raised no verdict."""
        return not self.reason


class Guarded:
    """The guard of one adapting stream: its StreamGuard, the last good state of its adapter and
    the weight distance of that adapter's current weights. The engine and `tta replay` call the
    same methods, so a verdict means the same in both:

        source_logits = source(x) if guarded.needs_source(len(x)) else None
        outcome = guarded.fallback_for_stream(source_logits)  # label-correlated stream: the source
        if outcome is None:                                   # answers, the adapter does not run
            guarded.before_predict(adapter)       # may keep a candidate for the last good state
            logits = adapter.predict(x)
            outcome = guarded.judge(adapter, logits, source_logits, loss, bn_shift)
            if outcome.learn: adapter.learn(); guarded.learned(adapter)

    `judge` also carries out the verdict on the adapter (drop the batch's update; load the last
    good state, or reset it); the caller's bookkeeping (step, counters, metrics, logs) stays its own."""

    def __init__(self, config: GuardConfig, prior: np.ndarray | None = None):
        self.guard = StreamGuard(config, prior)
        self.good_state: dict | None = None  # the adapter's last good state_dict (in memory)
        self._candidate: dict | None = None
        self.weight_distance = 0.0           # of the adapter's current weights (one pass per update)
        self._undo: dict | None = None       # the statistics before this batch (adapters that update in predict)
        self._seen = 0                       # batches judged
        self._trips: collections.deque[int] = collections.deque()  # batches that made it roll back or reset

    def before_predict(self, adapter) -> None:
        """Every `snapshot_every` updates the state about to predict this batch is a candidate for
        the last good state: it becomes it if this batch raises no signal at all (a state after an
        update is not checked yet). An adapter whose prediction is its update (bn-ema, unmix-tns)
        keeps its state from before the batch, so a fallback can undo it. state_dict() returns copies."""
        self._candidate = adapter.state_dict() if self.guard.snapshot_due(adapter.steps) else None
        self._undo = adapter.state_dict() if adapter.adapts and not adapter.deferred_update else None

    def needs_source(self, n: int) -> bool:
        """The caller computes the source's logits for this batch of n (StreamGuard.wants_source);
        without them judge() skips the label-shift tests, and on a verdict the caller computes them
        then, to answer with them (`Outcome.reply` is None)."""
        return n < self.guard.config.min_batch or self.guard.wants_source()

    def fallback_before_predict(self, n: int, adapter=None) -> Outcome | None:
        """A verdict known before predicting (a batch under min_batch, for an adapter that
        predicts with the batch's own statistics): the caller answers it with the source's
        prediction and does not touch the adapter (no prediction, no update)."""
        if (self.guard.config.action == "off" or n >= self.guard.config.min_batch
                or not getattr(adapter, "batch_statistics", True)):
            return None
        self._seen += 1
        self.guard.figures = {}
        return Outcome(None, self.guard._verdict("small_batch"), FALLBACK)

    def fallback_for_stream(self, source_logits: np.ndarray, adapter=None) -> Outcome | None:
        """A verdict known from the source alone (the stream-level label-shift test): the caller
        answers the batch with `source_logits` and does not run the adapter. Call after
        before_predict is due and before predicting; on None, predict and judge as usual."""
        if (source_logits is None or getattr(adapter, "running_statistics", False)
                or not self.guard.correlated_stream(source_logits)):
            return None
        self._seen += 1
        self._candidate = self._undo = None
        return Outcome(source_logits, self.guard._verdict("label_shift"), FALLBACK)

    def judge(self, adapter, logits: np.ndarray, source_logits: np.ndarray | None, loss: float | None,
              bn_shift: float | None) -> Outcome:
        reason = self.guard.observe(comparable_logits(adapter, logits), source_logits, loss=loss,
                                    weight_distance=self.weight_distance, bn_shift=bn_shift,
                                    batch_statistics=getattr(adapter, "batch_statistics", True),
                                    label_shift=not getattr(adapter, "running_statistics", False))
        candidate, self._candidate = self._candidate, None
        undo, self._undo = self._undo, None
        self._seen += 1
        if reason is None:
            if candidate is not None and self.guard.healthy():
                self.good_state = candidate
            return Outcome(logits)
        adapter.discard()  # never learn from the batch that raised the verdict
        action = self.guard.action(reason)
        if action == FALLBACK:  # this batch is answered by the source; the adapted state is kept
            if undo is not None:  # ... as it was before the batch
                adapter.load_state_dict(undo)
            return Outcome(source_logits, reason, FALLBACK)
        step = 0
        if action == "rollback" and self.good_state is not None:
            adapter.load_state_dict(self.good_state)
            self.good_state = None  # used up: tripping again before a new good state means reset
            step = adapter.steps
        else:
            action = "reset"
            adapter.reset()
            self.good_state = None
        self.guard.after_action()
        self.learned(adapter)
        # the batch itself is answered by the source: its adapted prediction came from the state just
        # judged unhealthy (and an adapter without state, LAME, would give the same again)
        return Outcome(source_logits, reason, action, step, self._escalate())

    def _escalate(self) -> bool:
        """Escalation: pin_after rollbacks/resets within the last pin_window batches (the stream
        keeps collapsing whatever its state): the caller pins it to safe_policy."""
        cfg = self.guard.config
        self._trips.append(self._seen)
        while self._trips and self._trips[0] <= self._seen - cfg.pin_window:
            self._trips.popleft()
        return cfg.pin_after > 0 and len(self._trips) >= cfg.pin_after

    def learned(self, adapter) -> None:
        """The adapter's weights changed (an update, a rollback, a reset): measure them once."""
        self.weight_distance = float(adapter.weight_distance())

    def after_reset(self) -> None:
        """The caller reset the stream (operator, sequence start): its signals and last good
        state described the state just dropped; the source's long-run marginal stays."""
        self.guard.after_action()
        self.good_state = None
        self.weight_distance = 0.0

    def describe(self) -> str:
        """The last batch's figures, for a log line."""
        return ", ".join(f"{k} {v:.3g}" for k, v in self.guard.figures.items() if isinstance(v, float))


def comparable_logits(adapter, logits: np.ndarray) -> np.ndarray:
    """The adapter's prediction as the guard compares it with the source's: an ensemble's summed
    logits (mean teacher: student + teacher) as their mean, whose confidence the sum would inflate
    (mean teacher then slipped past label_shift on label-sorted batches, docs/RESULTS.md)."""
    return np.asarray(logits) / getattr(adapter, "ensemble_size", 1)


def _ema(mean: np.ndarray, batch_mean: np.ndarray, n: int, window: int) -> np.ndarray:
    """An EMA in which each of the n samples enters with weight 1/window."""
    w = 1.0 - (1.0 - 1.0 / window) ** n
    return (1 - w) * mean + w * batch_mean


def _one_hot(p: np.ndarray) -> np.ndarray:
    return np.eye(p.shape[1])[p.argmax(1)]


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p, q = np.clip(p, 1e-12, None), np.clip(q, 1e-12, None)
    return float((p * np.log(p / q)).sum())


class StreamGuard:
    """Per-stream state of the guard; see the module docstring for the rules."""

    def __init__(self, config: GuardConfig | None = None, prior: np.ndarray | None = None):
        self.config = config or GuardConfig()
        self.prior = None if prior is None else np.asarray(prior, np.float64)
        self.counts = {r: 0 for r in REASONS}  # verdicts by reason, over the stream's life
        self.figures: dict[str, float] = {}    # the last batch's signals (for logs and metrics)
        self.reset()

    def reset(self) -> None:  # a new stream, or the caller reset it to source; counts are kept
        self._source_long = None if self.prior is None else self.prior.copy()
        self._source_seen = 0  # samples in the long run (without a prior, the first ones fill its window)
        self._label_excess: collections.deque[float] = collections.deque(maxlen=max(self.config.label_runs, 1))
        self._source_done: tuple[float, float] | None = None  # this batch's (KL, chance), taken once
        self._since_source, self._last_excess = 0, 0.0  # batches without the source since; the last excess
        self._adapted_marginal = self._source_marginal = None
        self.after_action()

    def after_action(self) -> None:
        """The caller rolled back or reset: restart the consecutive counters and the collapse
        marginals (they described the state just dropped); the source's long-run marginal stays."""
        self._adapted_marginal = self._source_marginal = None
        self._runs = {"marginal_collapse": 0, "weight_runaway": 0, "bn_shift_jump": 0}
        self._bn_baseline: float | None = None
        self._last: str | None = None

    def action(self, reason: str) -> str:  # what the caller must do: fallback, rollback or reset
        return FALLBACK if reason in FALLBACK_REASONS else self.config.action

    def healthy(self) -> bool:  # the last batch raised no signal: its state may become the last good one
        return self._last is None and not any(self._runs.values())

    def wants_source(self) -> bool:
        """The source's forward on every batch while the stream is young (label_runs window not full),
        has a signal running, no source marginal since an action, or shows label shift on its last
        batch with the source (KL beyond chance above label_kl, or the stream-level test firing); on
        a calm stream on every source_every-th batch."""
        cfg, excess = self.config, self._label_excess
        calm = (cfg.action != "off" and len(excess) == excess.maxlen and self._last_excess <= cfg.label_kl
                and not self._correlated()[0] and self.healthy() and self._source_marginal is not None)
        return not calm or self._since_source + 1 >= cfg.source_every

    def snapshot_due(self, step: int) -> bool:
        return self.config.action != "off" and step > 0 and step % self.config.snapshot_every == 0 and self.healthy()

    def observe(self, adapted_logits, source_logits=None, loss: float | None = None,
                weight_distance: float | None = None, bn_shift: float | None = None,
                weights_finite: bool | None = None, batch_statistics: bool = True,
                label_shift: bool = True) -> str | None:
        """One batch's signals; returns the reason to act on now, or None. Call after the prediction
        and before the batch's update (a verdict means: do not apply it)."""
        cfg = self.config
        self._last = None
        if cfg.action == "off":
            return None
        adapted = np.asarray(adapted_logits, np.float64)
        n = len(adapted)
        self.figures = {"loss": loss, "weight_distance": weight_distance, "bn_shift": bn_shift}
        if (not np.isfinite(adapted).all() or (loss is not None and not math.isfinite(loss))
                or (weight_distance is not None and not math.isfinite(weight_distance)) or weights_finite is False):
            return self._verdict("non_finite")

        p_adapted = softmax(adapted)
        p_source = None if source_logits is None else softmax(np.asarray(source_logits, np.float64))
        # the first batch with the source after batches without it meets a long run that missed
        # them (a domain change among them reads as label shift): it only makes the next ones dense,
        # and stays out of the stream-level window
        after_gap, self._since_source = self._since_source > 0, 0 if p_source is not None else self._since_source + 1
        fallback = None
        small = n < cfg.min_batch and batch_statistics
        if p_source is not None:
            kl, chance = self._source_side(p_source, record=not small and not after_gap)
            if not small and label_shift and not after_gap:
                fallback = self._label_shift(p_source, p_adapted, kl, chance)
        self._source_done = None
        if small:
            fallback = "small_batch"
        if fallback:
            return self._verdict(fallback)  # this batch is not evidence about the adapted state

        # collapse of the adapted class marginal, against the source's on the same batches; of the
        # argmax, not of the probabilities: a collapsed model may answer one class with flat softmax
        self._adapted_marginal = self._update(self._adapted_marginal, _one_hot(p_adapted), cfg.marginal_window)
        h_adapted = float(entropy_ratio(self._adapted_marginal[None])[0])
        floor = cfg.collapse_floor
        if p_source is not None:
            self._source_marginal = self._update(self._source_marginal, _one_hot(p_source), cfg.marginal_window)
        if self._source_marginal is not None:  # between the batches with the source: its last level
            floor = cfg.collapse_ratio * float(entropy_ratio(self._source_marginal[None])[0])
        self.figures.update(marginal_entropy=h_adapted, marginal_floor=floor)
        checks = {"marginal_collapse": h_adapted < floor,
                  "weight_runaway": weight_distance is not None and weight_distance > cfg.max_weight_distance,
                  "bn_shift_jump": self._bn_jump(bn_shift)}
        for reason, bad in checks.items():
            self._runs[reason] = self._runs[reason] + 1 if bad else 0
        for reason, run in self._runs.items():
            if run >= (cfg.bn_jump_patience if reason == "bn_shift_jump" else cfg.patience):
                return self._verdict(reason)
        return None

    # ------------------------------------------------------------------ helpers

    def _verdict(self, reason: str) -> str:
        self.counts[reason] += 1
        self._last = reason
        return reason

    def correlated_stream(self, source_logits) -> bool:
        """Before predicting, with the source's logits at hand: take this batch's source-side label
        statistics (observe() reuses them) and say whether the stream-level test calls the stream
        label-correlated, so the caller can answer the batch with the source without running the
        adapter (its update would be dropped anyway)."""
        cfg = self.config
        if cfg.action == "off" or cfg.label_runs == 0 or len(source_logits) < cfg.min_batch:
            return False
        p_source = softmax(np.asarray(source_logits, np.float64))
        kl, _ = self._source_side(p_source, record=self._since_source == 0)
        correlated, median = self._correlated()
        if correlated:  # the batch ends here: observe() will not see it
            self._source_done, self._since_source = None, 0
            self._last = None
            self.figures = {"label_kl": kl, "label_kl_median": median}
        return correlated

    def _source_side(self, p_source: np.ndarray, record: bool) -> tuple[float, float]:
        """This batch's KL to the source's long run (before the batch) and an i.i.d. batch's by chance,
        taken once (correlated_stream, then observe); the excess kept for the stream-level test
        (`record`); the long run moved by the batch."""
        if self._source_done is not None:
            return self._source_done
        cfg = self.config
        m, n = p_source.mean(0), len(p_source)
        if self._source_long is None:  # uniform prior unless the caller gave the training marginal
            self._source_long = np.full(len(m), 1.0 / len(m))
        kl, chance = _kl(m, self._source_long), (len(m) - 1) / (2 * n)
        self._last_excess = kl - chance  # after a gap too: it decides whether the next batches are dense
        if record:  # not after a gap: measured against a long run that missed the batches between
            self._label_excess.append(kl - chance)
        # without the training marginal as a prior, the long run starts as the average of what it
        # has seen (a window filling up) and a uniform guess worth 4 samples a class, so a source
        # biased from the first batch on is not measured for long against a uniform it never showed
        window = cfg.label_window if self.prior is not None else min(cfg.label_window, self._source_seen + n + 4 * len(m))
        self._source_long = _ema(self._source_long, m, n, window)
        self._source_seen += n
        self._source_done = (kl, chance)
        return self._source_done

    def _correlated(self) -> tuple[bool, float]:
        """The stream-level test: the batches' KL beyond chance, median over the last label_runs batches."""
        cfg = self.config
        median = float(np.median(self._label_excess)) if self._label_excess else 0.0
        return (cfg.label_runs > 0 and len(self._label_excess) >= max(cfg.label_runs // 2, 1)
                and median > cfg.label_runs_kl), median

    def _label_shift(self, p_source: np.ndarray, p_adapted: np.ndarray, kl: float, chance: float) -> str | None:
        cfg = self.config
        confidence = float(p_source.max(1).mean())
        adapted_confidence = float(p_adapted.max(1).mean())
        shifted = kl > cfg.label_kl + chance and confidence > cfg.min_source_confidence and adapted_confidence < confidence
        correlated, median = self._correlated()
        self.figures.update(label_kl=kl, label_kl_median=median, source_confidence=confidence,
                            adapted_confidence=adapted_confidence)
        return "label_shift" if shifted or correlated else None

    @staticmethod
    def _update(mean: np.ndarray | None, probs: np.ndarray, window: int) -> np.ndarray:
        if mean is None:
            return probs.mean(0)
        return _ema(mean, probs.mean(0), len(probs), window)

    def _bn_jump(self, bn_shift: float | None) -> bool:
        if bn_shift is None:
            return False
        if self._bn_baseline is None:
            self._bn_baseline = bn_shift
            return False
        jumped = bn_shift > self.config.bn_jump_factor * max(self._bn_baseline, 1e-3)
        if not jumped:  # the baseline follows healthy batches only, so a lasting jump stays visible
            self._bn_baseline = 0.9 * self._bn_baseline + 0.1 * bn_shift
        return jumped
