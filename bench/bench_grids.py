"""The speed suite of the issue: three plan sets on the random GPT-2-small model
and the notebook's 6 prompts, each timed against (1) one TransformerLens
``run_with_hooks`` per plan (how users do it today; timed on a sample, scaled
per plan), (2) one TransformerLens forward over all plans with mask-multiplying
hooks (the best a TL user can do; timed on a sample) and (3) fastskip's naive
one-pass masked batch (no sharing). Ratios are per plan, measured in one run.

    .venv/bin/python -m pytest bench/bench_grids.py -s --benchmark-json=bench/results/grids.json
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from baselines import tl_masked_batch
from conftest import ANSWERS, PROMPTS, best_of, hook_loop_per_plan, machine

import fastskip as fs
from fastskip.execute import work_flops
from fastskip.schedule import step_keys


def plan_sets() -> dict[str, fs.PlanSet]:
    return {
        "a_block_grid_4096": fs.PlanSet.from_plans(fs.grid.block_subsets(12), 12, 12),
        "b_leave_one_out_156": fs.grid.leave_one_out(12, 12, units=("head", "mlp")),
        "c_random_mixed_1024": fs.grid.random_plans(1024, 12, 12, seed=0, p_keep=0.7),
    }


def sample(plans: fs.PlanSet, k: int) -> fs.PlanSet:
    return plans.take(np.unique(np.linspace(0, len(plans) - 1, k).round().astype(int)))


@pytest.mark.parametrize("name", list(plan_sets()))
def test_grid(benchmark, gpt2, tokens, name):
    plans = plan_sets()[name]
    runner = fs.Runner(gpt2, verbose=False)
    runner.run(sample(plans, 4), PROMPTS, ANSWERS)  # warm-up
    benchmark.pedantic(runner.run, args=(plans, PROMPTS, ANSWERS),
                       kwargs={"top_k": 10, "progress": False}, rounds=1, iterations=1)
    fast = benchmark.stats.stats.min / len(plans)
    naive_sample = sample(plans, min(len(plans), 128))
    masked = fs.Runner(gpt2, strategy="masked", verbose=False)
    naive = best_of(lambda: masked.run(naive_sample, PROMPTS, ANSWERS, progress=False), 1)
    naive /= len(naive_sample)
    tl_sample = sample(plans, 64)
    tl_batch = best_of(lambda: tl_masked_batch(gpt2, tl_sample, tokens), 1) / len(tl_sample)
    hooks = hook_loop_per_plan(gpt2, runner.plan_set(plans), tokens)
    work = work_flops(step_keys(plans).keys, runner.weights, len(PROMPTS), tokens.shape[1], 1)
    info = {
        "plans": len(plans), "prompts": len(PROMPTS), "tokens": tokens.shape[1],
        "ms_per_plan": {"fastskip": fast * 1e3, "naive_masked_batch": naive * 1e3,
                        "tl_masked_batch": tl_batch * 1e3, "run_with_hooks": hooks * 1e3},
        "ratio_vs_run_with_hooks": hooks / fast, "ratio_vs_tl_masked_batch": tl_batch / fast,
        "ratio_vs_naive_masked_batch": naive / fast,
        "gflop_tree": work["tree"] / 1e9, "gflop_naive": work["naive"] / 1e9,
        "achieved_gflops": work["tree"] / (fast * len(plans)) / 1e9,
        "dtype": "float32", "machine": machine(),
    }
    benchmark.extra_info.update(info)
    print(f"\n{name}: fastskip {fast * 1e3:.2f} ms/plan | run_with_hooks {hooks / fast:.0f}x | "
          f"TL masked batch {tl_batch / fast:.1f}x | naive masked batch {naive / fast:.1f}x | "
          f"{info['achieved_gflops']:.0f} GFLOP/s on {work['tree'] / 1e9:.0f} GFLOP "
          f"(naive {work['naive'] / 1e9:.0f})")


@pytest.mark.parametrize("exact", [True, False], ids=["exact_ranks", "raw"])
def test_grid_a_bf16(benchmark, gpt2, tokens, exact):
    plans = plan_sets()["a_block_grid_4096"]
    runner = fs.Runner(gpt2, dtype=torch.bfloat16, exact_ranks=exact, verbose=False)
    runner.run(sample(plans, 4), PROMPTS, ANSWERS)
    start = time.perf_counter()
    res = benchmark.pedantic(runner.run, args=(plans, PROMPTS, ANSWERS),
                             kwargs={"progress": False}, rounds=1, iterations=1)
    fast = (time.perf_counter() - start) / len(plans)
    ref = fs.Runner(gpt2, verbose=False).run(plans, PROMPTS, ANSWERS, progress=False)
    hooks = hook_loop_per_plan(gpt2, runner.plan_set(plans), tokens)
    mismatches = int((res.rank != ref.rank).sum())
    benchmark.extra_info.update({
        "plans": len(plans), "ms_per_plan": fast * 1e3, "ratio_vs_run_with_hooks": hooks / fast,
        "rank_mismatches_vs_fp32": mismatches,
        "max_logit_error_vs_fp32": float((res.logit - ref.logit).abs().max()),
        **{k: v for k, v in res.info.items() if k != "ambiguous"}, "machine": machine(),
    })
    print(f"\nbf16 {'exact ranks' if exact else 'raw'}: {fast * 1e3:.2f} ms/plan, "
          f"{hooks / fast:.0f}x vs run_with_hooks, rank mismatches vs fp32: {mismatches}, "
          f"recomputed plans: {res.info.get('recomputed_plans', '-')}")
