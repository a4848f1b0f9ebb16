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


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of 2 CPUs shared by the cluster tests; yields its address
    (for a second driver). Ray is the ``cluster`` extra that scripts/setup.sh installs."""
    import logging

    ray = pytest.importorskip("ray", reason="the Ray tests need the cluster extra: "
                                            "pip install 'fastskip[cluster]'")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def one_thread():
    """One torch thread in this process, as each CPU worker has: the condition under
    which a one-process table equals the workers' bit for bit (the fp32 reductions of
    the CPU kernels split their work by thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
