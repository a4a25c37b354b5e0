"""`tta replay`: its numbers equal a direct in-process loop, it is deterministic, and its flags work."""
import json

import numpy as np
import pytest
import torch

import adapters
from runtime import cli
from runtime.demo.model import build_demo_model, load_prototypes
from runtime.lab import corruptions, datasets, replay, streams

DOMAINS = ["gaussian_noise", "contrast"]
BASE = ["replay", "--data", "slice", "--corruptions", ",".join(DOMAINS), "--n-per-domain", "48",
        "--batch-size", "16", "--seed", "2", "--no-progress", "--threads", "2"]


def run_json(capsys, *extra):
    assert cli.main(BASE + list(extra) + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def direct_errors(name, setting, **hp):
    """The same benchmark written out by hand: corrupt the slice, order it, step the adapter."""
    x_clean, y = datasets.load_demo_slice()
    model = build_demo_model()
    if name == "mean-teacher":
        hp["prototypes"] = load_prototypes()
    if "seed" in {h["name"] for h in adapters.describe(name)["hyperparameters"]}:
        hp["seed"] = 2
    torch.manual_seed(2)
    adapter = adapters.create(name, model, **hp)
    errors = {}
    for k, domain in enumerate(DOMAINS):
        x = corruptions.corrupt(x_clean, domain, 5, seed=0)
        order = streams.sample_order(y, seed=2, n=48, correlated=setting == "correlated", delta=0.0)
        if setting == "reset_each_shift" and k:
            adapter.reset()
        wrong = 0
        for start in range(0, 48, 16):
            idx = order[start:start + 16]
            wrong += int((adapter.step(torch.from_numpy(x[idx])).argmax(1).numpy() != y[idx]).sum())
        errors[domain] = 100.0 * wrong / 48
    return errors


@pytest.mark.parametrize("name, setting", [("source", "continual"), ("bn", "correlated"),
                                           ("tent", "continual"), ("unmix-tns", "reset_each_shift")])
def test_table_numbers_equal_a_direct_loop(capsys, name, setting):
    out = run_json(capsys, "--adapter", name, "--setting", setting)
    (result,) = out["results"]
    expected = direct_errors(name, setting)
    assert result["errors"] == pytest.approx(expected, abs=1e-9)
    assert result["mean"] == pytest.approx(np.mean(list(expected.values())))
    assert result["samples"] == 96 and out["config"]["data"] == "slice"


def test_mean_teacher_gets_the_shipped_prototypes_and_matches_a_direct_loop(capsys):
    (result,) = run_json(capsys, "--adapter", "mean-teacher", "--n-per-domain", "32")["results"]
    assert result["hyperparameters"]["prototypes"] == "demo prototypes.pt"
    assert result["samples"] == 64


def test_replay_is_deterministic_under_a_seed(capsys):
    args = ("--adapter", "bn,cotta", "--hp", "n_augmentations=2", "--setting", "mixed")
    first = run_json(capsys, *args)["results"]
    second = run_json(capsys, *args)["results"]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(first) == strip(second)
    assert first[1]["hyperparameters"]["n_augmentations"] == 2 and "n_augmentations" not in first[0]["hyperparameters"]
    assert first[0]["samples"] == 96  # mixed: n_per_domain × domains in one stream


def test_table_has_a_row_per_adapter_and_the_mean(capsys):
    assert cli.main(BASE + ["--adapter", "source", "--adapter", "bn"]) == 0
    text = capsys.readouterr().out
    assert "gauss" in text and "contr" in text and "mean" in text
    rows = [line for line in text.splitlines() if line.startswith("| source") or line.startswith("| bn")]
    assert len(rows) == 2


def test_norm_composition_and_scoped_hyperparameters():
    hp = replay.hyperparameters_for("cotta", ["cotta.lr=1e-5", "tent.lr=0.5", "alpha=0.3"], "unmix-tns", 7, None)
    assert hp == {"lr": 1e-5, "norm": "unmix-tns", "seed": 7}
    assert replay.hyperparameters_for("bn-alpha", ["alpha=0.3"], "unmix-tns", 7, None) == {"alpha": 0.3}


def test_bad_flags_fail_with_exit_code_2(capsys):
    assert cli.main(BASE + ["--adapter", "nope"]) == 2
    assert cli.main(BASE + ["--adapter", "bn", "--hp", "lr=0.1"]) == 2  # bn has no lr: a typo, not ignored
    assert cli.main(BASE + ["--adapter", "bn", "--norm", "unmix-tns"]) == 2
    assert cli.main(BASE + ["--adapter", "tent", "--hp", "lr=abc"]) == 2
    assert "error:" in capsys.readouterr().err


def test_guard_column_and_json_summary(capsys):
    assert cli.main(BASE + ["--adapter", "source,tent", "--guard", "reset", "--n-per-domain", "32"]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("| adapter"))
    assert "guard reset" in text and header.split("|")[-2].strip() == "guard"
    out = run_json(capsys, "--adapter", "tent", "--guard", "reset", "--n-per-domain", "32")
    (result,) = out["results"]
    assert out["config"]["guard"]["action"] == "reset"
    assert set(result["guard"]) == {"verdicts", "actions", "pinned_batches", "batches", "source_forwards",
                                    "max_weight_distance"}
    assert sum(result["guard"]["actions"].values()) == sum(result["guard"]["verdicts"].values())


def test_every_adapting_policy_is_guarded_as_in_the_server(capsys):
    """As in the server (runtime.guard.is_guarded): statistics-only policies are guarded too, source is not."""
    out = run_json(capsys, "--adapter", "source,bn,unmix-tns,tent", "--guard", "rollback", "--n-per-domain", "32")
    guards = {r["adapter"]: r["guard"] for r in out["results"]}
    assert guards["source"] == {}
    for name in ("bn", "unmix-tns", "tent"):
        assert set(guards[name]) == {"verdicts", "actions", "pinned_batches", "batches", "source_forwards",
                                     "max_weight_distance"}, (name, guards[name])
