"""The fast path against the TransformerLens reference (fp32: max |logit error|
<= 1e-4), and the invariances a user relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastskip as fs
from fastskip.reference import check_report, reference_logits
from helpers import ANSWERS, PROMPTS, rank_band, small_model

ATOL = 1e-4
KINDS = [("block",), ("attn",), ("mlp",), ("heads",), ("noln",),
         ("block", "attn", "mlp", "heads", "noln")]


@pytest.mark.parametrize("kinds", KINDS, ids=["+".join(k) for k in KINDS])
def test_random_plans_match_reference_small(tiny_runner, prompt_tokens, kinds):
    plans = fs.grid.random_plans(24, 3, 4, seed=len(kinds), kinds=kinds)
    err = fs.check(tiny_runner, plans, prompt_tokens, atol=ATOL)
    assert err <= ATOL


def test_layernorm_with_weights_and_noln(tiny_ln, prompt_tokens):
    """Unfolded LayerNorm (weights kept): /noln skips the normalisation only."""
    runner = fs.Runner(tiny_ln)
    plans = fs.grid.random_plans(40, 3, 4, seed=5)
    assert fs.check(runner, plans, prompt_tokens, atol=ATOL) <= ATOL
    assert fs.check(fs.Runner(tiny_ln, strategy="masked"), plans, prompt_tokens) <= ATOL


def test_all_plan_equals_plain_transformerlens_forward(tiny, tiny_runner, prompt_tokens):
    fast = tiny_runner.logits(["all"], prompt_tokens)[0]
    assert (fast - tiny(prompt_tokens)).abs().max() <= ATOL
    assert (tiny_runner.logits("none", prompt_tokens)[0] -
            reference_logits(tiny, "none", prompt_tokens)).abs().max() <= ATOL


def test_every_item_kind_on_one_layer(tiny_runner, prompt_tokens):
    plans = ["1", "1.attn", "1.mlp", "1.2", "1.0-2", "1.attn,-1.0-3", "1/noln", "1.mlp/noln",
             "1.attn/noln", "1.3/noln", "all,-1.2", "all,-2.mlp", "all,-0.attn", "0,2.1,2.mlp",
             "none", "all"]
    assert fs.check(tiny_runner, plans, prompt_tokens) <= ATOL


def test_check_names_the_worst_plan(tiny, prompt_tokens):
    runner = fs.Runner(tiny)
    # break layer 1's attention in the fast path only (not along the all-ones direction,
    # which LayerNorm's centring would remove)
    gen = torch.Generator().manual_seed(0)
    runner.weights.layers.b_O[1] += torch.randn(runner.weights.d_model, generator=gen)
    with pytest.raises(fs.CheckError, match=r"plan 1 '1.attn' differs .* by "):
        fs.check(runner, ["0", "1.attn", "2"], prompt_tokens)


def test_masked_and_tree_strategies_agree_and_chunking_is_invisible(tiny, prompt_tokens):
    plans = fs.grid.random_plans(60, 3, 4, seed=11)
    ref = fs.Runner(tiny).logits(plans, prompt_tokens, last_only=True)
    masked = fs.Runner(tiny, strategy="masked").logits(plans, prompt_tokens, last_only=True)
    assert (ref - masked).abs().max() <= ATOL
    # a tiny budget forces many chunks, tiny matmul batches and unembedding batches: 5 MB
    # beside the returned logits, which count against the budget
    out_bytes = ref.numel() * ref.element_size()
    small = fs.Runner(tiny, max_memory=out_bytes + 5 * 2**20).logits(plans, prompt_tokens,
                                                                     last_only=True)
    assert (ref - small).abs().max() <= 1e-5
    # order and duplicates do not matter
    perm = np.random.default_rng(0).permutation(len(plans))
    shuffled = fs.Runner(tiny).logits(plans.take(np.concatenate([perm, perm[:5]])),
                                      prompt_tokens, last_only=True)
    assert (shuffled[: len(plans)] - ref[perm]).abs().max() <= 1e-5
    assert (shuffled[len(plans):] - ref[perm[:5]]).abs().max() <= 1e-5


def test_budget_too_small_for_one_plan_says_so(tiny, prompt_tokens):
    with pytest.raises(fs.MemoryBudgetError, match="raise max_memory"):
        fs.Runner(tiny, max_memory=1000).logits(["all"], prompt_tokens)


def test_logits_shapes(tiny_runner, prompt_tokens):
    B, T = prompt_tokens.shape
    assert tiny_runner.logits(["all", "0"], prompt_tokens).shape == (2, B, T, 50257)
    last = tiny_runner.logits(["all", "0"], prompt_tokens, last_only=True)
    assert last.shape == (2, B, 50257)
    full = tiny_runner.logits(["all", "0"], prompt_tokens)
    assert (full[:, :, -1] - last).abs().max() <= 1e-5
    assert tiny_runner.logits("all", prompt_tokens[0]).shape == (1, 1, T, 50257)


def test_run_metrics_match_reference_with_padding_and_multitoken_answers(tiny, tiny_runner):
    prompts = ["1 2 3 4", "January February March April May June", "A B"]
    answers = [" 5 6 7", " July", " C D"]  # 3, 1 and 2 tokens; prompts of 5, 7 and 3 tokens
    plans = ["all", "0,2.mlp", "all,-1.3", "0-1/noln"]
    res = tiny_runner.run(plans, prompts, answers, top_k=7)
    assert res.rank.shape == (4, 3, 3) and res.topk_ids.shape == (4, 3, 3, 7)
    assert res.answer_mask.tolist() == [[True] * 3, [True, False, False], [True, True, False]]
    for n, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        full = tiny.to_tokens(p + a)  # each prompt alone, unpadded, no teacher-forcing trick
        n_prompt = tiny.to_tokens(p).shape[1]
        n_answer = full.shape[1] - n_prompt
        for i, plan in enumerate(plans):
            ref = reference_logits(tiny, plan, full)[0]
            for j in range(n_answer):
                row = ref[n_prompt - 1 + j]
                tok = full[0, n_prompt + j]
                assert abs(float(res.logit[i, n, j]) - float(row[tok])) <= ATOL
                assert abs(float(res.prob[i, n, j]) - float(row.softmax(-1)[tok])) <= 1e-6
                # rank: entries strictly above the answer, allowing near-ties (the
                # answer itself is not one of them)
                lo, hi = rank_band(row, int(tok), ATOL)
                assert lo <= int(res.rank[i, n, j]) <= hi
                top = row.topk(7)
                assert torch.allclose(res.topk_logits[i, n, j], top.values, atol=ATOL)
            assert (res.rank[i, n, n_answer:] == -1).all()
            assert torch.isnan(res.logit[i, n, n_answer:]).all()
    df = res.to_pandas()
    assert len(df) == 4 * 6 and list(df.columns[:9]) == [
        "plan", "prompt", "answer", "answer_pos", "token", "token_id", "rank", "logit", "prob"]
    assert df.groupby("plan").size().to_dict() == {p: 6 for p in res.plans}


def test_prompts_of_different_lengths_batch_exactly(tiny_runner):
    one = [tiny_runner.run(["all", "1.mlp"], [p], [a]) for p, a in zip(PROMPTS, ANSWERS,
                                                                      strict=True)]
    together = tiny_runner.run(["all", "1.mlp"], PROMPTS, ANSWERS)
    for n, r in enumerate(one):
        assert torch.allclose(together.logit[:, n], r.logit[:, 0], atol=1e-5)


def test_test_prompt_prints_the_notebook_report(tiny_runner, capsys):
    ranks = fs.test_prompt("1 2 3 4", "5", tiny_runner, "0-1,2.mlp", top_k=3)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Tokenized prompt: ['<|endoftext|>', '1', ' 2', ' 3', ' 4']"
    assert out[1] == "Tokenized answer: [' 5']"  # space prepended, as in the notebook
    assert out[2] == "Performance on answer token:"
    res = tiny_runner.run(["0-1,2.mlp"], ["1 2 3 4"], [" 5"], top_k=3)
    r, lg, pr = int(res.rank[0, 0, 0]), float(res.logit[0, 0, 0]), float(res.prob[0, 0, 0])
    assert out[3] == f"[b]Rank: {r: <8} Logit: {lg:5.2f} Prob: {pr:6.2%} Token: | 5|[/b]"
    assert out[4].startswith("Top 0th token. Logit: ") and " Token: |" in out[4]
    assert len(out) == 8 and out[7] == f"[b]Ranks of the answer tokens:[/b] [(' 5', {r})]"
    assert ranks == [(" 5", r)]


@pytest.mark.parametrize("prompts,answers,match", [
    (["1 2 3"], [" 4", " 5"], "got 1 prompts but 2 answers"),
    (["1 2 3"], [""], "answer 0 .* is empty"),
    ([3], [" 4"], "prompt 0 is a int"),
    (["1 2 3"], [None], "answer 0 is a NoneType"),
    (["1 " * 70], [" 4"], "needs .* positions; the model's context is 64"),
    ([], [], "no prompts"),
])
def test_bad_prompts_and_answers(tiny_runner, prompts, answers, match):
    with pytest.raises(fs.InputError, match=match):
        tiny_runner.run(["all"], prompts, answers)


def test_empty_prompt_without_bos(tiny_runner):
    with pytest.raises(fs.InputError, match="prompt 0 '' is empty after tokenization"):
        tiny_runner.run(["all"], [""], [" 4"], prepend_bos=False)


@pytest.mark.parametrize("tokens,match", [
    (torch.tensor([[1, 2, 60000]]), "token id 60000 at \\[batch 0, pos 2\\] is outside"),
    (torch.tensor([[1.0, 2.0]]), "integer ids"),
    (torch.zeros((1, 65), dtype=torch.long), "65 positions; the model's context is 64"),
    ([[1, 2]], "must be a torch.LongTensor"),
])
def test_bad_tokens(tiny_runner, tokens, match):
    with pytest.raises(fs.InputError, match=match):
        tiny_runner.logits(["all"], tokens)


def test_unsupported_architecture_is_named():
    model = small_model(seed=2)
    model.cfg.parallel_attn_mlp = True
    with pytest.raises(fs.UnsupportedModelError, match="parallel attention .* fastskip supports"):
        fs.Runner(model)


def test_import_is_light():
    import subprocess
    import sys
    code = "import sys, fastskip; print('transformer_lens' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_300_random_plans_of_every_kind_on_gpt2_small_random(gpt2_runner, gpt2_random):
    """The acceptance check of the core: fs.check on 300 random plans, fp32."""
    tokens = gpt2_random.to_tokens(PROMPTS)
    plans = fs.grid.concat(*[fs.grid.random_plans(50, 12, 12, seed=100 + i, kinds=k)
                             for i, k in enumerate(KINDS)])
    assert len(plans) == 300
    report = check_report(gpt2_runner, plans, tokens, atol=ATOL)
    assert not report.failures, report.failures[:3]
    plain = [e for i, e in enumerate(report.errors) if i not in report.arbitrated]
    assert max(plain) <= ATOL
    # plans above 1e-4 are ill-conditioned /noln plans whose residual stream grows: fastskip
    # is within 2x of TransformerLens fp32's own error against float64, or within the
    # tolerance scaled by that growth (check's arbitration)
    for i, v in report.arbitrated.items():
        assert "noln" in report.plans[i] and v.growth > 1
        assert v.ours <= 2 * v.theirs or v.ours <= ATOL * v.growth
    assert len(report.arbitrated) <= 10
    print(f"\nmax |logit error| over {len(plain)} plans: {max(plain):.2e}; "
          f"{len(report.arbitrated)} ill-conditioned /noln plans arbitrated in float64: "
          f"{sorted(report.arbitrated.values())}")


def test_logit_diff_and_kl(tiny, tiny_runner):
    res = tiny_runner.run(["all", "0,2"], ["1 2 3 4", "A B C"], [" 5", " D"],
                          wrong_answers=[" 4", " C"], kl=True)
    tokens = tiny.to_tokens(["1 2 3 4"])
    for i, plan in enumerate(["all", "0,2"]):
        row = reference_logits(tiny, plan, tokens)[0, -1]
        five, four = tiny.to_single_token(" 5"), tiny.to_single_token(" 4")
        assert abs(float(res.logit_diff[i, 0]) - float(row[five] - row[four])) <= ATOL
        full = reference_logits(tiny, "all", tokens)[0, -1].log_softmax(-1)
        want = float((full.exp() * (full - row.log_softmax(-1))).sum())
        assert abs(float(res.kl[i, 0]) - want) <= 1e-5
    assert abs(float(res.kl[0].max())) <= 1e-5  # the full model against itself
    df = res.to_pandas()
    assert {"logit_diff", "kl"} <= set(df.columns)


def test_overflow_is_reported_not_ranked(tiny):
    """inf/NaN logits give rank -1 and a warning naming a plan, never a made-up rank."""
    runner = fs.Runner(tiny)
    runner.weights.layers.W_out[1] *= 1e38  # layer 1's MLP overflows in the fast path
    with pytest.warns(fs.OverflowWarning, match=r"1 of 2 plans overflow .* plan 1 '0-1'"):
        res = runner.run(["0", "0-1"], ["1 2 3 4"], [" 5"])
    assert int(res.rank[0, 0, 0]) >= 0 and int(res.rank[1, 0, 0]) == -1
    assert torch.isnan(res.logit[1]).all() and res.info["nonfinite"][1].all()


def test_verify_mode_rechecks_every_call(tiny, prompt_tokens):
    runner = fs.Runner(tiny, verify=3)
    plans = fs.grid.random_plans(20, 3, 4, seed=4)
    runner.run(plans, PROMPTS, ANSWERS)
    runner.logits(plans, prompt_tokens, last_only=True)
    gen = torch.Generator().manual_seed(1)
    W_in = runner.weights.layers.W_in
    W_in[2] += 0.05 * torch.randn(W_in[2].shape, generator=gen)
    with pytest.raises(fs.CheckError, match="verify: plan .* differ"):
        runner.run(["2", "0,2", "all"], PROMPTS, ANSWERS)
    with pytest.raises(fs.CheckError, match="verify: plan"):
        runner.logits(["2", "0,2", "all"], prompt_tokens)
    with pytest.raises(fs.FastskipError, match="verify must be"):
        fs.Runner(tiny, verify=-1)


def test_logit_diff_fast_path_equals_run(tiny_runner):
    plans = fs.grid.random_plans(12, 3, 4, seed=6)
    prompts, answers, wrong = ["1 2 3 4", "A B C"], [" 5", " D"], [" 4", " C"]
    want = tiny_runner.run(plans, prompts, answers, wrong_answers=wrong).logit_diff
    got = tiny_runner.logit_diff(plans, prompts, answers, wrong)
    assert got.shape == (12, 2) and (got - want).abs().max() <= 1e-5
    again = tiny_runner.logit_diff(plans.take([3, 1]), prompts, answers, wrong)  # cached inputs
    assert (again - want[[3, 1]]).abs().max() <= 1e-5


def test_logits_output_counts_against_the_budget(tiny, prompt_tokens):
    """Fixed (issue 12, item 5): Runner.logits allocated the whole [P, B, T, V] output
    whatever max_memory said, though the README says the budget bounds logits."""
    runner = fs.Runner(tiny, max_memory="128MB", verbose=False)
    plans = fs.grid.random_plans(64, 3, 4, seed=2)  # 64 x 6 x 5 x 50257 fp32: 386 MB
    with pytest.raises(fs.MemoryBudgetError, match=r"the logits of 64 plans .* MiB, returned"):
        runner.logits(plans, prompt_tokens)
    assert runner.logits(plans, prompt_tokens, last_only=True).shape == (64, 6, 50257)


def test_logit_diff_is_verified_against_the_reference(tiny):
    """Fixed (issue 12, item 7): logit_diff skipped verify=, so Runner(model, verify=3)
    never checked a search."""
    runner = fs.Runner(tiny, verify=3)
    prompts, answers, wrong = ["1 2 3 4", "A B C"], [" 5", " D"], [" 4", " C"]
    plans = fs.grid.random_plans(10, 3, 4, seed=8)
    runner.logit_diff(plans, prompts, answers, wrong)  # agrees: no error
    W_in = runner.weights.layers.W_in
    W_in[1] += 0.05 * torch.randn(W_in[1].shape, generator=torch.Generator().manual_seed(2))
    with pytest.raises(fs.CheckError, match="verify: plan .* logit differences differ"):
        runner.logit_diff(["1", "0-1", "all"], prompts, answers, wrong)


def test_logit_diff_of_a_reduced_precision_runner_is_fp32(tiny):
    """Fixed (issue 12, item 7): a bf16 runner made search decisions on bf16 scores
    while the README quotes fp32 round-off (~1e-6); with exact_ranks (the default) the
    differences are computed in fp32."""
    prompts, answers, wrong = ["1 2 3 4", "A B C"], [" 5", " D"], [" 4", " C"]
    plans = fs.grid.random_plans(10, 3, 4, seed=9)
    want = fs.Runner(tiny).logit_diff(plans, prompts, answers, wrong)
    got = fs.Runner(tiny, dtype=torch.bfloat16).logit_diff(plans, prompts, answers, wrong)
    assert (got - want).abs().max() <= 1e-5
    raw = fs.Runner(tiny, dtype=torch.bfloat16, exact_ranks=False)
    assert (raw.logit_diff(plans, prompts, answers, wrong) - want).abs().max() > 1e-5


def test_verify_refuses_a_rank_one_too_high():
    """Fixed (issue 12, item 8): verify counted entries above answer - tol, the answer
    itself among them, so a rank one too high passed."""
    from fastskip.inputs import make_batch
    from fastskip.run.verify import verify_run

    model = small_model(seed=5)
    answer = model.to_single_token(" 5")
    with torch.no_grad():
        model.unembed.b_U[answer] += 50.0  # " 5" is top-1 by a wide margin: no near-tie
    runner = fs.Runner(model)
    plans = runner.plan_set(["all", "0-1", "2"])
    res = runner.run(plans, ["1 2 3 4"], [" 5"])
    assert (res.rank == 0).all()
    batch = make_batch(model, ["1 2 3 4"], [" 5"])
    verify_run(runner, plans, batch, res, 3, 0, None)  # the true ranks pass
    res.rank[1, 0, 0] = 1
    with pytest.raises(fs.CheckError, match="reports rank 1 .* the reference gives 0..0"):
        verify_run(runner, plans, batch, res, 3, 0, None)
