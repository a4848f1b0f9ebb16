"""Shared setup of the benchmark suite: the random GPT-2-small model, the
notebook's 6 prompts, and helpers that time the TransformerLens way in the
same run, so every figure is a ratio measured on one machine at one time."""

from __future__ import annotations

import os
import platform
import statistics

import pytest
import torch

if not torch.cuda.is_available():  # see tests/conftest.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastskip as fs  # noqa: E402
from fastskip.cli import notebook  # noqa: E402

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


def median(xs: list[float]) -> float:
    return statistics.median(xs)


@pytest.fixture(scope="session")
def gpt2():
    torch.set_grad_enabled(False)
    return fs.load_model("gpt2-small-random")


@pytest.fixture(scope="session")
def tokens(gpt2):
    return gpt2.to_tokens(PROMPTS)
