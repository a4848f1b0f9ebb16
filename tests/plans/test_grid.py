"""The grid helpers build exactly the plans their items spell: each plan equals
``Plan.parse`` of its text."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastskip as fs

L, H = 6, 4


def spelled(components: list[str], bits: tuple[bool, ...], base: str) -> str:
    chosen = [c for c, b in zip(components, bits, strict=True) if b]
    if base == "all":
        return ",".join(["all", *(f"-{c}" for c in chosen)])
    return ",".join(chosen) or "none"


def check_grid(components: list[str], base: str) -> None:
    ps = fs.grid.component_subsets(components, L, H, base=base)
    assert len(ps) == 2 ** len(components)
    for i in range(len(ps)):
        bits = tuple(bool(i >> k & 1) for k in range(len(components)))
        text = spelled(components, bits, base)
        assert ps[i] == fs.Plan.parse(text, L, H), (i, text, ps.text(i))


def test_component_subsets_spell_every_head_of_a_layer_as_heads():
    """Fixed (issue 12, item 2): '8.0-11' (every head of the layer) was read as '8.attn'
    and its output bias removed, while Plan('all,-8.0-11') keeps it."""
    check_grid(["3.0-3", "2.mlp"], "all")
    ps = fs.grid.component_subsets(["3.0-3"], L, H)
    assert ps[1].mask.attn[3] and not ps[1].mask.heads[3].any()  # the bias stays
    assert ps[1] == fs.Plan.parse("all,-3.0-3", L, H)


def test_component_subsets_keep_noln():
    """Fixed (issue 12, item 2): /noln on a component was silently dropped."""
    check_grid(["5.mlp/noln", "3.2/noln"], "none")
    ps = fs.grid.component_subsets(["5.mlp/noln", "3.2/noln"], L, H, base="none")
    assert not ps[1].mask.mlp_ln[5] and not ps[2].mask.attn_ln[3]
    with pytest.raises(fs.PlanError, match="removal cannot carry /noln"):
        fs.grid.component_subsets(["5.mlp/noln"], L, H, base="all")


ITEMS = ["0", "1.attn", "2.mlp", "3.1", "3.0-3", "4.2-3", "0-2.mlp", "5", "1.0", "2-3.attn"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(ITEMS), min_size=1, max_size=4, unique=True),
       st.sampled_from(["all", "none"]), st.booleans())
def test_component_subsets_equal_parse_of_their_text(components, base, noln):
    if noln and base == "none":
        components = [c + "/noln" if i % 2 == 0 else c for i, c in enumerate(components)]
    check_grid(components, base)


def test_leave_one_out_plans_are_their_text():
    for units in ("block", "attn", "mlp", "head", "component"):
        ps = fs.grid.leave_one_out(L, H, units=units, include_full=True)
        for i in range(len(ps)):
            assert ps[i] == fs.Plan.parse(ps.text(i), L, H)
    heads = fs.grid.leave_one_out(L, H, units="head")
    assert heads[0] == fs.Plan.parse("all,-0.0", L, H)
    attn = fs.grid.leave_one_out(L, H, units="attn")
    assert attn[2] == fs.Plan.parse("all,-2.attn", L, H)


def test_block_subsets_are_their_text():
    ps = fs.PlanSet.from_plans(fs.grid.block_subsets(L), L, H)
    for i in range(len(ps)):
        kept = [str(k) for k in range(L) if i >> k & 1]
        assert ps[i] == fs.Plan.parse(",".join(kept) or "none", L, H)


def test_random_plans_round_trip_their_text():
    ps = fs.grid.random_plans(40, L, H, seed=1)
    for i in range(len(ps)):
        assert ps[i] == fs.Plan.parse(ps.text(i), L, H)
    assert np.array_equal(fs.PlanSet.from_plans(ps.texts(), L, H).attn, ps.attn)


def test_every_grid_of_two_components_on_every_item_pair():
    for a, b in itertools.combinations(ITEMS, 2):
        check_grid([a, b], "all")
        check_grid([a, b], "none")
