"""`tta replay`: stream a corruption benchmark through adapters in-process and print the
paper-style table (error % per corruption and mean, one row per adapter).

The stream is built as the reference benchmark builds it (runtime/lab/streams.py, ADAPTERS.md §6)
from the demo model's Fashion-MNIST test split corrupted by runtime/lab/corruptions.py, or, with
`--model CONFIG.toml --dataset FILE.npz|FOLDER` (runtime/lab/replay_inputs.py, userdata.py), from the
user's model and data: corrupted at the model's input size and cached (runtime/lab/corruption_cache.py),
or played as recorded with `--corruptions none` (each --dataset a domain, in order). Each adapter
is created fresh over the model, reset where the setting says, and fed every batch
with `step(x)`; the error of a sample is that of the logits `step` returned for it.

With `--guard rollback|reset` the runs of adapting policies (every one but source) are guarded
as the server guards their streams (runtime.guard.is_guarded): the frozen source model predicts
too where the guard asks for it (every batch while a stream is young or looks label-shifted, every
--guard-source-every-th batch on a calm one), and runtime.guard.Guarded, the engine's own
guard, judges both predictions, the last update's loss, the weight distance and the BN shift,
and carries out its verdict (fallback: serve the source prediction and skip this batch's update;
rollback: back to the last good in-memory snapshot, kept every --guard-snapshot-every healthy
updates; reset: to source).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import adapters
from runtime import guard as guarding
from runtime.console import Progress, table
from runtime.drift import BNShift
from runtime.lab import corruption_cache, userdata
from runtime.lab import corruptions as corr
from runtime.lab.replay_inputs import DataSource, UserSource, load_model
from runtime.lab.streams import ALIASES, SETTINGS, Stream, canonical_setting

__all__ = ["DataSource", "add_arguments", "run"]

EXAMPLES = """examples:
  tta replay --adapter source,bn --n-per-domain 1000          # continual, severity 5, batch 200
  tta replay --setting mixed --batch-size 64 --n-per-domain 500
  tta replay --setting correlated --delta 0.1 --batch-size 64 --adapter bn,unmix-tns
  tta replay --adapter cotta --norm unmix-tns --hp lr=1e-5 --batch-size 64
  tta replay --adapter bn-alpha --batch-size 1 --n-per-domain 100 --json
  tta replay --data slice ...       # the shipped 2 000-image demo slice (no Debian package needed)
  tta replay --adapter source,tent --setting correlated --batch-size 64 --guard rollback   # collapse guard
  tta replay --model my.toml --dataset test.npz --adapter source,bn,tent     # your model, your data, corrupted
  tta replay --model my.toml --dataset day.npz --dataset night.npz --corruptions none   # your recorded shift

Data: the Fashion-MNIST test split (apt-get install dataset-fashion-mnist), corrupted once into
the cache (~/.cache/tta-runtime or $TTA_CACHE_DIR). --hp applies to every selected adapter that
has the hyperparameter; prefix it to aim at one: --hp cotta.lr=1e-5.
Cost: cotta runs 32 augmented teacher passes per batch (~50-90 ms per image on 2 CPU cores), so
on CPU use --n-per-domain (docs/RESULTS.md: 1 000 per domain, all adapters, 35 min).
"""

SHORT = {"gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impul", "defocus_blur": "defoc",
         "glass_blur": "glass", "motion_blur": "motn", "zoom_blur": "zoom", "snow": "snow", "frost": "frost",
         "fog": "fog", "brightness": "brit", "contrast": "contr", "elastic_transform": "elast",
         "pixelate": "pixel", "jpeg_compression": "jpeg"}
NORM_CAPABLE = {"tent", "cotta", "mean-teacher"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", action="append", default=None,
                        help="adapter(s), repeatable or comma-separated "
                             f"(default: all: {', '.join(adapters.available())})")
    parser.add_argument("--setting", default="continual", help=f"one of {', '.join(SETTINGS + list(ALIASES))}")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--severity", type=int, default=5, choices=corr.SEVERITIES,
                        help="severity (gradual always plays 1..5..1)")
    parser.add_argument("--seed", type=int, default=1, help="stream order seed (RNG_SEED) and adapter seed")
    parser.add_argument("--corruptions", default=",".join(corr.CORRUPTIONS),
                        help="comma list, in stream order; 'none' plays the --dataset files as recorded")
    parser.add_argument("--n-per-domain", type=int, default=None,
                        help="samples per domain (default: all); for mixed, the stream holds n × domains")
    parser.add_argument("--delta", type=float, default=0.0, help="Dirichlet δ for *_correlated (0: sort by label)")
    parser.add_argument("--norm", default=None,
                        help="normalisation adapter to compose with tent / cotta / mean-teacher, e.g. unmix-tns")
    parser.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                        help="hyperparameter, repeatable; ADAPTER.KEY=VALUE for one adapter")
    parser.add_argument("--data", choices=["auto", "full", "slice"], default="auto",
                        help="full test split (Debian package), the shipped demo slice, or full when installed")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (an error when unusable)")
    parser.add_argument("--model", default=None, metavar="CONFIG.toml",
                        help="the model config `tta serve --model` takes (default: the built-in demo model)")
    parser.add_argument("--dataset", action="append", default=None, metavar="FILE.npz|FOLDER",
                        help="your labelled images: .npz (x uint8 NHWC or float32 NCHW in [0, 1], y labels) or a "
                             "folder of class sub-folders; repeat with --corruptions none for successive domains")
    parser.add_argument("--cache-dir", default=None, help="corruption cache (default ~/.cache/tta-runtime)")
    parser.add_argument("--cache-max-mb", type=float, default=corruption_cache.DEFAULT_MAX_MB,
                        help="bound on the cache of corrupted --dataset files (least recently used removed first)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--guard", choices=guarding.ACTIONS, default="off",
                        help="collapse guard (runtime/guard.py) on the runs of adapting policies (as in the "
                             "server: runtime.guard.is_guarded): what to do on collapse")
    parser.add_argument("--guard-patience", type=int, default=guarding.GuardConfig.patience)
    parser.add_argument("--guard-snapshot-every", type=int, default=guarding.GuardConfig.snapshot_every,
                        help="updates between automatic last-good snapshots")
    parser.add_argument("--guard-min-batch", type=int, default=guarding.GuardConfig.min_batch,
                        help="smaller batches are answered by the source model")
    parser.add_argument("--guard-source-every", type=int, default=guarding.GuardConfig.source_every,
                        help="a calm stream's source forward on every n-th batch (1: every batch)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--no-progress", action="store_true")


# ----------------------------------------------------------------------------- running

@dataclass
class Result:
    adapter: str
    errors: dict[str, float]                 # corruption -> error %
    mean: float
    samples: int
    seconds: float
    by_block: list[dict] = field(default_factory=list)  # per (domain, severity) block, in stream order
    hyperparameters: dict = field(default_factory=dict)
    guard: dict = field(default_factory=dict)  # verdicts by reason, actions taken, largest signals


def parse_adapters(values: list[str] | None) -> list[str]:
    names = [n.strip() for v in (values or []) for n in v.split(",") if n.strip()] or adapters.available()
    for n in names:
        if n not in adapters.available():
            raise ValueError(f"unknown adapter {n!r}; available: {', '.join(adapters.available())}")
    return names


def hyperparameters_for(name: str, hp: list[str], norm: str | None, seed: int,
                        prototypes: torch.Tensor | None, fisher_data: torch.Tensor | None = None) -> dict:
    """The keyword arguments for adapters.create(name, ...): --hp values that apply, norm, seed, prototypes
    and the model config's fisher_data (eata)."""
    known = {h["name"] for h in adapters.describe(name)["hyperparameters"]}
    raw = {}
    for item in hp:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--hp {item!r}: expected KEY=VALUE")
        target, dot, bare = key.partition(".")
        if dot and target in adapters.available():
            if target == name:
                raw[bare] = value
        elif key in known:
            raw[key] = value
    typed = adapters.coerce(name, raw)
    if norm and name in NORM_CAPABLE:
        typed["norm"] = norm
    if "seed" in known:
        typed.setdefault("seed", seed)
    if name == "mean-teacher" and prototypes is not None:
        typed.setdefault("prototypes", prototypes)
    if name == "eata" and fisher_data is not None:
        typed.setdefault("fisher_data", fisher_data)
    return typed


def check_hp_used(names: list[str], hp: list[str]) -> None:
    """A --hp that no selected adapter takes is a typo: say so rather than ignore it."""
    for item in hp:
        key = item.partition("=")[0]
        target, dot, bare = key.partition(".")
        if dot and target in adapters.available():
            owners = [target] if bare in {h["name"] for h in adapters.describe(target)["hyperparameters"]} else []
        else:
            owners = [n for n in names if key in {h["name"] for h in adapters.describe(n)["hyperparameters"]}]
        if not owners:
            raise ValueError(f"--hp {item!r}: no selected adapter has hyperparameter {bare if dot else key!r}")


class _GuardedRun:
    """The collapse guard of one replay run: runtime.guard.Guarded judges every batch and carries
    out its verdict on the adapter, as in the engine; this keeps what the replay adds around it
    (the source forward, the BN-shift probe, the last loss) and reports (actions, weight distance)."""

    def __init__(self, adapter, model: torch.nn.Module, config: guarding.GuardConfig):
        self.adapter, self.model = adapter, model
        self.guarded = guarding.Guarded(config)
        self.probe = BNShift()
        adapter.observe_bn_inputs(self.probe)
        self.loss: float | None = None
        self.actions = {"fallback": 0, "rollback": 0, "reset": 0}
        self.pinned_batches = 0  # answered by the source while pinned (no verdict of their own)
        self.max_weight_distance = 0.0
        self.pinned = False  # escalation, as the server's: the source answers until the next reset
        self.batches = self.source_forwards = 0  # what the guard cost: the source's forwards over the batches

    def reset(self) -> None:
        """The benchmark reset the adapter (a new block): a new stream for the guard too (and, as
        an operator's reset in the server, the end of a pin)."""
        self.guarded.after_reset()
        self.guarded.guard.reset()
        self.loss = None
        self.pinned = False

    def step(self, x: torch.Tensor) -> torch.Tensor:
        a = self.adapter
        source_logits = self._source(x) if self.pinned or self.guarded.needs_source(len(x)) else None
        self.batches += 1
        if self.pinned:  # the server's safe policy by default: the frozen model
            self.pinned_batches += 1
            return torch.from_numpy(source_logits)
        early = self.guarded.fallback_for_stream(source_logits, a)
        if early is not None:  # a label-correlated stream: the source answers, the adapter does not run
            self.actions[early.action] += 1
            return torch.from_numpy(early.reply)
        self.guarded.before_predict(a)
        logits = a.predict(x).detach().float().cpu().numpy()
        self.max_weight_distance = max(self.max_weight_distance, self.guarded.weight_distance)  # as judged
        outcome = self.guarded.judge(a, logits, source_logits, self.loss, self.probe.take())
        if outcome.learn:
            self.loss = a.learn().get("loss", self.loss)
            self.guarded.learned(a)
        else:
            self.actions[outcome.action] += 1  # a rollback without a good state is a reset
            if outcome.action != guarding.FALLBACK:
                self.loss = None
            self.pinned = outcome.pin
        return torch.from_numpy(outcome.reply if outcome.reply is not None else self._source(x))

    def _source(self, x: torch.Tensor) -> np.ndarray:
        self.source_forwards += 1
        with torch.no_grad():  # the frozen forward the guard's source-level tests (and its answers) need
            return self.model(x).float().cpu().numpy()

    def summary(self) -> dict:
        return {"verdicts": {r: c for r, c in self.guarded.guard.counts.items() if c}, "actions": self.actions,
                "pinned_batches": self.pinned_batches, "batches": self.batches, "source_forwards": self.source_forwards,
                "max_weight_distance": round(self.max_weight_distance, 4)}


def run_adapter(name: str, model: torch.nn.Module, stream: Stream, hyperparameters: dict, device: str = "cpu",
                show_progress: bool = True, guard: guarding.GuardConfig | None = None,
                prototypes_name: str = "demo prototypes.pt") -> Result:
    """Feed the stream through a fresh adapter; errors per corruption and per block."""
    d = len(stream.corruptions)
    wrong, seen = np.zeros(d, np.int64), np.zeros(d, np.int64)
    blocks: dict[int, list[int]] = {}
    adapter = adapters.create(name, model, **hyperparameters)
    guarded = _GuardedRun(adapter, model, guard) if guard is not None and guarding.is_guarded(adapter, guard) else None
    bar = Progress(total=len(stream), desc=f"{name:>12s}", disable=not show_progress)
    start = time.monotonic()
    for batch in stream:
        if batch.reset:
            adapter.reset()
            if guarded:
                guarded.reset()
        x = torch.from_numpy(batch.x).to(device)
        with torch.set_grad_enabled(adapter.updates_weights):  # no autograd graph for statistics-only methods
            logits = guarded.step(x) if guarded else adapter.step(x)
        miss = (logits.argmax(1).cpu().numpy() != batch.y)
        np.add.at(wrong, batch.domains, miss)
        np.add.at(seen, batch.domains, 1)
        acc = blocks.setdefault(batch.block, [0, 0])
        acc[0] += int(miss.sum())
        acc[1] += len(miss)
        bar.set_postfix(err=f"{100 * wrong.sum() / max(seen.sum(), 1):.1f}%")
        bar.update(1)
    bar.close()
    seconds = time.monotonic() - start
    errors = {c: 100.0 * wrong[i] / seen[i] for i, c in enumerate(stream.corruptions) if seen[i]}
    by_block = [{"domain": stream.blocks[b].domain, "severity": stream.blocks[b].severity,
                 "error": 100.0 * w / n, "samples": n} for b, (w, n) in sorted(blocks.items())]
    shown = {k: v for k, v in hyperparameters.items() if k not in ("prototypes", "fisher_data")}
    if "prototypes" in hyperparameters:
        shown["prototypes"] = prototypes_name
    if "fisher_data" in hyperparameters:
        shown["fisher_data"] = f"model config fisher_data ({len(hyperparameters['fisher_data'])} images)"
    return Result(name, errors, float(np.mean(list(errors.values()))), int(seen.sum()), seconds, by_block, shown,
                  guarded.summary() if guarded else {})


def guard_cell(summary: dict) -> str:
    """Guard verdicts by reason, e.g. 'label_shift 12, weight_runaway 1'; '-' when unguarded."""
    if not summary:
        return "-"
    return ", ".join(f"{r} {c}" for r, c in summary["verdicts"].items()) or "none"


def format_table(results: list[Result], corruptions: list[str], title: str = "") -> str:
    guarded = any(r.guard for r in results)
    head = ["adapter"] + [SHORT.get(c, c) for c in corruptions] + ["mean", "time"] + (["guard"] if guarded else [])
    rows = [[r.adapter] + [f"{r.errors[c]:.1f}" if c in r.errors else "-" for c in corruptions]
            + [f"{r.mean:.1f}", f"{r.seconds:.0f}s"] + ([guard_cell(r.guard)] if guarded else []) for r in results]
    return "\n".join(([title] if title else []) + [table(head, rows, markdown=True)])


def _source(args, model, corruptions: list[str], show: bool):
    """The data: the demo's Fashion-MNIST, or the user's --dataset files (corrupted, or as recorded)."""
    recorded = corruptions == ["none"]
    if not args.dataset:
        if args.model:
            raise ValueError("--model needs --dataset FILE.npz|FOLDER: the demo's Fashion-MNIST fits the demo model only")
        if recorded:
            raise ValueError("--corruptions none plays your --dataset files as recorded; give --dataset")
        return DataSource(args.data, args.data_dir, args.cache_dir, seed=0, show_progress=show)
    if args.data != "auto" or args.data_dir:
        raise ValueError("--data / --data-dir choose the demo's Fashion-MNIST; drop them when giving --dataset")
    sets = [userdata.load(path, model.expect, show) for path in args.dataset]
    cache = None if recorded else corruption_cache.CorruptionCache(corr.cache_dir(args.cache_dir), args.cache_max_mb)
    return UserSource(sets, corrupt=not recorded, cache=cache, seed=0, show_progress=show)


def run(args) -> int:
    fail = lambda e: print(f"error: {e}", file=sys.stderr) or 2  # noqa: E731 - one line, exit code 2
    try:
        setting = canonical_setting(args.setting)
        corruptions = [c.strip() for c in args.corruptions.split(",") if c.strip()]
        if "none" in corruptions and corruptions != ["none"]:
            raise ValueError("--corruptions none cannot be combined with corruptions")
        guard = guarding.GuardConfig(action=args.guard, patience=args.guard_patience,
                                     snapshot_every=args.guard_snapshot_every, min_batch=args.guard_min_batch,
                                     source_every=args.guard_source_every)
    except ValueError as e:
        return fail(e)
    if args.threads:
        torch.set_num_threads(args.threads)
    show = not (args.no_progress or args.json and not sys.stderr.isatty())
    try:
        model = load_model(args.model, args.device)
        default = None if model.can_adapt or args.adapter else ["source"]  # a frozen graph serves source only
        names = parse_adapters(args.adapter or default)
        refusal = model.refusal(names)
        if refusal:
            raise ValueError(refusal)
        check_hp_used(names, args.hp)
        if args.norm and args.norm not in adapters.available():
            raise ValueError(f"--norm {args.norm!r}: not an adapter")
        if args.norm and not NORM_CAPABLE & set(names):
            raise ValueError(f"--norm composes with {', '.join(sorted(NORM_CAPABLE))}; none of them is selected")
        source = _source(args, model, corruptions, show)
    except (ValueError, FileNotFoundError) as e:
        return fail(e)
    domains = list(source.recorded) if source.recorded else corruptions
    n = args.n_per_domain
    if n is not None and setting.startswith("mixed"):
        n = n * len(domains)  # the mixed loader's NUM_EX is the whole stream
    try:
        stream = Stream(setting, source, source.labels, corruptions if not source.recorded else (), args.severity,
                        args.batch_size, n, args.seed, args.delta, recorded=source.recorded)
        for c in stream.corruptions:  # generate the cache up front, so adapter timings exclude it
            for s in sorted({b.severity for b in stream.blocks}):
                source(c, s)
        if source.cache_line():
            print(source.cache_line(), file=sys.stderr)
        results = []
        for name in names:
            hp = hyperparameters_for(name, args.hp, args.norm, args.seed, model.prototypes, model.fisher_data)
            torch.manual_seed(args.seed)  # anything drawing from the global generator starts the same
            label = f"{name}+{args.norm}" if args.norm and name in NORM_CAPABLE else name
            result = run_adapter(name, model.module, stream, hp, args.device, show, guard,
                                 "demo prototypes.pt" if model.name == "demo" and not args.model
                                 else "model config prototypes")
            result.adapter = label
            results.append(result)
    except ValueError as e:
        return fail(e)
    config = {"setting": setting, "batch_size": args.batch_size, "severity": 0 if source.recorded else args.severity,
              "seed": args.seed, "corruptions": stream.corruptions, "recorded": bool(source.recorded),
              "n_per_domain": args.n_per_domain, "delta": args.delta, "norm": args.norm, "hp": args.hp,
              "data": source.kind, "samples": stream.num_samples(), "torch_threads": torch.get_num_threads(),
              "guard": guard.__dict__ if args.guard != "off" else None, "model": model.meta, "datasets": source.meta,
              "cache": source.cache.summary() if getattr(source, "cache", None) and not source.recorded else None}
    if args.json:
        print(json.dumps({"config": config, "results": [r.__dict__ for r in results]}, indent=2))
    else:
        sev = "none (recorded)" if source.recorded else "1-5-1" if setting.startswith("gradual") else str(args.severity)
        data = (f"{source.kind} test data" if source.kind != "user"
                else f"model {model.name}, data {', '.join(d['name'] for d in source.meta)}")
        title = (f"{setting}, severity {sev}, batch {args.batch_size}, seed {args.seed}, "
                 f"{stream.num_samples()} samples ({data})"
                 + (f", δ={args.delta}" if setting.endswith("correlated") else "")
                 + (f", guard {args.guard}" if args.guard != "off" else "") + " - error %")
        print(format_table(results, stream.corruptions, title))
    return 0
