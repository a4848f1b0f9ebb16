"""Pairwise interactions between components, from one batched run.

    res = fs.search.interactions(runner, ["9.mlp", "8.attn", "8.11"], task)
    res.table          # DataFrame: interaction of every pair (components x components)

For components a, b (plan items): effect(a) = mld(all - a) - mld(all) and the
interaction of a and b is mld(all - a - b) - mld(all) - effect(a) - effect(b),
where mld is the mean logit difference over prompts. Zero means the two
removals add up; negative, removing both hurts more than the sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch

from ..errors import InputError
from ..plans import Plan
from ..run import Runner
from .common import AblationArg, Evaluator, TaskArg, resolve_ablation, resolve_inputs


@dataclass
class InteractionResult:
    """``effects`` [k]: change of the mean logit difference when one component is
    removed; ``joint`` [k, k]: when both are (diagonal: the single effect);
    ``matrix`` [k, k]: joint - effect(a) - effect(b) (diagonal NaN)."""

    components: list[str]
    full_logit_diff: float
    effects: torch.Tensor
    joint: torch.Tensor
    matrix: torch.Tensor

    @property
    def table(self) -> Any:
        """The interaction matrix as a DataFrame (components as index and columns)."""
        import pandas as pd

        return pd.DataFrame(self.matrix.numpy(), index=self.components, columns=self.components)

    def to_pandas(self) -> Any:
        """One row per pair: a, b, effect_a, effect_b, joint, interaction."""
        import pandas as pd

        k = len(self.components)
        return pd.DataFrame([
            dict(a=self.components[i], b=self.components[j], effect_a=float(self.effects[i]),
                 effect_b=float(self.effects[j]), joint=float(self.joint[i, j]),
                 interaction=float(self.matrix[i, j]))
            for i, j in combinations(range(k), 2)])


def interactions(runner: Runner, components: Sequence[str], task: TaskArg = None, *,
                 prompts: Sequence[str] | None = None, answers: Sequence[str] | None = None,
                 wrong_answers: Sequence[str] | None = None, ablation: AblationArg = None,
                 prepend_bos: bool | None = None, progress: bool | None = None
                 ) -> InteractionResult:
    """Effects and pairwise interactions of removing ``components`` (plan items
    such as "9.mlp", "8.attn", "8.11", "8.0-3", "4") from the full model:
    1 + k + k(k-1)/2 plans in one ``runner.run`` call."""
    comps = [str(c).strip() for c in components]
    if len(comps) < 2:
        raise InputError("interactions needs at least two components")
    if len(set(comps)) != len(comps):
        raise InputError(f"components repeat: {comps}")
    for c in comps:
        if c.startswith("-") or "," in c:
            raise InputError(f"component '{c}' must be one plan item like 9.mlp or 8.11")
        Plan.parse(f"all,-{c}", runner.n_layers, runner.n_heads)  # PlanError names bad items
    ev = Evaluator(runner, resolve_inputs(task, prompts, answers, wrong_answers),
                   resolve_ablation(ablation, task),
                   prepend_bos, progress)
    k = len(comps)
    pairs = list(combinations(range(k), 2))
    plans = ["all"] + [f"all,-{c}" for c in comps] + [
        f"all,-{comps[i]},-{comps[j]}" for i, j in pairs]
    mld = torch.as_tensor(ev.mean_logit_diff(plans))
    full = float(mld[0])
    effects = mld[1: k + 1] - full
    joint = torch.diag(effects.clone())
    matrix = torch.full((k, k), float("nan"), dtype=mld.dtype)
    for (i, j), v in zip(pairs, mld[k + 1:], strict=True):
        joint[i, j] = joint[j, i] = v - full
        matrix[i, j] = matrix[j, i] = v - full - effects[i] - effects[j]
    return InteractionResult(comps, full, effects, joint, matrix)
