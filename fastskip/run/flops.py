"""FLOP accounting: the matmul work a plan set costs with prefix sharing and
without it (for benchmarks and ``fastskip bench``)."""

from __future__ import annotations

import numpy as np

from ..model import StackedWeights
from .tree import SKIPPED, build_tree, step_name


def work_flops(keys: np.ndarray, w: StackedWeights, n_prompts: int, n_tokens: int,
               n_asked: int) -> dict[str, float]:
    """Matmul FLOPs of a plan set with step keys [P, 2L]: ``tree`` is what the
    executor spends (distinct states only; after the last attention step, asked
    positions only), ``naive`` what the same plans cost without sharing (every
    plan computes its kept components at every position)."""
    tree = build_tree(keys)
    per_tok = w.flops_per_token()
    d, hd, kd = w.d_model, w.n_heads * w.d_head, w.n_kv_heads * w.d_head
    qo, kv = 2 * d * 2 * hd, 2 * d * 2 * kd  # per token: Q and O projections; K and V
    last = tree.last_attention_step()
    B, T, Q = n_prompts, n_tokens, n_asked
    shared = 0.0
    for s, step in enumerate(tree.steps):
        n = len(step.computed)
        positions = T if s < last else Q
        if step.kind == "attn":
            shared += n * B * (T * kv + positions * qo)
        else:
            shared += n * B * positions * per_tok["mlp"]
    P = keys.shape[0]
    finals = len(np.unique(tree.final_state))
    unembed = B * Q * per_tok["unembed"]
    is_attn = np.array([step_name(s)[1] == "attn" for s in range(keys.shape[1])])
    kept = keys != SKIPPED
    kept_attn, kept_mlp = kept[:, is_attn].sum(), kept[:, ~is_attn].sum()
    naive = B * T * (kept_attn * per_tok["attn"] + kept_mlp * per_tok["mlp"]) + P * unembed
    return {"tree": shared + finals * unembed, "naive": float(naive), "plans": float(P)}
