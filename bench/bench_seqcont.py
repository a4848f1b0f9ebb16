"""The paper's circuit search on the paper's prompts: ``prune_nodes(...,
algorithm="seqcont")`` (batched, sharing states and MLP means between trials)
against ``prune_nodes_seqcont_reference`` (one TransformerLens pass over the mean
prompts and one ``run_with_hooks`` over the prompts per trial; the full-model head
means cached, the MLP means recomputed every trial as the paper's code does),
timed in the same run.

Model: random GPT-2 small (GPT-2's weights cannot be downloaded here); data:
``fs.tasks.load_seqcont(TASK, n_per_template=64)`` (192 prompts) and every one of
its 1,536 mean prompts; threshold 0.8. Random weights make the sign of the full
model's logit difference arbitrary: answers and wrong answers are swapped when
it is negative.

Every reference trial costs the same (a full pass over the mean prompts and one
over the prompts, whatever was removed before), so the reference is timed on its
first PREFIX trials, which must decide as the batched search did, and scaled per
trial to the batched search's trial count (+ the final circuit's evaluation).
``extra_info`` has the breakdown: seconds in mean-prompt passes and in trial
passes, for both.

    flock /tmp/fastskip-timing.lock .venv/bin/python -m pytest bench/bench_seqcont.py -s
"""

from __future__ import annotations

import pytest
from conftest import machine

import fastskip as fs
from fastskip import search
from fastskip.reference.timing import synced, timed

TASK = "months"
N_PER_TEMPLATE = 64
THRESHOLD = 0.8
PREFIX = 3  # reference trials timed


def oriented(task: fs.tasks.Task, runner: fs.Runner) -> fs.tasks.Task:
    d = runner.logit_diff(["all"], task.prompts, task.answers, task.wrong_answers,
                          prepend_bos=False)
    if float(d.mean()) > 0:
        return task
    return fs.tasks.Task(task.name, task.prompts, task.wrong_answers, task.answers,
                         task.corrupted, task.mean_prompts)


@pytest.mark.parametrize("batch", [8])
def test_seqcont_search_vs_the_sequential_reference(benchmark, gpt2, batch):
    runner = fs.Runner(gpt2, verbose=False)
    task = oriented(fs.tasks.load_seqcont(TASK, N_PER_TEMPLATE, model=gpt2), runner)
    fast = benchmark.pedantic(synced(search.prune_nodes), args=(runner, task),
                              kwargs=dict(threshold=THRESHOLD, algorithm="seqcont",
                                          batch=batch),
                              rounds=1, iterations=1)
    fast_s = benchmark.stats.stats.min
    ref, ref_s = timed(lambda: search.prune_nodes_seqcont_reference(
        gpt2, task, threshold=THRESHOLD, max_trials=PREFIX))
    assert [(s.candidate, s.removed) for s in ref.trace] == \
        [(s.candidate, s.removed) for s in fast.trace[:PREFIX]]
    evaluated = PREFIX + 1  # the prefix and the final circuit's evaluation
    per_trial = (ref.stats["means_s"] + ref.stats["trials_s"]) / evaluated
    setup = ref_s - ref.stats["means_s"] - ref.stats["trials_s"]
    trials = len(fast.trace)
    ref_scaled = setup + per_trial * (trials + 1)
    st = fast.stats
    info = {
        "task": TASK, "prompts": len(task), "mean_prompts": len(task.mean_prompts),
        "threshold": THRESHOLD, "batch": batch, "trials": trials, "passes": fast.passes,
        "trials_evaluated": st["trials_evaluated"], "runner_calls": st["runner_calls"],
        "kept_heads": len(fast.kept_heads), "kept_mlps": fast.kept_mlps,
        "score_percent": 100 * fast.score,
        "fastskip_s": fast_s, "fastskip_means_s": st["means_s"],
        "fastskip_trials_s": st["trials_s"],
        "fastskip_row_layers": {"means": st["means_row_layers"],
                                "trials": st["trials_row_layers"]},
        "reference_s_scaled": ref_scaled, "reference_s_per_trial": per_trial,
        "reference_means_s_per_trial": ref.stats["means_s"] / evaluated,
        "reference_trials_s_per_trial": ref.stats["trials_s"] / evaluated,
        "reference_setup_s": setup,
        "reference_timing": f"timed on its first {PREFIX} trials (+ the final evaluation), "
                            f"scaled per trial to {trials} + 1",
        "ratio_vs_reference": ref_scaled / fast_s, "machine": machine(),
    }
    benchmark.extra_info.update(info)
    print(f"\nseqcont search, {TASK}, {len(task)} prompts x {len(task.mean_prompts)} mean "
          f"prompts, threshold {THRESHOLD}, batch {batch}: {trials} trials in {fast.passes} "
          f"passes ({st['trials_evaluated']} evaluated, {st['runner_calls']} calls), kept "
          f"{len(fast.kept_heads)} heads and MLPs {fast.kept_mlps}, score "
          f"{100 * fast.score:.2f}%")
    print(f"  fastskip {fast_s:.0f} s: means passes {st['means_s']:.0f} s, trial passes "
          f"{st['trials_s']:.0f} s")
    means, forward = info["reference_means_s_per_trial"], info["reference_trials_s_per_trial"]
    print(f"  reference {per_trial:.1f} s per trial (means {means:.1f} s, trial forward "
          f"{forward:.1f} s) + setup {setup:.0f} s -> {ref_scaled:.0f} s scaled -> "
          f"{ref_scaled / fast_s:.1f}x")
