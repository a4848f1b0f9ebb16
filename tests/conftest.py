"""Shared fixtures: small random models (fast) and the GPT-2-small-shaped random
model (the benchmark model), all with random biases; and what the machine can run.

Triton decides once per process, when it is first imported (importing TransformerLens
imports it), whether kernels run compiled for a GPU or in its CPU interpreter. Without
a GPU the interpreter is the only way they run at all, so it is chosen here, before
anything imports Triton; with a GPU Triton runs compiled (``TRITON_INTERPRET=1`` set by
hand still wins). Tests say what they need and skip, with the reason, where the machine
or the process's mode cannot give it:

* ``@pytest.mark.interpreter``: Triton kernels on CPU tensors (the interpreter);
* ``@pytest.mark.gpu``: a CUDA device (Triton compiled, for tests that launch kernels).

Tests that only want the kernel path use ``helpers.kernel_runner``: on the GPU where
there is one, in the interpreter on CPU otherwise.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import fastskip as fs
from helpers import EAGER_METRICS, PROMPTS, small_model


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


def pytest_collection_modifyitems(config, items):
    """Skip, with the reason, what this machine and process cannot run."""
    from fastskip.kernels._common import interpret_mode

    no_gpu = pytest.mark.skip(reason="needs a CUDA device (the GPU suite: every path on the "
                              "GPU against the TransformerLens reference)")
    compiled = pytest.mark.skip(reason="runs Triton kernels on CPU tensors in Triton's "
                                "interpreter, and this process runs Triton compiled (a GPU "
                                "is present); TRITON_INTERPRET=1 pytest -m interpreter runs it")
    for item in items:
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if item.get_closest_marker("interpreter") and not interpret_mode():
            item.add_marker(compiled)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of 2 CPUs shared by the cluster tests; yields its address
    (for a second driver). Ray is the ``cluster`` extra that scripts/setup.sh installs.

    Its workers compute the vocabulary metrics eagerly (``FASTSKIP_COMPILE_METRICS=0``,
    inherited from the environment Ray starts in): by default a process switches to
    the compiled log-sum-exp after 4,096 rows, whose fp32 sums round differently, so
    a table would depend on how many rows each process had computed before. The
    tests comparing bit for bit keep this process eager as well (``eager_metrics``)."""
    import logging

    ray = pytest.importorskip("ray", reason="the Ray tests need the cluster extra: "
                                            "pip install 'fastskip[cluster]'")
    started = not ray.is_initialized()
    if started:
        with pytest.MonkeyPatch.context() as mp:  # only while Ray starts its processes
            for name, value in EAGER_METRICS.items():
                mp.setenv(name, value)
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture
def eager_metrics(monkeypatch):
    """This process computes the vocabulary metrics eagerly, as the workers of
    ``ray_cluster`` do (see there): the condition for tables equal bit for bit."""
    for name, value in EAGER_METRICS.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def one_thread():
    """One torch thread in this process, as each CPU worker has: the condition under
    which a one-process table equals the workers' bit for bit (the fp32 reductions of
    the CPU kernels split their work by thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
