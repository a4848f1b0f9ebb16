"""The benchmark's speed-written edge peer (``bench/baselines.py: EdgeHooks``, one
``run_with_hooks`` per edge plan with stacked sender outputs) computes what the plain
edge reference and fastskip compute, under every ablation type, so that the ratio
``bench/bench_edges.py`` reports compares equal work."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastskip as fs
from fastskip.plans import EdgePlan
from fastskip.reference.edge_hooks import edge_reference_logits, sender_ablations
from helpers import PROMPTS, small_llama, small_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from baselines import EdgeHooks  # noqa: E402


@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
def test_edge_hooks_peer_matches_reference_and_fastskip(arch, kind):
    model = small_model(seed=5) if arch == "gpt2" else small_llama(seed=7)
    tokens = model.to_tokens(PROMPTS[:3])
    gen = torch.Generator().manual_seed(1)
    ablation = {"zero": None,
                "mean": fs.Ablation.mean(tokens=torch.randint(0, 1000, (4, tokens.shape[1]),
                                                              generator=gen)),
                "resample": fs.Ablation.resample(tokens=torch.randint(0, 1000, tuple(tokens.shape),
                                                                      generator=gen))}[kind]
    runner = fs.Runner(model, verbose=False)
    g = runner.edges
    peer = EdgeHooks(model, sender_ablations(model, ablation, tokens), tokens)
    rng = np.random.default_rng(2)
    for density in (0.2, 0.9):
        mask = rng.random(g.n_edges) < density
        got = peer.logits(mask, tokens)
        want = edge_reference_logits(model, EdgePlan.from_mask(mask, g), tokens, ablation)
        fast = runner.logits(EdgePlan.from_mask(mask, g), tokens, ablation=ablation)[0]
        assert (got - want).abs().max() <= 1e-4
        assert (got - fast).abs().max() <= 1e-4
    assert (peer.logits(np.ones(g.n_edges, bool), tokens) - model(tokens)).abs().max() <= 1e-4
