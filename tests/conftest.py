"""Shared fixtures: small random models (fast) and the GPT-2-small-shaped random
model (the benchmark model), all with random biases."""

from __future__ import annotations

import os

import pytest
import torch

# Triton decides at import time whether it interprets kernels, and importing
# TransformerLens imports Triton: without a GPU, kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import fastskip as fs
from helpers import PROMPTS, small_model


@pytest.fixture(scope="session")
def tiny():
    return small_model()


@pytest.fixture(scope="session")
def tiny_runner(tiny):
    return fs.Runner(tiny)


@pytest.fixture(scope="session")
def tiny_ln():
    return small_model(seed=1, normalization_type="LN")


@pytest.fixture(scope="session")
def gpt2_random():
    return fs.load_model("gpt2-small-random")


@pytest.fixture(scope="session")
def gpt2_runner(gpt2_random):
    return fs.Runner(gpt2_random)


@pytest.fixture(scope="session")
def prompt_tokens(tiny):
    return tiny.to_tokens(PROMPTS)
