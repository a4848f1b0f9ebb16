"""``fastskip search path-patch | faithfulness | prune-edges``: results written
as JSON or Parquet, figures, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import fastskip as fs
from fastskip.cli import main
from helpers import PROMPTS


@pytest.fixture
def prompts(tiny, tmp_path):
    """Prompts whose answer is the random model's top-1, with a wrong answer it ranks low."""
    res = fs.Runner(tiny).run(["all"], PROMPTS, [" x"] * len(PROMPTS), top_k=1)
    best = [tiny.to_string(int(res.topk_ids[0, n, 0, 0])) for n in range(len(PROMPTS))]
    path = tmp_path / "prompts.tsv"
    path.write_text("\n".join(f"{p}\t{a}\t zebra" for p, a in zip(PROMPTS, best, strict=True)))
    return path


def test_path_patch_writes_json_and_an_edge_graph(tiny_name, prompts, tmp_path, capsys):
    circuit = tmp_path / "circuit.json"
    circuit.write_text(json.dumps({"heads": [[0, 1], [1, 2], [2, 3]], "mlps": [0, 2]}))
    out, png = tmp_path / "edges.json", tmp_path / "graph.png"
    rc = main(["search", "path-patch", "-m", tiny_name, "--prompts", str(prompts),
               "--circuit", str(circuit), "--ablation", "zero", "--threshold", "0.95",
               "--out", str(out), "--plot", str(png)])
    text = capsys.readouterr().out
    assert rc == 0 and "node circuit score" in text
    data = json.loads(out.read_text())
    assert data["circuit"] == {"heads": [[0, 1], [1, 2], [2, 3]], "mlps": [0, 2]}
    assert len(data["edges"]) > 10 and set(data["edges"][0]) == {"edge", "sender", "receiver",
                                                                  "score", "kept"}
    assert data["kept"] == [e["edge"] for e in data["edges"] if e["kept"]]
    assert png.stat().st_size > 1000


def test_faithfulness_writes_parquet_and_a_curve(tiny_name, prompts, tmp_path, capsys):
    g = fs.Runner(fs.model.load_model("tiny")).edges
    scores = tmp_path / "scores.npy"
    np.save(scores, np.random.default_rng(0).normal(size=g.n_edges))
    out, html = tmp_path / "curve.parquet", tmp_path / "curve.html"
    rc = main(["search", "faithfulness", "-m", tiny_name, "--prompts", str(prompts),
               "--scores", str(scores), "--sizes", "1,10,100", "--ablation", "zero",
               "--out", str(out), "--plot", str(html)])
    assert rc == 0 and "area under faithfulness" in capsys.readouterr().out
    table = pd.read_parquet(out)
    assert list(table["edges"]) == [1, 10, 100] and "kl" in table.columns
    assert "plotly" in html.read_text()[:100000]


def test_prune_edges_writes_the_circuit(tiny_name, prompts, tmp_path, capsys):
    out = tmp_path / "acdc.json"
    rc = main(["search", "prune-edges", "-m", tiny_name, "--prompts", str(prompts),
               "--threshold", "0.05", "--metric", "logit_diff", "--ablation", "zero",
               "--out", str(out)])
    assert rc == 0 and "runner calls" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["metric"] == "logit_diff" and len(data["trace"]) > 0
    g = fs.Runner(fs.model.load_model("tiny")).edges
    assert fs.EdgePlan.parse(data["plan"], g).edges() == data["kept"]


@pytest.mark.parametrize("args, match", [
    (["path-patch"], "path-patch needs --circuit"),
    (["faithfulness"], "faithfulness needs --scores"),
    (["faithfulness", "--scores", "missing.npy"], "no such file"),
])
def test_edge_search_errors_are_one_line(tiny_name, prompts, capsys, args, match):
    rc = main(["search", args[0], "-m", tiny_name, "--prompts", str(prompts), *args[1:]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and match in err
