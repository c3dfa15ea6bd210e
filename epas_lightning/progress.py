"""Progress of long commands on stderr: a bar with an ETA in a terminal, a line every few seconds in a log file."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

LINE_EVERY_S = 10.0
"""Without a terminal: the shortest time between two progress lines."""


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "step") -> Iterator[T]:
    """Yield ``items`` while reporting how far along they are and how long the rest should take."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)
        return
    start = last = time.perf_counter()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.perf_counter()
        if now - last >= LINE_EVERY_S or done == total:
            last = now
            of = f"/{total}" if total else ""
            eta = f", about {(now - start) / done * (total - done):.0f} s left" if total and done < total else ""
            units = unit + ("es" if unit.endswith(("ch", "sh", "s", "x")) else "s")
            print(f"{desc}: {done}{of} {units} in {now - start:.0f} s{eta}", file=sys.stderr, flush=True)
