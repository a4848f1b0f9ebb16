"""Bounded memory: a 2^k-plan component grid under a small ``max_memory`` is cut
into chunks and its peak resident memory stays within the budget plus the
results it returns; work that cannot fit is refused with ``MemoryBudgetError``
before it starts.

Peak RSS is measured with Linux's /proc: writing 5 to /proc/self/clear_refs
resets VmHWM (the high-water mark of the resident set), which is read after the
run and compared with VmRSS before it.

The grid runs in a fresh process: in one that did bigger work before (the rest
of the suite), the allocator reuses freed pages and the increase reads 0.
The GPT-2-small-sized measurement (65,536 plans, max_memory="2GB", minutes) is
``bench/memory_grid.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from strategies import tokenizer

import fastskip as fs
from fastskip.inputs import make_batch
from fastskip.run.answer_metrics import ranks_agree_up_to_ties
from fastskip.run.memory import can_measure_peak, peak_rss
from fastskip.run.tree import arena_sizes, build_tree, step_keys
from helpers import small_model

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)  # helpers.py and strategies.py live there

MiB = 2**20
SLACK = 16 * MiB  # interpreter, allocator fragmentation, small temporaries: fixed, not per plan

pytestmark = pytest.mark.skipif(
    not can_measure_peak(),
    reason="peak RSS is measured through Linux's /proc/self/clear_refs and VmHWM")


def tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def results_bytes(res: fs.Results) -> int:
    """What a run returns, and its twin tables alive when it is built (log-prob tables
    become prob tables by exp)."""
    mine = tensor_bytes(res.rank, res.logit, res.prob, res.topk_ids, res.topk_logits,
                        res.topk_probs, res.answer_ids, res.answer_mask, res.logit_diff, res.kl,
                        *res.info.values())
    return mine + tensor_bytes(res.prob, res.topk_probs)


def schedule_bytes(ps: fs.PlanSet) -> int:
    """Plan masks, step keys and the prefix tree (built once for the whole set and
    again per chunk, with a slot array per step): numpy bookkeeping per plan."""
    keys = step_keys(ps).keys
    tree = build_tree(keys)
    tree_bytes = sum(s.parent.nbytes + s.key.nbytes for s in tree.steps) + tree.final_state.nbytes
    masks = sum(getattr(ps, f).nbytes for f in ("attn", "heads", "mlp", "attn_ln", "mlp_ln"))
    return masks + keys.nbytes + 3 * tree_bytes + 2 * len(ps) * 8


def make_model8():
    """8 layers, d_model 32, the GPT-2 tokenizer and vocabulary (50,257 logits per row)."""
    return small_model(seed=21, tokenizer=tokenizer(), n_layers=8, d_model=32, d_head=8,
                       n_heads=4, d_mlp=128, n_ctx=64)


# two prompts of ~30 tokens: the residual-stream arena, not the unembedding, needs chunking
PROMPTS2 = ["1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28",
            "January February March April May June July August September October November"]
ANSWERS2 = [" 29", " December"]


def measure_grid(n_components: int) -> dict[str, float]:
    """Run a 2^n component grid under a small budget and return the peak RSS
    increase, the allowance and the agreement with unbudgeted runs. Called in a
    fresh process (see the test): in a process that ran bigger work before, the
    allocator reuses freed pages and the increase reads 0."""
    model8 = make_model8()
    comps = [f"{L}.{part}" for L in range(8) for part in ("attn", "mlp")][:n_components]
    plans = fs.grid.component_subsets(comps, 8, 4)
    budget = 8 * MiB if n_components == 10 else 24 * MiB
    runner = fs.Runner(model8, max_memory=budget, verbose=False)
    ps = runner.plan_set(plans)
    # the budget forces chunks: the whole tree's arena would not fit
    T = max(model8.to_tokens(p + a).shape[1] - 1 for p, a in zip(PROMPTS2, ANSWERS2, strict=True))
    _, full, small = arena_sizes(build_tree(step_keys(ps).keys))
    arena = (full * T + small) * len(PROMPTS2) * 32 * 4
    runner.run(ps.take(range(8)), PROMPTS2, ANSWERS2, top_k=5)  # warm up lazy imports
    with peak_rss() as mem:
        res = runner.run(ps, PROMPTS2, ANSWERS2, top_k=5, progress=False)
    # chunking changed nothing: a sample of plans run alone, without a budget
    idx = np.random.default_rng(0).choice(len(ps), 24, replace=False)
    unbudgeted = fs.Runner(model8, verbose=False)
    alone = unbudgeted.run(ps.take(idx), PROMPTS2, ANSWERS2, top_k=5)
    batch = make_batch(model8, PROMPTS2, ANSWERS2)
    logits = unbudgeted.asked_logits(ps.take(idx), batch)
    return dict(plans=len(ps), budget=budget, increase=mem["increase"], arena=arena,
                results=results_bytes(res), schedule=schedule_bytes(ps),
                all_ranked=bool((res.rank >= 0).all()), shape_ok=res.rank.shape == (len(ps), 2, 1),
                logit_diff=float((alone.logit - res.logit[idx]).abs().max()),
                ranks_agree=ranks_agree_up_to_ties(alone.rank, res.rank[idx], logits,
                                                   batch.answer_ids, 1e-5))


@pytest.mark.parametrize("n_components", [
    10, pytest.param(16, marks=pytest.mark.slow)], ids=["1024-plans", "65536-plans"])
def test_component_grid_stays_within_the_memory_budget(n_components):
    code = (f"import json, sys; sys.path[:0] = [{HERE!r}, {TESTS!r}]; import test_memory; "
            f"print(json.dumps(test_memory.measure_grid({n_components})))")
    # eager vocabulary metrics, whose temporaries the budget counts: past 4,096 rows a
    # process compiles them, and the compiler and the compiled kernels' workspace (not
    # counted by the budget) raised the peak by 20-30 MiB here
    env = {**os.environ, "FASTSKIP_COMPILE_METRICS": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    allowance = m["results"] + m["schedule"] + SLACK
    print(f"\n{m['plans']} plans: peak RSS +{m['increase'] / MiB:.1f} MiB; budget "
          f"{m['budget'] / MiB:.0f} MiB + allowance {allowance / MiB:.1f} MiB (results "
          f"{m['results'] / MiB:.1f}, schedule {m['schedule'] / MiB:.1f}, slack "
          f"{SLACK / MiB:.0f}); whole-tree arena {m['arena'] / MiB:.1f} MiB")
    assert m["plans"] == 2**n_components
    assert m["arena"] > m["budget"] // 2, "the budget must force the plans into several chunks"
    assert m["increase"] > 0, "the measurement saw nothing: RSS did not grow during the run"
    assert m["increase"] <= m["budget"] + allowance
    assert m["shape_ok"] and m["all_ranked"]
    assert m["logit_diff"] <= 1e-5
    assert m["ranks_agree"]  # equal, except where a near-tie within 1e-5 explains a difference


def test_budget_too_small_for_one_unembedding_row_is_not_silently_exceeded():
    """Fixed: the residual-stream arena raises MemoryBudgetError when one plan cannot
    fit, but the unembedding and metric rows are clipped to one state and run
    anyway: 8 prompts x 16 answer tokens x 50,257 logits of one plan take ~25 MiB
    (plus temporaries) against a budget of 4 MiB, and nothing says so."""
    model = small_model(seed=22, tokenizer=tokenizer(), n_layers=1, d_model=32, d_head=16,
                        n_heads=2, d_mlp=64, n_ctx=64)
    answer = " " + " ".join(str(i) for i in range(5, 21))  # 16 tokens
    prompts, answers = ["1 2 3 4"] * 8, [answer] * 8
    budget = 4 * MiB
    runner = fs.Runner(model, max_memory=budget, verbose=False)
    runner.run(["all"], prompts[:1], [" 5"], top_k=0)  # warm up (fits the budget)
    try:
        with peak_rss() as mem:
            res = runner.run(["all", "none"], prompts, answers, top_k=0)
    except fs.MemoryBudgetError as e:
        assert "max_memory" in str(e)
        return
    allowance = results_bytes(res) + SLACK // 4
    assert mem["increase"] <= budget + allowance, (
        f"peak RSS +{mem['increase'] / MiB:.1f} MiB with max_memory {budget / MiB:.0f} MiB "
        "and no MemoryBudgetError")


def test_masked_strategy_refuses_a_budget_below_one_plan(tiny, prompt_tokens):
    """Fixed: the tree strategy raises MemoryBudgetError for max_memory=1000 (see
    test_engine.py); the masked strategy clips its chunk to one plan and runs."""
    with pytest.raises(fs.MemoryBudgetError, match="max_memory"):
        fs.Runner(tiny, strategy="masked", max_memory=1000).logits(["all"], prompt_tokens)


def test_budget_error_comes_before_any_work(tiny):
    """Fixed: plans are split until each chunk fits, lazily: here plan '0.mlp' (no
    attention: asked positions only) fits and is computed, then 'all' raises. A
    sweep can run for a long time before it learns that its budget is too small."""
    tokens = torch.randint(0, 50000, (4, 40), generator=torch.Generator().manual_seed(0))
    state = 4 * 40 * 64 * 4  # one residual stream of the batch
    runner = fs.Runner(tiny, max_memory=2 * state, verbose=False)
    ps = runner.plan_set(["0.mlp", "all"])
    q_pos = torch.full((4, 1), 39)
    with pytest.raises(fs.MemoryBudgetError, match="raise max_memory"):
        next(iter(runner.final_states(ps, tokens, q_pos)))  # the first batch


def test_budget_error_shows_sizes_that_differ(tiny, prompt_tokens):
    """Fixed: 'one plan needs 0 MiB ... but the memory budget allows 0 MiB': sizes
    under 1 MiB round to 0 and the message contradicts itself."""
    with pytest.raises(fs.MemoryBudgetError) as info:
        fs.Runner(tiny, max_memory=1000).logits(["all"], prompt_tokens)
    sizes = re.findall(r"\d+(?:\.\d+)? ?(?:B|KiB|MiB|GiB)\b", str(info.value))
    assert len(sizes) >= 2 and len(set(sizes)) == len(sizes), str(info.value)
