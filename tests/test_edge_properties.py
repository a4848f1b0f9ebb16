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
from strategies import EdgeNames, edge_masks, edge_plan_texts, edge_sizes

from fastskip.plans import EdgeGraph, EdgePlan, EdgePlanSet

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
