"""The speed machinery: prefix sharing counts, asked-positions-only work, the
Triton kernel path and the compiled path through the Runner (against the
TransformerLens reference), memory budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastskip as fs
from fastskip.inputs import make_batch
from fastskip.run.answer_metrics import ranks_agree_up_to_ties
from fastskip.run.tree import arena_sizes, build_tree, naive_evaluations, step_keys
from helpers import PROMPTS, kernel_runner, small_model

ATOL = 1e-4


def test_block_grid_needs_4095_block_evaluations():
    keys = step_keys(fs.PlanSet.from_plans(fs.grid.block_subsets(12), 12, 12))
    tree = build_tree(keys.keys)
    evals = tree.evaluations()
    assert evals[0::2].sum() == 4095 and evals[1::2].sum() == 4095  # attention, MLP
    assert naive_evaluations(keys.keys) == 2 * 12 * 2**11  # 24,576 of each: 49,152 blocks x 2
    # the last attention step is layer 11's; after it only the asked positions are kept
    assert tree.last_attention_step() == 22


def test_head_subsets_share_one_z_per_parent():
    plans = fs.PlanSet.from_plans(fs.grid.leave_one_out(12, 12, units="head"), 12, 12)
    tree = build_tree(step_keys(plans).keys)
    # layer L's attention: the full model's state has 13 children (12 head subsets + all
    # heads, but at layer 11), computed from one z; states that lost a head earlier have
    # one child each
    for layer in range(12):
        step = tree.steps[2 * layer]
        parents, children = np.unique(step.parent[step.key != 0], return_counts=True)
        assert len(parents) == 12 * layer + 1
        assert children.max() == (13 if layer < 11 else 12)  # no plan keeps every head


def test_arena_is_bounded_by_the_tree_width():
    plans = fs.PlanSet.from_plans(fs.grid.block_subsets(8), 8, 12)
    tree = build_tree(step_keys(plans).keys)
    last, full, small = arena_sizes(tree)
    assert last == 14 and full <= 2**7 + 1 and small <= 2**8


@pytest.fixture(scope="module")
def model():
    return small_model(seed=4)


@pytest.fixture(scope="module")
def tokens(model):
    return model.to_tokens(PROMPTS[:3])


def test_kernel_path_through_the_runner_matches_reference(model, tokens):
    """The GPU path's fused MLP kernels (on CPU: in Triton's interpreter)."""
    pytest.importorskip("triton", reason="the kernel path needs triton")
    runner = kernel_runner(model)
    assert runner.ops.kernels
    plans = fs.grid.random_plans(6, 3, 4, seed=1)
    assert fs.check(runner, plans, tokens, atol=ATOL) <= ATOL
    masked = kernel_runner(model, strategy="masked")  # mask scale in the epilogue
    assert fs.check(masked, plans, tokens, atol=ATOL) <= ATOL


@pytest.mark.interpreter
def test_kernels_on_cpu_tensors_run_in_the_interpreter_only(model, tokens, monkeypatch):
    pytest.importorskip("triton", reason="the kernel path needs triton")
    runner = fs.Runner(model, kernels=True, device="cpu")
    assert runner.ops.kernels
    assert fs.check(runner, ["all", "0,2.mlp/noln", "1.attn,2"], tokens, atol=ATOL) <= ATOL
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fs.FastskipError, match="TRITON_INTERPRET"):
        fs.Runner(model, kernels=True, device="cpu")


def test_kernels_refuse_models_they_do_not_cover():
    ln_model = small_model(seed=1, normalization_type="LN")
    with pytest.raises(fs.FastskipError, match="fused kernels cover weightless LayerNormPre"):
        fs.Runner(ln_model, kernels=True)
    assert not fs.Runner(ln_model).ops.kernels  # default on CPU: off


@pytest.mark.slow
def test_compiled_path_matches_reference_and_does_not_recompile(model, tokens):
    torch._dynamo.reset()  # graphs an earlier test compiled for these shapes would serve here
    runner = fs.Runner(model, compile=True, verbose=False)
    plans = fs.grid.random_plans(12, 3, 4, seed=3)
    assert fs.check(runner, plans, tokens, atol=ATOL) <= ATOL
    first = runner.compile_seconds
    assert first > 0
    # Fixed (issue 12, item 9): this compared compile_seconds, which only grows for new
    # keys, so it could not fail. Count what Dynamo actually compiles instead.
    from torch._dynamo.utils import counters

    compiled = counters["stats"]["unique_graphs"]
    runner.logits(plans, tokens)
    runner.logits(plans.take(np.arange(5)), tokens)  # other plan counts: dynamic shapes
    assert counters["stats"]["unique_graphs"] == compiled, "a second call compiled new graphs"
    assert runner.compile_seconds == first


def test_budget_chunks_give_identical_results(model, tokens):
    plans = fs.grid.random_plans(80, 3, 4, seed=9)
    prompts, answers = PROMPTS[:3], [" 5", " May", " five"]
    runner = fs.Runner(model)
    big = runner.run(plans, prompts, answers)
    small = fs.Runner(model, max_memory="2MB").run(plans, prompts, answers)
    assert (big.logit - small.logit).abs().max() <= 1e-5
    # ranks are equal, except where another logit within that round-off of the answer's
    # explains the difference (a different batch split rounds the matmuls differently)
    batch = make_batch(model, prompts, answers)
    logits = runner.asked_logits(runner.plan_set(plans), batch)
    assert ranks_agree_up_to_ties(big.rank, small.rank, logits, batch.answer_ids, 1e-5)


def test_bf16_mode_reports_fp32_ranks():
    """bf16 everywhere, then fp32 for every plan whose rank bf16 leaves ambiguous (and
    for the sampled plans the error is measured on); the plans left in bf16 are within
    their own bound (``fastskip.run.precision``)."""
    model = small_model(seed=5)
    with torch.no_grad():  # a peaked next-token distribution, like a trained model's
        model.unembed.W_U.mul_(30)
    prompts = PROMPTS[:4]
    full = fs.Runner(model).logits(["all"], model.to_tokens(prompts), last_only=True)[0]
    answers = [model.to_string(int(t)) for t in full.argmax(-1)]  # the full model's top-1
    plans = fs.grid.concat(fs.PlanSet.from_plans(["all"] + ["all,-2.3", "all,-1.0"] * 6, 3, 4),
                           fs.grid.random_plans(30, 3, 4, seed=2))
    exact = fs.Runner(model).run(plans, prompts, answers)
    low = fs.Runner(model, dtype=torch.bfloat16).run(plans, prompts, answers)
    assert torch.equal(low.rank, exact.rank)
    info = low.info
    assert info["guarantee"] == "empirical"
    assert 0 < info["recomputed_plans"] < len(plans)  # some plans were unambiguous in bf16
    assert 0 < info["measured_error"] < info["error_bound"]
    kept = info["plan_error_bound"] > 0
    err = (low.logit - exact.logit).abs().flatten(1).amax(1).double()
    assert int(kept.sum()) == len(plans) - info["recomputed_plans"]
    assert (err[kept] <= info["plan_error_bound"][kept]).all()
    assert (err[~kept] <= 1e-5).all()  # recomputed in fp32
    raw = fs.Runner(model, dtype=torch.bfloat16, exact_ranks=False).run(plans, prompts, answers)
    assert "error_bound" not in raw.info
