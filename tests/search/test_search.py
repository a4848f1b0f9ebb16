"""Search tools against plain references: node pruning against one TransformerLens
``run_with_hooks`` per candidate, the speculative walk against the plain loop,
greedy and exhaustive layer pruning against brute force, interactions against
separate runs, and the metrics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import fastskip as fs
from fastskip import search
from fastskip.errors import InputError
from fastskip.search import scores, tasks
from fastskip.search.layers import pareto_front
from fastskip.search.speculate import decision_tree, walk
from helpers import small_model

_MODELS: dict[int, tuple] = {}


def model_and_runner(seed: int):
    if seed not in _MODELS:
        model = small_model(seed=seed)
        _MODELS[seed] = (model, fs.Runner(model))
    return _MODELS[seed]


def oriented(task: tasks.Task, runner) -> tasks.Task:
    """The task with answers and wrong answers swapped if the (random) full model
    prefers the wrong ones: the scores need a positive full logit difference."""
    res = runner.run(["all"], task.prompts, task.answers, wrong_answers=task.wrong_answers)
    if float(res.logit_diff.mean()) > 0:
        return task
    return tasks.Task(task.name, task.prompts, task.wrong_answers, task.answers, task.corrupted)


def tl_mean_logit_diff(model, plan, task: tasks.Task) -> float:
    """Mean logit difference of a plan by TransformerLens hooks (one batched run;
    right padding is exact under causal attention)."""
    lengths = [model.to_tokens(p).shape[1] for p in task.prompts]
    logits = fs.reference_logits(model, plan, model.to_tokens(task.prompts))
    out = []
    for i, (a, w) in enumerate(zip(task.answers, task.wrong_answers, strict=True)):
        row = logits[i, lengths[i] - 1]
        out.append(float(row[model.to_single_token(a)] - row[model.to_single_token(w)]))
    return float(np.mean(out))


def decisions(res) -> str:
    return "".join("R" if s.removed else "k" for s in res.trace)


# (model seed, task family, threshold): each removes some candidates and keeps others,
# with every score at least 1e-3 from the threshold
PRUNE_CASES = [(0, "numerals", 0.9), (2, "numerals", 0.5), (2, "letters", 0.8),
               pytest.param(0, "numerals", 0.5, marks=pytest.mark.slow),
               pytest.param(1, "numerals", 0.8, marks=pytest.mark.slow)]


@pytest.mark.parametrize(("seed", "family", "threshold"), PRUNE_CASES)
def test_prune_nodes_equals_the_sequential_transformerlens_walk(seed, family, threshold):
    model, runner = model_and_runner(seed)
    task = oriented(tasks.make_task(family, n=6, seed=seed), runner)
    slow = search.prune_nodes_sequential(model, task, threshold=threshold, second_pass=True)
    n_first = 3 * 5  # 3 layers x (4 heads + the MLP)
    survivors = n_first - sum(s.removed for s in slow.trace[:n_first])
    assert len(slow.trace) == n_first + survivors
    assert "R" in decisions(slow) and "k" in decisions(slow)
    assert min(abs(s.score - threshold) for s in slow.trace) > 1e-3
    for second_pass in (True, False):
        fast = search.prune_nodes(runner, task, threshold=threshold, second_pass=second_pass)
        want = slow.trace if second_pass else slow.trace[:n_first]
        assert decisions(fast) == "".join("R" if s.removed else "k" for s in want)
        assert [s.candidate for s in fast.trace] == [s.candidate for s in want]
        assert [s.pass_no for s in fast.trace] == [s.pass_no for s in want]
        for a, b in zip(fast.trace, want, strict=True):
            assert abs(a.score - b.score) < 1e-4 and abs(a.circuit_score - b.circuit_score) < 1e-4
        assert abs(fast.full_logit_diff - slow.full_logit_diff) < 1e-4
        assert fast.score >= threshold
        if second_pass:
            assert fast.plan == slow.plan
            assert fast.kept_heads == slow.kept_heads and fast.kept_mlps == slow.kept_mlps


@pytest.mark.parametrize(("seed", "kind", "threshold"), [(0, "resample", 0.9), (2, "mean", 0.8)])
def test_prune_nodes_with_mean_and_resample_ablation_equals_the_sequential_walk(
        seed, kind, threshold):
    model, runner = model_and_runner(seed)
    task = oriented(tasks.make_task("numerals", n=6, seed=seed), runner)
    fast = search.prune_nodes(runner, task, threshold=threshold, ablation=kind, second_pass=True)
    make = fs.Ablation.mean if kind == "mean" else fs.Ablation.resample
    slow = search.prune_nodes_sequential(model, task, threshold=threshold, second_pass=True,
                                         ablation=make(task.corrupted))
    assert "R" in decisions(slow) and "k" in decisions(slow)
    assert min(abs(s.score - threshold) for s in slow.trace) > 1e-3
    assert decisions(fast) == decisions(slow) and fast.plan == slow.plan
    for a, b in zip(fast.trace, slow.trace, strict=True):
        assert abs(a.score - b.score) < 1e-4
    zero = search.prune_nodes(runner, task, threshold=threshold, second_pass=True)
    assert [s.score for s in zero.trace] != [s.score for s in fast.trace]


def test_prune_nodes_candidate_order_plan_and_final_score():
    model, runner = model_and_runner(0)
    task = oriented(tasks.make_task("numerals", n=6, seed=0), runner)
    res = search.prune_nodes(runner, task, threshold=0.5)
    assert [s.candidate for s in res.trace[:6]] == ["2.mlp", "2.3", "2.2", "2.1", "2.0", "1.mlp"]
    # the plan keeps exactly the survivors, and its score is the last removal's
    heads = res.plan.mask.heads
    assert [(L, h) for L in range(3) for h in range(4) if heads[L, h]] == res.kept_heads
    assert [L for L in range(3) if res.plan.mask.mlp[L]] == res.kept_mlps
    assert res.plan.mask.attn.all()  # removing heads keeps the attention output bias
    assert res.score == [s.score for s in res.trace if s.removed][-1]
    want = tl_mean_logit_diff(model, res.plan, task) / res.full_logit_diff
    assert abs(res.score - want) < 1e-4
    assert res.removed == [s.candidate for s in res.trace if s.removed]
    df = res.to_pandas()
    assert list(df.columns) == ["candidate", "removed", "score", "circuit_score", "pass_no"]
    assert len(df) == len(res.trace)


def test_speculative_batches_give_the_one_plan_per_call_walk():
    _, runner = model_and_runner(2)
    task = oriented(tasks.make_task("numerals", n=6, seed=2), runner)
    plain = search.prune_nodes(runner, task, threshold=0.8, batch=1, second_pass=True)
    assert plain.stats["runner_calls"] == len(plain.trace) + 1  # + the full model
    for batch, speculate in ((4, "keep"), (32, "adaptive")):
        res = search.prune_nodes(runner, task, threshold=0.8, batch=batch, second_pass=True,
                                 speculate=speculate)
        assert decisions(res) == decisions(plain)
        pairs = zip(res.trace, plain.trace, strict=True)
        assert max(abs(a.score - b.score) for a, b in pairs) < 1e-5
        assert res.stats["runner_calls"] < plain.stats["runner_calls"]
        assert sum(res.stats["decided_per_call"]) == len(res.trace)


def plain_walk(n: int, threshold: float, score) -> list[tuple[int, bool, float]]:
    """The plain sequential loop over candidates 0..n-1."""
    removed: frozenset = frozenset()
    out = []
    for c in range(n):
        s = score(removed | {c})
        out.append((c, s >= threshold, s))
        if s >= threshold:
            removed = removed | {c}
    return out


def test_walk_equals_the_plain_loop_on_synthetic_scores():
    """Exactness of the speculation, bit for bit: scores are a fixed function of
    the removed set, so every decision must be the plain loop's."""
    mixed = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(1, 30))
        weights = rng.normal(0, 0.2, n)
        pair = rng.normal(0, 0.1, (n, n))
        threshold = float(rng.uniform(0.3, 1.2))

        def score(removed: frozenset, weights=weights, pair=pair) -> float:
            idx = sorted(removed)
            return 1.0 + float(weights[idx].sum() + pair[np.ix_(idx, idx)].sum() / 4)

        want = plain_walk(n, threshold, score)
        mixed += len({r for _, r, _ in want}) == 2
        for batch, mode in itertools.product((1, 2, 5, 64), ("adaptive", "keep")):
            got: list[tuple[int, bool, float]] = []
            walk(list(range(n)), frozenset(), threshold,
                 lambda states, score=score: np.array([score(s) for s in states]),
                 lambda st, c: st | {c}, lambda i, r, s, got=got: got.append((i, r, s)),
                 batch=batch, speculate=mode)
            assert got == want, (seed, batch, mode)
    assert mixed >= 10  # walks that both remove and keep


def test_decision_tree_is_best_first_and_prefix_closed():
    paths = decision_tree(10, 7, lambda k, b: (0.9, b))
    assert paths[0] == () and len(paths) == 7
    assert all(p[:-1] in paths for p in paths if p)
    assert paths[:4] == [(), (True,), (True, True), (True, True, True)]
    assert decision_tree(10, 5, lambda k, b: (0.0, b)) == [(), (False,), (False, False),
                                                         (False, False, False), (False,) * 4]
    assert decision_tree(2, 50, lambda k, b: (0.5, b)) == [(), (True,), (False,)]
    assert decision_tree(10, 50, lambda k, b: (0.5, b), min_prob=0.3) == [(), (True,), (False,)]
    assert len(decision_tree(10, 50, lambda k, b: (0.5, b), min_prob=0.2)) == 7
    # path-dependent predictions: every removal costs 0.3, removals are likely while the
    # predicted score stays above 0.5
    seen = []

    def predict(k, score):
        seen.append(round(score, 6))
        return (0.9 if score - 0.3 >= 0.5 else 0.1), score - 0.3

    paths = decision_tree(10, 4, predict, base=1.0)
    assert paths[:3] == [(), (True,), (True, False)]
    assert {1.0, 0.7} <= set(seen)


def greedy_by_hooks(model, task, units: list[str], threshold: float, cache: dict):
    """Greedy layer pruning, one TransformerLens run per plan (memoised in ``cache``)."""

    def mld(plan: str) -> float:
        if plan not in cache:
            cache[plan] = tl_mean_logit_diff(model, plan, task)
        return cache[plan]

    full = mld("all")
    removed: list[str] = []
    scores: list[float] = []
    left = list(units)
    while left:
        trial = [mld(",".join(["all"] + [f"-{u}" for u in removed + [u]])) / full for u in left]
        best = int(np.argmax(trial))
        if trial[best] < threshold:
            break
        removed.append(left.pop(best))
        scores.append(trial[best])
    return removed, scores


@pytest.mark.parametrize(("units", "names"), [
    ("block", ["0", "1", "2"]),
    ("component", ["0.attn", "0.mlp", "1.attn", "1.mlp", "2.attn", "2.mlp"])])
def test_prune_layers_equals_greedy_by_hooks(units, names):
    model, runner = model_and_runner(0)
    task = oriented(tasks.make_task("numerals", n=6, seed=0), runner)
    cache: dict[str, float] = {}
    for threshold in (0.3, 0.9):
        res = search.prune_layers(runner, task, units=units, threshold=threshold)
        removed, scores = greedy_by_hooks(model, task, names, threshold, cache)
        assert res.removed == removed
        assert np.allclose(res.scores, scores, atol=1e-4)
        assert res.score == (res.scores[-1] if scores else 1.0)
        kept = fs.Plan.parse(",".join(["all"] + [f"-{u}" for u in removed]), 3, 4)
        assert res.plan == kept
        assert set(res.history["round"]) == set(range(len(removed) + (len(removed) < len(names))))
    assert len(search.prune_layers(runner, task, units=units, threshold=0.3).removed) > 0


def test_exhaustive_equals_one_call_per_subset_and_the_pareto_front_is_right():
    _, runner = model_and_runner(1)
    task = oriented(tasks.make_task("letters", n=6, seed=1), runner)
    ex = search.exhaustive(runner, task, threshold=0.5)
    assert len(ex.table) == 8
    full = None
    for i, row in ex.table.iterrows():
        one = runner.run([row.plan], task.prompts, task.answers, wrong_answers=task.wrong_answers)
        mld = float(one.logit_diff.mean())
        assert abs(mld - row.mean_logit_diff) < 1e-5
        kept = [L for L in range(3) if (i >> L) & 1]
        assert row.n_blocks == len(kept)
        assert fs.Plan.parse(row.plan, 3, 4) == fs.Plan.from_masks(
            [L in kept for L in range(3)], [L in kept for L in range(3)], n_heads=4)
        full = mld if len(kept) == 3 else full
    assert np.allclose(ex.table.score, ex.table.mean_logit_diff / full)
    # smallest: the passing plans of the fewest blocks
    passing = ex.table[ex.table.score >= 0.5]
    assert len(ex.smallest) > 0
    assert set(ex.smallest.n_blocks) == {passing.n_blocks.min()}
    assert set(ex.smallest.plan) == set(passing[passing.n_blocks == passing.n_blocks.min()].plan)
    assert list(ex.smallest.score) == sorted(ex.smallest.score, reverse=True)
    check_pareto(ex.table, ex.pareto)


def check_pareto(table, front):
    pts = list(zip(table.n_blocks, table.score, strict=True))
    fpts = list(zip(front.n_blocks, front.score, strict=True))
    for k, s in fpts:  # no point is dominated
        assert not any((k2 <= k and s2 >= s) and (k2 < k or s2 > s) for k2, s2 in pts)
    for k, s in pts:  # every point is matched or dominated by a front point
        assert any(k2 <= k and s2 >= s for k2, s2 in fpts)


def test_pareto_front_by_hand():
    n = np.array([0, 1, 1, 2, 2, 3, 3])
    s = np.array([0.1, 0.5, 0.7, 0.6, np.nan, 0.9, 0.9])
    assert pareto_front(n, s).tolist() == [0, 2, 5]
    rng = np.random.default_rng(0)
    import pandas as pd

    for _ in range(20):
        n = rng.integers(0, 5, 30)
        s = rng.normal(size=30)
        table = pd.DataFrame({"n_blocks": n, "score": s})
        check_pareto(table, table.iloc[pareto_front(n, s)])


def test_exhaustive_over_the_first_layers_keeps_the_rest():
    _, runner = model_and_runner(1)
    task = oriented(tasks.make_task("letters", n=6, seed=1), runner)
    ex = search.exhaustive(runner, task, n_layers=2, threshold=0.5)
    assert len(ex.table) == 4
    assert all(fs.Plan.parse(p, 3, 4).mask.mlp[2] for p in ex.table.plan)
    assert list(ex.table.n_blocks) == [1, 2, 2, 3]
    with pytest.raises(InputError, match="n_layers"):
        search.exhaustive(runner, task, n_layers=4)


def test_interactions_equal_separate_runs():
    _, runner = model_and_runner(0)
    task = oriented(tasks.make_task("numerals", n=6, seed=0), runner)
    comps = ["2.mlp", "1.attn", "0.3", "2"]
    res = search.interactions(runner, comps, task)

    def mld(plan: str) -> float:
        r = runner.run([plan], task.prompts, task.answers, wrong_answers=task.wrong_answers)
        return float(r.logit_diff.mean())

    full = mld("all")
    effect = [mld(f"all,-{c}") - full for c in comps]
    assert np.allclose(res.effects.numpy(), effect, atol=1e-5)
    for i, j in itertools.combinations(range(4), 2):
        joint = mld(f"all,-{comps[i]},-{comps[j]}") - full
        assert abs(float(res.joint[i, j]) - joint) < 1e-5
        assert abs(float(res.matrix[i, j]) - (joint - effect[i] - effect[j])) < 1e-5
        assert float(res.matrix[i, j]) == float(res.matrix[j, i])
    assert torch.isnan(res.matrix.diagonal()).all()
    # removing 2.mlp from a plan without block 2 changes nothing: interaction = -effect
    assert abs(float(res.matrix[0, 3]) + effect[0]) < 1e-5
    assert list(res.table.index) == comps and len(res.to_pandas()) == 6
    with pytest.raises(fs.PlanError):
        search.interactions(runner, ["2.mlp", "7.attn"], task)
    with pytest.raises(InputError, match="one plan item"):
        search.interactions(runner, ["2.mlp", "all,-1"], task)


def test_metrics_from_results(tiny_runner):
    task = tasks.make_task("numerals", n=5, seed=0)
    plans = ["all", "0,2", "none"]
    res = tiny_runner.run(plans, task.prompts, task.answers, wrong_answers=task.wrong_answers,
                          kl=True)
    mld = res.logit_diff.mean(dim=1)
    assert torch.allclose(scores.mean_logit_diff(res), mld)
    assert torch.allclose(scores.score(res), mld / mld[0])
    assert torch.allclose(scores.score(res, full=2.0), mld / 2.0)
    assert torch.allclose(scores.percent(res), 100 * mld / mld[0])
    assert torch.allclose(scores.accuracy(res), (res.rank[:, :, 0] == 0).float().mean(1))
    assert torch.allclose(scores.mean_kl(res), res.kl.mean(dim=1))
    assert float(scores.mean_kl(res)[0]) < 1e-5
    bare = tiny_runner.run(["0,2"], task.prompts, task.answers)
    with pytest.raises(InputError, match="wrong_answers"):
        scores.mean_logit_diff(bare)
    with pytest.raises(InputError, match="kl=True"):
        scores.mean_kl(bare)
    with pytest.raises(InputError, match="no plan 'all'"):
        scores.score(tiny_runner.run(["0,2"], task.prompts, task.answers,
                                      wrong_answers=task.wrong_answers))


class RecordingRunner:
    """A runner that records the keyword arguments of ``run`` and ``logit_diff``."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []
        self.n_layers, self.n_heads = runner.n_layers, runner.n_heads

    def run(self, plans, prompts, answers, **kw):
        self.calls.append(dict(kw))
        kw.pop("ablation", None)
        return self.runner.run(plans, prompts, answers, **kw)

    def logit_diff(self, plans, prompts, answers, wrong_answers, **kw):
        self.calls.append(dict(kw))
        kw.pop("ablation", None)
        return self.runner.logit_diff(plans, prompts, answers, wrong_answers, **kw)


def test_inputs_and_ablation_pass_through():
    _, runner = model_and_runner(0)
    task = oriented(tasks.make_task("numerals", n=6, seed=0), runner)
    rec = RecordingRunner(runner)
    by_lists = search.prune_layers(rec, prompts=task.prompts, answers=task.answers,
                                   wrong_answers=task.wrong_answers, threshold=0.3)
    assert all(kw.get("ablation") is None for kw in rec.calls)  # zero ablation
    assert by_lists.removed == search.prune_layers(runner, task, threshold=0.3).removed
    rec.calls.clear()
    search.prune_nodes(rec, task, threshold=0.5, ablation="mean")
    assert rec.calls and all(kw["ablation"] == fs.Ablation.mean(task.corrupted)
                             for kw in rec.calls)
    with pytest.raises(InputError, match="corrupted prompts"):
        search.prune_nodes(runner, prompts=task.prompts, answers=task.answers,
                           wrong_answers=task.wrong_answers, ablation="resample")
    bad = tasks.Task(task.name, task.prompts, task.wrong_answers, task.answers, task.corrupted)
    with pytest.raises(InputError, match="full model's mean logit difference"):
        search.prune_nodes(runner, bad)
    with pytest.raises(InputError, match="missing wrong_answers"):
        search.prune_nodes(runner, prompts=task.prompts, answers=task.answers)
    with pytest.raises(InputError, match="one length"):
        search.exhaustive(runner, task.prompts, answers=task.answers[:2],
                          wrong_answers=task.wrong_answers)
