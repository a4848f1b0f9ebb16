"""Figures of edge circuits and faithfulness curves, as PNG (matplotlib) or
offline HTML (plotly), like the other figures of ``fastskip.plot``.

    from fastskip.output.edge_plot import edge_graph, faithfulness
    edge_graph(res.plan, "circuit.png")        # an EdgePlan, or a search result
    faithfulness(curve, "curve.html")

The edge graph is drawn as the paper's figures are: one row per stage of the
model (the embedding at the bottom, then per layer its heads and its MLP, the
logits on top), a node for every sender and receiver a kept edge touches, and
an arrow per kept edge into the receiver's node, coloured by the input it
feeds (query, key, value, MLP input, logits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..plans import EdgeGraph, EdgePlan
from .plot import Chart, render
from .plot_render import _need

COLOURS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#d62728", "mlp": "#7f7f7f",
           "logits": "#000000"}


@dataclass
class GraphLayout:
    """Nodes (name -> (x, y)) and edges (sender, receiver node, kind) to draw."""

    nodes: dict[str, tuple[float, float]]
    edges: list[tuple[str, str, str]]
    rows: int


def _plan_of(data: Any) -> EdgePlan:
    plan = getattr(data, "plan", data)
    if not isinstance(plan, EdgePlan) or not plan.bound:
        raise InputError("edge_graph draws a bound fs.EdgePlan or a search result with .plan "
                         f"(path_patch, prune_edges); got {type(data).__name__}")
    return plan


def layout(plan: EdgePlan) -> GraphLayout:
    """Where each node of the plan's kept edges goes: row = stage (embed 0, layer
    L's heads 2L+1, its MLP 2L+2, logits on top), heads spread along the row,
    MLPs to their right."""
    g: EdgeGraph = plan.graph  # type: ignore[assignment]
    nodes: dict[str, tuple[float, float]] = {}
    edges = []

    def sender_node(s: int) -> str:
        name = g.sender_name(s)
        if s == 0:
            nodes[name] = (0.5, 0.0)
        else:
            layer, k = divmod(s - 1, g.n_heads + 1)
            if k == g.n_heads:  # right of the heads, so that edges pass beside it
                nodes[name] = (1.12, 2.0 * layer + 2)
            else:
                nodes[name] = ((k + 0.5) / g.n_heads, 2.0 * layer + 1)
        return name

    for e in np.flatnonzero(plan.mask):
        s, r = int(g.edge_sender[e]), int(g.edge_receiver[e])
        layer, kind, head = g.receiver_kind(r)
        if kind == "logits":
            target = "logits"
            nodes[target] = (0.5, 2.0 * g.n_layers + 1)
        elif kind == "mlp":
            target = sender_node(g.mlp_sender(layer))
        elif kind == "q":
            target = sender_node(g.head_sender(layer, head))
        else:  # key/value inputs: drawn into the first query head they serve
            target = sender_node(g.head_sender(layer, head * g.group_size))
        edges.append((sender_node(s), target, kind))
    return GraphLayout(nodes, edges, 2 * g.n_layers + 2)


def edge_graph(data: Any, path: str | os.PathLike | None = None, title: str = "edge circuit",
               size: tuple[int, int] = (1000, 900)) -> Any:
    """Draw the kept edges of an ``EdgePlan`` (or of a result with ``.plan``)."""
    lay = layout(_plan_of(data))
    if not lay.edges:
        raise InputError("the edge plan keeps no edge: nothing to draw")
    html = path is not None and Path(path).suffix.lower() in (".html", ".htm")
    fig = _plotly(lay, title, size) if html else _matplotlib(lay, title, size)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if html:
            fig.write_html(str(path), include_plotlyjs=True, full_html=True)
        else:
            fig.savefig(str(path), dpi=100)
    return fig


def _matplotlib(lay: GraphLayout, title: str, size: tuple[int, int]) -> Any:
    figure = _need("matplotlib.figure")
    agg = _need("matplotlib.backends.backend_agg")
    fig = figure.Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100, layout="constrained")
    agg.FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for s, r, kind in lay.edges:
        (x0, y0), (x1, y1) = lay.nodes[s], lay.nodes[r]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), zorder=2,
                    arrowprops=dict(arrowstyle="-|>", color=COLOURS[kind], lw=0.8, alpha=0.7,
                                    shrinkA=9, shrinkB=9, mutation_scale=9))
    for name, (x, y) in lay.nodes.items():
        ax.scatter([x], [y], s=260, color="#fdf6e3", edgecolors="#333333", zorder=3)
        ax.text(x, y, name, ha="center", va="center", fontsize=7, zorder=4)
    for kind, colour in COLOURS.items():
        ax.plot([], [], color=colour, label=kind)
    ax.legend(loc="upper right", fontsize=8, title="input")
    ax.set_xlim(-0.05, 1.2)
    ax.set_ylim(-0.7, lay.rows - 0.3)
    ax.set_yticks([0, lay.rows - 1], ["embed", "logits"])
    ax.set_xticks([])
    ax.set_title(title)
    return fig


def _plotly(lay: GraphLayout, title: str, size: tuple[int, int]) -> Any:
    go = _need("plotly.graph_objects")
    fig = go.Figure()
    for kind, colour in COLOURS.items():
        xs: list[float | None] = []
        ys: list[float | None] = []
        for s, r, k in lay.edges:
            if k == kind:
                xs += [lay.nodes[s][0], lay.nodes[r][0], None]
                ys += [lay.nodes[s][1], lay.nodes[r][1], None]
        if xs:
            fig.add_scatter(x=xs, y=ys, mode="lines", line=dict(color=colour, width=1),
                            name=kind, hoverinfo="skip")
    names = list(lay.nodes)
    fig.add_scatter(x=[lay.nodes[n][0] for n in names], y=[lay.nodes[n][1] for n in names],
                    mode="markers+text", text=names, textposition="middle center",
                    marker=dict(size=22, color="#fdf6e3", line=dict(color="#333", width=1)),
                    name="nodes", hovertemplate="%{text}<extra></extra>")
    fig.update_layout(title=title, width=size[0], height=size[1], xaxis_visible=False,
                      yaxis_title="stage (embed at 0, logits on top)")
    return fig


def faithfulness(curve: Any, path: str | os.PathLike | None = None,
                 metric: str = "faithfulness", title: str = "faithfulness curve",
                 size: tuple[int, int] = (900, 500)) -> Any:
    """A faithfulness curve (``fs.search.faithfulness_curve``): ``metric`` per circuit size."""
    values = getattr(curve, metric, None)
    sizes = getattr(curve, "sizes", None)
    if values is None or sizes is None:
        raise InputError(f"faithfulness plots a FaithfulnessCurve's '{metric}' against its sizes")
    chart = Chart("line", title, x=[str(int(n)) for n in sizes],
                  y=[float(v) for v in values], xlabel="edges in the circuit", ylabel=metric,
                  hline=("full model", 1.0) if metric in ("faithfulness", "score") else None)
    return render(chart, path, size)
