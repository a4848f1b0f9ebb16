"""``fastskip search prune-nodes --data seqcont --algorithm seqcont``: the paper's
search from the command line, with the circuit written in the paper's format."""

from __future__ import annotations

import json

import pytest

import fastskip as fs
from fastskip.cli import main


def test_seqcont_search_writes_the_circuit_in_the_papers_format(tiny, tiny_name, tmp_path,
                                                                capsys):
    out, png = tmp_path / "circuit.json", tmp_path / "trace.png"
    rc = main(["search", "prune-nodes", "-m", tiny_name, "--task", "months", "--data", "seqcont",
               "--n-per-template", "1", "--n-mean", "48", "--algorithm", "seqcont",
               "--threshold", "0.8",
               "--out", str(out), "--plot", str(png)])
    printed = capsys.readouterr().out
    assert rc == 0 and "of the full model's mean logit difference" in printed
    circuit = json.loads(out.read_text())
    task = fs.tasks.load_seqcont("months", 1, model=tiny)
    task.mean_prompts = task.mean_prompts[:48]
    want = fs.search.prune_nodes(fs.Runner(tiny), task, threshold=0.8, algorithm="seqcont")
    assert circuit["heads"] == [list(h) for h in want.kept_heads]
    assert circuit["mlps"] == want.kept_mlps
    assert abs(circuit["score_percent"] - 100 * want.score) < 1e-6
    assert circuit["mean_prompts"] == 48 and circuit["prompts"] == 3
    assert len(circuit["trials"]) == len(want.trace) and circuit["passes"] == want.passes
    assert png.stat().st_size > 1000


@pytest.mark.parametrize(("argv", "message"), [
    (["--task", "letters", "--data", "seqcont"], "has tasks numerals, numwords, months"),
    (["--prompts", "p.tsv", "--data", "seqcont"], "not --prompts"),
])
def test_seqcont_options_are_checked_before_loading(argv, message, capsys):
    assert main(["search", "prune-nodes", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_out_is_not_an_option_of_prune_layers(capsys):
    assert main(["search", "prune-layers", "--task", "months", "--out", "x.json"]) == 2
    assert "--out is an option of prune-nodes, path-patch" in capsys.readouterr().err
    assert main(["search", "path-patch", "--task", "months", "--algorithm", "seqcont"]) == 2
    assert "--algorithm is an option of prune-nodes" in capsys.readouterr().err
