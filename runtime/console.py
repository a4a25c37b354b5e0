"""Console output of the offline commands (replay, corruption cache, train-demo, demo, bench):
progress bars on stderr (tqdm) and plain-text tables.

    bar = Progress(total=n, desc="corrupt"); bar.set_postfix(loss=0.3); bar.update(k); bar.close()
    for batch in Progress(batches, desc="train"): ...

On a terminal the bar redraws one line (at most ~10 times a second); when stderr is not a
terminal (logs, CI) it prints a plain line about every 10 % instead (one a minute without a
total). `disable=True` or the env TTA_NO_PROGRESS=1 silences it.
"""
from __future__ import annotations

import math
import os
import sys

from tqdm import tqdm


class _Lines:
    """A log file's view of a bar: each redraw as one plain line (no carriage returns), and only
    when the count moved (tqdm redraws the last figures once more on close)."""

    def __init__(self, stream):
        self.stream, self._last = stream, None

    def write(self, text: str) -> None:
        line = text.strip("\r\n").rstrip()
        if line and line.split(" [", 1)[0] != self._last:
            self.stream.write(line + "\n")
            self._last = line.split(" [", 1)[0]

    def flush(self) -> None:
        self.stream.flush()


class Progress(tqdm):
    """tqdm on stderr (or `file`) with the rules above; set_postfix shows at the next redraw."""

    def __init__(self, iterable=None, desc: str = "", total: int | None = None, disable: bool = False,
                 file=None, **kwargs):
        file = sys.stderr if file is None else file
        disable = disable or os.environ.get("TTA_NO_PROGRESS", "") not in ("", "0")
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        if not disable and not (hasattr(file, "isatty") and file.isatty()):
            file = _Lines(file)
            kwargs = {"miniters": max(1, total // 10) if total else 1, "mininterval": 0 if total else 60,
                      "maxinterval": math.inf, **kwargs}  # maxinterval: tqdm's monitor would drop miniters
        super().__init__(iterable, desc=desc, total=total, disable=disable, file=file, **kwargs)

    def set_postfix(self, ordered_dict=None, refresh: bool = False, **kwargs) -> None:
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)


def table(header: list[str], rows: list[list[str]], *, rule: bool = False, markdown: bool = False) -> str:
    """Columns padded to their widest cell, the first left-aligned and the others right-aligned.
    rule: a line of dashes under the header; markdown: `| a | b |` cells and a `|---|--:|`
    alignment row."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    cells = lambda r: [c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
    if markdown:
        line = lambda r: "| " + " | ".join(cells(r)) + " |"
        under = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    else:
        line = lambda r: "  ".join(cells(r))
        under = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), *([under] if rule or markdown else []), *map(line, rows)])
