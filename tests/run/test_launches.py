"""The tree walk issues device work only: no tensor is made from host data inside it
but the schedule's one upload (on CUDA each upload from pageable memory waits for the
device, stalling the launch queue) and no device value is read by the host
(``fastskip.run.schedule``). Counted with the torch
profiler, as bench/op_count.py counts a whole grid (a) run."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fastskip as fs
from helpers import PROMPTS

UPLOADS = {"aten::lift_fresh", "aten::tensor"}  # a tensor from numpy arrays or lists
SCHEDULE_UPLOADS = 2  # the schedule's index buffers (ints, head masks): one copy each
SYNCS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero"}


def walk_ops(runner, plans, tokens, sources=None) -> collections.Counter:
    """aten operators issued while the executor produces every final state."""
    ps = runner.plan_set(plans)
    B, T = tokens.shape
    q_pos = torch.arange(T)[None].expand(B, -1).contiguous()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        batches = list(runner.final_states(ps, tokens, q_pos, sources))
    assert batches
    return collections.Counter(ev.name for ev in prof.events())


@pytest.mark.parametrize("plans", ["blocks", "mixed"])
def test_the_walk_uploads_nothing_and_never_waits(tiny, prompt_tokens, plans):
    plan_set = fs.grid.block_subsets(3) if plans == "blocks" else \
        fs.grid.random_plans(40, 3, 4, seed=4)  # heads, /noln, bias-only attention, ...
    ops = walk_ops(fs.Runner(tiny, verbose=False), plan_set, prompt_tokens)
    assert sum(ops[k] for k in UPLOADS) <= SCHEDULE_UPLOADS, {k: ops[k] for k in UPLOADS}
    assert sum(ops[k] for k in SYNCS) == 0, {k: ops[k] for k in SYNCS}


def test_the_walk_uploads_nothing_with_ablation_sources(tiny, prompt_tokens):
    from fastskip.run.sources import sources_for_tokens

    runner = fs.Runner(tiny, verbose=False)
    abl = fs.Ablation.mean(tokens=tiny.to_tokens(PROMPTS[::-1]))
    sources = sources_for_tokens(abl, runner.weights, prompt_tokens)
    ops = walk_ops(runner, fs.grid.random_plans(30, 3, 4, seed=5), prompt_tokens, sources)
    assert sum(ops[k] for k in UPLOADS) <= SCHEDULE_UPLOADS
    assert sum(ops[k] for k in SYNCS) == 0
