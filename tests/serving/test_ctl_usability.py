"""`tta ctl` as a new user meets it (issue 17, part 4): global options anywhere on the line, a
quiet end when the output pipe closes, `streams` filters / limit / one JSON document, `delete`
saying what went, `watch`, and the note at `set-policy unmix-tns`. Against the session's real
server (tests/conftest.py), through runtime.cli.main in-process or `python -m runtime.cli ctl`."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import tritonclient.grpc as tc

from clients import batches, infer, tta_pb
from conftest import REPO
from runtime import cli, ctl

CTL = [sys.executable, "-m", "runtime.cli", "ctl"]


@pytest.fixture(scope="module")
def client(server):
    c = tc.InferenceServerClient(server.target)
    yield c
    c.close()


def tta(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["ctl", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_global_options_go_before_or_after_the_action(server, capsys):
    code, out, err = tta(capsys, "set-policy", "usab-anywhere", "bn-alpha", "alpha=0.3", "--target", server.target,
                         "--timeout", "20")
    assert code == 0 and "usab-anywhere: policy bn-alpha alpha=0.3" in out, err
    code, out, _ = tta(capsys, "get", "usab-anywhere", "--json", "--target", server.target)
    assert code == 0 and json.loads(out)["policy"] == "bn-alpha"
    code, out, _ = tta(capsys, "--target", server.target, "--json", "get", "usab-anywhere")  # the old order
    assert code == 0 and json.loads(out)["stream_id"] == "usab-anywhere"
    # after the action wins over before it; one left out after keeps the top level's
    code, out, _ = tta(capsys, "--target", "127.0.0.1:1", "--timeout", "20", "get", "usab-anywhere",
                       "--target", server.target)
    assert code == 0 and "usab-anywhere: policy bn-alpha" in out
    code, _, err = tta(capsys, "get", "usab-anywhere", "--target", "127.0.0.1:1", "--timeout", "2")
    assert code == 1 and ("UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err), err


def test_streams_filters_sorts_limits_and_prints_one_json_document(server, capsys):
    for stream, policy in (("usab-f-c", "tent"), ("usab-f-a", "bn-alpha"), ("usab-f-b", "bn-alpha")):
        assert tta(capsys, "set-policy", stream, policy, "--target", server.target)[0] == 0
    code, out, _ = tta(capsys, "streams", "--prefix", "usab-f-", "--limit", "2", "--target", server.target)
    assert code == 0
    listed = [line.split(":")[0] for line in out.splitlines() if line.startswith("usab-f-")]
    assert listed == ["usab-f-a", "usab-f-b"]  # sorted by id, cut to --limit
    assert "; 3 match --prefix usab-f-" in out.splitlines()[0]
    assert out.rstrip().splitlines()[-1].startswith("... 1 more not shown (--limit 2")
    code, out, _ = tta(capsys, "streams", "--prefix", "usab-f-", "--policy", "tent", "--target", server.target)
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("usab-f-")] == ["usab-f-c"]
    assert "more not shown" not in out
    code, out, _ = tta(capsys, "streams", "--policy", "bn-alpha", "--policy", "tent", "--prefix", "usab-f-",
                       "--limit", "2", "--json", "--target", server.target)
    document = json.loads(out)  # the whole output is one document
    assert [s["stream_id"] for s in document["streams"]] == ["usab-f-a", "usab-f-b"]
    assert (document["matched"], document["not_shown"]) == (3, 1)
    assert int(document["stream_limit"]) > 0  # int64: a JSON string (proto3 JSON)
    code, out, _ = tta(capsys, "streams", "--prefix", "usab-f-nothing", "--target", server.target)
    assert code == 0 and "; 0 match --prefix usab-f-nothing" in out


def test_delete_says_what_it_deleted(server, client, capsys):
    assert tta(capsys, "set-policy", "usab-del", "tent", "lr=0.0001", "--target", server.target)[0] == 0
    for x in batches(2, seed=21):
        infer(client, x, stream="usab-del")
    assert tta(capsys, "snapshot", "usab-del", "--name", "before", "--target", server.target)[0] == 0
    code, out, err = tta(capsys, "delete", "usab-del", "--target", server.target)
    assert code == 0, err
    assert out.startswith("deleted stream usab-del: policy tent lr=0.0001, 2 batches (8 samples, step ")
    assert "1 snapshot (before)" in out and "snapshot files are gone" in out and "on disk" in out
    code, _, err = tta(capsys, "get", "usab-del", "--target", server.target)
    assert code == 1 and "NOT_FOUND" in err


def test_set_policy_unmix_tns_prints_a_note(server, capsys):
    code, out, err = tta(capsys, "set-policy", "usab-unmix", "unmix-tns", "--target", server.target)
    assert code == 0 and "usab-unmix: policy unmix-tns" in out
    assert "loses accuracy on the demo model" in err and "87.4 %" in err
    code, out, err = tta(capsys, "set-policy", "usab-unmix", "tent", "norm=unmix-tns", "--json",
                         "--target", server.target)
    assert code == 0 and json.loads(out)["policy"] == "tent" and "loses accuracy" in err  # stdout stays JSON
    code, _, err = tta(capsys, "set-policy", "usab-unmix", "bn", "--target", server.target)
    assert code == 0 and "loses accuracy" not in err


def test_watch_shows_drift_and_accuracy(server, client, capsys):
    assert tta(capsys, "set-policy", "usab-watch", "bn-alpha", "--target", server.target)[0] == 0
    infer(client, batches(1, seed=22)[0], stream="usab-watch", request_id="usab-watch-1")
    assert tta(capsys, "feedback", "usab-watch-1", "1", "2", "3", "4", "--target", server.target)[0] == 0
    code, out, err = tta(capsys, "watch", "usab-watch", "--every", "0.1", "--count", "3", "--target", server.target)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("stream usab-watch on ") and lines[1] == ctl.WATCH_HEADER
    rows = lines[2:]
    assert len(rows) == 3 and all(" bn-alpha " in r for r in rows)
    assert all(f"({rows[0].split('(')[1].split(')')[0]})" in r for r in rows)  # n/4 correct, every row
    assert "/4)" in rows[0]
    code, out, _ = tta(capsys, "watch", "usab-watch", "--every", "0.1", "--count", "2", "--json",
                       "--target", server.target)
    assert [json.loads(line)["stream_id"] for line in out.splitlines()] == ["usab-watch"] * 2
    code, _, err = tta(capsys, "watch", "usab-no-such", "--count", "1", "--target", server.target)
    assert code == 1 and "NOT_FOUND" in err


def test_get_and_watch_show_holder_and_pinned_from_when_set(capsys):
    info = tta_pb.StreamInfo(stream_id="cam-9", policy="bn", holder="replica-2", pinned_from="tent", resident=True)
    row = ctl._watch_line(info, None)
    assert "held by replica-2" in row and "PINNED by the guard (was tent)" in row
    capsys.readouterr()
    ctl._print_stream(info)
    out = capsys.readouterr().out
    assert "held by replica replica-2" in out and "PINNED by the collapse guard (was tent" in out
    plain = ctl._watch_line(tta_pb.StreamInfo(stream_id="cam-9", policy="bn", resident=True), None)
    assert "held by" not in plain and "PINNED" not in plain


def test_watch_ends_quietly_on_ctrl_c(server):
    assert subprocess.run([*CTL, "set-policy", "usab-sigint", "bn", "--target", server.target], cwd=REPO,
                          capture_output=True, timeout=60).returncode == 0
    proc = subprocess.Popen([*CTL, "watch", "usab-sigint", "--every", "0.2", "--target", server.target], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("stream usab-sigint")
        assert proc.stdout.readline().startswith("time ")
        assert proc.stdout.readline()  # a first row
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_a_closed_pipe_ends_quietly(server):
    # the reader closes before the client writes anything: every write meets a closed pipe
    proc = subprocess.Popen([*CTL, "streams", "--target", server.target], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0 and err == "", err
    # and as a user types it
    shell = subprocess.run(f"set -o pipefail; {' '.join(CTL)} policies --target {server.target} | head -n 1",
                           shell=True, executable="/bin/bash", cwd=REPO, capture_output=True, text=True, timeout=60)
    assert shell.returncode == 0 and shell.stdout.count("\n") == 1 and shell.stderr == "", shell.stderr
