"""A tiny tqdm-like progress bar on stderr (no dependency).

    for batch in progress(batches, desc="train", total=len(batches)):
        ...
    bar = Progress(total=n, desc="corrupt"); bar.update(k); bar.set_postfix(loss=0.3); bar.close()

On a terminal it redraws one line (at most ~10 times a second); when stderr is not a terminal
(logs, CI) it prints a plain line every 10 % so log files stay readable. `disable=True` or the
env TTA_NO_PROGRESS=1 silences it.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, total: int | None = None, desc: str = "", disable: bool = False, stream=None,
                 width: int = 30):
        self.total, self.desc, self.width = total, desc, width
        self.stream = stream if stream is not None else sys.stderr
        self.disable = disable or os.environ.get("TTA_NO_PROGRESS", "") not in ("", "0")
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.n = 0
        self.postfix = ""
        self.start = self._last_draw = time.monotonic()
        self._last_decile = -1
        self._closed = False

    def update(self, k: int = 1) -> None:
        self.n += k
        self._maybe_draw()

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            frac = min(self.n / self.total, 1.0)
            filled = int(frac * self.width)
            eta = (self.total - self.n) / rate if rate > 0 else 0.0
            text = (f"{head}{frac * 100:3.0f}%|{'#' * filled}{' ' * (self.width - filled)}| {self.n}/{self.total} "
                    f"[{_fmt_time(elapsed)}<{_fmt_time(eta)}, {rate:.3g}/s]")
        else:
            text = f"{head}{self.n} [{_fmt_time(elapsed)}, {rate:.3g}/s]"
        return f"{text} {self.postfix}".rstrip()

    def _maybe_draw(self, force: bool = False) -> None:
        if self.disable:
            return
        now = time.monotonic()
        if self.tty:
            if force or now - self._last_draw >= 0.1:
                self.stream.write("\r" + self._line() + "\033[K")
                self.stream.flush()
                self._last_draw = now
        else:  # not a terminal: one line per 10 % (or per minute without a total)
            decile = int(10 * self.n / self.total) if self.total else int((now - self.start) // 60)
            if force or decile > self._last_decile:
                self.stream.write(self._line() + "\n")
                self.stream.flush()
                self._last_decile = decile

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable:
            if self.tty:
                self._maybe_draw(force=True)
                self.stream.write("\n")
            elif self.total is None or self.n < self.total or self._last_decile < 10:
                self._maybe_draw(force=True)
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, disable: bool = False) -> Iterator[T]:
    """Wrap an iterable with a progress bar (like tqdm)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    bar = Progress(total=total, desc=desc, disable=disable)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()
