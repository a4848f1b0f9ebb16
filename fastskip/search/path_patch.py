"""Path patching inside a node circuit: the second stage of "Towards
Interpretable Sequence Continuation" (Lan & Barez; apartresearch/seqcont_circuits,
``src/iter_edge_pruning/``).

Start from a node circuit with the rest of the model ablated (mean ablation as
in the paper: every out-edge of a node outside the circuit carries its mean).
For every edge inside the circuit (a circuit head or MLP to the q/k/v input of
a circuit head, the input of a circuit MLP, or the logits) patch that edge
alone from the ablation (the receiver reads the sender's mean instead of its
output) and score the circuit; keep the edges whose patching leaves the score
below the threshold (removing them hurts).

    res = fs.search.path_patch(runner, task, {"heads": [[9, 1], ...], "mlps": [0, 9]})
    res.kept, res.to_pandas(), res.plan        # kept edges, every edge's score, EdgePlan

All trials are edge plans that differ from the circuit by one edge: one Runner
call evaluates them all, each costing only the values downstream of its edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..plans import EdgeGraph, EdgePlan, EdgePlanSet
from ..reference.edge_hooks import model_graph
from ..run import Runner
from .common import AblationArg, TaskArg, resolve_inputs
from .edge_common import (
    CircuitArg,
    EdgeMetrics,
    NodeCircuit,
    node_circuit,
    resolve_edge_ablation,
)
from .edge_reference import SequentialScorer

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass
class PathPatchResult:
    """Every circuit edge's score when patched alone, and the edges kept."""

    circuit: NodeCircuit
    graph: EdgeGraph
    candidates: np.ndarray  # [n] edge indices (graph order) that were scored
    scores: np.ndarray  # [n] score with that edge patched (fraction of the full model's)
    threshold: float
    circuit_score: float  # the node circuit's own score
    full_logit_diff: float
    base: np.ndarray  # [n_edges] the node circuit as an edge mask
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def kept_mask(self) -> np.ndarray:
        """[n] the candidates whose patching leaves the score below the threshold."""
        return self.scores < self.threshold

    @property
    def kept(self) -> list[str]:
        """The kept edges' names, in edge order."""
        return [self.graph.edge_name(int(e)) for e in self.candidates[self.kept_mask]]

    @property
    def plan(self) -> EdgePlan:
        """The edge circuit: the node circuit without the edges that were not kept."""
        mask = self.base.copy()
        mask[self.candidates[~self.kept_mask]] = False
        return EdgePlan.from_mask(mask, self.graph)

    def to_pandas(self) -> Any:
        """One row per scored edge: edge, sender, receiver, score, kept."""
        import pandas as pd

        g = self.graph
        return pd.DataFrame({
            "edge": [g.edge_name(int(e)) for e in self.candidates],
            "sender": [g.sender_name(int(g.edge_sender[e])) for e in self.candidates],
            "receiver": [g.receiver_name(int(g.edge_receiver[e])) for e in self.candidates],
            "score": self.scores, "kept": self.kept_mask})


def circuit_edges(circuit: NodeCircuit, g: EdgeGraph, embed: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The node circuit as an edge mask [n_edges] (every out-edge of a node outside
    it removed; the embedding's kept), and the edges inside it that path patching
    scores (from ``embed`` too when asked) as indices in edge order."""
    senders = circuit.senders(g, embed=True)
    base = senders[g.edge_sender]
    inside = circuit.senders(g, embed=embed)[g.edge_sender] & circuit.receivers(g)[
        g.edge_receiver]
    return base, np.flatnonzero(inside)


def path_patch(runner: Runner, task: TaskArg, circuit: CircuitArg, threshold: float = 0.8, *,
               ablation: AblationArg = "mean", embed: bool = False,
               prompts: Sequence[str] | None = None, answers: Sequence[str] | None = None,
               wrong_answers: Sequence[str] | None = None,
               prepend_bos: bool | None = None) -> PathPatchResult:
    """Score every edge inside ``circuit`` by patching it alone (see the module
    docstring); keep those whose patched score is below ``threshold``.

    ``circuit``: ``{"heads": [[L, h], ...], "mlps": [...]}``, ``(heads, mlps)``, a
    ``prune_nodes`` result or a node ``Plan``. ``ablation``: "mean" (default: the
    task's ``mean_prompts``, else its ``corrupted`` prompts), "resample", "zero" or
    an ``fs.Ablation``. ``embed=True`` also scores the embedding's edges.
    """
    g = runner.edges
    nodes = node_circuit(circuit, g)
    inputs = resolve_inputs(task, prompts, answers, wrong_answers)
    metrics = EdgeMetrics(runner, inputs, resolve_edge_ablation(ablation, task), prepend_bos)
    base, cand = circuit_edges(nodes, g, embed)
    trials = np.repeat(base[None], len(cand) + 1, axis=0)
    trials[np.arange(1, len(cand) + 1), cand] = False  # row 0: the circuit itself
    scores = metrics.score(EdgePlanSet(trials, g))
    full = metrics.full
    return PathPatchResult(nodes, g, cand, scores[1:], threshold, float(scores[0]), full, base,
                           {"runner_calls": metrics.calls, "plans_evaluated": metrics.plans})


def path_patch_sequential(model: HookedTransformer, task: TaskArg, circuit: CircuitArg,
                          threshold: float = 0.8, *, ablation: AblationArg = "mean",
                          embed: bool = False, prompts: Sequence[str] | None = None,
                          answers: Sequence[str] | None = None,
                          wrong_answers: Sequence[str] | None = None,
                          prepend_bos: bool | None = None,
                          max_edges: int | None = None) -> PathPatchResult:
    """The plain reference: one TransformerLens ``run_with_hooks`` per patched
    edge (``edge_reference_logits``). ``max_edges`` scores only the first edges
    (for timing a prefix)."""
    g = model_graph(model)
    nodes = node_circuit(circuit, g)
    scorer = SequentialScorer(model, resolve_inputs(task, prompts, answers, wrong_answers),
                              resolve_edge_ablation(ablation, task), prepend_bos)
    base, cand = circuit_edges(nodes, g, embed)
    if max_edges is not None:
        cand = cand[:max_edges]
    circuit_score = scorer.score(EdgePlan.from_mask(base, g))
    scores = []
    for e in cand:
        trial = base.copy()
        trial[e] = False
        scores.append(scorer.score(EdgePlan.from_mask(trial, g)))
    return PathPatchResult(nodes, g, cand, np.array(scores), threshold, circuit_score,
                           scorer.full, base, {"run_with_hooks_calls": scorer.runs})
