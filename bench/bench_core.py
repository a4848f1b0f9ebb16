"""The core's speed claim: 64 random block plans x 6 prompts in one
``runner.run`` call against one TransformerLens ``run_with_hooks`` per plan.

    .venv/bin/python -m pytest bench/bench_core.py --benchmark-json=bench/results/core.json
"""

from __future__ import annotations

from conftest import ANSWERS, PROMPTS, machine

import fastskip as fs
from fastskip.reference.timing import hook_loop_per_plan, synced


def test_64_random_block_plans(benchmark, gpt2, tokens):
    runner = fs.Runner(gpt2)
    plans = runner.plan_set(fs.grid.random_plans(64, 12, 12, seed=0, kinds=("block",)))
    runner.run(plans[:2], PROMPTS, ANSWERS)  # warm-up
    benchmark.pedantic(synced(runner.run, runner.device), args=(plans, PROMPTS, ANSWERS),
                       rounds=3, iterations=1)
    fast = benchmark.stats.stats.min / len(plans)
    slow = hook_loop_per_plan(gpt2, plans, tokens)
    benchmark.extra_info.update(
        plans=len(plans), prompts=len(PROMPTS), fastskip_ms_per_plan=fast * 1e3,
        run_with_hooks_ms_per_plan=slow * 1e3, ratio_vs_run_with_hooks=slow / fast,
        machine=machine(),
    )
    print(f"\n64 block plans: fastskip {fast * 1e3:.1f} ms/plan, run_with_hooks "
          f"{slow * 1e3:.1f} ms/plan -> {slow / fast:.1f}x")
