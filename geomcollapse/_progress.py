"""One progress-bar factory for the library's long loops."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Any = None, *, total: int | None = None, desc: str, enabled: bool):
    """A tqdm bar when ``enabled`` and stderr is a terminal; otherwise a silent one.

    Redrawn at most once a second, so logs of non-interactive runs stay short.
    """
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        disable=None if enabled else True,
        leave=False,
        mininterval=1.0,
    )
