"""The GPU suite: every path of the Runner with ``device="cuda"`` against the
TransformerLens reference, run on the CPU (fp32, the model the runner was built
from): tree and masked executors, compiled and eager, the Triton kernels and the
plain torch MLP, fp32 and bf16, zero / mean / resample ablation, GPT-2 style and
Llama style blocks, and the default GPU path (compile + kernels) on GPT-2 small.

Marked ``gpu``: skipped, with the reason, without a CUDA device (tests/conftest.py).
``bench/gpu_check.py`` runs it on a GPU machine. Tolerances: fp32 max |logit error|
<= 1e-4 (``fs.check``, with its float64 arbitration); bf16 ranks equal to fp32's
(exact-rank mode), logits within the run's measured error bound.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch

import fastskip as fs
from helpers import ANSWERS, PROMPTS, small_llama, small_model

pytestmark = pytest.mark.gpu
ATOL = 1e-4
MODELS = {"gpt2": lambda: small_model(seed=21), "llama": lambda: small_llama(seed=22)}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    torch.set_grad_enabled(False)
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def tokens(model):
    return model.to_tokens(PROMPTS[:4])


def ablation_of(kind: str, tokens: torch.Tensor) -> fs.Ablation | str:
    g = torch.Generator().manual_seed(5)
    if kind == "mean":
        return fs.Ablation.mean(tokens=torch.randint(0, 50000, (6, tokens.shape[1]), generator=g))
    if kind == "resample":
        return fs.Ablation.resample(tokens=torch.randint(0, 50000, tuple(tokens.shape),
                                                         generator=g))
    return "zero"


@pytest.mark.parametrize("ablation", ["zero", "mean", "resample"])
@pytest.mark.parametrize("kernels", [False, True], ids=["torch-mlp", "triton-mlp"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("strategy", ["tree", "masked"])
def test_every_path_matches_the_reference_on_gpu(model, tokens, strategy, compile, kernels,
                                                 ablation):
    if strategy == "masked" and compile:
        pytest.skip("the masked executor runs no compiled step (its MLP scale is eager)")
    runner = fs.Runner(model, device="cuda", strategy=strategy, compile=compile,
                       kernels=kernels, verbose=False)
    assert runner.device.type == "cuda" and runner.ops.kernels == kernels
    plans = fs.grid.concat(fs.PlanSet.from_plans(["all", "none", "0,2.mlp/noln"], 3, 4),
                           fs.grid.random_plans(13, 3, 4, seed=7))  # every plan kind
    abl = ablation_of(ablation, tokens)
    assert fs.check(runner, plans, tokens, atol=ATOL, ablation=abl) <= ATOL
    res = runner.run(plans, PROMPTS[:4], ANSWERS[:4], ablation=abl if ablation != "zero"
                     else None)
    host = fs.Runner(model, verbose=False).run(plans, PROMPTS[:4], ANSWERS[:4],
                                              ablation=abl if ablation != "zero" else None)
    res = res.cpu()
    torch.testing.assert_close(res.logit, host.logit, atol=ATOL, rtol=0, equal_nan=True)
    near_tie = (res.rank - host.rank).abs() <= 1  # ranks: fp32 near-ties may move by one
    assert near_tie.all()


@pytest.mark.parametrize("kernels", [False, True], ids=["torch-mlp", "triton-mlp"])
def test_bf16_on_gpu_reports_fp32_ranks(model, kernels):
    peaked = copy.deepcopy(model)
    with torch.no_grad():  # a peaked next-token distribution, like a trained model's
        peaked.unembed.W_U.mul_(30)
    prompts = PROMPTS[:4]
    full = fs.Runner(peaked).logits(["all"], peaked.to_tokens(prompts), last_only=True)[0]
    answers = [peaked.to_string(int(t)) for t in full.argmax(-1)]
    plans = fs.grid.random_plans(30, 3, 4, seed=2)
    exact = fs.Runner(peaked).run(plans, prompts, answers)
    low = fs.Runner(peaked, device="cuda", dtype=torch.bfloat16, kernels=kernels,
                    verbose=False).run(plans, prompts, answers).cpu()
    assert torch.equal(low.rank, exact.rank)
    kept = ~low.info["ambiguous"].flatten(1).any(1)
    if kept.any():
        assert (low.logit[kept] - exact.logit[kept]).abs().max() <= low.info["error_bound"]


def test_default_gpu_path_on_gpt2_small():
    """``fs.Runner(model, device="cuda")`` as a user makes it: compiled steps and the
    Triton kernels, on GPT-2 small's shapes, against the reference; compiled once."""
    gpt2 = fs.load_model("gpt2-small-random")
    runner = fs.Runner(gpt2, device="cuda", verbose=False)
    assert runner.compile and runner.ops.kernels
    tokens = gpt2.to_tokens(PROMPTS)
    plans = fs.grid.concat(fs.PlanSet.from_plans(["all", "0-7,9.mlp/noln", "all,-10.7"], 12, 12),
                           fs.grid.random_plans(8, 12, 12, seed=1))
    assert fs.check(runner, plans, tokens, atol=ATOL) <= ATOL
    graphs = runner.ops.graphs_compiled
    runner.run(fs.grid.random_plans(100, 12, 12, seed=2), PROMPTS[:5], ANSWERS[:5])
    runner.logits(plans.take(np.arange(3)), tokens[:2, :4], last_only=True)
    assert runner.ops.graphs_compiled == graphs  # new plan/prompt/position counts: no compile


def test_mixed_precision_on_gpu():
    """The slot for mixed precision (the precision issue): fp32 ranks from a mixed
    precision run on the GPU. Skips until ``fs.Runner(..., precision="mixed")`` exists."""
    if "precision" not in inspect.signature(fs.Runner).parameters:
        pytest.skip('fs.Runner(..., precision="mixed") does not exist yet (precision issue)')
    model = small_model(seed=23)
    plans = fs.grid.random_plans(20, 3, 4, seed=3)
    exact = fs.Runner(model).run(plans, PROMPTS[:4], ANSWERS[:4])
    mixed = fs.Runner(model, device="cuda", precision="mixed",  # type: ignore[call-arg]
                      verbose=False).run(plans, PROMPTS[:4], ANSWERS[:4]).cpu()
    assert ((mixed.rank - exact.rank).abs() <= 1).all()
    bound = mixed.info.get("error_bound", ATOL)
    assert (mixed.logit - exact.logit).abs().max() <= max(bound, ATOL)
