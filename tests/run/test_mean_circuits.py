"""``Runner.mean_ablated_circuits`` (the seqcont ablation with shared states)
against the TransformerLens-hook reference of ``fastskip.search.seqcont_reference``:
random circuits around random bases, on GPT-2-style (LNPre, LN) and Llama-style
(grouped-query, rotary) models with random biases, the paper's prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastskip as fs
from fastskip.errors import InputError, MemoryBudgetError
from fastskip.run.mean_circuits import first_difference
from fastskip.search.seqcont_reference import SeqcontReference
from helpers import small_llama, small_model

ATOL = 1e-4  # fp32: per prompt |logit difference error|

MODELS = {
    "lnpre": lambda: small_model(seed=3),
    "ln": lambda: small_model(seed=4, normalization_type="LN"),
    "llama": lambda: small_llama(seed=5),
}


def paper_inputs(model, n: int = 2, n_mean: int = 20):
    task = fs.tasks.load_seqcont("numerals", n, model=model)
    return task.prompts, task.answers, task.wrong_answers, task.mean_prompts[:n_mean]


def as_sets(heads: np.ndarray, mlps: np.ndarray):
    return ({(int(a), int(b)) for a, b in zip(*np.nonzero(heads), strict=True)},
            {int(a) for a in np.flatnonzero(mlps)})


def random_circuit(rng, L, H, p=None):
    p = rng.uniform(0.2, 0.9) if p is None else p
    return rng.random((L, H)) < p, rng.random(L) < p


def near(rng, base, k):
    """``base`` with k random components switched (removed or restored)."""
    heads, mlps = base[0].copy(), base[1].copy()
    L, H = heads.shape
    for _ in range(k):
        c = int(rng.integers(L * (H + 1)))
        if c < L * H:
            heads[c // H, c % H] ^= True
        else:
            mlps[c - L * H] ^= True
    return heads, mlps


def check_rounds(model, runner, rounds: int, seed: int, memo_capacity: int | None = None):
    prompts, answers, wrong, means = paper_inputs(model)
    circuits = runner.mean_ablated_circuits(prompts, answers, wrong, means)
    if memo_capacity is not None:
        circuits.memo.capacity = memo_capacity
    ref = SeqcontReference(model, prompts, answers, wrong, means)
    L, H = runner.n_layers, runner.n_heads
    rng = np.random.default_rng(seed)
    worst = 0.0
    full = (np.ones((L, H), bool), np.ones(L, bool))
    empty = (np.zeros((L, H), bool), np.zeros(L, bool))
    base = full
    for r in range(rounds):
        if r:
            base = random_circuit(rng, L, H) if r % 2 else near(rng, base, 2)
            circuits.set_base(*base)
        batch = [base, empty, random_circuit(rng, L, H)] + [near(rng, base, k) for k in (1, 3)]
        got = circuits.logit_diff(np.stack([b[0] for b in batch]), np.stack([b[1] for b in batch]))
        for i, c in enumerate(batch):
            want = ref.logit_diffs(*as_sets(*c))
            err = float((got[i] - want).abs().max())
            worst = max(worst, err)
            assert err <= ATOL, (r, i, err)
        assert torch.allclose(circuits.base_logit_diff(), got[0], atol=ATOL)
    return worst


@pytest.mark.parametrize("kind", list(MODELS))
def test_random_circuits_around_moving_bases_equal_the_hooks(kind):
    model = MODELS[kind]()
    check_rounds(model, fs.Runner(model), rounds=3, seed=0)


def test_tiny_memo_and_row_chunks_give_the_same_scores():
    model = MODELS["llama"]()
    runner = fs.Runner(model, max_memory="1MB")  # passes of a few prompts at a time
    prompts, answers, wrong, means = paper_inputs(model)
    circuits = runner.mean_ablated_circuits(prompts, answers, wrong, means)
    assert circuits.work // circuits.row_bytes < len(means)  # the mean prompts run in chunks
    check_rounds(model, runner, rounds=2, seed=1, memo_capacity=2)


@pytest.mark.slow
def test_gpt2_small_random_circuits_equal_the_hooks(gpt2_random, gpt2_runner):
    check_rounds(gpt2_random, gpt2_runner, rounds=2, seed=2)


def test_work_is_shared_with_the_base():
    """Work in (prompt rows x layers) at every position; a layer at the last
    position only counts 1/T."""
    model = MODELS["lnpre"]()
    runner = fs.Runner(model)
    circuits = runner.mean_ablated_circuits(*paper_inputs(model))
    L, H = runner.n_layers, runner.n_heads
    R, N, T = circuits.R, circuits.N, circuits.T
    work = circuits.timing
    assert work["means_row_layers"] == pytest.approx(R * (L - 1 + 1 / T))  # the full model
    heads, mlps = np.ones((1, L, H), bool), np.ones((1, L), bool)
    mlps[0, 1] = False
    circuits.logit_diff(heads, mlps)  # an MLP trial: the full model's MLP means serve
    assert work["means_row_layers"] == pytest.approx(R * (L - 1 + 1 / T))
    # the base's layer 0, then the trial from layer 1 (the last layer at the last position)
    assert work["trials_row_layers"] == pytest.approx(N + N + N / T)
    heads[0, 2, 0] = False  # a head trial at the last layer with MLP 1 ablated: no means pass
    circuits.logit_diff(heads, mlps)
    assert work["means_row_layers"] == pytest.approx(R * (L - 1 + 1 / T))
    circuits.set_base(heads[0], mlps[0])
    trial = heads.copy()
    trial[0, 0, 1] = False  # a head trial at layer 0 with MLP 1 ablated: means of layers 0-1
    circuits.logit_diff(trial, mlps)
    assert work["means_row_layers"] == pytest.approx(R * (L - 1 + 1 / T) + 2 * R)
    before = work["trials_row_layers"]
    sparse = np.zeros((1, L, H), bool)
    sparse[0, 0, 2] = True  # a circuit whose only head is in layer 0: above it, the last
    circuits.logit_diff(sparse, mlps)  # position only, for the prompts and the mean prompts
    assert work["trials_row_layers"] - before == pytest.approx(N / T * L)
    assert first_difference(trial[0], heads[0]) == 0
    assert first_difference(mlps[0], mlps[0]) == L


def test_prompts_of_different_token_lengths_are_refused():
    model = MODELS["lnpre"]()
    runner = fs.Runner(model)
    with pytest.raises(InputError, match="one token length"):
        runner.mean_ablated_circuits(["1 2 3", "1 2 3 4"], [" 4", " 5"], [" 3", " 4"],
                                     ["5 6 7 8"])
    with pytest.raises(InputError, match="at least"):
        runner.mean_ablated_circuits(["1 2 3 4"], [" 5"], [" 4"], ["5 6"])
    with pytest.raises(InputError, match="one answer and one wrong answer"):
        runner.mean_ablated_circuits(["1 2 3 4"], [" 5", " 6"], [" 4"], ["5 6 7 8"])
    with pytest.raises(MemoryBudgetError):
        fs.Runner(model, max_memory=1000).mean_ablated_circuits(
            ["1 2 3 4"], [" 5"], [" 4"], ["5 6 7 8"])
