"""Mixed precision (``precision="mixed"``): the proven bound holds entry by entry, and
ranks and top-k ids equal an fp32 run's (up to exact ties) on the hard cases: flat
random-weight logits, exact ties, overflowing rows, /noln plans with huge residuals,
every route (tier 1, tier 2, fp32) forced."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fastskip as fs
from fastskip.inputs import make_batch
from fastskip.run.answer_metrics import ranks_agree_up_to_ties
from fastskip.run.mixed_bounds import U_OUT, row_bounds
from fastskip.run.mixed_unembed import MixedUnembedding
from helpers import PROMPTS, small_llama, small_model

TIE = 1e-5  # fp32 round-off: two fp32 computations may order entries this close either way


def peaked(model, scale: float = 30.0):
    """A peaked next-token distribution, like a trained model's."""
    with torch.no_grad():
        model.unembed.W_U.mul_(scale)
    return model


def top1_answers(model, prompts):
    full = fs.Runner(model).logits(["all"], model.to_tokens(prompts), last_only=True)[0]
    return [model.to_string(int(t)) for t in full.argmax(-1)]


def compare(model, plans, prompts, answers, *, route=True, tight=None, max_ambiguous=None,
            top_k=10, tie=TIE):
    """Mixed against fp32 on the same plans: ranks and top-k ids up to exact ties, fp32
    logits, probabilities within their bound. Returns the mixed results."""
    fp32 = fs.Runner(model, verbose=False)
    mixed = fs.Runner(model, precision="mixed", verbose=False)
    assert mixed.mixed is not None
    mixed.mixed.route = route
    if tight is not None:
        mixed.mixed.tight = tight
    if max_ambiguous is not None:
        mixed.mixed.max_ambiguous = max_ambiguous
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.OverflowWarning)
        want = fp32.run(plans, prompts, answers, top_k=top_k)
        got = mixed.run(plans, prompts, answers, top_k=top_k)
    batch = make_batch(model, prompts, answers)
    logits = fp32.asked_logits(fp32.plan_set(plans), batch)
    scale = float(torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0).abs().max())
    tol = tie * max(1.0, scale)
    assert torch.equal(got.info["nonfinite"], want.info["nonfinite"])
    assert torch.equal(got.rank == -1, want.rank == -1)
    assert ranks_agree_up_to_ties(got.rank, want.rank, logits, batch.answer_ids, tol)
    ok = batch.answer_mask[None] & ~want.info["nonfinite"]
    assert (got.logit[ok] - want.logit[ok]).abs().max() <= tol
    seen = ok & (want.prob > 1e-30)  # below, fp32 probabilities underflow to 0
    bound = got.info["logprob_error_bound"][seen]
    err = (got.prob[seen].log() - want.prob[seen].log()).abs().double()
    assert (err <= bound + 2 * tol).all(), float((err - bound).max())  # + fp32 round-off
    if top_k:  # the k largest, in order, up to ties: each id has its reported logit
        assert (got.topk_logits[ok] - want.topk_logits[ok]).abs().max() <= tol
        at = logits.gather(-1, got.topk_ids.clamp_min(0))
        assert (at[ok] - got.topk_logits[ok]).abs().max() <= tol
        assert (got.topk_ids[ok].sort(-1).values.diff(dim=-1) > 0).all()  # distinct
    return got


def test_bound_holds_for_every_entry():
    """Tier 1 and tier 2 against float64, entry by entry, on states of every size
    (including 1e-3 and 30x the norm after the final LayerNorm) and on an unembedding
    whose columns fall into several power-of-two scale groups."""
    model = small_llama(seed=3)
    with torch.no_grad():  # column norms over three octaves
        model.unembed.W_U.mul_(torch.exp2(torch.linspace(-1, 2, model.cfg.d_vocab)))
    mixed = MixedUnembedding(fs.Runner(model).weights)
    assert len(mixed.groups) >= 3
    assert mixed.self_check() <= 1.0
    g = torch.Generator().manual_seed(0)
    h = torch.randn(12, mixed.d, generator=g) * torch.logspace(-3, 1.5, 12)[:, None]
    rows = torch.arange(12)
    ya = mixed.exact_entries(h, rows, torch.randint(0, mixed.V, (12,), generator=g))
    theta, E2, E1 = row_bounds(mixed.consts, h, ya)
    exact = ((h.double() @ mixed.WT.double().T + mixed.b.double() - ya.double()[:, None])
             / mixed.p.double())
    o = mixed.tier1(h, ya).double()
    assert ((o - exact).abs() <= E1[:, None] + U_OUT * o.abs()).all()
    o2 = mixed.tier2(h, mixed.tier1(h, ya)).double()
    inside = o.abs() <= theta[:, None] * (1 + 4 * 2**-8)
    assert ((o2 - exact).abs() <= E2[:, None])[inside].all()
    assert bool(inside.any()) and bool((theta / 4 > E2).all())  # tier 2 is tighter


def test_peaked_model_takes_the_bf16_product():
    """A trained-like (peaked) distribution: most rows are decided by tier 1, with a
    few entries in fp32, and ranks, top-k ids and probabilities are those of fp32."""
    model = peaked(small_model(seed=5))
    prompts = PROMPTS[:4]
    plans = fs.grid.concat(fs.PlanSet.from_plans(["all", "all,-2.3", "all,-1.0"], 3, 4),
                           fs.grid.random_plans(40, 3, 4, seed=2))
    got = compare(model, plans, prompts, top1_answers(model, prompts))
    stats = got.info["mixed"]
    assert stats["fp32_rows"] < stats["rows"] // 2 and stats["recomputed_entries"] > 0
    assert got.info["guarantee"] == "proven" and got.info["precision"] == "mixed"


@pytest.mark.parametrize("tight", [False, True], ids=["tier1", "tier2"])
def test_flat_random_logits_on_every_route(tight):
    """Random weights: flat logits, the answer deep inside them, thousands of entries
    within the bf16 bound. Routed (fp32 rows), and forced through tier 1 (every
    ambiguous entry in fp32) or tier 2."""
    model = small_model(seed=1)
    plans = fs.grid.random_plans(12, 3, 4, seed=4)
    prompts, answers = PROMPTS[:3], [" 5", " May", " five"]
    routed = compare(model, plans, prompts, answers)
    assert routed.info["mixed"]["fp32_rows"] == routed.info["mixed"]["rows"]
    forced = compare(model, plans, prompts, answers, route=False, tight=tight,
                     max_ambiguous=50 if tight else 10**9)
    stats = forced.info["mixed"]
    assert stats["fp32_rows"] < stats["rows"] and stats["recomputed_entries"] > 1000
    if tight:
        assert stats["tight_rows"] > 0


def test_exact_ties_are_not_counted():
    """Duplicated vocabulary columns: entries exactly tied with the answer (or with the
    k-th logit) are not above it, in mixed precision as in fp32."""
    model = peaked(small_model(seed=5))
    prompts = PROMPTS[:4]
    answers = top1_answers(model, prompts)
    ids = model.to_tokens(answers, prepend_bos=False)[:, 0]
    with torch.no_grad():  # every answer token gets three exact twins
        for i, t in enumerate(ids.tolist()):
            for j in range(3):
                twin = 1000 + 10 * i + j
                model.unembed.W_U[:, twin] = model.unembed.W_U[:, t]
                model.unembed.b_U[twin] = model.unembed.b_U[t]
    plans = fs.grid.concat(fs.PlanSet.from_plans(["all", "all,-2.3"], 3, 4),
                           fs.grid.random_plans(10, 3, 4, seed=7))
    got = compare(model, plans, prompts, answers)
    want = fs.Runner(model).run(plans, prompts, answers)
    assert torch.equal(got.rank, want.rank)  # a tie is never strictly above
    assert int((got.rank == 0).sum()) > 0


def test_overflowing_rows_are_reported_as_fp32_reports_them():
    model = peaked(small_model(seed=6))
    with torch.no_grad():  # MLP 0 overflows: plans that keep it get inf/NaN logits
        model.blocks[0].mlp.W_out[:, 0] = float("inf")
    prompts = PROMPTS[:3]
    plans = fs.PlanSet.from_plans(["0.mlp", "all", "1-2", "all,-0.mlp", "2.attn"], 3, 4)
    got = compare(model, plans, prompts, [" 5", " May", " five"], route=False)
    assert got.info["nonfinite"].any() and (~got.info["nonfinite"]).any()
    assert (got.rank[got.info["nonfinite"]] == -1).all()


def test_noln_plans_with_huge_residuals():
    """Many /noln components grow the residual stream by orders of magnitude; the final
    norm brings it back, so mixed precision stays exact (its bound scales with the
    normalised state, not with the residual)."""
    model = peaked(small_model(seed=2), 10.0)
    prompts = PROMPTS[:3]
    plans = fs.PlanSet.from_plans(["all/noln", "0-1/noln,2", "all/noln,-1.mlp",
                                   "0.mlp/noln,1.mlp/noln,2.mlp/noln", "all"], 3, 4)
    for route in (True, False):
        compare(model, plans, prompts, top1_answers(model, prompts), route=route,
                max_ambiguous=10**9)


def test_wrong_answers_kl_and_logit_diff_are_fp32():
    model = peaked(small_model(seed=5))
    prompts = PROMPTS[:3]
    answers, wrong = top1_answers(model, prompts), [" 4", " April", " four"]
    plans = fs.grid.random_plans(8, 3, 4, seed=3)
    want = fs.Runner(model).run(plans, prompts, answers, wrong_answers=wrong, kl=True)
    mixed = fs.Runner(model, precision="mixed")
    got = mixed.run(plans, prompts, answers, wrong_answers=wrong, kl=True)
    assert (got.logit_diff - want.logit_diff).abs().max() <= 1e-4
    assert (got.kl - want.kl).abs().max() <= 1e-5
    diff = mixed.logit_diff(plans, prompts, answers, wrong)
    assert (diff - want.logit_diff).abs().max() <= 1e-4


def test_mixed_refuses_reduced_dtypes_and_unknown_names():
    model = small_model(seed=0)
    with pytest.raises(fs.FastskipError, match="dtype"):
        fs.Runner(model, precision="mixed", dtype=torch.bfloat16)
    with pytest.raises(fs.FastskipError, match="precision must be"):
        fs.Runner(model, precision="bf16")  # type: ignore[arg-type]


def test_mixed_verify_passes():
    model = peaked(small_model(seed=5))
    prompts = PROMPTS[:2]
    res = fs.Runner(model, precision="mixed", verify=3).run(
        fs.grid.random_plans(6, 3, 4, seed=1), prompts, top1_answers(model, prompts))
    assert math.isfinite(float(res.info["logprob_error_bound"].max()))
