"""The logits workspace: one buffer per call, reused by every batch."""

from __future__ import annotations

import torch

import fastskip as fs
from fastskip.run.workspace import Workspace

BUDGET = 8_000_000  # bytes: a few plans of logits at a time


def test_a_workspace_grows_and_reuses_its_buffer():
    ws = Workspace(torch.float32, torch.device("cpu"))
    a = ws.take(3, 5)
    assert a.shape == (3, 5)
    b = ws.take(2, 5)  # smaller: the same memory
    assert b.data_ptr() == a.data_ptr()
    c = ws.take(4, 5)  # larger: a new buffer
    assert c.shape == (4, 5) and ws.buf is not None and ws.buf.numel() == 20


def test_batches_written_over_one_buffer_give_the_unchunked_metrics(tiny, monkeypatch):
    plans = fs.grid.random_plans(200, tiny.cfg.n_layers, tiny.cfg.n_heads, seed=3)
    prompts, answers = ["1 2 3", "a b c d"], [" 4", " e"]
    whole = fs.Runner(tiny, verbose=False).run(plans, prompts, answers, top_k=3)
    takes = []
    original = Workspace.take
    monkeypatch.setattr(Workspace, "take", lambda self, *shape: takes.append(shape)
                        or original(self, *shape))
    # a budget that holds a few final states at a time: many batches over one buffer
    small = fs.Runner(tiny, verbose=False, max_memory=BUDGET).run(plans, prompts, answers,
                                                                  top_k=3)
    assert len(takes) > 1, "the budget should split the final states into batches"
    assert torch.equal(whole.rank, small.rank)
    assert torch.equal(whole.topk_ids, small.topk_ids)
    assert torch.allclose(whole.logit, small.logit, atol=1e-5, equal_nan=True)
