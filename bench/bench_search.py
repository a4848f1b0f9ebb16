"""The circuit search of Lan & Barez (iterative node pruning) on the random
GPT-2 small and the notebook's 6 prompts: ``fs.search.prune_nodes`` (speculative
batches through ``runner.run``) against ``prune_nodes_sequential`` (one
TransformerLens ``run_with_hooks`` per candidate), timed in the same run.

The sequential walk is timed on a prefix of its candidates (every candidate
costs one full forward, whatever was removed before) and scaled per candidate
to the whole walk; ``extra_info`` says so. Decisions on the prefix must agree.

    .venv/bin/python -m pytest bench/bench_search.py -s
"""

from __future__ import annotations

import pytest
from conftest import ANSWERS, PROMPTS, machine

import fastskip as fs
from fastskip.reference.timing import synced, timed
from fastskip.search import prune_nodes, prune_nodes_sequential

WRONG = [" 4", " April", " four", " Wednesday", " D", " 8"]  # the last member, repeated
THRESHOLD = 0.8
PREFIX = 20  # sequential candidates timed


def oriented(runner: fs.Runner) -> dict[str, list[str]]:
    """The notebook's prompts with answers and wrong answers; random weights make
    the sign of the full model's logit difference arbitrary, so they are swapped
    when it is negative (scores are fractions of a positive full score)."""
    res = runner.run(["all"], PROMPTS, ANSWERS, wrong_answers=WRONG, top_k=0)
    if float(res.logit_diff.mean()) > 0:
        return dict(prompts=PROMPTS, answers=ANSWERS, wrong_answers=WRONG)
    return dict(prompts=PROMPTS, answers=WRONG, wrong_answers=ANSWERS)


def sequential_per_candidate(model, inputs: dict[str, list[str]], want: list[bool]) -> float:
    """Seconds per candidate of the sequential walk (its full-model run included),
    on the first PREFIX candidates; checks its decisions against ``want``."""
    seq, seconds = timed(lambda: prune_nodes_sequential(
        model, threshold=THRESHOLD, max_candidates=PREFIX, **inputs), model.cfg.device)
    per = seconds / (len(seq.trace) + 1)
    assert [s.removed for s in seq.trace] == want[:PREFIX]
    return per


@pytest.mark.parametrize("batch", [32])
def test_prune_nodes_vs_sequential_run_with_hooks(benchmark, gpt2, batch):
    runner = fs.Runner(gpt2)
    inputs = oriented(runner)
    result = prune_nodes(runner, threshold=THRESHOLD, batch=batch, **inputs)  # warm-up
    want = [s.removed for s in result.trace]
    per = [sequential_per_candidate(gpt2, inputs, want)]
    benchmark.pedantic(synced(prune_nodes, runner.device), args=(runner,),
                       kwargs=dict(threshold=THRESHOLD, batch=batch, **inputs),
                       rounds=2, iterations=1)
    per.append(sequential_per_candidate(gpt2, inputs, want))
    fast = benchmark.stats.stats.min
    decisions = len(result.trace)
    slow = min(per) * (decisions + 1)
    benchmark.extra_info.update(
        prompts=len(PROMPTS), threshold=THRESHOLD, batch=batch, decisions=decisions,
        removed=len(result.removed), runner_calls=result.stats["runner_calls"],
        plans_evaluated=result.stats["plans_evaluated"], fastskip_s=fast,
        sequential_s_scaled=slow, sequential_s_per_candidate=min(per),
        sequential_timing=f"run_with_hooks walk timed on its first {PREFIX} candidates "
                          f"(+ the full model), best of 2, scaled per candidate to "
                          f"{decisions} + 1", ratio_vs_sequential=slow / fast,
        plan=str(result.plan), machine=machine(),
    )
    print(f"\nprune_nodes (batch {batch}): {decisions} decisions in "
          f"{result.stats['runner_calls']} runner calls, {result.stats['plans_evaluated']} "
          f"plans; fastskip {fast:.1f} s, sequential run_with_hooks {slow:.1f} s (scaled from "
          f"{PREFIX} candidates) -> {slow / fast:.1f}x")
