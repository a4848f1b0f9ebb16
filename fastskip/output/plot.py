"""Figures of sweep results, as PNG (matplotlib) or offline HTML (plotly).

    fs.plot.leave_one_out(res, "heads.png")            # answer probability per removed unit
    fs.plot.layer_heatmap(df, "blocks.html")           # block subsets: kept-count x block
    fs.plot.interaction_matrix(table, "pairs.png")     # any square table
    fs.plot.pruning_trace([("start", 0.9), ("-9.mlp", 0.85)], "trace.png")

Each function takes ``Results``, a results DataFrame (``Results.to_pandas()``,
``fs.io.load_results(...).df``) or a per-plan summary (``fs.io.summarize``), writes
``path`` by its extension (``.html``: plotly with plotly.js embedded, so it opens
offline; ``.png``/``.svg``/``.pdf``: matplotlib, Agg backend) and returns the
figure (a matplotlib ``Figure`` or a plotly ``Figure``). matplotlib and plotly
are optional (``pip install fastskip[plot]``) and imported only here, lazily.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..plans import Plan, parse_items
from .tables import SUMMARY_METRICS, summarize

LABELS = {"prob": "mean answer probability", "accuracy": "top-1 accuracy",
          "rank": "mean rank of the answer", "logit_diff": "mean logit difference",
          "kl": "mean KL(full || plan)", "score": "score"}


@dataclass
class Chart:
    """What to draw, independent of the plotting library."""

    kind: str  # "bar", "heatmap" or "line"
    title: str
    x: list[Any] = field(default_factory=list)
    y: list[Any] = field(default_factory=list)  # line: values; heatmap: row labels
    series: dict[str, list[float]] = field(default_factory=dict)
    z: np.ndarray | None = None
    xlabel: str = ""
    ylabel: str = ""
    hline: tuple[str, float] | None = None


# -- inputs ------------------------------------------------------------------------

def per_plan(data: Any, metric: str = "prob") -> Any:
    """A per-plan summary DataFrame (plan order kept) from Results, a results
    DataFrame or an existing summary."""
    import pandas as pd

    if metric not in SUMMARY_METRICS:
        raise InputError(f"unknown metric '{metric}'; expected one of {', '.join(SUMMARY_METRICS)}")
    if hasattr(data, "to_pandas") and hasattr(data, "plans"):
        data = data.to_pandas(top_k=0)
    elif hasattr(data, "df") and hasattr(data, "plans"):
        data = data.df
    if not isinstance(data, pd.DataFrame) or "plan" not in data:
        raise InputError("expected Results or a DataFrame with a 'plan' column")
    table = summarize(data, sort_by=None) if "prompt" in data else data
    if metric not in table:
        raise InputError(f"metric '{metric}' is not in this table; columns: "
                         f"{', '.join(map(str, table.columns))}")
    return table


def infer_sizes(plans: Sequence[str]) -> tuple[int, int]:
    """(n_layers, n_heads) as large as the plans mention (pass them when known)."""
    n_layers, n_heads = 1, 1
    for text in plans:
        for item in parse_items(text):
            if item.layers:
                n_layers = max(n_layers, item.layers[1] + 1)
            if item.heads:
                n_heads = max(n_heads, item.heads[1] + 1)
    return n_layers, n_heads


def _masks(plans: Sequence[str], n_layers: int | None, n_heads: int | None) -> list[Any]:
    if n_layers is None or n_heads is None:
        guess = infer_sizes(plans)
        n_layers, n_heads = n_layers or guess[0], n_heads or guess[1]
    return [Plan.parse(text, n_layers, n_heads).mask for text in plans]


def removed_unit(mask: Any) -> tuple[str, int, int] | None:
    """What a leave-one-out plan removes: ("block"|"attn"|"mlp", layer, -1),
    ("head", layer, head), ("full", -1, -1) for the full model, None otherwise."""
    attn_off = np.flatnonzero(~mask.attn)
    mlp_off = np.flatnonzero(~mask.mlp)
    heads_off = np.argwhere(mask.attn[:, None] & ~mask.heads)
    if not (mask.attn_ln.all() and mask.mlp_ln.all()):
        return None
    n_off = len(attn_off) + len(mlp_off) + len(heads_off)
    if n_off == 0:
        return ("full", -1, -1)
    if len(attn_off) == 1 and len(mlp_off) == 1 and attn_off[0] == mlp_off[0] and n_off == 2:
        return ("block", int(attn_off[0]), -1)
    if n_off == 1:
        if len(attn_off):
            return ("attn", int(attn_off[0]), -1)
        if len(mlp_off):
            return ("mlp", int(mlp_off[0]), -1)
        return ("head", int(heads_off[0][0]), int(heads_off[0][1]))
    return None


# -- figures -----------------------------------------------------------------------

def leave_one_out(data: Any, path: str | os.PathLike | None = None, metric: str = "prob",
                  n_layers: int | None = None, n_heads: int | None = None,
                  title: str | None = None, size: tuple[int, int] = (900, 500)) -> Any:
    """The metric of each leave-one-out plan: bars per layer (one series per removed
    kind: block, attn, mlp) or, for removed heads, a layer x head heatmap. The full
    model (plan 'all'), if present, is a dashed line. Other plans are bars labelled
    with their text."""
    table = per_plan(data, metric)
    plans, values = list(table["plan"]), [float(v) for v in table[metric]]
    units = [removed_unit(m) for m in _masks(plans, n_layers, n_heads)]
    full = [v for u, v in zip(units, values, strict=True) if u and u[0] == "full"]
    hline = ("full model", full[0]) if full else None
    label = LABELS[metric]
    kinds = {u[0] for u in units if u and u[0] != "full"}
    known = [u for u in units if u is not None]
    if kinds == {"head"} and len(known) == len(units):
        L = max(u[1] for u in known) + 1
        H = max(u[2] for u in known) + 1
        z = np.full((L, H), np.nan)
        for unit, v in zip(known, values, strict=True):
            if unit[0] == "head":
                z[unit[1], unit[2]] = v
        chart = Chart("heatmap", title or f"{label} without one head", x=list(range(H)),
                      y=list(range(L)), z=z, xlabel="head removed", ylabel="layer")
        return render(chart, path, size)
    series: dict[str, dict[str, float]] = {}
    for text, u, v in zip(plans, units, values, strict=True):
        if u is None:
            series.setdefault("other plans", {})[text] = v
        elif u[0] != "full":
            series.setdefault(f"without {u[0]}" if u[0] != "head" else "without head",
                              {})[f"L{u[1]}" + (f"H{u[2]}" if u[2] >= 0 else "")] = v
    x = list(dict.fromkeys(k for s in series.values() for k in s))
    chart = Chart("bar", title or f"{label} per plan (leave one out)", x=x,
                  series={name: [s.get(k, np.nan) for k in x] for name, s in series.items()},
                  xlabel="removed", ylabel=label, hline=hline)
    return render(chart, path, size)


def layer_heatmap(data: Any, path: str | os.PathLike | None = None, metric: str = "prob",
                  kind: str = "count", n_layers: int | None = None,
                  title: str | None = None, size: tuple[int, int] = (900, 600)) -> Any:
    """Block subsets as a heatmap. ``kind="count"``: rows = number of kept blocks,
    columns = block; a cell is the mean metric of the plans with that many blocks
    that keep that block. ``kind="pairs"``: an n_layers x n_layers matrix; cell
    (i, j) is the mean metric of the plans that skip both block i and block j
    (the diagonal: plans that skip block i)."""
    if kind not in ("count", "pairs"):
        raise InputError(f"kind must be 'count' or 'pairs', got '{kind}'")
    table = per_plan(data, metric)
    masks = _masks(list(table["plan"]), n_layers, 1)
    kept = np.stack([m.attn & m.mlp for m in masks])  # [P, L]
    values = table[metric].to_numpy(dtype=float)
    L = kept.shape[1]
    label = LABELS[metric]
    if kind == "count":
        count = kept.sum(1)
        z = np.full((L + 1, L), np.nan)
        for k in range(L + 1):
            for j in range(L):
                sel = (count == k) & kept[:, j]
                if sel.any():
                    z[k, j] = values[sel].mean()
        chart = Chart("heatmap", title or f"{label}: blocks kept x block", x=list(range(L)),
                      y=list(range(L + 1)), z=z, xlabel="block kept",
                      ylabel="number of kept blocks")
    else:
        z = np.full((L, L), np.nan)
        for i in range(L):
            for j in range(L):
                sel = ~kept[:, i] & ~kept[:, j]
                if sel.any():
                    z[i, j] = values[sel].mean()
        chart = Chart("heatmap", title or f"{label} of plans skipping blocks i and j",
                      x=list(range(L)), y=list(range(L)), z=z, xlabel="block j skipped",
                      ylabel="block i skipped")
    return render(chart, path, size)


def interaction_matrix(table: Any, path: str | os.PathLike | None = None,
                       title: str = "interaction", labels: Sequence[str] | None = None,
                       size: tuple[int, int] = (700, 600)) -> Any:
    """Any matrix (DataFrame with labelled rows/columns, or a 2-D array) as an
    annotated heatmap, e.g. pairwise effects of removing two components."""
    import pandas as pd

    if isinstance(table, pd.DataFrame):
        z = table.to_numpy(dtype=float)
        x, y = [str(c) for c in table.columns], [str(i) for i in table.index]
    else:
        z = np.asarray(table, dtype=float)
        if z.ndim != 2:
            raise InputError(f"interaction_matrix needs a 2-D table, got shape {z.shape}")
        x = list(labels) if labels is not None else [str(i) for i in range(z.shape[1])]
        y = list(labels) if labels is not None else [str(i) for i in range(z.shape[0])]
    return render(Chart("heatmap", title, x=x, y=y, z=z), path, size)


def pruning_trace(trace: Any, path: str | os.PathLike | None = None, title: str = "pruning",
                  threshold: float | None = None, ylabel: str = "score",
                  size: tuple[int, int] = (900, 500)) -> Any:
    """The score after each pruning decision: ``trace`` is a list of (label, score)
    pairs or a DataFrame with columns ``candidate`` and ``score``. ``threshold``
    draws the acceptance level."""
    import pandas as pd

    if isinstance(trace, pd.DataFrame):
        if not {"candidate", "score"} <= set(trace.columns):
            raise InputError("a pruning trace DataFrame needs columns 'candidate' and 'score'")
        pairs = list(zip(trace["candidate"], trace["score"], strict=True))
    else:
        pairs = [tuple(p) for p in trace]
        if any(len(p) != 2 for p in pairs):
            raise InputError("a pruning trace is a list of (label, score) pairs")
    if not pairs:
        raise InputError("the pruning trace is empty")
    chart = Chart("line", title, x=[str(a) for a, _ in pairs], y=[float(b) for _, b in pairs],
                  xlabel="decision", ylabel=ylabel,
                  hline=("threshold", threshold) if threshold is not None else None)
    return render(chart, path, size)


# -- rendering ---------------------------------------------------------------------

def render(chart: Chart, path: str | os.PathLike | None, size: tuple[int, int]) -> Any:
    """Draw ``chart`` with plotly (``path`` ending .html) or matplotlib (anything
    else, or no path) and write it."""
    html = path is not None and Path(path).suffix.lower() in (".html", ".htm")
    if html:
        from .plot_render import plotly_figure

        fig = plotly_figure(chart, size)
        fig.write_html(str(path), include_plotlyjs=True, full_html=True)
        return fig
    from .plot_render import matplotlib_figure

    fig = matplotlib_figure(chart, size)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(str(path), dpi=100)
    return fig
