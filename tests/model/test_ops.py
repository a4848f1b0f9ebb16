"""Step operations (``fastskip.model.ops``): the compiled steps compile once.

Dynamo's own counters say how many frames and graphs were compiled: after the first call
of a compiled runner, calls with new plan counts, prompt counts, prompt lengths and asked
positions (and every plan kind, so every flag) compile nothing, never reach the recompile
limit, and ``compile_seconds`` moves only when something compiles.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import fastskip as fs
from fastskip.model.ops import at_least_two, dynamo_graphs
from helpers import ANSWERS, PROMPTS, small_llama, small_model

ATOL = 1e-4


def dynamo_state() -> dict[str, int]:
    limit_hits = sum(n for k, n in counters["unimplemented"].items()
                     if "recompile limit" in k.lower() or "cache_size_limit" in k)
    return {"frames": counters["frames"]["ok"], "graphs": dynamo_graphs(),
            "limit_hits": limit_hits}


def test_at_least_two_repeats_a_single_entry_only():
    one = torch.arange(3.0)[None]
    assert torch.equal(at_least_two(one), torch.cat([one, one]))
    two = torch.zeros(2, 3)
    assert at_least_two(two) is two
    assert at_least_two(one.T, 1).shape == (3, 2)


@pytest.mark.slow
@pytest.mark.parametrize("make", [small_model, small_llama], ids=["gpt2", "llama"])
def test_compiled_steps_compile_once(make):
    torch.set_grad_enabled(False)
    model = make(seed=3)
    runner = fs.Runner(model, compile=True, verbose=False)
    eager = fs.Runner(model, verbose=False)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    every_kind = fs.grid.random_plans(24, L, H, seed=1)  # blocks, heads, /noln, ...
    tokens = model.to_tokens(PROMPTS[:3])
    start = dynamo_state()
    first = runner.logits(every_kind, tokens)
    after_first = dynamo_state()
    # at most one graph per step function (MLP, attention z, attention output), whatever
    # the flags (fewer when an earlier runner of the same shapes compiled one already)
    assert 1 <= runner.ops.graphs_compiled == after_first["graphs"] - start["graphs"] <= 3
    assert runner.compile_seconds > 0
    seconds = runner.compile_seconds
    torch.testing.assert_close(first, eager.logits(every_kind, tokens), atol=ATOL, rtol=0)

    # new plan counts, prompt counts, lengths and asked positions: nothing compiles
    short = model.to_tokens(PROMPTS[4:5])[:, :3]  # one prompt of 3 tokens
    plans = every_kind.take(np.arange(5))
    second = runner.logits(plans, short, last_only=True)
    torch.testing.assert_close(second, eager.logits(plans, short, last_only=True),
                               atol=ATOL, rtol=0)
    res = runner.run(fs.grid.random_plans(40, L, H, seed=2), PROMPTS[1:5], ANSWERS[1:5])
    ref = eager.run(fs.grid.random_plans(40, L, H, seed=2), PROMPTS[1:5], ANSWERS[1:5])
    torch.testing.assert_close(res.logit, ref.logit, atol=ATOL, rtol=0, equal_nan=True)
    one = runner.logits(["all"], tokens[:1, :1])  # one state, one prompt, one position
    torch.testing.assert_close(one, eager.logits(["all"], tokens[:1, :1]), atol=ATOL, rtol=0)
    assert dynamo_state() == after_first
    assert runner.compile_seconds == seconds
    assert runner.ops.graphs_compiled == after_first["graphs"] - start["graphs"]
    assert fs.check(runner, every_kind.take(np.arange(8)), tokens, atol=ATOL) <= ATOL


@pytest.mark.slow
def test_compile_seconds_counts_every_compile():
    """A recompile (here: Dynamo's caches dropped) is counted like the first compile."""
    torch.set_grad_enabled(False)
    torch._dynamo.reset()  # no graph of an earlier test serves this runner
    model = small_model(seed=6)
    runner = fs.Runner(model, compile=True, verbose=False)
    tokens = model.to_tokens(PROMPTS[:2])
    runner.logits(["all"], tokens)
    first, graphs = runner.compile_seconds, runner.ops.graphs_compiled
    assert first > 0 and graphs == 3
    torch._dynamo.reset()
    runner.logits(["all"], tokens)
    assert runner.compile_seconds > first and runner.ops.graphs_compiled == 2 * graphs
