"""Renderers of ``fastskip.plot.Chart``: matplotlib (Agg, no pyplot state) and plotly."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        pkg = module.split(".")[0]
        raise InputError(f"plots need the package {pkg}: pip install 'fastskip[plot]' "
                         f"(or pip install {pkg})") from None


def matplotlib_figure(chart: Any, size: tuple[int, int]) -> Any:
    """A matplotlib Figure (Agg canvas: works without a display) of ``size`` pixels at 100 dpi."""
    figure = _need("matplotlib.figure")
    agg = _need("matplotlib.backends.backend_agg")
    fig = figure.Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100,
                        layout="constrained")
    agg.FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if chart.kind == "bar":
        n = max(len(chart.series), 1)
        width = 0.8 / n
        pos = np.arange(len(chart.x))
        for i, (name, values) in enumerate(chart.series.items()):
            ax.bar(pos + (i - (n - 1) / 2) * width, values, width, label=name)
        ax.set_xticks(pos, [str(v) for v in chart.x], rotation=90 if len(pos) > 16 else 0,
                      fontsize=8 if len(pos) > 16 else 10)
        if len(chart.series) > 1 or chart.hline:
            _hline(ax, chart)
            ax.legend(fontsize=8)
    elif chart.kind == "heatmap":
        z = np.asarray(chart.z, dtype=float)
        im = ax.imshow(z, aspect="auto", origin="lower" if chart.ylabel.startswith("number")
                       else "upper", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax)
        ax.set_xticks(range(len(chart.x)), [str(v) for v in chart.x], fontsize=8)
        ax.set_yticks(range(len(chart.y)), [str(v) for v in chart.y], fontsize=8)
        if z.size <= 400:
            for (i, j), v in np.ndenumerate(z):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                            color="white" if v < np.nanmean(z) else "black")
    elif chart.kind == "line":
        pos = np.arange(len(chart.x))
        ax.plot(pos, chart.y, marker="o")
        ax.set_xticks(pos, chart.x, rotation=60 if len(pos) > 6 else 0, ha="right"
                      if len(pos) > 6 else "center", fontsize=8)
        if chart.hline:
            _hline(ax, chart)
            ax.legend(fontsize=8)
    else:
        raise InputError(f"unknown chart kind '{chart.kind}'")
    ax.set_title(chart.title)
    ax.set_xlabel(chart.xlabel)
    ax.set_ylabel(chart.ylabel)
    return fig


def _hline(ax: Any, chart: Any) -> None:
    if chart.hline:
        name, value = chart.hline
        ax.axhline(value, color="black", linestyle="--", linewidth=1, label=name)


def plotly_figure(chart: Any, size: tuple[int, int]) -> Any:
    """A plotly Figure of ``chart``."""
    go = _need("plotly.graph_objects")
    fig = go.Figure()
    if chart.kind == "bar":
        for name, values in chart.series.items():
            fig.add_bar(x=[str(v) for v in chart.x], y=values, name=name)
        fig.update_layout(barmode="group")
    elif chart.kind == "heatmap":
        z = np.asarray(chart.z, dtype=float)
        cells = [[v if np.isfinite(v) else None for v in row] for row in z.tolist()]
        fig.add_heatmap(z=cells,
                        x=[str(v) for v in chart.x], y=[str(v) for v in chart.y],
                        colorscale="Viridis", texttemplate="%{z:.2g}" if z.size <= 400 else None)
        if not chart.ylabel.startswith("number"):
            fig.update_yaxes(autorange="reversed")
    elif chart.kind == "line":
        fig.add_scatter(x=list(range(len(chart.x))), y=chart.y, mode="lines+markers",
                        text=chart.x, hovertemplate="%{text}: %{y}<extra></extra>")
        fig.update_xaxes(tickvals=list(range(len(chart.x))), ticktext=chart.x)
    else:
        raise InputError(f"unknown chart kind '{chart.kind}'")
    if chart.hline:
        fig.add_hline(y=chart.hline[1], line_dash="dash", annotation_text=chart.hline[0])
    fig.update_layout(title=chart.title, xaxis_title=chart.xlabel, yaxis_title=chart.ylabel,
                      width=size[0], height=size[1])
    return fig
