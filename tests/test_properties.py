"""Property tests: random small models (GPT-2 and Llama style), random plan sets of
every item kind (from mask arrays and from plan text), every ablation type and
random token batches or prompts, checked against the TransformerLens reference
on every fast path (tree, masked, chunked, Triton kernels under the
interpreter); and the invariances a user relies on (plan order, duplicates,
memory budget, batch composition, plan text round trips, PlanSet views).

Budget: the default profile fits CI (about two minutes here). A longer run:

    FASTSKIP_PROPERTY_EXAMPLES=2000 .venv/bin/python -m pytest tests/test_properties.py

spreads about 2,000 examples over the property tests (each test's share is in
``SHARES``, and no test runs fewer than its default); ``--hypothesis-seed=N``
replays a run. The compiled path is
exercised once, marked slow (``torch.compile`` on CPU takes minutes).
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategies import (
    FULL_VOCAB,
    N_CTX,
    SMALL_VOCABS,
    ablations,
    answers,
    build,
    gpt2_specs,
    llama_specs,
    mask_plan_sets,
    plan_sets,
    plan_texts,
    prompts,
    specs,
    token_batches,
)

import fastskip as fs
from fastskip.inputs import make_batch
from fastskip.model import blocks
from fastskip.plans import PlanMask
from fastskip.reference import check_report, reference_logits
from fastskip.run.answer_metrics import answer_metrics, rank_bounds
from fastskip.run.mixed_unembed import MixedUnembedding
from helpers import kernel_runner

ATOL = 1e-4  # fp32 against the TransformerLens reference (the README's promise)
SAME = 1e-5  # two fastskip runs of the same numbers: round-off only

# -- profiles ---------------------------------------------------------------------------

TOTAL = int(os.environ.get("FASTSKIP_PROPERTY_EXAMPLES", "0") or 0)
settings.register_profile(
    "fastskip-ci", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fastskip-long", settings.get_profile("fastskip-ci"))
PROFILE = "fastskip-long" if TOTAL else "fastskip-ci"

# examples per test: (default profile, share of FASTSKIP_PROPERTY_EXAMPLES); shares sum to 1
SHARES = {
    "fast_paths": (12, 0.10),  # x3 strategies
    "kernels": (3, 0.02),  # x2 strategies: the Triton interpreter is slow
    "run": (10, 0.10),
    "asked": (30, 0.05),  # x2 strategies: asked positions only after the last attention
    "mean_lengths": (15, 0.04),
    "order": (10, 0.07),
    "budget": (10, 0.07),
    "batch_rows": (8, 0.06),
    "batch_prompts": (6, 0.06),
    "round_trip": (150, 0.03),
    "text": (150, 0.03),
    "planset": (100, 0.02),
    "any_heads": (100, 0.02),
    "mixed_rows": (25, 0.04),  # mixed precision on drawn final states (hard cases)
    "mixed_run": (4, 0.02),  # mixed precision through Runner.run
}
RUNS = {"fast_paths": 3, "kernels": 2, "asked": 2}  # parametrized tests run once per parameter
assert math.isclose(sum(share * RUNS.get(k, 1) for k, (_, share) in SHARES.items()), 1.0)


def examples(name: str) -> settings:
    default, share = SHARES[name]
    n = max(default, round(share * TOTAL)) if TOTAL else default
    return settings(settings.get_profile(PROFILE), max_examples=n)


# -- helpers ----------------------------------------------------------------------------


def assert_matches_reference(runner, plans, tokens, ablation, context: str) -> None:
    report = check_report(runner, plans, tokens, atol=ATOL, ablation=ablation)
    assert len(report.errors) == len(plans)
    if report.failures:
        err, i, where, extra = max(report.failures)
        raise AssertionError(f"{context}: plan {i} '{report.plans[i]}' is {err:.3g} from the "
                             f"reference at [prompt, pos, token] {where}{extra}; "
                             f"{len(report.failures)} of {len(plans)} plans fail")
    plain = [e for i, e in enumerate(report.errors) if i not in report.arbitrated]
    assert max(plain, default=0.0) <= ATOL


def one_plan_bytes(model, plans, tokens: torch.Tensor, ablation) -> int:
    """The smallest ``max_memory`` under which ``logits`` runs these plans: the returned
    logits [P, B, T, V] and one plan's work (``Runner.memory_sizes``: its states, matmul
    activations and logits). Budgets below it raise ``MemoryBudgetError``."""
    runner = fs.Runner(model, verbose=False)
    B, T = tokens.shape
    ps = runner.plan_set(plans)
    returned = len(ps) * B * T * runner.weights.d_vocab_out * 4
    return returned + sum(runner.memory_sizes(ps, B, T, T, ablation is None))


def events(spec, tokens, ablation, plans) -> None:
    """What a run covered (pytest --hypothesis-show-statistics lists these)."""
    event(f"model: {spec.arch} {spec.norm} {spec.act_fn}, {spec.n_layers} layers, "
          f"{spec.n_heads} heads")
    event(f"ablation: {'zero' if ablation is None else ablation.kind}")
    event(f"tokens: {tokens.shape[0]} x {'1' if tokens.shape[1] == 1 else '2-10'}")
    kinds = {"heads": (plans.attn[..., None] & ~plans.heads).any(),
             "bias only": (plans.attn & ~plans.heads.any(2)).any(),
             "/noln": (~plans.attn_ln | ~plans.mlp_ln).any(),
             "attn only": (plans.attn & ~plans.mlp).any(),
             "mlp only": (plans.mlp & ~plans.attn).any()}
    for name, present in kinds.items():
        event(f"plans with {name}: {bool(present)}")


def describe(spec, tokens, ablation, plans) -> str:
    return (f"{spec}; tokens {tuple(tokens.shape)}; ablation {ablation!r}; "
            f"plans {plans.texts()}")


# -- every fast path against the TransformerLens reference ------------------------------


@pytest.mark.parametrize("path", ["tree", "masked", "chunked"])
@examples("fast_paths")
@given(data=st.data())
def test_fast_paths_match_reference(path, data):
    spec = data.draw(specs(), label="spec")
    tokens = data.draw(token_batches(spec.d_vocab), label="tokens")
    plans = data.draw(plan_sets(spec.n_layers, spec.n_heads), label="plans")
    ablation = data.draw(ablations(spec.d_vocab, tuple(tokens.shape)), label="ablation")
    model = build(spec)
    budget = None
    if path == "chunked":  # 1MB or room for 16..48 more residual states: many chunks
        B, T = tokens.shape
        k = data.draw(st.sampled_from([0, 1, 2, 3]), label="budget")
        least = one_plan_bytes(model, plans, tokens, ablation)
        budget = least + (k * 16 * B * T * spec.d_model * 4 if k else 2**20)
    runner = fs.Runner(model, strategy="masked" if path == "masked" else "tree",
                       max_memory=budget, verbose=False)
    events(spec, tokens, ablation, plans)
    assert_matches_reference(runner, plans, tokens, ablation,
                             f"{path}: {describe(spec, tokens, ablation, plans)}")


@pytest.mark.parametrize("strategy", ["tree", "masked"])
@examples("kernels")
@given(data=st.data())
def test_kernel_path_matches_reference(strategy, data):
    """The fused Triton MLP kernels (CUDA's default path), in Triton's interpreter."""
    pytest.importorskip("triton", reason="the kernel path needs triton")
    spec = data.draw(st.one_of(  # tiny: the interpreter is slow
        gpt2_specs(vocabs=(97,), max_layers=2, norms=("LNPre",), acts=("gelu_new",),
                   d_models=(32, 48), d_mlps=(32, 64)),
        llama_specs(vocabs=(97,), max_layers=2, norms=("RMSPre",), d_models=(32,),
                    d_mlps=(32, 64))), label="spec")
    assert spec.kernels_cover
    tokens = data.draw(token_batches(spec.d_vocab, max_batch=2, max_len=5), label="tokens")
    plans = data.draw(plan_sets(spec.n_layers, spec.n_heads, max_masks=3, max_texts=1),
                      label="plans")
    ablation = data.draw(ablations(spec.d_vocab, tuple(tokens.shape)), label="ablation")
    runner = kernel_runner(build(spec), strategy=strategy)
    assert runner.ops.kernels
    assert_matches_reference(runner, plans, tokens, ablation,
                             f"kernels/{strategy}: {describe(spec, tokens, ablation, plans)}")


@pytest.mark.slow
@settings(settings.get_profile(PROFILE), max_examples=1, phases=[Phase.generate])
@given(data=st.data())
def test_compiled_path_matches_reference_on_a_random_model(data):
    """One random model through torch.compile, not shrunk (each try compiles for
    minutes on CPU; tests/test_fastpaths.py has the fixed-model compile test)."""
    spec = data.draw(gpt2_specs(max_layers=2), label="spec")
    tokens = data.draw(token_batches(spec.d_vocab), label="tokens")
    plans = fs.grid.concat(fs.PlanSet.from_plans(["all", "0.attn/noln"], spec.n_layers,
                                                 spec.n_heads),
                           data.draw(plan_sets(spec.n_layers, spec.n_heads), label="plans"))
    torch._dynamo.reset()  # compile_seconds > 0 below: no earlier graph may serve this model
    runner = fs.Runner(build(spec), compile=True, verbose=False)
    assert_matches_reference(runner, plans, tokens, None, f"compiled: {spec}")
    assert runner.compile_seconds > 0


@pytest.mark.parametrize("strategy", ["tree", "masked"])
@examples("asked")
@given(data=st.data())
def test_asked_positions_match_reference(strategy, data):
    """The asked-positions path (Q < T): after the last attention step only the
    positions whose logits are asked for are kept, and the last MLPs and the
    unembedding run on those alone (``last_only=True``: Q = 1 of T >= 2). Raised into
    the CI profile (issue 12, item 10): ``run`` reached it in only ~10 examples."""
    spec = data.draw(specs(), label="spec")
    tokens = data.draw(token_batches(spec.d_vocab), label="tokens")
    assume(tokens.shape[1] >= 2)
    plans = data.draw(plan_sets(spec.n_layers, spec.n_heads), label="plans")
    ablation = data.draw(ablations(spec.d_vocab, tuple(tokens.shape)), label="ablation")
    model = build(spec)
    runner = fs.Runner(model, strategy=strategy, verbose=False)
    fast = runner.logits(plans, tokens, last_only=True, ablation=ablation)[:, :, None]
    event(f"asked: 1 of {'2-3' if tokens.shape[1] <= 3 else '4-10'} positions")
    events(spec, tokens, ablation, plans)
    report = check_report(runner, plans, tokens, atol=ATOL, ablation=ablation, fast=fast)
    assert len(report.errors) == len(plans)
    assert not report.failures, (describe(spec, tokens, ablation, plans), report.failures[:2])


def mean_by_position(model, prompts_: list[str], width: int, bos: bool) -> dict:
    """The reference for mean ablation from prompts of any lengths: each prompt run
    alone by TransformerLens, every component's output averaged per position over
    the prompts that reach that position (written independently of fastskip)."""
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(width)
    for p in prompts_:
        tok = model.to_tokens(p, prepend_bos=bos)[:, :width]
        _, cache = model.run_with_cache(tok, names_filter=lambda n: n.endswith(
            ("hook_attn_out", "attn.hook_z", "hook_mlp_out")))
        n = tok.shape[1]
        counts[:n] += 1
        for name, act in cache.items():
            total = sums.setdefault(name, torch.zeros((1, width, *act.shape[2:])))
            total[0, :n] += act[0].float()
    shape = lambda t: counts.reshape(1, width, *([1] * (t.ndim - 2)))  # noqa: E731
    return {name: total / shape(total) for name, total in sums.items()}


@examples("mean_lengths")
@given(data=st.data())
def test_mean_ablation_from_prompts_of_other_lengths(data):
    """Mean ablation given as prompts of other lengths than the prompts (shorter and
    longer: a position's mean is over the reference prompts that reach it), pinned
    against a TransformerLens reference (issue 12, item 10)."""
    spec = data.draw(gpt2_specs(vocabs=(FULL_VOCAB,), max_layers=3), label="spec")
    model = build(spec)
    n = data.draw(st.integers(1, 3), label="n prompts")
    ps = data.draw(st.lists(prompts(), min_size=n, max_size=n), label="prompts")
    ans = data.draw(st.lists(answers(), min_size=n, max_size=n), label="answers")
    rows = [teacher_forced_rows(model, p, a) for p, a in zip(ps, ans, strict=True)]
    T = max(len(r) - 1 for r, _, _ in rows)
    assume(T <= N_CTX)
    refs = data.draw(st.lists(prompts(), min_size=1, max_size=4), label="reference prompts")
    lengths = [model.to_tokens(r).shape[1] for r in refs]
    assume(max(lengths) >= T and max(lengths) <= N_CTX)  # every position is reached
    event(f"reference prompts: {'all as long' if min(lengths) >= T else 'some shorter'}")
    plans = data.draw(plan_sets(spec.n_layers, spec.n_heads, max_masks=3, max_texts=1),
                      label="plans")
    res = fs.Runner(model, verbose=False).run(plans, ps, ans, top_k=0,
                                              ablation=fs.Ablation.mean(refs))
    means = mean_by_position(model, refs, T, bos=True)
    for i, plan in enumerate(plans):
        for b, (row, n_prompt, n_answer) in enumerate(rows):
            x = row[:-1][None]
            sources = {k: v[:, : x.shape[1]] for k, v in means.items()}
            ref = model.run_with_hooks(x, fwd_hooks=fs.plan_hooks(plan, sources))[0].float()
            for j in range(n_answer):
                logits = ref[n_prompt - 1 + j]
                tok = int(row[n_prompt + j])
                if not torch.isfinite(logits).all():
                    continue
                tol = ATOL + 1e-5 * float(logits.abs().max())
                err = abs(float(res.logit[i, b, j]) - float(logits[tok]))
                assert err <= tol, (plans.text(i), ps[b], refs, err)


# -- run(): prompts of mixed lengths, multi-token answers, every metric -----------------


def teacher_forced_rows(model, prompt: str, answer: str) -> tuple[torch.Tensor, int, int]:
    """Prompt (with BOS) followed by the answer's tokens, as README's teacher forcing."""
    p = model.to_tokens(prompt)[0]
    a = model.to_tokens(answer, prepend_bos=False)[0]
    return torch.cat([p, a]), len(p), len(a)


@examples("run")
@given(data=st.data())
def test_run_matches_reference_prompt_by_prompt(data):
    """``run`` on a padded batch of prompts of different lengths against the
    reference on each prompt alone, unpadded: logit, probability, rank (up to
    near-ties), top-k and the padding of answers of different lengths."""
    spec = data.draw(st.one_of(gpt2_specs(vocabs=(FULL_VOCAB,), max_layers=3),
                               llama_specs(vocabs=(FULL_VOCAB,), max_layers=2)), label="spec")
    model = build(spec)
    n = data.draw(st.integers(1, 3), label="n prompts")
    ps = data.draw(st.lists(prompts(), min_size=n, max_size=n), label="prompts")
    ans = data.draw(st.lists(answers(), min_size=n, max_size=n), label="answers")
    rows = [teacher_forced_rows(model, p, a) for p, a in zip(ps, ans, strict=True)]
    assume(all(len(r) - 1 <= N_CTX for r, _, _ in rows))
    plans = data.draw(plan_sets(spec.n_layers, spec.n_heads, max_masks=4, max_texts=1),
                      label="plans")
    k = data.draw(st.integers(0, 5), label="top_k")
    # ablation as tokens over the padded batch: row i's source row serves prompt i
    T = max(len(r) - 1 for r, _, _ in rows)
    ablation = data.draw(ablations(FULL_VOCAB, (n, T)), label="ablation")
    strategy = data.draw(st.sampled_from(["tree", "masked"]), label="strategy")
    runner = fs.Runner(model, strategy=strategy, verbose=False)
    res = runner.run(plans, ps, ans, top_k=k, ablation=ablation)
    A = max(na for _, _, na in rows)
    assert res.rank.shape == (len(plans), n, A) and res.topk_ids.shape == (len(plans), n, A, k)
    for i, plan in enumerate(plans):
        for b, (row, n_prompt, n_answer) in enumerate(rows):
            x = row[:-1][None]
            abl = ablation
            if ablation is not None:  # the same source, cut to this prompt's length
                src = ablation.tokens[b: b + 1] if ablation.kind == "resample" else \
                    ablation.tokens
                abl = type(ablation)(ablation.kind, None, src[:, : x.shape[1]])
            ref = reference_logits(model, plan, x, abl)[0].float()
            for j in range(n_answer):
                logits = ref[n_prompt - 1 + j]
                tok = int(row[n_prompt + j])
                where = f"plan '{plans.text(i)}', prompt {b} {ps[b]!r}, answer token {j}"
                assert res.answer_mask[b, j]
                if not torch.isfinite(logits).all():
                    assert int(res.rank[i, b, j]) == -1, where
                    continue
                scale = float(logits.abs().max())
                tol = ATOL + 1e-5 * scale
                assert abs(float(res.logit[i, b, j]) - float(logits[tok])) <= tol, where
                prob = float(logits.log_softmax(-1)[tok].exp())
                assert math.isclose(float(res.prob[i, b, j]), prob, rel_tol=4 * tol,
                                    abs_tol=1e-30), where
                lo = int((logits > logits[tok] + tol).sum())
                hi = int((logits > logits[tok] - tol).sum()) - 1  # not the answer itself
                assert lo <= int(res.rank[i, b, j]) <= hi, where
                if k:
                    top = logits.topk(k).values
                    assert torch.allclose(res.topk_logits[i, b, j], top, atol=tol), where
                    # each reported id has the reported logit
                    got = logits[res.topk_ids[i, b, j]]
                    assert torch.allclose(got, res.topk_logits[i, b, j], atol=tol), where
            assert not res.answer_mask[b, n_answer:].any()
            assert (res.rank[i, b, n_answer:] == -1).all()
            assert torch.isnan(res.logit[i, b, n_answer:]).all()


# -- mixed precision against fp32 ---------------------------------------------------------


def assert_mixed_agrees(met, bound, logits: torch.Tensor, answer: torch.Tensor, k: int,
                        ref, context: str) -> None:
    """Mixed-precision metrics of rows against fp32 logits [R, V] of the same rows:
    overflow flags, ranks up to ties within fp32 round-off, the answer's and the top-k
    logits, top-k ids up to ties (each id has its logit, none twice), probabilities
    within the proven bound."""
    assert torch.equal(met.nonfinite, ref.nonfinite), context
    ok = ~ref.nonfinite
    if not bool(ok.any()):
        return
    x = logits[ok]
    tol = SAME * max(1.0, float(x.abs().max()))
    lo, hi = rank_bounds(x, answer[ok], tol)
    assert ((met.rank[ok] >= lo) & (met.rank[ok] <= hi)).all(), context
    assert (met.rank[~ok] == -1).all(), context
    assert (met.logit[ok] - ref.logit[ok]).abs().max() <= tol, context
    if k:
        assert (met.topk_logits[ok] - ref.topk_logits[ok]).abs().max() <= tol, context
        at = x.gather(1, met.topk_ids[ok])
        assert (at - met.topk_logits[ok]).abs().max() <= tol, context
        assert (met.topk_ids[ok].sort(1).values.diff(dim=1) > 0).all(), context
    seen = ref.logprob[ok] > -60  # further down, fp32 probabilities underflow
    err = (met.logprob[ok] - ref.logprob[ok]).abs().double()[seen]
    assert (err <= bound[ok][seen] + 2 * tol).all(), context


@examples("mixed_rows")
@given(data=st.data())
def test_mixed_unembedding_matches_fp32_on_the_hard_cases(data):
    """``MixedUnembedding.metrics`` on drawn final states against fp32 logits: flat
    (random weights) or peaked logits, exact ties (duplicated columns), overflowing
    rows, states of any scale (a /noln plan's residual can be 1e4 times the full
    model's), answers at the top or deep in the distribution, every route."""
    spec = data.draw(specs(vocabs=SMALL_VOCABS + (FULL_VOCAB,)), label="spec")
    w = fs.Runner(build(spec), verbose=False).weights
    V = w.d_vocab_out
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    W_U, b_U = w.W_U.clone(), w.b_U.clone()
    case = data.draw(st.sampled_from(["flat", "peaked", "ties", "overflow"]), label="case")
    if case in ("peaked", "ties"):
        W_U *= data.draw(st.sampled_from([5.0, 30.0]), label="peak")
    if case == "ties":  # a third of the vocabulary copies another column exactly
        src = torch.randint(0, V, (V // 3,), generator=g)
        dst = torch.randperm(V, generator=g)[: V // 3]
        W_U[:, dst], b_U[dst] = W_U[:, src], b_U[src]
    w = dataclasses.replace(w, W_U=W_U.contiguous(), b_U=b_U)
    R = data.draw(st.integers(1, 24), label="rows")
    scale = torch.logspace(-2, 4, R)[torch.randperm(R, generator=g)]
    states = torch.randn(R, w.d_model, generator=g) * scale[:, None]
    if case == "overflow":
        states[torch.randint(0, R, (max(1, R // 4),), generator=g), 0] = float("inf")
    logits = blocks.unembed(states, w)
    top = torch.nan_to_num(logits, nan=0.0).argmax(1)
    answer = torch.where(torch.rand(R, generator=g) < 0.5, top,
                         torch.randint(0, V, (R,), generator=g))
    k = data.draw(st.integers(0, 12), label="top_k")
    mixed = MixedUnembedding(w)
    route = data.draw(st.sampled_from(["estimate", "tier1", "tier2"]), label="route")
    if route != "estimate":
        mixed.route, mixed.tight = False, route == "tier2"
        mixed.max_ambiguous = 10**9 if route == "tier1" else data.draw(
            st.integers(0, 64), label="max_ambiguous")
    event(f"mixed: {case}, {route}")
    met, bound = mixed.metrics(states, answer, k)
    ref = answer_metrics(logits, answer, k)
    assert_mixed_agrees(met, bound, logits, answer, k, ref, f"{spec}, {case}, {route}")


@examples("mixed_run")
@given(data=st.data())
def test_mixed_run_matches_fp32_run(data):
    """``Runner(precision="mixed").run`` against the fp32 run on random plans (with
    /noln) and prompts: ranks up to ties, fp32 logits, probabilities within the bound."""
    spec = data.draw(st.one_of(gpt2_specs(vocabs=(FULL_VOCAB,), max_layers=3),
                               llama_specs(vocabs=(FULL_VOCAB,), max_layers=2)), label="spec")
    model = build(spec)
    n = data.draw(st.integers(1, 3), label="n prompts")
    ps = data.draw(st.lists(prompts(), min_size=n, max_size=n), label="prompts")
    ans = data.draw(st.lists(answers(), min_size=n, max_size=n), label="answers")
    rows = [teacher_forced_rows(model, p, a) for p, a in zip(ps, ans, strict=True)]
    assume(all(len(r) - 1 <= N_CTX for r, _, _ in rows))
    plans = data.draw(plan_sets(spec.n_layers, spec.n_heads, max_masks=4, max_texts=1),
                      label="plans")
    k = data.draw(st.integers(0, 5), label="top_k")
    fp32 = fs.Runner(model, verbose=False)
    mixed = fs.Runner(model, precision="mixed", verbose=False)
    assert mixed.mixed is not None
    mixed.mixed.route = data.draw(st.booleans(), label="route")
    want, got = fp32.run(plans, ps, ans, top_k=k), mixed.run(plans, ps, ans, top_k=k)
    batch = make_batch(model, ps, ans)
    logits = fp32.asked_logits(fp32.plan_set(plans), batch)
    m = batch.answer_mask[None].expand(len(plans), -1, -1)
    V = logits.shape[-1]
    answer = batch.answer_ids[None].expand(len(plans), -1, -1)[m]
    pick = lambda t: t[m]  # noqa: E731

    class Flat:  # the rows of a Results as answer_metrics gives them
        def __init__(self, res):
            self.rank, self.logit = pick(res.rank), pick(res.logit)
            self.logprob = pick(res.prob).log()
            self.topk_ids, self.topk_logits = pick(res.topk_ids), pick(res.topk_logits)
            self.nonfinite = pick(res.info["nonfinite"])

    bound = got.info["logprob_error_bound"][m]
    assert_mixed_agrees(Flat(got), bound, logits[m].reshape(-1, V), answer, k, Flat(want),
                        describe(spec, batch.tokens, None, plans))


# -- invariances --------------------------------------------------------------------------


def runner_inputs(data, max_batch: int = 3):
    spec = data.draw(specs(), label="spec")
    tokens = data.draw(token_batches(spec.d_vocab, max_batch=max_batch), label="tokens")
    plans = data.draw(plan_sets(spec.n_layers, spec.n_heads), label="plans")
    ablation = data.draw(ablations(spec.d_vocab, tuple(tokens.shape)), label="ablation")
    return spec, build(spec), tokens, plans, ablation


@examples("order")
@given(data=st.data())
def test_plan_order_and_duplicates_do_not_change_results(data):
    spec, model, tokens, plans, ablation = runner_inputs(data)
    strategy = data.draw(st.sampled_from(["tree", "masked"]), label="strategy")
    runner = fs.Runner(model, strategy=strategy, verbose=False)
    base = runner.logits(plans, tokens, ablation=ablation)
    n = len(plans)
    perm = data.draw(st.permutations(range(n)), label="perm")
    extra = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4), label="dups")
    idx = np.array(list(perm) + extra)
    again = runner.logits(plans.take(idx), tokens, ablation=ablation)
    assert again.shape == (len(idx), *base.shape[1:])
    assert (again - base[torch.as_tensor(idx)]).abs().max() <= SAME, describe(
        spec, tokens, ablation, plans)
    # the same plans as text (parsed again) give the same numbers
    texts = runner.logits([plans.text(int(i)) for i in idx], tokens, ablation=ablation)
    assert (texts - again).abs().max() <= SAME


def count_batches(runner, plans, tokens, ablation, reserved: int = 0) -> int:
    from fastskip.ablation import as_ablation
    from fastskip.run.sources import sources_for_tokens

    abl = as_ablation(ablation)
    sources = None if abl is None else sources_for_tokens(abl, runner.weights, tokens)
    B, T = tokens.shape
    q_pos = torch.arange(T)[None].expand(B, -1).contiguous()
    return sum(1 for _ in runner.final_states(runner.plan_set(plans), tokens, q_pos, sources,
                                              reserved))


@examples("budget")
@given(data=st.data())
def test_memory_budget_does_not_change_results(data):
    """Chunks, matmul batch sizes and unembedding batches are invisible."""
    spec, model, tokens, plans, ablation = runner_inputs(data)
    B, T = tokens.shape
    state = B * T * spec.d_model * 4
    budgets = data.draw(st.lists(st.integers(16, 200), min_size=2, max_size=2), label="x state")
    base = fs.Runner(model, verbose=False).logits(plans, tokens, ablation=ablation)
    distinct = len({m.key() for m in (plans.mask(i) for i in range(len(plans)))})
    returned = base.numel() * base.element_size()  # the logits count against the budget
    for k in budgets:
        budget = returned + max(k * state, one_plan_bytes(model, plans, tokens, ablation)
                                - returned)
        runner = fs.Runner(model, max_memory=budget, verbose=False)
        out = runner.logits(plans, tokens, ablation=ablation)
        assert (out - base).abs().max() <= SAME, f"max_memory {budget}: " + describe(
            spec, tokens, ablation, plans)
        if k <= 24 and distinct > 1:  # the budget really split the work
            assert count_batches(runner, plans, tokens, ablation, returned) > 1


@examples("batch_rows")
@given(data=st.data())
def test_a_row_alone_equals_the_row_in_a_batch(data):
    """``logits``: row b of a batch equals the same tokens run alone (with its own
    resample source row; mean ablation's reference set is shared)."""
    spec, model, tokens, plans, ablation = runner_inputs(data)
    runner = fs.Runner(model, verbose=False)
    together = runner.logits(plans, tokens, ablation=ablation)
    for b in range(tokens.shape[0]):
        abl = ablation
        if ablation is not None and ablation.kind == "resample":
            abl = fs.Ablation.resample(tokens=ablation.tokens[b: b + 1])
        alone = runner.logits(plans, tokens[b: b + 1], ablation=abl)
        assert (alone[:, 0] - together[:, b]).abs().max() <= SAME, f"row {b}: " + describe(
            spec, tokens, ablation, plans)


@examples("batch_prompts")
@given(data=st.data())
def test_a_prompt_alone_equals_the_prompt_among_others(data):
    """``run``: a prompt alone and padded among prompts of other lengths (and
    multi-token answers) gives the same logits, probabilities, top-k and ranks."""
    spec = data.draw(gpt2_specs(vocabs=(FULL_VOCAB,), max_layers=3), label="spec")
    model = build(spec)
    n = data.draw(st.integers(2, 4), label="n prompts")
    ps = data.draw(st.lists(prompts(), min_size=n, max_size=n), label="prompts")
    ans = data.draw(st.lists(answers(), min_size=n, max_size=n), label="answers")
    rows = [teacher_forced_rows(model, p, a) for p, a in zip(ps, ans, strict=True)]
    assume(all(len(r) - 1 <= N_CTX for r, _, _ in rows))
    plans = data.draw(plan_sets(spec.n_layers, spec.n_heads, max_masks=4), label="plans")
    runner = fs.Runner(model, verbose=False)
    together = runner.run(plans, ps, ans, top_k=3)
    for b in range(n):
        alone = runner.run(plans, [ps[b]], [ans[b]], top_k=3)
        A = rows[b][2]
        for name in ("logit", "prob", "topk_logits", "topk_probs"):
            mine, theirs = getattr(alone, name)[:, 0, :A], getattr(together, name)[:, b, :A]
            assert torch.allclose(mine, theirs, rtol=0, atol=SAME, equal_nan=True), (name, b)
        # ranks agree except where another logit is within round-off of the answer's
        logits = runner.logits(plans, rows[b][0][:-1][None])[:, 0]
        q = torch.arange(rows[b][1] - 1, rows[b][1] - 1 + A)
        ids = rows[b][0][rows[b][1]:]
        at = logits[:, q]  # [P, A, V]
        ans_logit = at.gather(2, ids[None, :, None].expand(len(plans), A, 1))
        near = ((at - ans_logit).abs() <= 10 * SAME).sum(-1) > 1
        same = alone.rank[:, 0, :A] == together.rank[:, b, :A]
        assert bool((same | near).all()), f"prompt {b}: ranks differ"


# -- plan text and PlanSet ----------------------------------------------------------------

sizes = st.tuples(st.integers(1, 14), st.integers(1, 6))


@st.composite
def masks(draw) -> PlanMask:
    L, H = draw(sizes)
    ps = draw(mask_plan_sets(L, H, max_plans=1))
    return ps.mask(0)


@examples("round_trip")
@given(m=masks())
def test_canonical_text_round_trips(m):
    """``str(plan)`` parses back to the same masks and printing is idempotent, for
    model sizes down to one layer and one head."""
    plan = fs.Plan.from_mask(m)
    text = str(plan)
    again = fs.Plan.parse(text, m.n_layers, m.n_heads)
    assert again.mask == m, text
    assert str(again) == text
    # the unbound form prints normalised items that bind to the same masks
    unbound = fs.Plan.parse(text)
    assert fs.Plan.parse(str(unbound), m.n_layers, m.n_heads).mask == m
    assert fs.PlanSet.from_plans([text], m.n_layers, m.n_heads).mask(0) == m


@st.composite
def texts_with_meaning(draw):
    L, H = draw(sizes)
    text, want = draw(plan_texts(L, H, max_items=6))
    return L, H, text, want


@examples("text")
@given(case=texts_with_meaning())
def test_plan_text_means_what_the_readme_says(case):
    L, H, text, want = case
    plan = fs.Plan.parse(text, L, H)
    assert plan.mask == want, f"{text!r} -> {str(plan)!r}"
    canon = str(plan)
    assert fs.Plan.parse(canon, L, H).mask == want
    assert str(fs.Plan.parse(canon, L, H)) == canon
    assert plan == fs.Plan.parse(text).bind(L, H)  # binding later is the same


@examples("planset")
@given(data=st.data())
def test_planset_take_texts_and_indexing_agree(data):
    L, H = data.draw(sizes, label="size")
    ps = data.draw(plan_sets(L, H), label="plans")
    n = len(ps)
    idx = data.draw(st.lists(st.integers(-n, n - 1), min_size=1, max_size=8), label="idx")
    taken = ps.take(np.array(idx) % n)
    fresh = fs.PlanSet(ps.attn, ps.heads, ps.mlp, ps.attn_ln, ps.mlp_ln)  # no cached texts
    texts = ps.texts()
    for j, i in enumerate(idx):
        assert taken[j] == ps[i] == fresh[i]
        assert taken.text(j) == texts[i % n] == fresh.text(i % n) == str(ps[i])
        assert taken.mask(j) == ps.mask(i % n)
    assert taken.texts() == [texts[i % n] for i in idx]
    assert list(fresh.lazy_texts()) == texts and fresh.lazy_texts() == texts
    assert fresh.lazy_texts()[-1] == texts[-1]
    a, b = sorted(data.draw(st.tuples(st.integers(0, n), st.integers(0, n)), label="slice"))
    if a < b:
        assert ps[a:b] == ps.take(range(a, b)) and ps[a:b].texts() == texts[a:b]
    # texts parse back to the same plan set; so do the Plan objects
    assert fs.PlanSet.from_plans(texts, L, H) == ps
    assert fs.PlanSet.from_plans(list(ps), L, H) == ps
    assert fs.PlanSet.from_plans(ps, L, H) is ps


@examples("any_heads")
@given(L=st.integers(1, 8), H=st.integers(1, 5), data=st.data())
def test_whole_attention_plan_sets_bind_to_any_head_count(L, H, data):
    """``PlanSet(heads=None)`` (e.g. ``grid.block_subsets``) binds to a model with any
    number of heads exactly like its texts do."""
    shape = (data.draw(st.integers(1, 6), label="plans"), L)
    attn, mlp, attn_ln, mlp_ln = (data.draw(hnp.arrays(bool, shape), label=name)
                                  for name in ("attn", "mlp", "attn_ln", "mlp_ln"))
    ps = fs.PlanSet(attn, None, mlp, attn_ln, mlp_ln)
    assert ps.n_heads is None
    bound = fs.PlanSet.from_plans(ps, L, H)
    assert bound.n_heads == H
    assert bound == fs.PlanSet.from_plans(ps.texts(), L, H)
    assert [str(p) for p in bound] == ps.texts()
