"""Progress bars for long runs: shown on a terminal for large plan sets, never
otherwise (``show=True``/``False`` forces it)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TypeVar

LARGE = 256  # plans from which a bar is shown by default


class HasPlans(Protocol):
    plans: Any  # the plan indices of one batch (their number advances the bar)


T = TypeVar("T", bound=HasPlans)


def progress_wanted(total: int, show: bool | None) -> bool:
    """``show``, or by default: a large set and stderr a terminal."""
    if show is not None:
        return bool(show)
    try:
        return total >= LARGE and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int, show: bool | None, desc: str, unit: str = "plan") -> Any:
    """A tqdm bar when ``progress_wanted``, else None."""
    if not progress_wanted(total, show):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)


def with_progress(batches: Iterable[T], total: int, show: bool | None, desc: str
                  ) -> Iterator[T]:
    """Pass batches through, advancing a bar (plans/s) by each batch's plans."""
    bar = progress_bar(total, show, desc)
    if bar is None:
        yield from batches
        return
    with bar:
        for batch in batches:
            yield batch
            bar.update(len(batch.plans))
