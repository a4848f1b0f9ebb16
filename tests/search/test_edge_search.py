"""Edge searches against their sequential references (one TransformerLens
``run_with_hooks`` per trial): path patching inside a node circuit, ACDC's edge
pruning; faithfulness curves against separate runs; auto-circuit PruneScores
both ways (against auto-circuit itself where it is installed)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fastskip as fs
from fastskip import search
from fastskip.errors import InputError
from fastskip.plans import EdgePlan, EdgePlanSet
from fastskip.search import tasks
from fastskip.search.autocircuit import from_prune_scores, to_prune_scores
from fastskip.search.faithfulness import default_sizes
from helpers import small_llama, small_model

_MODELS: dict[str, tuple] = {}


def model_and_runner(kind: str):
    if kind not in _MODELS:
        model = {"gpt2": lambda: small_model(seed=11),
                 "tiny": lambda: small_model(seed=12, n_layers=2, n_heads=2, d_head=16,
                                             d_model=32, d_mlp=64),
                 "llama": lambda: small_llama(seed=13)}[kind]()
        _MODELS[kind] = (model, fs.Runner(model, verbose=False))
    return _MODELS[kind]


def oriented(task: tasks.Task, runner) -> tasks.Task:
    """Answers and wrong answers swapped where the random model prefers the wrong
    one on average (the scores need a positive full logit difference)."""
    res = runner.run(["all"], task.prompts, task.answers, wrong_answers=task.wrong_answers)
    if float(res.logit_diff.mean()) > 0:
        return task
    return tasks.Task(task.name, task.prompts, task.wrong_answers, task.answers, task.corrupted)


# -- path patching ------------------------------------------------------------------------


@pytest.mark.parametrize("kind, ablation", [("gpt2", "zero"), ("gpt2", "mean"),
                                            ("gpt2", "resample"), ("llama", "mean")])
def test_path_patch_equals_the_sequential_reference(kind, ablation):
    model, runner = model_and_runner(kind)
    task = oriented(tasks.make_task("numerals", n=6, seed=1), runner)
    nodes = search.prune_nodes(runner, task, threshold=0.6)
    circuit = {"heads": [list(h) for h in nodes.kept_heads] or [[2, 1]],
               "mlps": nodes.kept_mlps or [0]}
    res = search.path_patch(runner, task, circuit, threshold=0.9, ablation=ablation)
    ref = search.path_patch_sequential(model, task, circuit, threshold=0.9, ablation=ablation)
    assert np.array_equal(res.candidates, ref.candidates) and len(res.candidates) > 3
    # scores are fractions of the full model's mean logit difference, which is small
    # on random models (0.02 here: zero-ablated circuits score ~20x it), so compare
    # them in logit units, where fp32 gives 1e-4
    full = abs(ref.full_logit_diff)
    assert abs(res.full_logit_diff - ref.full_logit_diff) <= 1e-4
    assert np.abs(res.scores - ref.scores).max() * full <= 1e-4
    assert abs(res.circuit_score - ref.circuit_score) * full <= 1e-4
    near = np.abs(ref.scores - 0.9) * full < 1e-4
    assert np.array_equal(res.kept_mask[~near], ref.kept_mask[~near])
    assert res.stats["runner_calls"] == 2  # the full model, then every trial in one call
    df = res.to_pandas()
    assert list(df.columns) == ["edge", "sender", "receiver", "score", "kept"]
    assert df["kept"].sum() == len(res.kept)
    # the kept-edge circuit keeps exactly the kept internal edges of the node circuit
    plan = res.plan
    for e in res.candidates:
        assert plan.mask[e] == (res.graph.edge_name(int(e)) in res.kept)


def test_path_patch_takes_every_circuit_form_and_mean_prompts():
    model, runner = model_and_runner("gpt2")
    task = oriented(tasks.make_task("numerals", n=6, seed=2), runner)
    heads, mlps = [(1, 2), (2, 0)], [0, 2]
    forms = [{"heads": [list(h) for h in heads], "mlps": mlps}, (heads, mlps),
             SimpleNamespace(kept_heads=heads, kept_mlps=mlps),
             fs.Plan.from_masks(np.ones(3, bool), np.array([True, False, True]),
                                heads=np.array([[0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]], bool))]
    results = [search.path_patch(runner, task, f) for f in forms]
    for r in results[1:]:
        assert np.array_equal(r.scores, results[0].scores)
    # a task's mean_prompts are the mean ablation's source when it has them
    with_mean = SimpleNamespace(prompts=task.prompts, answers=task.answers,
                                wrong_answers=task.wrong_answers, corrupted=task.corrupted,
                                mean_prompts=task.prompts[::-1])
    other = search.path_patch(runner, with_mean, forms[0])
    direct = search.path_patch(runner, task, forms[0],
                               ablation=fs.Ablation.mean(task.prompts[::-1]))
    assert np.array_equal(other.scores, direct.scores)
    assert not np.array_equal(other.scores, results[0].scores)
    with pytest.raises(InputError, match="head \\[1, 9\\] does not exist"):
        search.path_patch(runner, task, {"heads": [[1, 9]], "mlps": []})


# -- ACDC edge pruning -----------------------------------------------------------------


@pytest.mark.parametrize("metric, threshold, free", [
    pytest.param("kl", 0.005, False, marks=pytest.mark.slow), ("kl", 0.02, True),
    ("logit_diff", 0.05, True)])
def test_prune_edges_equals_the_sequential_reference(metric, threshold, free):
    model, runner = model_and_runner("tiny")
    task = oriented(tasks.make_task("numerals", n=5, seed=3), runner)
    ref = search.prune_edges_sequential(model, task, threshold, metric)
    for batch in (1, 8, 32):
        res = search.prune_edges(runner, task, threshold, metric, batch=batch)
        assert [s.edge for s in res.trace] == [s.edge for s in ref.trace]
        got = np.array([s.metric for s in res.trace])
        want = np.array([s.metric for s in ref.trace])
        assert np.abs(got - want).max() <= 1e-4
        close = np.abs(want - np.array([s.circuit_metric for s in ref.trace]) - threshold) < 1e-5
        agree = [a.removed == b.removed for a, b in zip(res.trace, ref.trace, strict=True)]
        assert all(ok for ok, c in zip(agree, close, strict=True) if not c)
        assert res.plan == ref.plan
    removed = sum(s.removed for s in ref.trace)
    assert 0 < removed < len(ref.trace)  # the case decides both ways
    # edges into receivers no kept path reads are decided without a model call
    assert (res.stats["decided_free"] > 0) == free


def test_prune_edges_checks_its_arguments():
    _, runner = model_and_runner("tiny")
    task = tasks.make_task("numerals", n=3)
    with pytest.raises(InputError, match="metric must be one of"):
        search.prune_edges(runner, task, 0.1, metric="accuracy")
    with pytest.raises(InputError, match="corrupted"):
        search.prune_edges(runner, task.prompts, 0.1, answers=task.answers,
                           wrong_answers=task.wrong_answers)


# -- faithfulness curves ---------------------------------------------------------------


def test_faithfulness_curve_equals_separate_runs():
    model, runner = model_and_runner("gpt2")
    task = oriented(tasks.make_task("numerals", n=6, seed=4), runner)
    g = runner.edges
    scores = np.random.default_rng(0).normal(size=g.n_edges)
    sizes = [0, 1, 10, 100, 200, g.n_edges]
    curve = search.faithfulness_curve(runner, task, scores, sizes)
    assert curve.sizes.tolist() == sizes
    abl = fs.Ablation.resample(task.corrupted)
    for i, n in enumerate(sizes):
        plan = EdgePlan.top_n(np.abs(scores), n, g)
        res = runner.run([plan], task.prompts, task.answers, wrong_answers=task.wrong_answers,
                         kl=True, ablation=abl)
        assert abs(curve.logit_diff[i] - float(res.logit_diff.mean())) <= 1e-5
        assert abs(curve.kl[i] - float(res.kl.mean())) <= 1e-5
    assert curve.faithfulness[0] == pytest.approx(0.0, abs=1e-9)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-9)
    assert curve.score[-1] == pytest.approx(1.0, abs=1e-9) and curve.kl[-1] <= 1e-5
    df = curve.to_pandas()
    assert list(df["edges"]) == sizes and np.isfinite(curve.area())
    # torch scores and PruneScores give the same curve
    same = search.faithfulness_curve(runner, task, torch.tensor(scores), sizes)
    assert np.array_equal(same.logit_diff, curve.logit_diff)
    again = search.faithfulness_curve(runner, task, to_prune_scores(scores, g), sizes)
    assert np.allclose(again.logit_diff, curve.logit_diff, atol=1e-5)


def test_default_sizes_are_32_distinct_logarithmic_sizes():
    sizes = default_sizes(32491)
    assert len(sizes) == 32 and sizes == sorted(set(sizes))
    assert sizes[0] == 1 and sizes[-1] == 32491
    assert len(default_sizes(10)) == 10


# -- auto-circuit PruneScores ----------------------------------------------------------


def test_prune_scores_round_trip():
    for g in (fs.EdgeGraph(12, 12, 12), fs.EdgeGraph(3, 4, 2)):
        scores = np.random.default_rng(1).normal(size=g.n_edges)
        ps = to_prune_scores(scores, g)
        assert ps["blocks.0.hook_q_input"].shape == (g.n_heads, 1)
        assert ps[f"blocks.{g.n_layers - 1}.hook_resid_post"].shape == (g.n_senders,)
        assert ps["blocks.1.hook_k_input"].shape == (g.n_kv_heads, g.senders_before(2))
        assert np.allclose(from_prune_scores(ps, g), scores, atol=1e-6)
    bad = dict(ps)
    del bad["blocks.0.hook_mlp_in"]
    with pytest.raises(InputError, match="no entry 'blocks.0.hook_mlp_in'"):
        from_prune_scores(bad, g)


HAVE_AUTO_CIRCUIT = importlib.util.find_spec("auto_circuit") is not None


@pytest.mark.skipif(not HAVE_AUTO_CIRCUIT, reason="auto-circuit is not installed (pip install "
                    "auto-circuit==1.0.1 attrs; the bench extra)")
def test_prune_scores_and_curves_agree_with_auto_circuit_itself():
    from helpers import import_auto_circuit

    ac = import_auto_circuit()
    model = small_model(seed=14)
    runner = fs.Runner(model, verbose=False)
    g = runner.edges
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    pm = ac.patchable_model(model, factorized=True, slice_output="last_seq", separate_qkv=True,
                            device=torch.device("cpu"))
    assert pm.n_edges == g.n_edges
    assert {k: tuple(v.shape) for k, v in pm.patch_masks.items()} == \
        {k: tuple(v.shape) for k, v in to_prune_scores(np.zeros(g.n_edges), g).items()}
    ps = to_prune_scores(np.random.default_rng(2).normal(size=g.n_edges), g)
    scores = from_prune_scores(ps, g)  # fp32 values, as auto-circuit ranks them
    ours = {name: i for i, name in enumerate(g.edge_names())}
    for edge in pm.edges:  # auto-circuit's own reading of every edge's score
        name = ac.edge_name(edge)
        assert float(edge.prune_score(ps)) == pytest.approx(scores[ours[name]], abs=1e-6)
    # the same circuits: auto-circuit's run_circuits (patching every edge outside
    # the circuit from the corrupted run) against fastskip's resample ablation
    prompts = ["1 2 3 4", "5 6 7 8", "A B C D"]
    tokens = model.to_tokens(prompts)
    corrupt = model.to_tokens(["7 3 9 1", "2 8 4 6", "Q X M B"])
    sizes = [1, 10, 100, g.n_edges // 2, g.n_edges]
    outs = ac.run_tree_patch(pm, tokens, corrupt, ps, sizes)
    mine = runner.logits(EdgePlanSet.top_n(np.abs(scores), sizes, g), tokens, last_only=True,
                         ablation=fs.Ablation.resample(tokens=corrupt))
    for i, n in enumerate(sizes):
        assert (outs[n] - mine[i]).abs().max() <= 1e-4, n
