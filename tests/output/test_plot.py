"""Figures: PNG through matplotlib (size, not blank) and offline HTML through plotly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import fastskip as fs
from fastskip.output import plot
from helpers import ANSWERS, PROMPTS

pytest.importorskip("matplotlib")
pytest.importorskip("plotly")


@pytest.fixture(scope="module")
def heads(tiny_runner):
    return tiny_runner.run(fs.grid.leave_one_out(3, 4, units="head", include_full=True),
                           PROMPTS, ANSWERS, top_k=0)


@pytest.fixture(scope="module")
def blocks(tiny_runner):
    return tiny_runner.run(fs.grid.block_subsets(3), PROMPTS, ANSWERS, top_k=0)


def assert_png(path, size):
    import matplotlib.image

    img = matplotlib.image.imread(str(path))
    assert img.shape[:2] == (size[1], size[0])
    colours = np.unique(img.reshape(-1, img.shape[-1]), axis=0)
    assert len(colours) > 10  # not blank


def assert_html(path):
    text = path.read_text()
    assert "plotly" in text.lower() and len(text) > 1_000_000  # plotly.js embedded: offline


def test_leave_one_out_heads_is_a_layer_by_head_heatmap(heads, tmp_path):
    fig = plot.leave_one_out(heads, tmp_path / "heads.png")
    assert_png(tmp_path / "heads.png", (900, 500))
    assert fig.axes[0].get_ylabel() == "layer"
    plot.leave_one_out(heads.to_pandas(), tmp_path / "heads.html", metric="rank")
    assert_html(tmp_path / "heads.html")


def test_leave_one_out_components_are_bars_per_layer(tiny_runner, tmp_path):
    res = tiny_runner.run(fs.grid.leave_one_out(3, 4, ("block", "attn", "mlp"),
                                                include_full=True), PROMPTS, ANSWERS)
    fig = plot.leave_one_out(res, tmp_path / "loo.png", size=(640, 480))
    assert_png(tmp_path / "loo.png", (640, 480))
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["full model", "without block", "without attn", "without mlp"]
    fig = plot.leave_one_out(res, tmp_path / "loo.html")
    assert {trace.name for trace in fig.data} == {"without block", "without attn", "without mlp"}
    assert_html(tmp_path / "loo.html")


def test_layer_heatmap_counts_and_pairs(blocks, tmp_path):
    fig = plot.layer_heatmap(blocks, tmp_path / "count.png")
    assert_png(tmp_path / "count.png", (900, 600))
    z = fig.axes[0].images[0].get_array()
    assert z.shape == (4, 3)  # 0..3 kept blocks x 3 blocks
    table = fs.io.summarize(blocks.to_pandas(), sort_by=None).set_index("plan")
    assert z[3, 0] == pytest.approx(table.loc["all", "prob"])
    fig = plot.layer_heatmap(blocks.to_pandas(), tmp_path / "pairs.html", kind="pairs")
    assert_html(tmp_path / "pairs.html")
    assert np.asarray(fig.data[0].z).shape == (3, 3)


def test_interaction_matrix_from_a_dataframe_or_array(tmp_path):
    labels = ["9.mlp", "8.attn", "10.7"]
    table = pd.DataFrame(np.arange(9.0).reshape(3, 3), index=labels, columns=labels)
    plot.interaction_matrix(table, tmp_path / "m.png")
    assert_png(tmp_path / "m.png", (700, 600))
    plot.interaction_matrix(np.eye(3), tmp_path / "m.html", labels=labels)
    assert_html(tmp_path / "m.html")


def test_pruning_trace_from_pairs_or_dataframe(tmp_path):
    pairs = [("full model", 1.0), ("-9.mlp", 0.95), ("-8.3", 0.9), ("-2", 0.82)]
    plot.pruning_trace(pairs, tmp_path / "t.png", threshold=0.8)
    assert_png(tmp_path / "t.png", (900, 500))
    df = pd.DataFrame(pairs, columns=["candidate", "score"])
    fig = plot.pruning_trace(df, tmp_path / "t.html")
    assert list(fig.data[0].y) == [1.0, 0.95, 0.9, 0.82]
    assert_html(tmp_path / "t.html")


def test_bad_inputs_raise_input_errors(heads):
    with pytest.raises(fs.InputError, match="unknown metric"):
        plot.leave_one_out(heads, metric="accuracy_top5")
    with pytest.raises(fs.InputError, match="candidate"):
        plot.pruning_trace(pd.DataFrame({"x": [1]}))
    with pytest.raises(fs.InputError, match="empty"):
        plot.pruning_trace([])
    with pytest.raises(fs.InputError, match="kind"):
        plot.layer_heatmap(heads, kind="triangles")


def test_removed_unit_names_what_a_plan_leaves_out():
    bind = lambda t: fs.Plan.parse(t, 3, 4).mask  # noqa: E731
    assert plot.removed_unit(bind("all")) == ("full", -1, -1)
    assert plot.removed_unit(bind("0,2")) == ("block", 1, -1)
    assert plot.removed_unit(bind("all,-1.attn")) == ("attn", 1, -1)
    assert plot.removed_unit(bind("all,-2.mlp")) == ("mlp", 2, -1)
    assert plot.removed_unit(bind("all,-1.3")) == ("head", 1, 3)
    assert plot.removed_unit(bind("0")) is None
    assert plot.removed_unit(bind("all,0/noln")) is None
