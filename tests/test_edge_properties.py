"""Property tests of edge plans: text means what the README says (checked
against the written-out reading in ``strategies``), canonical text round trips,
and (further down) the edge executor against the TransformerLens edge reference
on random models, edge plans and ablations, with its invariances.

``FASTSKIP_PROPERTY_EXAMPLES`` lengthens the run as for ``test_properties.py``.
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategies import (
    EdgeNames,
    ablations,
    build,
    edge_masks,
    edge_plan_texts,
    edge_sizes,
    specs,
    token_batches,
)

import fastskip as fs
from fastskip.plans import EdgeGraph, EdgePlan, EdgePlanSet
from fastskip.reference import check_report

TOTAL = int(os.environ.get("FASTSKIP_PROPERTY_EXAMPLES", "0") or 0)
BASE = settings(deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def examples(default: int, share: float) -> settings:
    """``default`` examples, or ``share`` of FASTSKIP_PROPERTY_EXAMPLES when set."""
    return settings(BASE, max_examples=max(default, round(share * TOTAL)) if TOTAL else default)


def graph_of(names: EdgeNames) -> EdgeGraph:
    return EdgeGraph(names.n_layers, names.n_heads, names.n_kv_heads)


@st.composite
def sized_texts(draw):
    names = draw(edge_sizes())
    return names, *draw(edge_plan_texts(names))


@examples(150, 0.04)
@given(case=sized_texts())
def test_edge_text_means_what_the_readme_says(case):
    names, text, want = case
    g = graph_of(names)
    assert g.edge_names() == names.edges()  # the documented order and names
    plan = EdgePlan.parse(text, g)
    assert set(plan.edges()) == want, f"{text!r} -> {str(plan)!r}"
    canon = EdgePlan.parse(str(plan), g)
    assert canon == plan and str(canon) == str(plan)
    assert EdgePlan.parse(text).bind(g) == plan  # binding later is the same


@examples(100, 0.03)
@given(names=edge_sizes(), data=st.data())
def test_edge_canonical_text_round_trips_on_random_masks(names, data):
    g = graph_of(names)
    masks = data.draw(edge_masks(g.n_edges), label="masks")
    ps = EdgePlanSet(masks, g)
    for i, text in enumerate(ps.texts()):
        plan = EdgePlan.parse(text, g)
        assert np.array_equal(plan.mask, masks[i]), text
        assert str(plan) == text
    assert EdgePlanSet.from_plans(ps.texts(), g) == ps


# -- the edge executor against the TransformerLens edge reference -----------------------

ATOL = 1e-4


@st.composite
def edge_cases(draw, max_plans: int = 4):
    """A random small model, token batch, edge plan set (random masks plus
    leave-one-edge-out variants of the first) and ablation."""
    spec = draw(specs(), label="spec")
    tokens = draw(token_batches(spec.d_vocab, max_len=8), label="tokens")
    model = build(spec)
    g = fs.Runner(model, verbose=False).edges
    masks = draw(edge_masks(g.n_edges, max_plans), label="masks")
    if draw(st.booleans()) and masks[0].any():
        kept = np.flatnonzero(masks[0])
        drop = draw(st.lists(st.sampled_from(list(kept)), min_size=1, max_size=3, unique=True))
        variants = np.repeat(masks[:1], len(drop), axis=0)
        variants[np.arange(len(drop)), drop] = False
        masks = np.concatenate([masks, variants])
    ablation = draw(ablations(spec.d_vocab, tuple(tokens.shape)), label="ablation")
    return spec, model, tokens, EdgePlanSet(masks, g), ablation


@examples(8, 0.06)
@given(case=edge_cases())
def test_edge_executor_matches_reference(case):
    spec, model, tokens, plans, ablation = case
    runner = fs.Runner(model, verbose=False)
    report = check_report(runner, plans, tokens, atol=ATOL, ablation=ablation, arbitrate=False)
    assert not report.failures, (f"{spec}: {report.failures[:2]}; ablation {ablation!r}; "
                                 f"plans {plans.texts()}")


@examples(8, 0.04)
@given(case=edge_cases(), data=st.data())
def test_edge_plan_order_duplicates_and_budget_do_not_change_results(case, data):
    _, model, tokens, plans, ablation = case
    runner = fs.Runner(model, verbose=False)
    want = runner.logits(plans, tokens, ablation=ablation)
    n = len(plans)
    order = data.draw(st.permutations(list(range(n))), label="order")
    extra = data.draw(st.lists(st.integers(0, n - 1), max_size=3), label="duplicates")
    idx = list(order) + extra
    B, T = tokens.shape
    returned = len(idx) * B * T * model.cfg.d_vocab_out * 4  # the logits count too
    least = sum(runner.memory_sizes(runner.plan_set(plans), B, T, T)) + returned
    k = data.draw(st.sampled_from([0, 1, 4]), label="budget")
    small = fs.Runner(model, max_memory=least + k * 8 * B * T * model.cfg.d_model * 4 + 2**16,
                      verbose=False)
    got = small.logits(plans.take(idx), tokens, ablation=ablation)
    assert (got - want[idx]).abs().max() <= 1e-5


@examples(8, 0.04)
@given(data=st.data())
def test_node_plans_equal_their_edge_form_on_random_models(data):
    spec = data.draw(specs(), label="spec")
    tokens = data.draw(token_batches(spec.d_vocab, max_len=8), label="tokens")
    model = build(spec)
    runner = fs.Runner(model, verbose=False)
    L, H = spec.n_layers, spec.n_heads
    P = data.draw(st.integers(1, 4), label="plans")
    heads = data.draw(hnp.arrays(bool, (P, L, H)), label="heads")
    mlp = data.draw(hnp.arrays(bool, (P, L)), label="mlp")
    ones = np.ones((P, L), dtype=bool)
    nodes = fs.PlanSet(ones, heads, mlp, ones, ones)  # heads and MLPs removed, b_O kept
    ablation = data.draw(ablations(spec.d_vocab, tuple(tokens.shape)), label="ablation")
    edges = [EdgePlan.from_plan(p, runner.edges) for p in nodes]
    a = runner.logits(nodes, tokens, ablation=ablation)
    b = runner.logits(edges, tokens, ablation=ablation)
    assert (a - b).abs().max() <= 1e-5, nodes.texts()
