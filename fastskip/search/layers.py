"""Layer pruning: greedy removal of blocks (or attention/MLP components), and the
exhaustive search over every subset of blocks.

    res = fs.search.prune_layers(runner, task, units="block", threshold=0.8)
    print(res.removed, res.scores, res.plan)
    ex = fs.search.exhaustive(runner, task, threshold=0.8)
    print(ex.smallest, ex.pareto)

Scores are mean logit differences as a fraction of the full model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..plans import Plan, PlanSet, grid
from ..run import Runner
from . import scores
from .common import (
    AblationArg,
    Evaluator,
    TaskArg,
    check_full,
    mask_set,
    resolve_ablation,
    resolve_inputs,
)

UNIT_KINDS = ("block", "component")


@dataclass
class LayerPruneResult:
    """Greedy pruning: the units removed in order, the score after each removal,
    the final plan and every round's candidates (``history``: round, unit,
    score, chosen)."""

    removed: list[str]
    scores: list[float]
    plan: Plan
    score: float
    threshold: float
    full_logit_diff: float
    history: Any  # pandas DataFrame


def _units(n_layers: int, units: str) -> list[tuple[int, str]]:
    if units not in UNIT_KINDS:
        raise InputError(f"units must be one of {UNIT_KINDS}, got '{units}'")
    if units == "block":
        return [(L, "block") for L in range(n_layers)]
    return [(L, part) for L in range(n_layers) for part in ("attn", "mlp")]


def _unit_name(u: tuple[int, str]) -> str:
    return str(u[0]) if u[1] == "block" else f"{u[0]}.{u[1]}"


def _without(attn: np.ndarray, mlp: np.ndarray, u: tuple[int, str]
             ) -> tuple[np.ndarray, np.ndarray]:
    attn, mlp = attn.copy(), mlp.copy()
    if u[1] in ("block", "attn"):
        attn[u[0]] = False
    if u[1] in ("block", "mlp"):
        mlp[u[0]] = False
    return attn, mlp


def _layer_set(attn: np.ndarray, mlp: np.ndarray, n_heads: int) -> PlanSet:
    """Plans keeping attention ``attn`` [P, L] (all heads) and MLPs ``mlp`` [P, L]."""
    return mask_set(np.repeat(attn[:, :, None], n_heads, axis=2), mlp, attn)


def prune_layers(runner: Runner, task: TaskArg = None, *, prompts: Sequence[str] | None = None,
                 answers: Sequence[str] | None = None,
                 wrong_answers: Sequence[str] | None = None, units: str = "block",
                 threshold: float = 0.8, ablation: AblationArg = None,
                 prepend_bos: bool | None = None, progress: bool | None = None
                 ) -> LayerPruneResult:
    """Greedy pruning: each round evaluates removing every kept unit (one batched
    call) and removes the one whose removal leaves the highest score (the first
    on ties), until that score would fall below ``threshold`` or nothing is left.

    ``units``: "block" (whole layers) or "component" (attention and MLP of each
    layer separately; removing an attention removes its output bias).
    """
    import pandas as pd

    ev = Evaluator(runner, resolve_inputs(task, prompts, answers, wrong_answers),
                   resolve_ablation(ablation, task),
                   prepend_bos, progress)
    full = ev.full
    L, H = runner.n_layers, runner.n_heads
    kept = _units(L, units)
    attn, mlp = np.ones(L, dtype=bool), np.ones(L, dtype=bool)
    removed: list[str] = []
    scores: list[float] = []
    rows: list[dict[str, Any]] = []
    current = 1.0
    for rnd in range(len(kept)):
        trials = [_without(attn, mlp, u) for u in kept]
        s = ev.score(_layer_set(np.stack([t[0] for t in trials]),
                                np.stack([t[1] for t in trials]), H))
        best = int(np.argmax(np.where(np.isnan(s), -np.inf, s)))
        ok = bool(s[best] >= threshold)
        rows += [dict(round=rnd, unit=_unit_name(u), score=float(v), chosen=ok and j == best)
                 for j, (u, v) in enumerate(zip(kept, s, strict=True))]
        if not ok:
            break
        attn, mlp = trials[best]
        removed.append(_unit_name(kept.pop(best)))
        scores.append(current := float(s[best]))
        if not kept:
            break
    plan = Plan.from_masks(attn, mlp, n_heads=H)
    return LayerPruneResult(removed, scores, plan, current, threshold, full, pd.DataFrame(rows))


@dataclass
class ExhaustiveResult:
    """Every subset of blocks: ``table`` (one row per plan: plan, n_blocks,
    mean_logit_diff, score, accuracy), ``smallest`` (the passing plans with the
    fewest blocks, best first) and ``pareto`` (number of kept blocks vs score:
    the best plan of each size that beats every smaller size)."""

    table: Any
    smallest: Any
    pareto: Any
    threshold: float
    full_logit_diff: float


def pareto_front(n_blocks: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Row indices of the non-dominated points (fewer blocks and higher score are
    better): for each size the best row (the first on ties), kept when it scores
    strictly above every smaller size. Ordered by size; NaN scores never count."""
    out: list[int] = []
    best_so_far = -np.inf
    for k in np.unique(n_blocks):
        rows = np.flatnonzero((n_blocks == k) & ~np.isnan(score))
        if len(rows) == 0:
            continue
        row = int(rows[np.argmax(score[rows])])
        if score[row] > best_so_far:
            out.append(row)
            best_so_far = float(score[row])
    return np.array(out, dtype=np.int64)


def exhaustive(runner: Runner, task: TaskArg = None, *, prompts: Sequence[str] | None = None,
               answers: Sequence[str] | None = None,
               wrong_answers: Sequence[str] | None = None, n_layers: int | None = None,
               threshold: float = 0.8, ablation: AblationArg = None,
               prepend_bos: bool | None = None,
               progress: bool | None = None) -> ExhaustiveResult:
    """Every subset of whole blocks in one batched call (``fs.grid.block_subsets``).

    ``n_layers``: vary only the blocks of layers 0 .. n_layers-1 (later blocks
    stay kept); default all layers (2^L plans: 4,096 for GPT-2 small).
    """
    import pandas as pd

    ev = Evaluator(runner, resolve_inputs(task, prompts, answers, wrong_answers),
                   resolve_ablation(ablation, task),
                   prepend_bos, progress)
    L, H = runner.n_layers, runner.n_heads
    n = L if n_layers is None else int(n_layers)
    if not 1 <= n <= L:
        raise InputError(f"n_layers must be between 1 and {L}, got {n_layers}")
    bits = grid.block_subsets(n).attn
    blocks = np.concatenate([bits, np.ones((len(bits), L - n), dtype=bool)], axis=1)
    res = ev.run(_layer_set(blocks, blocks.copy(), H))
    mld = scores.mean_logit_diff(res).double().cpu().numpy()
    full = check_full(float(mld[-1]))  # the last subset keeps every block
    score = mld / full
    table = pd.DataFrame({
        "plan": res.plans, "n_blocks": blocks.sum(axis=1),
        "mean_logit_diff": mld, "score": score,
        "accuracy": scores.accuracy(res).double().cpu().numpy(),
    })
    passing = table[table.score >= threshold]
    smallest = passing[passing.n_blocks == passing.n_blocks.min()].sort_values(
        "score", ascending=False, kind="stable")
    front = table.iloc[pareto_front(table.n_blocks.to_numpy(), score)]
    return ExhaustiveResult(table, smallest, front, threshold, full)
