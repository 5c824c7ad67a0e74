"""The one progress facility of the library.

Library code never prints. It wraps long loops in :func:`track` and reports
stage messages through :func:`info`; both are silent unless the CLI (or a user)
calls :func:`enable`. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_enabled = False


def enable(on: bool = True) -> None:
    """Switch progress bars and stage messages on (the CLI does this) or off."""
    global _enabled
    _enabled = on


def enabled() -> bool:
    """Whether progress is on (a library whose own bars the user's ``--quiet`` must silence asks this)."""
    return _enabled


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate over ``items``, showing a progress bar on stderr when enabled."""
    if not _enabled:
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)


def info(message: str) -> None:
    """A stage message ("loading model", "pass 2/3") on stderr when enabled."""
    if _enabled:
        print(f"[layerif] {message}", file=sys.stderr, flush=True)
