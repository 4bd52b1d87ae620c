"""Progress for long runs: a tqdm bar on a terminal, plain lines in a log or a pipe.

tqdm redraws its bar with carriage returns, which a log file or a pipe keeps as one garbled line per refresh (and
several bars of one command interleave). When stderr is not a terminal, ``progress_bar`` prints a plain line instead:
at the start, at most every ``LINE_SECONDS``, and at the end. Every long loop in catchtag takes its bar from here.
"""

from __future__ import annotations

import sys
import time

LINE_SECONDS = 30.0


def progress_bar(iterable=None, *, total=None, desc="", unit="it", initial=0, position=None, leave=True,
                 stream=None, disable=False):
    """A progress bar over ``iterable`` (or updated by hand with ``total``): tqdm on a terminal, else _Lines;
    ``disable``: one that shows nothing (tqdm's own no-op)."""
    if disable:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, disable=True)
    stream = stream if stream is not None else sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if _is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, position=position, leave=leave,
                    dynamic_ncols=True, file=stream)
    return _Lines(iterable, total=total, desc=desc, unit=unit, initial=initial, stream=stream)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Lines:
    """tqdm's few methods catchtag uses (iteration, update, set_postfix, close), as plain lines."""

    def __init__(self, iterable, total, desc, unit, initial, stream):
        self.iterable, self.total, self.desc, self.unit, self.stream = iterable, total, desc, unit, stream
        self.n = initial
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False
        self._line("started")

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if now - self.last >= LINE_SECONDS and (self.total is None or self.n < self.total):  # the end: close's line
            self.last = now
            self._line()

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self):
        if not self.closed:
            self.closed = True
            self._line("done")

    def _line(self, note=""):
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        elapsed = time.monotonic() - self.start
        parts = [f"{self.desc or 'progress'}: {count} {self.unit}{pct}, {elapsed:.0f} s"]
        if self.postfix:
            parts.append(self.postfix)
        if note:
            parts.append(note)
        print(" · ".join(parts), file=self.stream, flush=True)
