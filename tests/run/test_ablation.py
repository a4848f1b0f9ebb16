"""Mean and resample ablation against the TransformerLens-hook reference
(sources computed by TransformerLens's own forward): fp32 max |logit error| <= 1e-4."""

from __future__ import annotations

import pytest
import torch

import fastskip as fs
from fastskip.reference import reference_logits
from helpers import PROMPTS, small_model

ATOL = 1e-4
KINDS = [("heads",), ("noln",), ("block", "attn", "mlp", "heads", "noln")]


@pytest.fixture(scope="module")
def model():
    return small_model(seed=3)


@pytest.fixture(scope="module")
def tokens(model):
    return model.to_tokens(PROMPTS)  # 6 prompts x 5 tokens


def random_tokens(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, 50000, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["mean", "resample"])
@pytest.mark.parametrize("kinds", KINDS, ids=["+".join(k) for k in KINDS])
def test_ablation_matches_reference(model, tokens, kind, kinds):
    src = random_tokens((9, 5) if kind == "mean" else tuple(tokens.shape), 1)
    ablation = fs.Ablation.mean(tokens=src) if kind == "mean" else fs.Ablation.resample(
        tokens=src)
    plans = fs.grid.random_plans(12, 3, 4, seed=len(kinds), kinds=kinds)
    for strategy in ("tree", "masked"):
        runner = fs.Runner(model, strategy=strategy)
        assert fs.check(runner, plans, tokens, atol=ATOL, ablation=ablation) <= ATOL


def test_ablation_changes_results_and_all_plan_is_untouched(model, tokens):
    ablation = fs.Ablation.mean(tokens=random_tokens((9, 5), 2))
    runner = fs.Runner(model)
    zero = runner.logits(["all", "0,2"], tokens)
    mean = runner.logits(["all", "0,2"], tokens, ablation=ablation)
    assert (zero[0] - mean[0]).abs().max() == 0  # nothing is skipped in 'all'
    assert (zero[1] - mean[1]).abs().max() > 1e-2
    # under mean/resample, removing L.attn equals removing all of L's heads
    a, b = runner.logits(["all,-1.attn", "all,-1.0-3"], tokens, ablation=ablation)
    assert (a - b).abs().max() <= 1e-5


def test_prompt_ablations_through_run_match_reference(model):
    prompts = ["1 2 3 4", "5 6 7 8"]
    answers = [" 5 6", " 9"]  # teacher-forced: the resample source continues with the answer
    corrupted = ["3 9 1 7", "8 2 6 4"]
    runner = fs.Runner(model)
    plans = ["all,-2", "0,1.attn", "all,-1.2"]
    res = runner.run(plans, prompts, answers, ablation=fs.Ablation.resample(corrupted))
    for n, (p, a, c) in enumerate(zip(prompts, answers, corrupted, strict=True)):
        full = model.to_tokens(p + a)
        source = model.to_tokens(c + a)
        n_prompt = model.to_tokens(p).shape[1]
        for i, plan in enumerate(plans):
            ref = reference_logits(model, plan, full, fs.Ablation.resample(tokens=source))[0]
            for j in range(full.shape[1] - n_prompt):
                tok = full[0, n_prompt + j]
                assert abs(float(res.logit[i, n, j]) - float(ref[n_prompt - 1 + j, tok])) <= ATOL
    reference = ["2 3 4 5", "7 8 9 10", "1 3 5 7"]
    res = runner.run(plans, prompts[1:], answers[1:], ablation=fs.Ablation.mean(reference))
    toks = model.to_tokens(reference)[:, :5]
    want = reference_logits(model, plans[0], model.to_tokens(prompts[1]),
                            fs.Ablation.mean(tokens=toks))[0, -1]
    assert abs(float(res.logit[0, 0, 0]) - float(want[model.to_single_token(" 9")])) <= ATOL


@pytest.mark.parametrize("make,match", [
    (lambda: fs.Ablation.resample(["1 2"]), "one corrupted prompt per prompt"),
    (lambda: fs.Ablation.resample(["1 2 3 4 5 6", "1 2 3 4"]), "corrupted prompt 0 .* must align"),
    (lambda: fs.Ablation.mean(["1"]), "at least as long as the prompts"),
    (lambda: fs.Ablation.mean(), "either prompts or tokens"),
    (lambda: "mean", "ablation must be 'zero' or an fs.Ablation"),
])
def test_bad_ablations(model, make, match):
    runner = fs.Runner(model)
    with pytest.raises(fs.InputError, match=match):
        runner.run(["all,-1"], ["1 2 3 4", "5 6 7 8"], [" 5", " 9"], ablation=make())
