"""Plan syntax: parsing, canonical text round trips, the notebook's plans, errors."""

from __future__ import annotations

import numpy as np
import pytest

import fastskip as fs
from fastskip.plans import PlanMask

L, H = 12, 12


def mask(text: str) -> PlanMask:
    return fs.Plan.parse(text, L, H).mask


def layers(*idx: int) -> np.ndarray:
    a = np.zeros(L, bool)
    a[list(idx)] = True
    return a


# The notebook's hand-written ExtractedModel classes, as plans, with what they keep:
# (text, attention layers, MLP layers, MLP layers whose norm is skipped)
NOTEBOOK = [
    ("0-9", range(10), range(10), []),  # keep only L0 to L9
    ("0-8", range(9), range(9), []),  # keep only L0 to L8
    ("0-7,9", [*range(8), 9], [*range(8), 9], []),  # L0 to L7, skip 8, go only to 9
    ("0-3,5-7,9", [0, 1, 2, 3, 5, 6, 7, 9], [0, 1, 2, 3, 5, 6, 7, 9], []),  # skip 4, 8, 10, 11
    ("0-7,9.mlp", range(8), [*range(8), 9], []),  # skip attention in L9, only MLP9
    ("0-7,9.mlp/noln", range(8), [*range(8), 9], [9]),  # skip layer norm before MLP9
    ("0-7.attn,9.mlp", range(8), [9], []),  # attn only for L0-7, then MLP9
    ("0-7.mlp,9.mlp", [], [*range(8), 9], []),  # MLPs only
    ("0-7,8.attn,9.mlp", range(9), [*range(8), 9], []),  # skip MLP in L8, only attn8
    ("0-7,8.mlp,9.mlp", range(8), range(10), []),  # skip attn in L8, only MLP8
    ("all,-5", [i for i in range(12) if i != 5], [i for i in range(12) if i != 5], []),
    ("0-4,6-9", [*range(5), *range(6, 10)], [*range(5), *range(6, 10)], []),  # skip L5 (to 9)
    ("all,-9", [i for i in range(12) if i != 9], [i for i in range(12) if i != 9], []),
    ("all", range(12), range(12), []),
]


@pytest.mark.parametrize("text,attn,mlp,noln", NOTEBOOK)
def test_notebook_plans_mean_what_they_say(text, attn, mlp, noln):
    m = mask(text)
    assert np.array_equal(m.attn, layers(*attn))
    assert np.array_equal(m.mlp, layers(*mlp))
    assert np.array_equal(m.heads, np.repeat(layers(*attn)[:, None], H, axis=1))
    assert np.array_equal(~m.mlp_ln, layers(*noln))
    assert m.attn_ln.all()


def test_heads_and_removals():
    m = mask("0-7,8.11")
    assert m.attn[8] and m.heads[8].sum() == 1 and m.heads[8, 11] and not m.mlp[8]
    m = mask("all,-10.7")
    assert m.attn[10] and not m.heads[10, 7] and m.heads[10].sum() == 11 and m.mlp.all()
    m = mask("8.attn,-8.0-11")  # every head removed: the output bias stays
    assert m.attn[8] and not m.heads[8].any()
    m = mask("all,-8.attn")  # the whole attention removed: bias goes too
    assert not m.attn[8] and m.mlp[8]
    m = mask("8.3,8.11/noln")  # the norm is the layer's: the last item sets it
    assert not m.attn_ln[8] and m.heads[8].sum() == 2
    m = mask("none")
    assert not m.attn.any() and not m.mlp.any()
    m = mask("0-3.2")  # head 2 of layers 0..3
    assert m.heads[:4, 2].all() and m.heads.sum() == 4


def random_mask(rng: np.random.Generator, n_layers: int = L, n_heads: int = H) -> PlanMask:
    attn = rng.random(n_layers) < 0.6
    heads = np.where(rng.random((n_layers, 1)) < 0.5, True, rng.random((n_layers, n_heads)) < 0.5)
    return PlanMask(attn, heads & attn[:, None], rng.random(n_layers) < 0.6,
                    rng.random(n_layers) < 0.7, rng.random(n_layers) < 0.7).normalized()


def test_canonical_text_round_trips_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(500):
        m = random_mask(rng)
        plan = fs.Plan.from_mask(m)
        again = fs.Plan.parse(str(plan), L, H)
        assert again.mask == m, str(plan)
        assert str(again) == str(plan)  # canonical: printing is idempotent


@pytest.mark.parametrize("text", [t for t, *_ in NOTEBOOK] + [
    "all,-10.7", "8.11", "8.attn,-8.0-11", "0-11.mlp/noln,3.attn", "all/noln", "none",
    " 0-7 , 9.MLP ", "5,3,1-2", "all,-4,-8,-10,-11"])
def test_parse_print_parse(text):
    plan = fs.Plan.parse(text, L, H)
    assert fs.Plan.parse(str(plan), L, H) == plan
    assert len(str(plan)) <= len(text.replace(" ", "")) or text.startswith(" ")


def test_unbound_plans_print_normalised_items_and_bind_later():
    plan = fs.Plan.parse(" all , -4, 9.MLP/NOLN ")
    assert str(plan) == "all,-4,9.mlp/noln" and not plan.bound
    with pytest.raises(fs.PlanError, match="not bound"):
        _ = plan.mask
    assert plan.bind(12, 12).mask == mask("all,-4,9.mlp/noln")
    assert plan.bind(30, 9).mask.n_layers == 30  # the same text fits any model size


def test_from_masks_matches_text():
    attn = layers(*range(8))
    mlp = layers(*range(8), 9)
    assert fs.Plan.from_masks(attn, mlp, n_heads=H) == fs.Plan.parse("0-7,9.mlp", L, H)
    heads = np.ones((L, H), bool)
    heads[10, 7] = False
    plan = fs.Plan.from_masks(np.ones(L, bool), np.ones(L, bool), heads=heads)
    assert str(plan) == "all,-10.7"


@pytest.mark.parametrize("text,match", [
    ("12", "item 1 '12': layer 12 does not exist; the model has layers 0-11"),
    ("0-7,9-12", "item 2 '9-12': layer 12 does not exist"),
    ("3.12", "item 1 '3.12': head 12 does not exist"),
    ("3.foo", "item 1 '3.foo' at character 0: unknown part 'foo'"),
    ("1-", "item 1 '1-' at character 0: the layer range '1-' has no end"),
    ("", "empty plan"),
    ("   ", "empty plan"),
    ("0-7,,9", "item 2 '\\(empty\\)' at character 4: empty item"),
    ("7-3", "runs backwards"),
    ("3/ln", "unknown suffix '/ln'"),
    ("-3/noln", "'/noln' cannot be used on a removal"),
    ("-none", "'none' cannot be removed"),
    ("3 .mlp", "spaces inside an item"),
    ("x", "'x' is not a layer number"),
    ("3.", "nothing after '.'"),
    ("0-7, 9.atn", "item 2 '9.atn' at character 5: unknown part 'atn'"),
])
def test_bad_plans_name_the_item(text, match):
    with pytest.raises(fs.PlanError, match=match):
        fs.Plan.parse(text, L, H)


def test_plan_for_another_model_size():
    plan = fs.Plan.parse("0-7", 12, 12)
    with pytest.raises(fs.PlanError, match="made for a model with 12 layers x 12 heads"):
        plan.bind(30, 9)
    with pytest.raises(fs.PlanError, match="a plan must be a string"):
        fs.Plan.parse(7)  # type: ignore[arg-type]


def test_plan_set_and_grids():
    grid = fs.grid.block_subsets(12)
    assert len(grid) == 4096 and grid.n_heads is None
    bound = fs.PlanSet.from_plans(grid, 12, 12)
    assert str(bound[0]) == "none" and str(bound[4095]) == "all"
    assert bound[5] == fs.Plan.parse("0,2", 12, 12)
    loo = fs.grid.leave_one_out(12, 12, units=("head", "mlp"))
    assert len(loo) == 156
    assert loo.texts()[0] == "all,-0.0" and loo.texts()[-1] == "all,-11.mlp"
    comp = fs.grid.component_subsets(["9.mlp", "8.attn", "8.11"], 12, 12)
    assert len(comp) == 8
    assert comp.texts()[0] == "all" and comp.texts()[1] == "all,-9.mlp"
    assert comp[4] == fs.Plan.parse("all,-8.11", 12, 12)  # heads removed: bias stays
    assert comp[2] == fs.Plan.parse("all,-8.attn", 12, 12)
    rnd = fs.grid.random_plans(50, 12, 12, seed=3)
    assert len(rnd) == 50 and len(set(rnd.texts())) > 40
    assert list(rnd.take([3, 1])) == [rnd[3], rnd[1]]
    with pytest.raises(fs.PlanError, match="empty"):
        fs.PlanSet.from_plans([], 12, 12)
    with pytest.raises(fs.PlanError, match="plan #1 is a int"):
        fs.PlanSet.from_plans(["all", 3], 12, 12)


@pytest.mark.parametrize("text", ["-1-2", "-3", " -3.mlp,4", "-0.1"])
def test_a_plan_that_starts_with_a_removal_is_refused(text):
    """Fixed (issue 12, item 3): '-1-2' parsed as 'remove layers 1-2 from an empty
    plan', which keeps nothing; almost always a typo for 'all,-1-2'."""
    with pytest.raises(fs.PlanError, match=r"item 1 .* removes from an empty plan, which keeps "
                                           r"nothing; .* write 'all,"):
        fs.Plan.parse(text)


def test_a_removal_after_none_is_explicit_and_allowed():
    assert mask("none,-3") == mask("none")


def test_an_item_that_adds_nothing_keeps_the_norm_flag():
    """Fixed (issue 12, item 6): a head item without /noln switched its layer's
    attention norm back on although the head was kept already ('all/noln,8.3' ran
    layer 8's attention with its norm). The rule (README plan table): /noln switches
    the named norms off; an item without it switches a norm on only where it keeps
    something new."""
    assert not mask("all/noln,8.3").attn_ln[8]
    assert mask("all/noln,8.3") == mask("all/noln")
    assert mask("all/noln,8.attn") == mask("all/noln")  # adds nothing: no change
    assert mask("all/noln,9.mlp") == mask("all/noln")
    assert mask("8.0/noln,8.1").attn_ln[8]  # head 8.1 is new: the norm goes back on
    assert not mask("8.0,8.1/noln").attn_ln[8]  # /noln always switches it off
    assert not mask("all,9.mlp/noln").mlp_ln[9] and mask("all,9.mlp/noln").attn_ln.all()
    assert mask("all/noln,-8.attn,8.attn").attn_ln[8]  # removed, then kept anew
    assert mask("all,8.attn,-8.0-11,8.2").attn_ln[8]
