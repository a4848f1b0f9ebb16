"""The paper's circuit search (``prune_nodes(..., algorithm="seqcont")``) and data
(``fs.tasks.load_seqcont``): the batched search against the sequential
TransformerLens reference (``prune_nodes_seqcont_reference``) on the paper's
prompts, the shipped data, and the published circuits where GPT-2's weights are
at hand."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from importlib import resources

import numpy as np
import pytest
import torch

import fastskip as fs
from fastskip import search
from fastskip.errors import InputError
from fastskip.search import seqcont_data, tasks
from fastskip.search.common import resolve_ablation
from fastskip.search.seqcont import CLOSE, backward_order, forward_order, removal_rule
from helpers import small_llama, small_model


@pytest.fixture(scope="module")
def smollm():
    """The real SmolLM2-135M (skipped where its weights are not installed)."""
    try:
        return fs.load_model("smollm2-135m")
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"SmolLM2-135M is not available: {e}")


def oriented(task: tasks.Task, runner) -> tasks.Task:
    """The task with answers and wrong answers swapped where the (random) full model
    prefers the wrong ones: scores need a positive full logit difference."""
    d = runner.logit_diff(["all"], task.prompts, task.answers, task.wrong_answers,
                          prepend_bos=False)
    if float(d.mean()) > 0:
        return task
    return tasks.Task(task.name, task.prompts, task.wrong_answers, task.answers, task.corrupted,
                      task.mean_prompts)


def paper_task(model, runner, n: int, n_mean: int, name: str = "numerals") -> tasks.Task:
    task = tasks.load_seqcont(name, n, model=model)
    task.mean_prompts = task.mean_prompts[:n_mean]
    return oriented(task, runner)


def decisions(res) -> str:
    return "".join("R" if s.removed else "k" for s in res.trace)


def assert_same_search(fast, ref, threshold: float) -> list[str]:
    """The batched search walked as the reference did: the same trials in the same
    order, the same decisions, scores to fp32 round-off (logit differences within
    1e-4), the same circuit and passes. A reference score within CLOSE of the
    threshold may decide differently: such trials are returned (and warned about),
    and the walks are compared only up to the first of them."""
    tol = 1e-4 / ref.full_logit_diff  # on scores: fractions of the full logit difference
    assert abs(fast.full_logit_diff - ref.full_logit_diff) < 1e-4
    close = [i for i, s in enumerate(ref.trace) if abs(s.score - threshold) < CLOSE]
    n = close[0] + 1 if close else len(ref.trace)
    assert [s.candidate for s in fast.trace[:n]] == [s.candidate for s in ref.trace[:n]]
    assert [s.pass_no for s in fast.trace[:n]] == [s.pass_no for s in ref.trace[:n]]
    for i, (a, b) in enumerate(zip(fast.trace[:n], ref.trace[:n], strict=True)):
        assert abs(a.score - b.score) <= tol, (i, a, b)
        assert a.removed == b.removed or i in close, (i, a, b)
    if close:
        names = [ref.trace[i].candidate for i in close]
        warnings.warn(f"trials {names} scored within {CLOSE} of the threshold: compared up "
                      "to the first of them", stacklevel=2)
        return names
    assert len(fast.trace) == len(ref.trace)
    assert fast.kept_heads == ref.kept_heads and fast.kept_mlps == ref.kept_mlps
    assert fast.passes == ref.passes
    assert abs(fast.score - ref.score) <= tol
    return []


def covers_the_algorithm(res, n_layers: int) -> None:
    """The case exercises what matters: keeps and removals, removed MLPs (MLP means
    under head ablation), and a third pass (a forward pass that removed something)."""
    d = decisions(res)
    assert "R" in d and "k" in d
    assert any(s.removed and s.candidate.endswith("mlp") for s in res.trace)
    assert res.passes >= 3
    assert len(res.kept_mlps) < n_layers


# -- the paper's data ------------------------------------------------------------------

def test_the_shipped_data_is_found_through_importlib_resources():
    root = resources.files("fastskip.search").joinpath("data", "seqcont")
    for task in seqcont_data.SEQCONT_TASKS:
        for file, n in (("done", 1024), ("lost", 1024), ("names", 1024), ("random", 1536)):
            records = json.loads(root.joinpath(task, f"{file}.json").read_text())
            assert len(records) == n
            assert {"text", "corr", "incorr"} <= set(records[0])
    assert root.joinpath("README.md").read_text().startswith("# Sequence-continuation data")
    pub = tasks.published_circuits()
    assert set(pub) == {"numerals", "numwords", "months"}
    assert pub["numerals"]["mlps"] == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert (7, 11) in pub["numerals"]["heads"] and len(pub["months"]["heads"]) == 13


@pytest.mark.slow
def test_a_built_wheel_ships_the_data(tmp_path):
    """A non-editable install gets the data: the wheel pip builds from the checkout
    holds every file ``load_seqcont`` and ``published_circuits`` read."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "-q",
                          "-w", str(tmp_path)], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"pip could not build a wheel here (needs setuptools from the package "
                    f"index): {run.stderr.strip().splitlines()[-1:]}")
    (wheel,) = tmp_path.glob("fastskip-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    base = "fastskip/search/data/seqcont"
    want = {f"{base}/{t}/{f}.json" for t in seqcont_data.SEQCONT_TASKS
            for f in (*seqcont_data.TEMPLATES, "random")}
    want |= {f"{base}/{seqcont_data.PUBLISHED_FILE}", f"{base}/README.md"}
    assert want <= names


@pytest.mark.parametrize("name", seqcont_data.SEQCONT_TASKS)
def test_gpt2s_tokenizer_keeps_all_1536_prompts_of_23_tokens(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no drop warning
        task = tasks.load_seqcont(name)
    assert len(task) == 1536 and len(task.mean_prompts) == 1536
    assert task.dropped == 0 and task.dropped_mean == 0
    assert set(seqcont_data.token_lengths(task.prompts + task.mean_prompts)) == {23}
    for k, template in enumerate(seqcont_data.TEMPLATES):  # 512 of each, in the paper's order
        rows = seqcont_data.read_file(name, template)[:512]
        assert task.prompts[512 * k: 512 * (k + 1)] == [r["text"] for r in rows]
        assert task.answers[512 * k] == rows[0]["corr"]
        assert task.wrong_answers[512 * k] == rows[0]["incorr"]
    rand = seqcont_data.read_file(name, "random")
    assert task.mean_prompts == [r["text"] for r in rand]
    assert task.corrupted[513] == rand[513]["text"]  # the twin: same names, random members
    assert task.prompts[513].split(" ")[0] == task.corrupted[513].split(" ")[0]
    small = tasks.load_seqcont(name, 4)
    assert len(small) == 12 and small.prompts[4] == task.prompts[512]


class SplitDigits:
    """A stand-in model whose tokenizer splits numbers into digits (as SmolLM2's
    does): prompts with two-digit numbers are longer."""

    def to_tokens(self, text, prepend_bos=False, truncate=False):
        n = sum(len(w) if w.strip(".").isdigit() else 1 for w in text.split())
        return torch.zeros((1, n), dtype=torch.long)


def test_prompts_of_another_token_length_are_dropped_and_counted():
    with pytest.warns(UserWarning, match="dropped"):
        task = tasks.load_seqcont("numerals", 64, model=SplitDigits())
    lengths = seqcont_data.token_lengths(task.prompts, SplitDigits())
    assert len(set(lengths)) == 1
    assert task.dropped > 0 and len(task) + task.dropped == 3 * 64
    assert task.dropped_mean > 0 and len(task.mean_prompts) + task.dropped_mean == 1536
    assert set(seqcont_data.token_lengths(task.mean_prompts, SplitDigits())) == set(lengths)
    assert len(task.answers) == len(task.wrong_answers) == len(task.corrupted) == len(task)
    with pytest.raises(ValueError, match="n_per_template"):
        tasks.load_seqcont("numerals", 0)
    with pytest.raises(ValueError, match="unknown seqcont task"):
        tasks.load_seqcont("letters")
    assert tasks.load_seqcont("number_words", 1).name == "numwords"


@pytest.mark.realmodel
@pytest.mark.slow
def test_smollm2s_tokenizer_drops_prompts_and_reports_how_many(smollm):
    with pytest.warns(UserWarning, match="dropped"):
        task = tasks.load_seqcont("numerals", 512, model=smollm)
    assert task.dropped > 0 and len(task) + task.dropped == 1536
    # the counts, independently: SmolLM2's tokenizer itself on every prompt (no BOS)
    count = lambda texts: Counter(len(smollm.tokenizer(t, add_special_tokens=False)  # noqa: E731
                                      ["input_ids"]) for t in texts)
    rows = [r["text"] for t in seqcont_data.TEMPLATES
            for r in seqcont_data.read_file("numerals", t)[:512]]
    by_length = count(rows)
    majority, kept = by_length.most_common(1)[0]
    assert len(by_length) > 1 and (len(task), task.dropped) == (kept, 1536 - kept)
    mean_kept = count(r["text"] for r in seqcont_data.read_file("numerals", "random"))[majority]
    assert (len(task.mean_prompts), task.dropped_mean) == (mean_kept, 1536 - mean_kept)
    lengths = {smollm.to_tokens(p, prepend_bos=False).shape[1] for p in task.prompts}
    means = {smollm.to_tokens(p, prepend_bos=False).shape[1] for p in task.mean_prompts}
    assert len(lengths) == 1 and means == lengths
    print(f"\nSmolLM2 numerals: kept {len(task)} prompts (dropped {task.dropped}), "
          f"{len(task.mean_prompts)} mean prompts (dropped {task.dropped_mean})")


def test_mean_ablation_takes_the_tasks_mean_prompts():
    task = tasks.load_seqcont("months", 2)
    assert list(resolve_ablation("mean", task).prompts) == task.mean_prompts
    assert list(resolve_ablation("resample", task).prompts) == task.corrupted
    plain = tasks.make_task("months", n=4)
    assert list(resolve_ablation("mean", plain).prompts) == plain.corrupted
    assert task.subset([0, 2]).mean_prompts == task.mean_prompts


# -- the algorithm ---------------------------------------------------------------------

def test_candidate_orders_and_the_strict_rule():
    heads = np.ones((2, 3), bool)
    heads[1, 1] = False
    mlps = np.array([True, False])
    assert [f"{L}.{h}" for L, h in backward_order((heads, mlps))] == [
        "1.0", "1.2", "0.-1", "0.0", "0.1", "0.2"]
    assert [f"{L}.{h}" for L, h in forward_order((heads, mlps))] == [
        "0.0", "0.1", "0.2", "0.-1", "1.0", "1.2"]
    removes = removal_rule(0.8)
    assert not removes(0.8) and removes(0.8 + 1e-12) and not removes(0.5)
    assert removal_rule(0.8)(0.80000001) and not removal_rule(0.9)(0.9)


def test_seqcont_search_equals_the_sequential_reference_on_a_small_model():
    model = small_model(seed=2)
    runner = fs.Runner(model)
    task = paper_task(model, runner, n=2, n_mean=24)
    ref = search.prune_nodes_seqcont_reference(model, task, threshold=0.6)
    covers_the_algorithm(ref, 3)
    assert ref.passes == 4
    fast = search.prune_nodes(runner, task, threshold=0.6, algorithm="seqcont")
    assert assert_same_search(fast, ref, 0.6) == []
    assert fast.algorithm == "seqcont" and fast.stats["trials"] == len(fast.trace)
    assert [s.pass_no for s in fast.trace] == sorted(s.pass_no for s in fast.trace)


# (model, seed, threshold): each keeps and removes, removes an MLP and makes >= 3 passes,
# with every score at least 1e-3 from the threshold
SMALL_CASES = [("gpt2", 2, 0.5), ("gpt2-ln", 4, 0.8), ("llama", 10, 0.9), ("llama", 5, 0.8)]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "seed", "threshold"), SMALL_CASES)
def test_seqcont_search_equals_the_reference_on_small_random_models(kind, seed, threshold):
    model = (small_llama(seed=seed) if kind == "llama" else
             small_model(seed=seed, normalization_type="LN" if kind == "gpt2-ln" else "LNPre"))
    runner = fs.Runner(model)
    task = paper_task(model, runner, n=2, n_mean=24)
    ref = search.prune_nodes_seqcont_reference(model, task, threshold=threshold)
    covers_the_algorithm(ref, 3)
    fast = search.prune_nodes(runner, task, threshold=threshold, algorithm="seqcont")
    assert assert_same_search(fast, ref, threshold) == []


GPT2_CASES = [(0, 0.8, "months"), (1, 0.6, "numerals"), (2, 0.9, "numwords")]


@pytest.mark.slow
@pytest.mark.parametrize(("seed", "threshold", "name"), GPT2_CASES)
def test_seqcont_search_equals_the_reference_on_random_gpt2_small(seed, threshold, name):
    model = fs.load_model("gpt2-small-random", seed=seed)
    runner = fs.Runner(model)
    task = paper_task(model, runner, n=2, n_mean=24, name=name)
    ref = search.prune_nodes_seqcont_reference(model, task, threshold=threshold)
    fast = search.prune_nodes(runner, task, threshold=threshold, algorithm="seqcont")
    assert assert_same_search(fast, ref, threshold) == []
    assert "R" in decisions(ref) and "k" in decisions(ref)
    print(f"\nGPT-2 small random seed {seed}, {name}, threshold {threshold}: "
          f"{len(ref.trace)} trials, {ref.passes} passes, kept "
          f"{len(ref.kept_heads)} heads, MLPs {ref.kept_mlps}")


@pytest.mark.realmodel
@pytest.mark.slow
def test_seqcont_search_equals_the_reference_on_smollm2(smollm):
    runner = fs.Runner(smollm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the drop warning
        # months: SmolLM2 splits numbers into digits, so a numeral answer and its wrong
        # answer start with the same token (" ") and their logit difference is 0
        task = paper_task(smollm, runner, n=2, n_mean=12, name="months")
    ref = search.prune_nodes_seqcont_reference(smollm, task, threshold=0.8)
    fast = search.prune_nodes(runner, task, threshold=0.8, algorithm="seqcont")
    assert assert_same_search(fast, ref, 0.8) == []
    assert "R" in decisions(ref) and "k" in decisions(ref)


def test_speculative_batches_decide_as_one_trial_per_call():
    model = small_model(seed=2)
    runner = fs.Runner(model)
    task = paper_task(model, runner, n=2, n_mean=24)
    plain = search.prune_nodes(runner, task, algorithm="seqcont", batch=1)
    assert plain.stats["trials_evaluated"] == len(plain.trace)
    tol = 1e-4 / plain.full_logit_diff
    for batch, speculate in ((4, "keep"), (16, "adaptive")):
        res = search.prune_nodes(runner, task, algorithm="seqcont", batch=batch,
                                 speculate=speculate)
        assert decisions(res) == decisions(plain)
        assert max(abs(a.score - b.score) for a, b in zip(res.trace, plain.trace,
                                                          strict=True)) <= tol
        assert res.stats["runner_calls"] < plain.stats["runner_calls"]
        assert sum(res.stats["decided_per_call"]) == len(res.trace)


def test_result_plan_final_score_and_stats():
    model = small_model(seed=2)
    runner = fs.Runner(model)
    task = paper_task(model, runner, n=2, n_mean=24)
    res = search.prune_nodes(runner, task, threshold=0.8, algorithm="seqcont", max_passes=2)
    assert res.passes == 2 and {s.pass_no for s in res.trace} == {1, 2}
    heads = res.plan.mask.heads
    assert [(L, h) for L in range(3) for h in range(4) if heads[L, h]] == res.kept_heads
    assert [L for L in range(3) if res.plan.mask.mlp[L]] == res.kept_mlps
    last_removal = [s.score for s in res.trace if s.removed][-1]
    assert abs(res.score - last_removal) <= 1e-4 / res.full_logit_diff  # the final circuit's
    assert res.score > 0.8 and res.trace[0].candidate == "2.mlp"
    for key in ("runner_calls", "trials_evaluated", "means_s", "trials_s", "passes",
                "close_calls"):
        assert key in res.stats


def test_bad_arguments_raise():
    model = small_model(seed=1)
    runner = fs.Runner(model)
    task = paper_task(model, runner, n=1, n_mean=6)
    with pytest.raises(InputError, match="algorithm"):
        search.prune_nodes(runner, task, algorithm="greedy")
    with pytest.raises(InputError, match="takes no"):
        search.prune_nodes(runner, task, algorithm="seqcont", ablation="zero")
    with pytest.raises(InputError, match="takes no"):
        search.prune_nodes(runner, task, algorithm="seqcont", second_pass=True)
    with pytest.raises(InputError, match="mean prompts"):
        search.prune_nodes(runner, prompts=task.prompts, answers=task.answers,
                           wrong_answers=task.wrong_answers, algorithm="seqcont")
    with pytest.raises(InputError, match="one token length"):
        search.prune_nodes(runner, prompts=["1 2 3", "1 2 3 4"], answers=[" 4", " 5"],
                           wrong_answers=[" 3", " 4"], mean_prompts=["4 5 6 7"],
                           algorithm="seqcont")


# -- the published circuits ------------------------------------------------------------

def gpt2_cached() -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return all(isinstance(try_to_load_from_cache("gpt2", f), str)
               for f in ("config.json", "model.safetensors"))


@pytest.mark.gpt2
@pytest.mark.slow
@pytest.mark.parametrize("name", seqcont_data.SEQCONT_TASKS)
def test_the_published_circuits_at_the_papers_sizes(name, monkeypatch):
    if not gpt2_cached():
        pytest.skip("GPT-2 small's weights are not in the local Hugging Face cache "
                    "(models--gpt2 with config.json and model.safetensors); this check needs "
                    "them and never downloads")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = fs.load_model("gpt2-small")
    runner = fs.Runner(model)
    task = tasks.load_seqcont(name, 512, model=model)
    res = search.prune_nodes(runner, task, threshold=0.8, algorithm="seqcont")
    want = tasks.published_circuits()[name]
    print(f"\n{name}: score {100 * res.score:.2f}% after {res.passes} passes; heads "
          f"{res.kept_heads}, MLPs {res.kept_mlps}")
    assert res.kept_heads == want["heads"] and res.kept_mlps == want["mlps"]
