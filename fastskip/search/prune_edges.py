"""ACDC's edge pruning (Conmy et al., "Towards Automated Circuit Discovery"):
walk the receivers in reverse model order (the logits first, then layer L-1's
MLP, its heads' v, k and q inputs, ... down to layer 0), and each receiver's
in-edges from the latest sender to the earliest; remove an edge for good when
removing it (on top of the removals so far) changes the metric by less than
the threshold:

* ``metric="kl"``: KL(full model || circuit) at the answer position; remove
  when KL(without the edge) - KL(circuit) < threshold;
* ``metric="logit_diff"``: the metric is minus the mean logit difference as a
  fraction of the full model's; remove when score(circuit) - score(without) <
  threshold.

    res = fs.search.prune_edges(runner, task, threshold=0.01, metric="kl")
    res.plan, res.kept, res.to_pandas()

Batched like ``prune_nodes``: each Runner call evaluates the most likely next
decisions speculatively (a tree of decision paths, ``speculate.decision_tree``)
and every decision uses the circuit with exactly the real removals, so the
result is the sequential walk's (``prune_edges_sequential``). Edges into a
receiver that no kept path reads (a head or MLP whose out-edges are all gone)
change nothing: they are decided without a model call (metric change 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..plans import EdgeGraph, EdgePlan, EdgePlanSet
from ..reference.edge_hooks import model_graph
from ..run import Runner
from ..run.edge_schedule import liveness
from .common import AblationArg, TaskArg, resolve_inputs
from .edge_common import EdgeMetrics, resolve_edge_ablation
from .edge_reference import SequentialScorer
from .speculate import MIN_PROB, Path, decision_tree

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

METRICS = ("kl", "logit_diff")


@dataclass
class EdgeStep:
    """One decision: the edge, whether it was removed, the metric with it removed
    (what decided), the circuit's metric after the decision, and whether a model
    call was needed (False: its receiver is read by no kept path)."""

    edge: str
    removed: bool
    metric: float
    circuit_metric: float
    evaluated: bool = True


@dataclass
class EdgePruneResult:
    """The edge circuit ``prune_edges`` found, and how."""

    plan: EdgePlan
    metric: str
    value: float  # the final circuit's metric
    start_value: float
    threshold: float
    trace: list[EdgeStep]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> list[str]:
        return self.plan.edges()

    @property
    def removed(self) -> list[str]:
        return [s.edge for s in self.trace if s.removed]

    def to_pandas(self) -> Any:
        """The trace, one row per decision."""
        import pandas as pd

        return pd.DataFrame([vars(s) for s in self.trace])


def acdc_order(mask: np.ndarray, g: EdgeGraph) -> np.ndarray:
    """The kept edges of ``mask`` in ACDC's order: receivers in reverse model
    order, each receiver's senders from the latest to the earliest."""
    edges = np.flatnonzero(mask)
    return edges[np.lexsort((-g.edge_sender[edges], -g.edge_receiver[edges]))]


def _check(threshold: float, metric: str) -> None:
    if metric not in METRICS:
        raise InputError(f"metric must be one of {METRICS}, got '{metric}'")
    if not np.isfinite(threshold):
        raise InputError(f"threshold must be a finite number, got {threshold}")


def _start_mask(start: EdgePlan | str | None, g: EdgeGraph) -> np.ndarray:
    if start is None:
        return np.ones(g.n_edges, dtype=bool)
    return EdgePlan.parse(start, g).mask.copy()


def _walk(cands: np.ndarray, state: np.ndarray, cur: float, tau: float,
          evaluate: Callable[[np.ndarray], np.ndarray], batch: int,
          record: Callable[[int, bool, float, float], None], stats: dict[str, int]
          ) -> tuple[np.ndarray, float]:
    """Decide ``cands`` (edge indices) in order, speculatively; returns the state
    (mask) and its metric. Lower metrics are better: remove when the trial's
    metric exceeds the circuit's by less than ``tau``."""
    n = len(cands)
    effect: dict[int, float] = {}  # candidate -> metric change its removal caused, last seen
    i = decided = removed = 0
    while i < n:
        prior = (removed + 1) / (decided + 2)  # the share of removals so far

        def predict(k: int, base: float, i: int = i, prior: float = prior
                    ) -> tuple[float, float]:
            d = effect.get(i + k)
            if d is None:  # never evaluated
                return prior, base
            return (0.9 if d < tau else 0.1), base + d

        paths = decision_tree(n - i, batch, predict, MIN_PROB, cur)
        trials = np.repeat(state[None], len(paths), axis=0)
        for row, path in enumerate(paths):
            trials[row, cands[i:i + len(path)][np.array(path, dtype=bool)]] = False
            trials[row, cands[i + len(path)]] = False
        values = evaluate(trials)
        where = {path: row for row, path in enumerate(paths)}
        start, start_cur = i, cur
        real: Path = ()
        while i < n and real in where:
            v = float(values[where[real]])
            rem = v - cur < tau
            if rem:
                state = state.copy()
                state[cands[i]] = False
                cur = v
            record(int(cands[i]), rem, v, cur)
            real += (rem,)
            i += 1
            decided += 1
            removed += int(rem)
        for p, row in where.items():  # effects, under the hypothesis each path made
            j = start + len(p)
            if j >= i:
                last = max((m for m, r in enumerate(p) if r), default=None)
                base = start_cur if last is None else float(values[where[p[:last]]])
                effect[j] = float(values[row]) - base
        stats["runner_calls"] += 1
        stats["plans_evaluated"] += len(paths)
        stats["wasted"] += len(paths) - (i - start)
    return state, cur


def prune_edges(runner: Runner, task: TaskArg, threshold: float, metric: str = "kl", *,
                ablation: AblationArg = "resample", start: EdgePlan | str | None = None,
                batch: int = 32, prompts: Sequence[str] | None = None,
                answers: Sequence[str] | None = None,
                wrong_answers: Sequence[str] | None = None,
                prepend_bos: bool | None = None) -> EdgePruneResult:
    """ACDC edge pruning, batched (see the module docstring).

    ``ablation``: what a removed edge carries: "resample" (default: the task's
    corrupted prompts, ACDC's corrupted run), "mean", "zero" or an ``fs.Ablation``.
    ``start``: the circuit to prune (default: every edge). ``batch``: plans per
    Runner call at most.
    """
    _check(threshold, metric)
    g = runner.edges
    m = EdgeMetrics(runner, resolve_inputs(task, prompts, answers, wrong_answers),
                    resolve_edge_ablation(ablation, task), prepend_bos)

    def evaluate(masks: np.ndarray) -> np.ndarray:
        ps = EdgePlanSet(masks, g)
        return m.kl(ps) if metric == "kl" else -m.score(ps)

    state = _start_mask(start, g)
    order = acdc_order(state, g)
    cur = start_value = float(evaluate(state[None])[0])
    steps: dict[int, EdgeStep] = {}
    position = {int(e): k for k, e in enumerate(order)}
    stats = {"runner_calls": 0, "plans_evaluated": 0, "wasted": 0, "decided_free": 0}

    def record(e: int, rem: bool, value: float, after: float, evaluated: bool = True) -> None:
        steps[position[e]] = EdgeStep(g.edge_name(e), rem, value, after, evaluated)

    stages = g.receiver_stage[g.edge_receiver[order]]
    for stage in range(2 * g.n_layers, -1, -1):
        here = order[stages == stage]
        if not len(here):
            continue
        need = liveness(g.dense(state[None]), g)[0][0]
        free = ~need[g.edge_receiver[here]]
        for e in here[free]:  # nothing reads the receiver: removing the edge changes nothing
            rem = threshold > 0.0
            if rem:
                state[e] = False
            record(int(e), rem, cur, cur, evaluated=False)
            stats["decided_free"] += 1
        state, cur = _walk(here[~free], state, cur, threshold, evaluate, batch, record, stats)
    stats["runner_calls"] += 1  # the start circuit's metric
    trace = [steps[k] for k in sorted(steps)]
    circuit = start_value
    for step in trace:  # a free decision reads the circuit's metric where it sits in order
        if not step.evaluated:
            step.metric = step.circuit_metric = circuit
        circuit = step.circuit_metric
    return EdgePruneResult(EdgePlan.from_mask(state, g), metric, cur, start_value, threshold,
                           trace, stats)


def prune_edges_sequential(model: HookedTransformer, task: TaskArg, threshold: float,
                           metric: str = "kl", *, ablation: AblationArg = "resample",
                           start: EdgePlan | str | None = None,
                           prompts: Sequence[str] | None = None,
                           answers: Sequence[str] | None = None,
                           wrong_answers: Sequence[str] | None = None,
                           prepend_bos: bool | None = None,
                           max_trials: int | None = None) -> EdgePruneResult:
    """The plain reference: one TransformerLens ``run_with_hooks`` per candidate
    edge, every edge evaluated. ``max_trials`` stops after that many (timing)."""
    _check(threshold, metric)
    g = model_graph(model)
    scorer = SequentialScorer(model, resolve_inputs(task, prompts, answers, wrong_answers),
                              resolve_edge_ablation(ablation, task), prepend_bos)

    def value(mask: np.ndarray) -> float:
        plan = EdgePlan.from_mask(mask, g)
        return scorer.kl(plan) if metric == "kl" else -scorer.score(plan)

    state = _start_mask(start, g)
    cur = start_value = value(state)
    trace: list[EdgeStep] = []
    for e in acdc_order(state, g):
        if max_trials is not None and len(trace) >= max_trials:
            break
        trial = state.copy()
        trial[e] = False
        v = value(trial)
        rem = v - cur < threshold
        if rem:
            state, cur = trial, v
        trace.append(EdgeStep(g.edge_name(int(e)), rem, v, cur))
    return EdgePruneResult(EdgePlan.from_mask(state, g), metric, cur, start_value, threshold,
                           trace, {"run_with_hooks_calls": scorer.runs})
