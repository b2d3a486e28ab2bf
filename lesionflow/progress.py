"""Progress bars that suit both a terminal and a pipeline log.

In a terminal tqdm redraws one line; in a KFP (or kfp.local) log every redraw becomes a new line,
so off a terminal the bar refreshes at most every 15 s: long steps still show they are moving.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, leave=not interactive,
                mininterval=0.1 if interactive else 15, file=sys.stderr)
