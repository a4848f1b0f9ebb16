"""One measurement of the speed suite: a plan set timed with fastskip against
the TransformerLens ways (one run_with_hooks per plan; one forward over all plans
with mask-multiplying hooks) and fastskip's naive masked batch, in one run."""

from __future__ import annotations

import numpy as np
from baselines import tl_masked_batch
from conftest import machine

import fastskip as fs
from fastskip.reference.timing import best_of, hook_loop_per_plan, synced
from fastskip.run.flops import work_flops
from fastskip.run.tree import step_keys


def sample(plans: fs.PlanSet, k: int) -> fs.PlanSet:
    """``k`` plans spread evenly over the set."""
    return plans.take(np.unique(np.linspace(0, len(plans) - 1, k).round().astype(int)))


def time_plan_set(benchmark, model, tokens, plans: fs.PlanSet, prompts: list[str],
                  answers: list[str], label: str) -> dict:
    """Time ``runner.run`` on all plans (the benchmark itself) and the baselines
    on samples; store per-plan times, ratios and GFLOP/s in ``extra_info``."""
    runner = fs.Runner(model, verbose=False)
    plans = runner.plan_set(plans)
    runner.run(sample(plans, 4), prompts, answers)  # warm-up
    benchmark.pedantic(synced(runner.run, runner.device), args=(plans, prompts, answers),
                       kwargs={"top_k": 10, "progress": False}, rounds=1, iterations=1)
    fast = benchmark.stats.stats.min / len(plans)
    naive_sample = sample(plans, min(len(plans), 128))
    masked = fs.Runner(model, strategy="masked", verbose=False)
    naive = best_of(lambda: masked.run(naive_sample, prompts, answers, progress=False), 1,
                    masked.device)
    naive /= len(naive_sample)
    tl_sample = sample(plans, 32)
    tl_batch = best_of(lambda: tl_masked_batch(model, tl_sample, tokens), 1,
                       tokens.device) / len(tl_sample)
    hooks = hook_loop_per_plan(model, plans, tokens)
    work = work_flops(step_keys(plans).keys, runner.weights, len(prompts), tokens.shape[1], 1)
    info = {
        "plans": len(plans), "prompts": len(prompts), "tokens": int(tokens.shape[1]),
        "model": runner.model_name,
        "ms_per_plan": {"fastskip": fast * 1e3, "naive_masked_batch": naive * 1e3,
                        "tl_masked_batch": tl_batch * 1e3, "run_with_hooks": hooks * 1e3},
        "ratio_vs_run_with_hooks": hooks / fast, "ratio_vs_tl_masked_batch": tl_batch / fast,
        "ratio_vs_naive_masked_batch": naive / fast,
        "gflop_tree": work["tree"] / 1e9, "gflop_naive": work["naive"] / 1e9,
        "achieved_gflops": work["tree"] / (fast * len(plans)) / 1e9,
        "dtype": "float32", "machine": machine(),
    }
    benchmark.extra_info.update(info)
    print(f"\n{label}: fastskip {fast * 1e3:.2f} ms/plan | vs run_with_hooks {hooks / fast:.0f}x"
          f" | vs TL masked batch {tl_batch / fast:.1f}x | vs naive masked batch "
          f"{naive / fast:.1f}x | {info['achieved_gflops']:.0f} GFLOP/s on "
          f"{work['tree'] / 1e9:.0f} GFLOP (naive {work['naive'] / 1e9:.0f})")
    return info
