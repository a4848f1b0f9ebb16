"""EdgePlanSet: many edge plans as one boolean array [P, n_edges].

The Runner takes it where it takes a ``PlanSet``: ``len``, indexing (an
``EdgePlan``), ``take``, canonical texts (computed when read).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np

from ..errors import PlanError
from .edge_graph import EdgeGraph
from .edges import EdgePlan, top_n_mask
from .plan import Plan
from .planset import PlanTexts

EdgePlanLike = EdgePlan | Plan | str


def is_edge_text(value: object) -> bool:
    """Text in the edge grammar: it names an edge (``S>R``); plain node plan
    text never contains '>'."""
    return isinstance(value, str) and ">" in value


def holds_edge_plans(plans: object) -> bool:
    """Whether ``plans`` (one plan or a sequence) are edge plans: an
    ``EdgePlanSet``, an ``EdgePlan``, edge text (``S>R``), or a sequence holding one."""
    if isinstance(plans, (EdgePlanSet, EdgePlan)) or is_edge_text(plans):
        return True
    if isinstance(plans, Sequence) and not isinstance(plans, (str, bytes)):
        return any(isinstance(p, EdgePlan) or is_edge_text(p) for p in plans)
    return False


class EdgePlanSet(Sequence[EdgePlan]):
    """An ordered set of edge plans of one graph, stored as masks [P, n_edges]."""

    def __init__(self, masks: np.ndarray, graph: EdgeGraph):
        masks = np.asarray(masks)
        if masks.dtype != bool:
            raise PlanError(f"edge masks must be boolean, got dtype {masks.dtype}")
        if masks.ndim != 2 or masks.shape[1] != graph.n_edges:
            raise PlanError(f"edge masks must have shape [plans, {graph.n_edges}], got "
                            f"{masks.shape}")
        if masks.shape[0] == 0:
            raise PlanError("the plan set is empty; give at least one plan (e.g. 'all')")
        self.masks = masks
        self.graph = graph
        self._texts: dict[int, str] = {}

    # construction --------------------------------------------------------------------
    @classmethod
    def from_plans(cls, plans: EdgePlanLike | Sequence[EdgePlanLike] | EdgePlanSet,
                   graph: EdgeGraph) -> EdgePlanSet:
        """Bind and stack edge plans: ``EdgePlan`` objects, edge text, or node
        plans (``Plan`` objects; in a list with edge plans, text is edge text:
        ``"all"``, ``"none"``); see ``EdgePlan.from_plan`` for node plans."""
        if isinstance(plans, EdgePlanSet):
            if plans.graph != graph:
                raise PlanError(f"this edge plan set was made for {plans.graph}; the model's "
                                f"graph is {graph}")
            return plans
        if isinstance(plans, (str, EdgePlan, Plan)):
            plans = [plans]
        if isinstance(plans, (bytes, bytearray)):
            raise PlanError(f"plans must be plans or plan texts, got bytes ({plans!r}); decode "
                            "it first")
        try:
            items = list(plans)
        except TypeError:
            raise PlanError(f"edge plans must be an EdgePlan, edge text or a list of them, got "
                            f"{type(plans).__name__}") from None
        if not items:
            raise PlanError("the plan set is empty; give at least one plan (e.g. 'all')")
        bound = []
        for i, p in enumerate(items):
            if isinstance(p, str):
                p = EdgePlan.parse(p)
            elif isinstance(p, Plan):
                p = EdgePlan.from_plan(p, graph)
            elif not isinstance(p, EdgePlan):
                raise PlanError(f"plan #{i} is a {type(p).__name__} ({p!r}); expected an "
                                "EdgePlan, edge text or a node Plan")
            bound.append(p.bind(graph))
        out = cls(np.stack([p.mask for p in bound]), graph)
        out._texts = {i: p.text for i, p in enumerate(bound)}
        return out

    @classmethod
    def top_n(cls, scores: np.ndarray | Sequence[float], sizes: Sequence[int],
              graph: EdgeGraph) -> EdgePlanSet:
        """One plan per size: the ``sizes[i]`` highest-scoring edges (see
        ``EdgePlan.top_n``), from one sort."""
        return cls(top_n_mask(scores, sizes, graph), graph)

    # sequence protocol ---------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @overload
    def __getitem__(self, i: int) -> EdgePlan: ...

    @overload
    def __getitem__(self, i: slice) -> EdgePlanSet: ...

    def __getitem__(self, i: int | slice) -> EdgePlan | EdgePlanSet:
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        if isinstance(i, (int, np.integer)):
            n = len(self)
            if not -n <= i < n:
                raise IndexError(f"plan index {i} out of range for {n} plans")
            return EdgePlan.from_mask(self.masks[int(i) % n], self.graph)
        raise TypeError(f"EdgePlanSet indices must be integers or slices, not "
                        f"{type(i).__name__}")

    def __iter__(self) -> Iterator[EdgePlan]:
        for i in range(len(self)):
            yield self[i]

    def take(self, index: np.ndarray | Sequence[int]) -> EdgePlanSet:
        """The plans at ``index`` (in that order) as a new set."""
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        out = EdgePlanSet(self.masks[idx], self.graph)
        out._texts = {j: self._texts[int(i)] for j, i in enumerate(idx) if int(i) in self._texts}
        return out

    def text(self, i: int) -> str:
        """Canonical text of plan ``i`` (computed once)."""
        if i not in self._texts:
            self._texts[i] = str(self[i])
        return self._texts[i]

    def texts(self) -> list[str]:
        return [self.text(i) for i in range(len(self))]

    def lazy_texts(self) -> PlanTexts:
        """The plans' canonical texts as a sequence computed on access."""
        return PlanTexts(self)

    @property
    def n_layers(self) -> int:
        return self.graph.n_layers

    def __repr__(self) -> str:
        return f"EdgePlanSet({len(self)} plans over {self.graph})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EdgePlanSet):
            return NotImplemented
        return self.graph == other.graph and bool(np.array_equal(self.masks, other.masks))

    __hash__ = None  # type: ignore[assignment]


EdgePlansLike = EdgePlanLike | Sequence[EdgePlanLike] | EdgePlanSet  # what calls take


def concat_edge_sets(*sets: EdgePlanSet) -> EdgePlanSet:
    """Edge plan sets of one graph, one after the other."""
    graph = sets[0].graph
    if any(s.graph != graph for s in sets):
        raise PlanError("edge plan sets of different graphs cannot be joined")
    return EdgePlanSet(np.concatenate([s.masks for s in sets]), graph)
