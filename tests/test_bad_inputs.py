"""Bad inputs: every mistake a user can make raises a fastskip error of the right
type whose message names the culprit (the plan text and item, the layer or head,
the prompt index, the option), and broken numbers (NaN/inf) are reported, never
ranked. One case per id; cases already in tests/test_plan.py, test_engine.py and
test_ablation.py are not repeated.

Docstrings starting "Fixed:" describe what the code did before the fix.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from strategies import tokenizer

import fastskip as fs
from fastskip.reference import check_report
from helpers import PROMPTS, kernel_runner, small_llama, small_model

L, H = 3, 4  # the conftest's tiny model: 3 layers x 4 heads, n_ctx 64


@pytest.fixture(scope="module")
def tokens(tiny):
    return tiny.to_tokens(["1 2 3 4"])  # [1, 5]


def one_layer(seed: int = 0, **overrides):
    """A cheap 1-layer model for the architecture cases."""
    cfg = dict(n_layers=1, d_model=32, d_head=16, n_heads=2, d_mlp=64)
    cfg.update(overrides)
    return small_model(seed=seed, tokenizer=tokenizer(), **cfg)


# -- plan text -----------------------------------------------------------------------------

PLAN_TEXT = [
    ("1.2-1", r"plan '1.2-1': item 1 '1.2-1' at character 0: the head range '2-1' runs "
              r"backwards; write 1-2"),
    ("0,1.1-", r"item 2 '1.1-' at character 2: the head range '1-' has no end"),
    ("2/noln/noln", r"item 1 '2/noln/noln' at character 0: unknown suffix '/noln/noln'"),
    ("none/noln", r"item 1 'none/noln' .*'none' cannot be removed or given '/noln'"),
    ("all,-", r"item 2 '-' at character 4: empty item"),
    ("0, /noln", r"item 2 '/noln' at character 3: nothing before the suffix"),
    ("1.1.2", r"item 1 '1.1.2' .*'1.2' is not a head number or range"),
    ("1.-1", r"item 1 '1.-1' .*unknown part '-1'; expected attn, mlp or a head number"),
    ("1..mlp", r"item 1 '1..mlp' .*unknown part '.mlp'"),
    ("+1", r"item 1 '\+1' .*'\+1' is not a layer number or range like 0-7"),
    ("0:2", r"item 1 '0:2' .*'0:2' is not a layer number"),
    ("1.attn.noln", r"item 1 '1.attn.noln' .*unknown part 'attn.noln'"),
    ("all,", r"plan 'all,': item 2 '\(empty\)' at character 4: empty item"),
]


@pytest.mark.parametrize("text,match", PLAN_TEXT, ids=[t for t, _ in PLAN_TEXT])
def test_malformed_plan_text_names_the_item(tiny_runner, tokens, text, match):
    with pytest.raises(fs.PlanError, match=match):
        tiny_runner.logits([text], tokens)


OUT_OF_RANGE = [
    ("all,-3", r"item 2 '-3': layer 3 does not exist; the model has layers 0-2"),
    ("1-5.mlp", r"item 1 '1-5.mlp': layer 5 does not exist"),
    ("2.4", r"item 1 '2.4': head 4 does not exist; each layer has heads 0-3"),
    ("all,-0.2-7", r"item 2 '-0.2-7': head 7 does not exist"),
    ("0-1,9.0", r"item 2 '9.0': layer 9 does not exist"),
]


@pytest.mark.parametrize("text,match", OUT_OF_RANGE, ids=[t for t, _ in OUT_OF_RANGE])
def test_layers_and_heads_out_of_range_are_named(tiny_runner, tokens, text, match):
    with pytest.raises(fs.PlanError, match=match):
        tiny_runner.logits(["all", text], tokens)


def test_plan_parse_rejects_non_strings():
    with pytest.raises(fs.PlanError, match="a plan must be a string, got NoneType"):
        fs.Plan.parse(None)  # type: ignore[arg-type]


def test_binding_needs_both_sizes():
    with pytest.raises(fs.PlanError, match="give n_heads together with n_layers"):
        fs.Plan.parse("0", 3)


# -- plans for another model, empty sets, non-plans ------------------------------------------

OTHER_MODEL = {
    "bound-plan": (lambda: [fs.Plan.parse("0", 12, 12)],
                   r"plan '0' was made for a model with 12 layers x 12 heads; this model has "
                   r"3 x 4"),
    "plan-set": (lambda: fs.PlanSet.from_plans(["all"], 12, 12),
                 r"this plan set was made for 12 layers x 12 heads; the model has 3 x 4"),
    "block-grid": (lambda: fs.grid.block_subsets(5), r"made for 5 layers .* the model has 3 x 4"),
}


@pytest.mark.parametrize("name", list(OTHER_MODEL))
def test_plans_for_another_model_size(tiny_runner, tokens, name):
    make, match = OTHER_MODEL[name]
    with pytest.raises(fs.PlanError, match=match):
        tiny_runner.logits(make(), tokens)


NOT_PLANS = {
    "empty-generator": (lambda: (p for p in []), "the plan set is empty; give at least one"),
    "empty-array": (lambda: np.array([], dtype=str), "the plan set is empty"),
    "none-in-list": (lambda: ["all", None], r"plan #1 is a NoneType \(None\); expected a Plan"),
    "nested-list": (lambda: [["all"]], r"plan #0 is a list \(\['all'\]\)"),
    "plan-mask": (lambda: [fs.Plan.parse("0", L, H).mask], r"plan #0 is a PlanMask"),
    "int": (lambda: 5, "plans must be a Plan, a string or a list of them, got int"),
    "none": (lambda: None, "plans must be a Plan, a string or a list of them, got NoneType"),
}


@pytest.mark.parametrize("name", list(NOT_PLANS))
def test_empty_plan_sets_and_non_plans(tiny_runner, tokens, name):
    make, match = NOT_PLANS[name]
    with pytest.raises(fs.PlanError, match=match):
        tiny_runner.logits(make(), tokens)


def test_bytes_as_plans_is_named():
    """Fixed: b"all" is a Sequence of ints: the error says 'plan #0 is a int (97)'."""
    with pytest.raises(fs.PlanError, match="bytes"):
        fs.PlanSet.from_plans(b"all", L, H)  # type: ignore[arg-type]


def test_planset_from_1d_arrays_is_a_plan_error():
    """Fixed: 1-D mask arrays fail with numpy's 'not enough values to unpack'."""
    ones = np.ones(3, bool)
    with pytest.raises(fs.PlanError, match=r"attn masks must have shape \[plans, n_layers\]"):
        fs.PlanSet(ones, None, ones, ones, ones)


def test_concat_of_plan_sets_for_different_models():
    """Fixed: numpy's concatenation error instead of a PlanError naming the sizes."""
    with pytest.raises(fs.PlanError, match="3 layers .* 4 layers"):
        fs.grid.concat(fs.grid.random_plans(2, 3, 4), fs.grid.random_plans(2, 4, 4))


GRIDS = {
    "too-many-components": (lambda: fs.grid.component_subsets(
        [f"{i % 3}.{i % 4}" for i in range(25)], L, H), r"2\^25 plans is too many"),
    "component-names-nothing": (lambda: fs.grid.component_subsets(["0.mlp", "-1"], L, H),
                                "component '-1' names nothing"),
    "component-base": (lambda: fs.grid.component_subsets(["1"], L, H, base="some"),
                       "base must be 'all' or 'none', got 'some'"),
    "random-kinds": (lambda: fs.grid.random_plans(3, L, H, kinds=("blocks",)),
                     r"kinds must be among block, attn, mlp, heads, noln; got \('blocks',\)"),
    "loo-unit": (lambda: fs.grid.leave_one_out(L, H, units="neuron"), "unknown unit 'neuron'"),
}


@pytest.mark.parametrize("name", list(GRIDS))
def test_bad_grid_arguments(name):
    make, match = GRIDS[name]
    with pytest.raises(fs.PlanError, match=match):
        make()


# -- prompts and answers -----------------------------------------------------------------------

PROMPT_CASES = {
    "second-prompt-empty-without-bos": (
        dict(prompts=["1 2", ""], answers=[" 3", " 4"], prepend_bos=False),
        r"prompt 1 '' is empty after tokenization \(with prepend_bos=False\)"),
    "third-prompt-over-context": (
        dict(prompts=["1", "2", "3" * 5 + " 3" * 60], answers=[" 2", " 3", " 4 5 6 7 8 9 10"]),
        r"prompt 2 '33333 3 3 .*\.\.\.' \(\d+ tokens\) plus its answer \(7 tokens\) needs "
        r"\d+ positions; the model's context is 64"),
    "second-answer-empty": (dict(prompts=["1 2", "3 4"], answers=[" 3", ""]),
                            r"answer 1 \(for prompt 1 '3 4'\) is empty"),
    "three-prompts-two-answers": (dict(prompts=["1", "2", "3"], answers=[" 2", " 3"]),
                                  "got 3 prompts but 2 answers"),
    "prompts-none": (dict(prompts=None, answers=[" 3"]),
                     "prompts must be a string or a list of strings, got NoneType"),
    "prompts-tensor": (dict(prompts=torch.tensor([1, 2]), answers=[" 3"]),
                       "prompts must be a string or a list of strings, got Tensor"),
    "answer-int": (dict(prompts=["1", "2"], answers=[" 2", 3]),
                   r"answer 1 is a int \(3\); expected a string"),
}


@pytest.mark.parametrize("name", list(PROMPT_CASES))
def test_bad_prompts_and_answers_name_the_prompt(tiny_runner, name):
    kwargs, match = PROMPT_CASES[name]
    with pytest.raises(fs.InputError, match=match):
        tiny_runner.run(["all"], **kwargs)


def test_empty_answer_with_prepend_space_is_refused(tiny_runner):
    """Fixed: the space is prepended before the emptiness check, so '' silently
    becomes the answer ' '."""
    with pytest.raises(fs.InputError, match=r"answer 0 .* is empty"):
        tiny_runner.run(["all"], ["1 2 3"], [""], prepend_space_to_answer=True)


def test_bytes_prompts_are_named(tiny_runner):
    """Fixed: b"1 2 3" is a Sequence of ints: 'prompt 0 is a int (49)'."""
    with pytest.raises(fs.InputError, match="bytes"):
        tiny_runner.run(["all"], b"1 2 3", [" 4"])  # type: ignore[arg-type]


@pytest.mark.parametrize("wrong,match", [
    ([" 4"], r"(?=.*wrong.answers)(?=.*got 2 prompts but 1)"),
    ([" 4", ""], r"wrong answer 1 .*is empty"),
], ids=["wrong-answers-count", "wrong-answer-empty"])
def test_wrong_answers_are_named_as_wrong_answers(tiny_runner, wrong, match):
    """Fixed: wrong_answers go through the answers' checks and are reported as
    'answers' ('got 2 prompts but 1 answers', 'answer 1 ... is empty')."""
    with pytest.raises(fs.InputError, match=match):
        tiny_runner.run(["all"], ["1 2", "3 4"], [" 3", " 5"], wrong_answers=wrong)


# -- tokens ----------------------------------------------------------------------------------

TOKEN_CASES = {
    "negative-id": (lambda t: t.clone().fill_(-1),
                    r"token id -1 at \[batch 0, pos 0\] is outside the vocabulary \(0..50256\)"),
    "id-in-second-row": (lambda t: torch.cat([t, t.clone().index_fill_(1, torch.tensor([3]),
                                                                     50257)]),
                         r"token id 50257 at \[batch 1, pos 3\]"),
    "bool": (lambda t: t.bool(), r"integer ids \(torch.long\), got dtype torch.bool"),
    "float64": (lambda t: t.double(), "got dtype torch.float64"),
    "three-dims": (lambda t: t[None], r"shape \[batch, pos\] with pos >= 1, got \(1, 1, 5\)"),
    "no-positions": (lambda t: t[:, :0], r"got \(1, 0\)"),
    "numpy": (lambda t: t.numpy(), "must be a torch.LongTensor .*got ndarray"),
}


@pytest.mark.parametrize("name", list(TOKEN_CASES))
def test_bad_token_tensors_are_named(tiny_runner, tokens, name):
    make, match = TOKEN_CASES[name]
    with pytest.raises(fs.InputError, match=match):
        tiny_runner.logits(["all"], make(tokens))


def test_tokens_on_the_meta_device_are_named(tiny_runner, tokens):
    """Fixed: 'Tensor.item() cannot be called on meta tensors' from deep in check_tokens.
    (No CUDA here: the meta device stands in for a device the runner cannot read.)"""
    with pytest.raises(fs.InputError, match="meta"):
        tiny_runner.logits(["all"], tokens.to("meta"))


def test_runner_on_the_meta_device_is_refused(tiny):
    """Fixed: Runner(device="meta") is accepted; logits() then returns a tensor with
    no values and run() fails inside the metrics."""
    with pytest.raises(fs.FastskipError, match="meta"):
        fs.Runner(tiny, device="meta")


# -- models ----------------------------------------------------------------------------------


def _set(model, **cfg):
    for k, v in cfg.items():
        setattr(model.cfg, k, v)
    return model


def _call(model, method):
    getattr(model, method)(True)
    return model


ARCHITECTURES = {
    "use_attn_result": (lambda: _call(one_layer(), "set_use_attn_result"),
                        r"use_attn_result \(model.set_use_attn_result\(False\)\)"),
    "use_split_qkv_input": (lambda: _call(one_layer(), "set_use_split_qkv_input"),
                            "use_split_qkv_input"),
    "attn_only": (lambda: one_layer(attn_only=True), "attention-only models"),
    "output-soft-cap": (lambda: one_layer(output_logits_soft_cap=30.0), "output_logits_soft_cap"),
    "attn-soft-cap": (lambda: one_layer(attn_scores_soft_cap=50.0), "attn_scores_soft_cap"),
    "solu_ln-activation": (lambda: one_layer(act_fn="solu_ln"), "activation 'solu_ln'"),
    "llama-gelu-gate": (lambda: small_llama(n_layers=1, act_fn="gelu"),
                        r"gated activation 'gelu' \(only silu\)"),
    "rotary-with-layernorm": (lambda: one_layer(positional_embedding_type="rotary", rotary_dim=8),
                              "normalization_type='LNPre', positional_embedding_type='rotary'"),
    "no-normalization": (lambda: one_layer(normalization_type=None), "normalization_type=None"),
    "bidirectional": (lambda: one_layer(attention_dir="bidirectional"), "bidirectional attention"),
    "inverse-layer-scaling": (lambda: _set(one_layer(), scale_attn_by_inverse_layer_idx=True),
                              "scale_attn_by_inverse_layer_idx"),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_unsupported_architectures_are_named(name):
    make, match = ARCHITECTURES[name]
    with pytest.raises(fs.UnsupportedModelError, match=match + ".* fastskip supports"):
        fs.Runner(make())


@pytest.mark.parametrize("model", ["gpt2-small", None], ids=["model-name", "none"])
def test_runner_needs_a_model_object(model):
    """Fixed: Runner("gpt2-small") fails with "'str' object has no attribute 'cfg'"."""
    with pytest.raises(fs.FastskipError, match="HookedTransformer"):
        fs.Runner(model)


def test_unknown_model_name():
    with pytest.raises(fs.FastskipError, match="unknown model 'gpt-5': use one of gpt2-small"):
        fs.load_model("gpt-5")


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value,match", [
    ("2XB", r"max_memory '2XB' is not a size like 2GB or 512MiB"),
    ("-1GB", r"max_memory '-1GB' is not a size"),
    (0, "max_memory must be positive, got 0"),
    ([2], r"max_memory '\[2\]' is not a size"),
], ids=["unit", "negative", "zero", "list"])
def test_bad_max_memory(tiny, value, match):
    with pytest.raises(fs.FastskipError, match=match):
        fs.Runner(tiny, max_memory=value)


@pytest.mark.parametrize("value", ["1.2.3GB", ".", float("nan"), float("inf"), 0.5],
                         ids=["two-dots", "dot", "nan", "inf", "half-a-byte"])
def test_max_memory_that_python_cannot_convert(tiny, value):
    """Fixed: '1.2.3GB' and '.' raise float()'s ValueError, nan/inf int()'s errors, and
    0.5 (bytes: 0 after int()) silently falls back to the default budget."""
    with pytest.raises(fs.FastskipError, match="max_memory"):
        fs.Runner(tiny, max_memory=value)


def test_negative_top_k(tiny_runner):
    with pytest.raises(fs.InputError, match="top_k must be >= 0, got -1"):
        tiny_runner.run(["all"], ["1 2"], [" 3"], top_k=-1)


@pytest.mark.parametrize("value", [2.5, None], ids=["float", "none"])
def test_top_k_that_is_not_an_int(tiny_runner, value):
    """Fixed: torch.full's / '<' TypeError instead of an InputError naming top_k."""
    with pytest.raises(fs.InputError, match="top_k"):
        tiny_runner.run(["all"], ["1 2"], [" 3"], top_k=value)


@pytest.mark.parametrize("value", ["fast", "Tree", None], ids=["fast", "case", "none"])
def test_bad_strategy(tiny, value):
    with pytest.raises(fs.FastskipError, match=r"strategy must be one of \('tree', 'masked'\), "
                                               f"got '{value}'"):
        fs.Runner(tiny, strategy=value)


def test_verify_with_an_ablation_given_as_prompts_is_refused_up_front(tiny):
    """Fixed: Runner(verify=k).run(..., ablation=fs.Ablation.mean(prompts)) computes the
    whole plan set, then raises CheckError (the type for a fast path that disagrees
    with the reference) for what is a usage error."""
    runner = fs.Runner(tiny, verify=1)
    with pytest.raises(fs.InputError, match=r"verify needs the ablation as tokens"):
        runner.run(["all,-1"], PROMPTS[:2], [" 5", " May"],
                   ablation=fs.Ablation.mean(PROMPTS[2:4]))


@pytest.mark.parametrize("value", ["3", 1.5, None], ids=["string", "float", "none"])
def test_bad_verify(tiny, value):
    with pytest.raises(fs.FastskipError, match=f"verify must be a number of plans >= 0, got "
                                               f"{value!r}"):
        fs.Runner(tiny, verify=value)


# -- ablations ---------------------------------------------------------------------------------

ABLATIONS = {
    "mean-prompts-string": (lambda t: fs.Ablation.mean("1 2 3"),
                            "mean ablation prompts must be a list of strings"),
    "resample-no-prompts": (lambda t: fs.Ablation.resample([]),
                            "resample ablation needs at least one prompt"),
    "both-prompts-and-tokens": (lambda t: fs.Ablation.mean(["1"], tokens=t),
                                r"mean ablation needs either prompts or tokens \(exactly one\)"),
    "prompts-for-token-ids": (lambda t: fs.Ablation.mean(["1 2 3 4"]),
                              "this call takes token ids: give the ablation as tokens="),
    "resample-shape": (lambda t: fs.Ablation.resample(tokens=t[:, :3]),
                       r"resample ablation tokens have shape \(1, 3\); they must match the "
                       r"tokens' shape \(1, 5\)"),
    "mean-too-short": (lambda t: fs.Ablation.mean(tokens=t[:, :3]),
                       r"mean ablation needs reference prompts at least as long as the prompts "
                       r"\(5 tokens\); the longest has 3"),
    "ablation-int": (lambda t: 123, r"ablation must be 'zero' or an fs.Ablation .*got 123"),
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_bad_ablations_are_named(tiny_runner, tokens, name):
    make, match = ABLATIONS[name]
    with pytest.raises(fs.InputError, match=match):
        tiny_runner.logits(["all,-1"], tokens, ablation=make(tokens))


BAD_ABLATION_TOKENS = {
    "negative-id": lambda t: t.clone().fill_(-1),  # silently indexes W_E from the end
    "id-past-vocab": lambda t: t.clone().fill_(60000),  # IndexError deep in embed
    "float": lambda t: t.float() + 0.7,  # silently truncated to integers
    "no-rows": lambda t: t[:0],  # 'max(): Expected reduction dim'
    "list": lambda t: t.tolist(),  # "'list' object has no attribute 'to'"
    "meta": lambda t: t.to("meta"),  # "Cannot copy out of meta tensor"
}


@pytest.mark.parametrize("kind", ["mean", "resample"])
@pytest.mark.parametrize("name", list(BAD_ABLATION_TOKENS))
def test_bad_ablation_tokens_are_named(tiny_runner, tokens, kind, name):
    """Fixed: ablation token ids are not validated like the prompt tokens: negative ids
    and float ids give silently wrong numbers, the rest torch errors."""
    bad = BAD_ABLATION_TOKENS[name](tokens)
    with pytest.raises(fs.InputError, match="ablation"):
        ablation = getattr(fs.Ablation, kind)(tokens=bad)
        tiny_runner.logits(["all,-1"], tokens, ablation=ablation)


def test_one_dimensional_ablation_tokens_are_one_row(tiny_runner, tokens):
    """Fixed: tokens [T] are one row for runner.logits, but mean ablation tokens [T]
    fail with 'tuple index out of range'."""
    src = torch.randint(0, 50000, (1, 5), generator=torch.Generator().manual_seed(0))
    want = tiny_runner.logits(["all,-1"], tokens, ablation=fs.Ablation.mean(tokens=src))
    got = tiny_runner.logits(["all,-1"], tokens, ablation=fs.Ablation.mean(tokens=src[0]))
    assert torch.equal(got, want)


def test_unknown_ablation_kind(tiny_runner, tokens):
    """Fixed: fs.Ablation("median", tokens=...) runs as a resample ablation."""
    with pytest.raises(fs.InputError, match="median"):
        tiny_runner.logits(["all,-1"], tokens, ablation=fs.Ablation("median", tokens=tokens))


# -- NaN and inf in the weights: reported (rank -1, a warning), never ranked -------------------


def run_quietly(runner, plans, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = runner.run(plans, PROMPTS[:2], [" 5", " May"], **kw)
    overflow = [w for w in caught if issubclass(w.category, fs.OverflowWarning)]
    return res, overflow


def test_nan_weight_in_the_model_is_reported_for_the_plans_that_use_it():
    model = small_model(seed=11)
    with torch.no_grad():
        model.blocks[1].mlp.W_out[3, 5] = float("nan")
    res, warned = run_quietly(fs.Runner(model), ["0", "0-1", "all,-1.mlp", "all"])
    assert [bool(r) for r in (res.rank[:, :, 0] == -1).all(1)] == [False, True, False, True]
    assert (res.rank[[0, 2]] >= 0).all()
    assert torch.isnan(res.logit[[1, 3]]).all() and torch.isnan(res.prob[[1, 3]]).all()
    assert (res.topk_ids[[1, 3]] == -1).all()
    assert len(warned) == 1 and "2 of 4 plans overflow" in str(warned[0].message)
    assert "plan 1 '0-1'" in str(warned[0].message)


def test_nan_in_runner_weights_after_building_is_reported():
    runner = fs.Runner(small_model(seed=12))
    runner.weights.layers.W_in[0, 2, 3] = float("nan")
    res, warned = run_quietly(runner, ["1", "0", "0.attn"])
    assert res.rank[0].min() >= 0 and res.rank[2].min() >= 0 and (res.rank[1] == -1).all()
    assert len(warned) == 1 and "plan 1 '0'" in str(warned[0].message)


def test_nan_in_the_unembedding_fails_every_plan_loudly():
    model = small_model(seed=13)
    with torch.no_grad():
        model.unembed.W_U[:, 123] = float("nan")
    res, warned = run_quietly(fs.Runner(model), ["0", "all", "none"])
    assert (res.rank == -1).all() and res.info["nonfinite"].all()
    assert len(warned) == 1 and "3 of 3 plans overflow" in str(warned[0].message)


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "triton-kernels"])
def test_nan_weight_in_a_skipped_component_under_the_masked_strategy(kernels):
    """Fixed: the masked strategy multiplies a skipped component's output by 0, and
    NaN x 0 = NaN: plans that skip the broken MLP get rank -1 and an overflow
    warning, while the reference (and the tree strategy) rank them. The fused
    kernel's per-row scale (kernels=True; on CPU in Triton's interpreter) does the same."""
    if kernels:
        pytest.importorskip("triton", reason="the kernel path needs triton")
    model = small_model(seed=11)  # LayerNormPre + gelu_new: the kernels cover it
    with torch.no_grad():
        model.blocks[1].mlp.W_out[3, 5] = float("nan")
    masked = kernel_runner(model, strategy="masked") if kernels else \
        fs.Runner(model, strategy="masked")
    res, _ = run_quietly(masked, ["0", "all,-1.mlp"])
    tree, _ = run_quietly(fs.Runner(model), ["0", "all,-1.mlp"])
    assert (tree.rank >= 0).all()
    assert torch.equal(res.rank.cpu(), tree.rank)


def test_inf_in_a_removed_head_does_not_poison_the_plan(tiny):
    """Fixed: removed heads are masked by multiplying z by 0; an inf in that head's
    values gives inf x 0 = NaN, so 'all,-2.1' is reported as overflowing while the
    reference (hook_z set to zero) gives finite logits."""
    model = small_model(seed=6)
    with torch.no_grad():
        model.blocks[2].attn.W_V[1, 0, 0] = float("inf")
    tokens = model.to_tokens(["1 2 3 4"])
    report = check_report(fs.Runner(model), ["all", "all,-2.1", "all,-2.attn"], tokens)
    assert report.overflowing == [0]  # 'all' really overflows, in both
    assert not report.failures, report.failures


def test_bf16_exact_ranks_survive_an_overflowing_plan():
    """Fixed: with dtype=bfloat16, one overflowing plan in the error sample makes the
    measured error NaN, the ambiguity window NaN, and no plan is recomputed in fp32:
    every other plan silently gets its bf16 rank (31 of 36 ranks wrong here)."""
    model = small_model(seed=5)
    with torch.no_grad():  # a peaked next-token distribution, like a trained model's
        model.unembed.W_U.mul_(30)
    prompts = PROMPTS[:4]
    full = fs.Runner(model).logits(["all"], model.to_tokens(prompts), last_only=True)[0]
    answers = [model.to_string(int(t)) for t in full.argmax(-1)]
    with torch.no_grad():  # MLP 0 overflows (in both precisions)
        model.blocks[0].mlp.W_out[:, 0] = float("inf")
    plans = fs.grid.concat(fs.PlanSet.from_plans(["0.mlp", "all", "all,-2.3"], L, H),
                           fs.grid.random_plans(30, L, H, seed=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fs.OverflowWarning)
        exact = fs.Runner(model).run(plans, prompts, answers)
        low = fs.Runner(model, dtype=torch.bfloat16).run(plans, prompts, answers)
    finite = ~exact.info["nonfinite"].flatten(1).any(1)
    assert 0 < int(finite.sum()) < len(plans)
    wrong = int((low.rank[finite] != exact.rank[finite]).sum())
    assert wrong == 0, f"{wrong} of {low.rank[finite].numel()} ranks are bf16 ranks, not fp32"
    assert math.isfinite(low.info["error_bound"])
