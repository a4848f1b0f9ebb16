"""Timing the TransformerLens way against fastskip, in the same run: wall times
that wait for the device (CUDA work is asynchronous), and one ``run_with_hooks``
per plan, as users evaluate plans today. Shared by ``fastskip bench``, the demo
and the pytest-benchmark suite in ``bench/``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch

from ..plans import Plan
from .hooks import plan_hooks

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

T = TypeVar("T")


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued work on a CUDA device (a no-op on CPU)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device | str | None = None) -> tuple[T, float]:
    """``fn()`` and the seconds it took, its device work included."""
    synchronize(device)
    start = time.perf_counter()
    value = fn()
    synchronize(device)
    return value, time.perf_counter() - start


def wall_time(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Seconds one call of ``fn`` takes, its device work included."""
    return timed(fn, device)[1]


def synced(fn: Callable[..., T], device: torch.device | str | None = None) -> Callable[..., T]:
    """``fn`` returning only once its device work is done, for timers that call it
    themselves (pytest-benchmark's ``benchmark.pedantic``); waits for earlier work
    first, so that none of it is counted."""
    synchronize(device)

    def call(*args: object, **kwargs: object) -> T:
        out = fn(*args, **kwargs)
        synchronize(device)
        return out
    return call


def best_of(fn: Callable[[], object], repeat: int = 3,
            device: torch.device | str | None = None) -> float:
    """Minimum wall time of ``repeat`` calls (seconds)."""
    return min(wall_time(fn, device) for _ in range(max(1, repeat)))


def spread(plans: Sequence[Plan], k: int) -> list[Plan]:
    """``k`` plans spread evenly over ``plans``."""
    step = max(1, len(plans) // k)
    return [plans[i] for i in range(0, len(plans), step)][:k]


def hook_loop_per_plan(model: HookedTransformer, plans: Sequence[Plan], tokens: torch.Tensor,
                       sample: int = 8, rounds: int = 2) -> float:
    """Seconds per plan of one ``run_with_hooks`` per plan (the way users do it
    today), on ``sample`` plans spread over the set, best of ``rounds``."""
    chosen = spread(plans, sample)
    device = tokens.device
    model.run_with_hooks(tokens, fwd_hooks=plan_hooks(chosen[0]))  # warm-up

    def loop() -> None:
        for plan in chosen:
            model.run_with_hooks(tokens, fwd_hooks=plan_hooks(plan))
    return best_of(loop, rounds, device) / len(chosen)
