"""Shared setup of the benchmark suite: the random GPT-2-small model, the
notebook's 6 prompts, and helpers that time the TransformerLens way in the
same run, so every figure is a ratio measured on one machine at one time."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():  # see tests/conftest.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastskip as fs  # noqa: E402
from fastskip import notebook  # noqa: E402
from fastskip.reference import plan_hooks  # noqa: E402

PROMPTS = [p for p, _ in notebook.PROMPTS]
ANSWERS = [a for _, a in notebook.PROMPTS]


def machine() -> dict[str, object]:
    info: dict[str, object] = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Minimum wall time of ``repeat`` calls (seconds)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def hook_loop_per_plan(model, plans: fs.PlanSet, tokens: torch.Tensor, sample: int = 8) -> float:
    """Seconds per plan of the way users do it today: one run_with_hooks per plan
    (timed on ``sample`` plans spread over the set, best of 2 rounds)."""
    step = max(1, len(plans) // sample)
    chosen = [plans[i] for i in range(0, len(plans), step)][:sample]
    model.run_with_hooks(tokens, fwd_hooks=plan_hooks(chosen[0]))  # warm-up

    def loop() -> None:
        for plan in chosen:
            model.run_with_hooks(tokens, fwd_hooks=plan_hooks(plan))
    return best_of(loop, 2) / len(chosen)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


@pytest.fixture(scope="session")
def gpt2():
    torch.set_grad_enabled(False)
    return fs.load_model("gpt2-small-random")


@pytest.fixture(scope="session")
def tokens(gpt2):
    return gpt2.to_tokens(PROMPTS)
