"""The speed suite of the issue: four plan sets on the random GPT-2-small model
and the notebook's 6 prompts, fastskip in fp32 and in ``precision="mixed"`` timed
on every plan against the peers on samples of plans (per plan): one TransformerLens
``run_with_hooks`` per plan, one TransformerLens forward over all plans with
mask-multiplying hooks, nnsight 0.8.1 over the equivalent Hugging Face GPT-2 (one
invoke per plan; one batch with per-row masks), auto-circuit 1.0.1's batched node
masks (``peers.py``), and fastskip's naive one-pass masked batch (no sharing).
Ratios are per plan, measured in one run; where the time goes for (a) and (b).

    .venv/bin/python -m pytest bench/bench_grids.py -s --benchmark-json=bench/results/grids.json
"""

from __future__ import annotations

import pytest
import torch
from conftest import ANSWERS, PROMPTS, machine
from measure import sample, time_plan_set
from peers import peers

import fastskip as fs
from fastskip.inputs import make_batch
from fastskip.reference.timing import hook_loop_per_plan, synced, timed
from fastskip.run.answer_metrics import ranks_agree_up_to_ties


def plan_sets() -> dict[str, fs.PlanSet]:
    return {
        "a_block_grid_4096": fs.PlanSet.from_plans(fs.grid.block_subsets(12), 12, 12),
        "b_leave_one_out_156": fs.grid.leave_one_out(12, 12, units=("head", "mlp")),
        "c_random_mixed_1024": fs.grid.random_plans(1024, 12, 12, seed=0, p_keep=0.7),
        "random_blocks_256": fs.grid.random_plans(256, 12, 12, seed=0, kinds=("block",)),
    }


@pytest.fixture(scope="module")
def gpt2_peers(gpt2):
    return peers(gpt2)


@pytest.mark.parametrize("name", list(plan_sets()))
def test_grid(benchmark, gpt2, tokens, gpt2_peers, name):
    time_plan_set(benchmark, gpt2, tokens, plan_sets()[name], PROMPTS, ANSWERS, name,
                  peers=gpt2_peers, parts=name[:2] in ("a_", "b_"))


@pytest.mark.parametrize("exact", [True, False], ids=["exact_ranks", "raw"])
def test_grid_a_bf16(benchmark, gpt2, tokens, exact):
    plans = plan_sets()["a_block_grid_4096"]
    runner = fs.Runner(gpt2, dtype=torch.bfloat16, exact_ranks=exact, verbose=False)
    runner.run(sample(plans, 4), PROMPTS, ANSWERS)
    res, seconds = timed(lambda: benchmark.pedantic(
        synced(runner.run, runner.device), args=(plans, PROMPTS, ANSWERS),
        kwargs={"progress": False}, rounds=1, iterations=1), runner.device)
    fast = seconds / len(plans)
    ref = fs.Runner(gpt2, verbose=False).run(plans, PROMPTS, ANSWERS, progress=False)
    hooks = hook_loop_per_plan(gpt2, runner.plan_set(plans), tokens)
    mismatches = int((res.rank != ref.rank).sum())
    if exact:  # exact ranks: those of the fp32 run, up to exact ties within fp32 round-off
        batch = make_batch(gpt2, PROMPTS, ANSWERS)
        fp32 = fs.Runner(gpt2, verbose=False)
        for a in range(0, len(plans), 512):
            part = runner.plan_set(plans).take(range(a, min(a + 512, len(plans))))
            logits = fp32.asked_logits(part, batch)
            assert ranks_agree_up_to_ties(res.rank[a:a + 512], ref.rank[a:a + 512], logits,
                                          batch.answer_ids, 1e-5), "bf16 exact ranks differ"
    benchmark.extra_info.update({
        "plans": len(plans), "ms_per_plan": fast * 1e3, "ratio_vs_run_with_hooks": hooks / fast,
        "rank_mismatches_vs_fp32": mismatches,
        "max_logit_error_vs_fp32": float((res.logit - ref.logit).abs().max()),
        **{k: v for k, v in res.info.items() if k != "ambiguous"}, "machine": machine(),
    })
    print(f"\nbf16 {'exact ranks' if exact else 'raw'}: {fast * 1e3:.2f} ms/plan, "
          f"{hooks / fast:.0f}x vs run_with_hooks, rank mismatches vs fp32: {mismatches}, "
          f"recomputed plans: {res.info.get('recomputed_plans', '-')}")
