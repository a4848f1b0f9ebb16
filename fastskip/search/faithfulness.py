"""Faithfulness curves: the circuits "top n edges by score" for many n, in one
Runner call, with the metrics MIB-style scores integrate.

    curve = fs.search.faithfulness_curve(runner, task, scores, sizes=[10, 100, 1000])
    curve.to_pandas()     # per size: logit difference, score, faithfulness, KL, accuracy
    curve.area()          # area under faithfulness vs fraction of edges kept

``scores`` are one value per edge of ``runner.edges`` (numpy or torch), or
auto-circuit ``PruneScores``. Edges rank by |score| (auto-circuit's and MIB's
convention; ``absolute=False`` ranks by value). Ties keep the earlier edge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..plans import EdgePlanSet
from ..results import Results
from ..run import Runner
from .autocircuit import from_prune_scores
from .common import AblationArg, TaskArg, check_full, resolve_inputs
from .edge_common import resolve_edge_ablation


@dataclass
class FaithfulnessCurve:
    """Per circuit size: mean logit difference, ``score`` (as a fraction of the full
    model's), ``faithfulness`` ((circuit - empty) / (full - empty), MIB's
    normalisation), mean KL(full || circuit) and top-1 accuracy."""

    sizes: np.ndarray
    n_edges: int
    logit_diff: np.ndarray
    score: np.ndarray
    faithfulness: np.ndarray
    kl: np.ndarray
    accuracy: np.ndarray
    full_logit_diff: float
    empty_logit_diff: float
    plans: EdgePlanSet
    results: Results  # every circuit's metrics, then the empty and the full circuit

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame({"edges": self.sizes, "fraction": self.sizes / self.n_edges,
                             "logit_diff": self.logit_diff, "score": self.score,
                             "faithfulness": self.faithfulness, "kl": self.kl,
                             "accuracy": self.accuracy})

    def area(self, metric: str = "faithfulness") -> float:
        """Area under ``metric`` against the fraction of edges kept (trapezoids
        over the sizes given)."""
        y = np.asarray(getattr(self, metric), dtype=np.float64)
        x = self.sizes / self.n_edges
        order = np.argsort(x)
        x, y = x[order], y[order]
        return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def default_sizes(n_edges: int, k: int = 32) -> list[int]:
    """``k`` distinct circuit sizes from 1 edge to all, spaced logarithmically."""
    k = min(k, n_edges)
    for m in range(k, 8 * k + 8):
        sizes = np.unique(np.round(np.geomspace(1, n_edges, m)).astype(np.int64))
        if len(sizes) >= k:
            pick = np.unique(np.round(np.linspace(0, len(sizes) - 1, k)).astype(np.int64))
            return [int(s) for s in sizes[pick]]
    return list(range(1, n_edges + 1))[:k]


def edge_scores(scores: Any, runner: Runner) -> np.ndarray:
    """Scores [n_edges] from an array, a tensor or auto-circuit ``PruneScores``."""
    g = runner.edges
    if isinstance(scores, Mapping):
        return from_prune_scores(scores, g)
    s = scores.detach().double().cpu().numpy() if isinstance(scores, torch.Tensor) else \
        np.asarray(scores, dtype=np.float64)
    if s.reshape(-1).shape != (g.n_edges,):
        raise InputError(f"scores must have one value per edge of runner.edges ({g.n_edges}), "
                         f"got shape {s.shape}")
    return s.reshape(-1)


def faithfulness_curve(runner: Runner, task: TaskArg, scores: Any,
                       sizes: Sequence[int] | None = None, *, absolute: bool = True,
                       ablation: AblationArg = "resample", prompts: Sequence[str] | None = None,
                       answers: Sequence[str] | None = None,
                       wrong_answers: Sequence[str] | None = None,
                       prepend_bos: bool | None = None,
                       progress: bool | None = None) -> FaithfulnessCurve:
    """The circuits of the ``sizes`` highest-scoring edges (default: 32 sizes from
    1 edge to all, logarithmic), evaluated in one ``runner.run`` call with the
    empty and the full circuit. ``ablation``: what removed edges carry: "resample"
    (default: the task's corrupted prompts, as auto-circuit and ACDC patch),
    "mean", "zero" or an ``fs.Ablation``."""
    g = runner.edges
    s = edge_scores(scores, runner)
    ranked = np.abs(s) if absolute else s
    size_list = default_sizes(g.n_edges) if sizes is None else [int(n) for n in sizes]
    inputs = resolve_inputs(task, prompts, answers, wrong_answers)
    plans = EdgePlanSet.top_n(ranked, size_list + [0, g.n_edges], g)
    res = runner.run(plans, inputs.prompts, inputs.answers, wrong_answers=inputs.wrong_answers,
                     prepend_bos=prepend_bos, top_k=0, kl=True, progress=progress,
                     ablation=resolve_edge_ablation(ablation, task))
    assert res.logit_diff is not None and res.kl is not None
    ld = res.logit_diff.float().mean(dim=1).double().cpu().numpy()
    kl = res.kl.float().mean(dim=1).double().cpu().numpy()
    acc = (res.rank[:, :, 0] == 0).float().mean(dim=1).double().cpu().numpy()
    empty, full = float(ld[-2]), check_full(float(ld[-1]))
    n = len(size_list)
    span = full - empty
    faith = (ld[:n] - empty) / span if span != 0 else np.full(n, np.nan)
    return FaithfulnessCurve(np.array(size_list), g.n_edges, ld[:n], ld[:n] / full, faith,
                             kl[:n], acc[:n], full, empty, plans.take(np.arange(n)), res)
