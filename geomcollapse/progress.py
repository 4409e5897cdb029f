"""One progress-bar factory for the library's long loops.

On a terminal: a tqdm bar. Elsewhere (a log file, CI): one line when a stage
starts, one at most every ``_StageLines.interval`` seconds while it runs (steps
done, of how many, and seconds so far) and one when it ends, with its count and
wall time, so a long run that is not watched still says where it is. Disabled:
silent.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm


class _StageLines:
    """tqdm's interface (update, set_postfix, close, iteration) as printed lines."""

    interval = 60.0  # seconds between two lines of a running stage

    def __init__(self, iterable: Any, total: int | None, desc: str):
        self.iterable, self.total, self.desc = iterable, total, desc
        self.n, self.postfix, self.closed = 0, "", False
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)
        self.start = self.last = time.perf_counter()
        print(
            f"[{desc}] started" + (f" ({self.total} steps)" if self.total else ""),
            file=sys.stderr,
            flush=True,
        )

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            print(
                f"[{self.desc}] {self.n}{of} steps, {now - self.start:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        extra = f", {self.postfix}" if self.postfix else ""
        seconds = time.perf_counter() - self.start
        print(f"[{self.desc}] done: {self.n} steps in {seconds:.1f} s{extra}", file=sys.stderr)
        sys.stderr.flush()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(iterable: Any = None, *, total: int | None = None, desc: str, enabled: bool):
    """A tqdm bar when ``enabled`` and stderr is a terminal; start/end lines when not a
    terminal; silent when not ``enabled``.

    The bar is redrawn at most once a second, so logs stay short.
    """
    if enabled and not sys.stderr.isatty():
        return _StageLines(iterable, total, desc)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        disable=not enabled,
        leave=False,
        mininterval=1.0,
    )
