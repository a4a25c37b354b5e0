"""runtime/console.py: the progress bar's output off a terminal, its silencing, and the tables."""
import io
import re

import pytest

from runtime.console import Progress, table


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_off_a_terminal_writes_about_one_plain_line_per_10_percent(monkeypatch):
    monkeypatch.delenv("TTA_NO_PROGRESS", raising=False)
    out = io.StringIO()
    bar = Progress(total=200, desc="work", file=out)
    for i in range(200):
        bar.set_postfix(loss=i / 1000)
        bar.update()
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert 10 <= len(lines) <= 12  # 0 %, then one a tenth: not one per update
    assert all(line.startswith("work: ") for line in lines)
    assert lines[-1].startswith("work: 100%") and "200/200" in lines[-1] and "loss=0.199" in lines[-1]
    counts = [int(re.search(r"\| (\d+)/200 ", line).group(1)) for line in lines]
    assert counts == sorted(set(counts))  # each line a new count: close() does not repeat the last one


def test_progress_wraps_an_iterable_and_counts_big_updates(monkeypatch):
    monkeypatch.delenv("TTA_NO_PROGRESS", raising=False)
    out = io.StringIO()
    assert list(Progress(range(5), desc="it", file=out)) == [0, 1, 2, 3, 4]
    assert out.getvalue().splitlines()[-1].startswith("it: 100%")
    out = io.StringIO()
    bar = Progress(total=256, file=out)  # the demo: batches of 64, a line for each
    for _ in range(4):
        bar.update(64)
    bar.close()
    assert re.findall(r"\| (\d+)/256 ", out.getvalue()) == ["0", "64", "128", "192", "256"]


def test_progress_on_a_terminal_redraws_one_line(monkeypatch):
    monkeypatch.delenv("TTA_NO_PROGRESS", raising=False)
    out = _Terminal()
    with Progress(total=3, desc="tty", file=out) as bar:
        bar.update(3)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.count("\r") >= 2 and "3/3" in text


@pytest.mark.parametrize("how", ["flag", "env"])
def test_progress_disabled_writes_nothing(monkeypatch, how):
    monkeypatch.setenv("TTA_NO_PROGRESS", "1" if how == "env" else "0")
    out = io.StringIO()
    bar = Progress(total=10, desc="quiet", file=out, disable=how == "flag")
    for _ in range(10):
        bar.set_postfix(x=1)
        bar.update()
    bar.close()
    assert list(Progress(range(3), file=out, disable=how == "flag")) == [0, 1, 2]
    assert out.getvalue() == ""


def test_table_plain_ruled_and_markdown():
    header, rows = ["name", "x", "long header"], [["a", "1.0", "2"], ["bbbb", "10.25", "-"]]
    assert table(header, rows).splitlines() == [
        "name      x  long header",
        "a       1.0            2",
        "bbbb  10.25            -"]
    assert table(header, rows, rule=True).splitlines()[1] == "----  -----  -----------"
    assert table(header, rows, markdown=True).splitlines() == [
        "| name |     x | long header |",
        "|------|------:|------------:|",
        "| a    |   1.0 |           2 |",
        "| bbbb | 10.25 |           - |"]
