"""Edge plans: which sender -> receiver edges of a model are kept.

A receiver's input is the sum of its kept senders' outputs, plus for every
removed edge that sender's ablation value (zero, the per-position mean or the
corrupted run's output), plus the attention output biases (always on). See
``fastskip.plans.edge_graph`` for the senders and receivers and
``fastskip.plans.edge_items`` for the item syntax:

    fs.EdgePlan.parse("all,-8.6>9.1.q,-0.mlp>*")      # unbound: syntax checked
    plan = fs.EdgePlan.parse("8.6>9.1.q,embed>*", graph)   # bound: edges resolved
    plan.mask                  # [n_edges] bool over graph's edge order
    str(plan)                  # canonical text (parses back to the same edges)
    fs.EdgePlan.from_plan(node_plan, graph)  # every out-edge of removed nodes removed
    fs.EdgePlan.top_n(scores, 100, graph)    # the 100 edges with the highest scores
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import PlanError
from .edge_graph import EdgeGraph
from .edge_items import EdgeItem, apply_edge_items, parse_edge_items
from .edge_text import canonical_edge_text
from .plan import Plan


class EdgePlan:
    """A set of kept edges, parsed from text or built from masks, node plans or scores.

    ``EdgePlan.parse(text)`` gives an unbound plan (syntax checked); binding it to
    an ``EdgeGraph`` (``plan.bind(graph)``, or ``parse(text, graph)``) resolves the
    edges, checks every layer, head and edge, and gives ``plan.mask``.
    ``str(plan)`` is the canonical text for bound plans.
    """

    __slots__ = ("items", "text", "graph", "_mask")

    def __init__(self, items: tuple[EdgeItem, ...], text: str, graph: EdgeGraph | None = None,
                 mask: np.ndarray | None = None):
        self.items = items
        self.text = text
        self.graph = graph
        self._mask = mask

    # construction -------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | EdgePlan, graph: EdgeGraph | None = None) -> EdgePlan:
        """Parse edge plan text; bind it when the graph is given."""
        if isinstance(text, EdgePlan):
            plan = text
        else:
            items = parse_edge_items(text)
            plan = cls(items, ",".join(str(i) for i in items))
        return plan.bind(graph) if graph is not None else plan

    @classmethod
    def from_mask(cls, mask: np.ndarray | Sequence[bool], graph: EdgeGraph) -> EdgePlan:
        """A bound plan from a boolean mask over ``graph``'s edges [n_edges], or a
        dense mask [n_receivers, n_senders] (False where there is no edge)."""
        m = np.asarray(mask)
        if m.dtype != bool:
            raise PlanError(f"an edge mask must be boolean, got dtype {m.dtype}")
        if m.shape == (graph.n_receivers, graph.n_senders):
            invalid = m & ~graph.dense(np.ones((1, graph.n_edges), bool))[0]
            if invalid.any():
                r, s = (int(v) for v in np.argwhere(invalid)[0])
                raise PlanError(f"the dense edge mask sets {graph.sender_name(s)}>"
                                f"{graph.receiver_name(r)}, which is no edge: the receiver "
                                "comes before the sender")
            m = graph.flat(m[None])[0]
        if m.shape != (graph.n_edges,):
            raise PlanError(f"an edge mask must have shape [{graph.n_edges}] (the graph's edges) "
                            f"or [{graph.n_receivers}, {graph.n_senders}], got {m.shape}")
        text = canonical_edge_text(m, graph)
        return cls(parse_edge_items(text), text, graph, m.copy())

    @classmethod
    def from_plan(cls, plan: Plan | str, graph: EdgeGraph) -> EdgePlan:
        """The node plan as edges: every out-edge of each removed head and MLP
        removed, every other edge kept.

        Edge plans keep every attention output bias b_O and every norm, so a node
        plan that removes a whole attention layer (``-L.attn``, which drops b_O
        too) or skips a norm (``/noln``) has no edge form: ``PlanError`` says so."""
        node = Plan.parse(plan) if isinstance(plan, str) else plan
        m = node.bind(graph.n_layers, graph.n_heads).mask
        where = f"node plan '{node}'"
        if not m.attn.all():
            L = int(np.flatnonzero(~m.attn)[0])
            raise PlanError(
                f"{where} removes the attention of layer {L} with its output bias b_O; edge "
                f"plans keep every b_O, so remove its heads instead ('-{L}.0-{graph.n_heads - 1}'"
                f"); under mean or resample ablation the two are the same")
        if not (m.attn_ln.all() and m.mlp_ln.all()):
            raise PlanError(f"{where} skips a norm (/noln); edge plans apply every norm")
        removed = np.zeros(graph.n_senders, dtype=bool)
        for L in range(graph.n_layers):
            for h in np.flatnonzero(~m.heads[L]):
                removed[graph.head_sender(L, int(h))] = True
            removed[graph.mlp_sender(L)] = not m.mlp[L]
        return cls.from_mask(~removed[graph.edge_sender], graph)

    @classmethod
    def top_n(cls, scores: np.ndarray | Sequence[float], n: int, graph: EdgeGraph) -> EdgePlan:
        """The ``n`` edges with the highest ``scores`` [n_edges] (ties: the earlier
        edge; NaN scores rank last). Rank by magnitude with ``np.abs(scores)``."""
        return cls.from_mask(top_n_mask(scores, [n], graph)[0], graph)

    def bind(self, graph: EdgeGraph) -> EdgePlan:
        """Resolve the plan for a graph; raises ``PlanError`` naming the item."""
        if self._mask is not None:
            if self.graph != graph:
                raise PlanError(f"edge plan '{self}' was made for {self.graph}; this model's "
                                f"graph is {graph}")
            return self
        mask = apply_edge_items(self.items, graph, self.text)
        text = canonical_edge_text(mask, graph)
        return EdgePlan(self.items, text, graph, mask)

    # access ----------------------------------------------------------------------------
    @property
    def bound(self) -> bool:
        return self._mask is not None

    @property
    def mask(self) -> np.ndarray:
        """[n_edges] bool: the kept edges, in the graph's edge order."""
        if self._mask is None:
            raise PlanError(f"edge plan '{self.text}' is not bound to a model yet; use "
                            "plan.bind(runner.edges) or EdgePlan.parse(text, graph)")
        return self._mask

    @property
    def n_edges(self) -> int:
        """Kept edges."""
        return int(self.mask.sum())

    def edges(self) -> list[str]:
        """The kept edges' names (``8.6>9.1.q``), in edge order."""
        assert self.graph is not None
        return [self.graph.edge_name(int(e)) for e in np.flatnonzero(self.mask)]

    def senders_used(self) -> np.ndarray:
        """[n_senders] bool: senders with at least one kept out-edge."""
        assert self.graph is not None
        used = np.zeros(self.graph.n_senders, dtype=bool)
        used[self.graph.edge_sender[self.mask]] = True
        return used

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"EdgePlan('{self.text}')"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EdgePlan):
            return NotImplemented
        if self.bound and other.bound:
            return self.graph == other.graph and bool(np.array_equal(self.mask, other.mask))
        return not self.bound and not other.bound and self.text == other.text

    def __hash__(self) -> int:
        if self._mask is not None:
            return hash((self.graph, np.packbits(self._mask).tobytes()))
        return hash(self.text)


def top_n_mask(scores: np.ndarray | Sequence[float], sizes: Sequence[int], graph: EdgeGraph
               ) -> np.ndarray:
    """Masks [len(sizes), n_edges]: row i keeps the ``sizes[i]`` highest-scoring
    edges (ties: the earlier edge; NaN ranks last). One sort for all sizes."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape != (graph.n_edges,):
        raise PlanError(f"scores must have one value per edge ({graph.n_edges}), got {s.shape}")
    sizes_a = np.asarray(sizes, dtype=np.int64).reshape(-1)
    bad = sizes_a[(sizes_a < 0) | (sizes_a > graph.n_edges)]
    if len(bad):
        raise PlanError(f"a circuit size must be between 0 and {graph.n_edges} edges, got "
                        f"{int(bad[0])}")
    key = np.where(np.isnan(s), -np.inf, s)
    order = np.lexsort((np.arange(len(s)), -key))  # highest first, then edge order
    rank = np.empty(len(s), dtype=np.int64)
    rank[order] = np.arange(len(s))
    return rank[None, :] < sizes_a[:, None]
