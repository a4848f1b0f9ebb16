"""Edge plans: the graph's senders, receivers and edge order, the item syntax,
canonical text, node plans as edges, masks and top-n by score."""

from __future__ import annotations

import numpy as np
import pytest

import fastskip as fs
from fastskip.plans import EdgeGraph, EdgePlan, EdgePlanSet, holds_edge_plans

GPT2 = EdgeGraph(12, 12, 12)
GQA = EdgeGraph(3, 4, 2)  # 4 query heads sharing 2 key/value heads


def test_gpt2_small_has_auto_circuits_edge_count():
    # auto-circuit's factorized GPT-2 small graph with separate q/k/v has 32,491 edges
    assert (GPT2.n_senders, GPT2.n_receivers, GPT2.n_edges) == (157, 445, 32491)
    names = GPT2.edge_names()
    assert names[:2] == ["embed>0.0.q", "embed>0.1.q"]
    assert names[-1] == "11.mlp>logits" and len(set(names)) == GPT2.n_edges
    # the senders before a receiver are a prefix of the sender order
    assert GPT2.in_degree[GPT2.q_receiver(0, 3)] == 1  # embed only
    assert GPT2.in_degree[GPT2.mlp_receiver(0)] == 13  # embed + layer 0's heads
    assert GPT2.in_degree[GPT2.logits_receiver] == 157


def test_edge_index_and_names_agree():
    for e in [0, 1, 500, 12345, GPT2.n_edges - 1]:
        s, r = int(GPT2.edge_sender[e]), int(GPT2.edge_receiver[e])
        assert GPT2.edge_index(s, r) == e
        assert GPT2.edge_name(e) == GPT2.edge_names()[e]
    with pytest.raises(fs.PlanError, match="no edge 9.1>8.6.q"):
        GPT2.edge_index(GPT2.head_sender(9, 1), GPT2.q_receiver(8, 6))


def test_grouped_query_receivers_belong_to_key_value_heads():
    assert GQA.receivers_per_layer == 4 + 2 + 2 + 1
    assert GQA.receiver_name(GQA.k_receiver(1, 1)) == "1.kv1.k"
    assert GQA.receiver_name(GQA.v_receiver(2, 0)) == "2.kv0.v"
    assert GQA.receiver_name(GQA.q_receiver(2, 3)) == "2.3.q"
    assert GPT2.receiver_name(GPT2.k_receiver(1, 1)) == "1.1.k"


@pytest.mark.parametrize("text, edges", [
    ("8.6>9.1.q", ["8.6>9.1.q"]),
    ("0.mlp>logits", ["0.mlp>logits"]),
    ("embed>3.mlp", ["embed>3.mlp"]),
    ("8.6>9.1.qk", ["8.6>9.1.q", "8.6>9.1.k"]),
    ("11.0-1>logits", ["11.0>logits", "11.1>logits"]),
    ("10-11.mlp>logits", ["10.mlp>logits", "11.mlp>logits"]),
    ("embed>0.kv2.k", ["embed>0.2.k"]),  # kv spelling also works without grouping
])
def test_items_name_edges(text, edges):
    plan = EdgePlan.parse(text, GPT2)
    assert plan.edges() == sorted(edges, key=GPT2.edge_names().index)


def test_wildcards_removals_and_order():
    out = EdgePlan.parse("11.mlp>*", GPT2)
    assert out.edges() == ["11.mlp>logits"]
    into = EdgePlan.parse("*>0.mlp", GPT2)
    assert into.n_edges == 13
    plan = EdgePlan.parse("all,-8.6>9.1.q,-0.mlp>*", GPT2)
    out_degree = int((GPT2.edge_sender == GPT2.mlp_sender(0)).sum())
    assert plan.n_edges == GPT2.n_edges - 1 - out_degree
    assert "8.6>9.1.q" not in plan.edges()
    # left to right: a later item wins
    assert EdgePlan.parse("-8.6>9.1.q,all", GPT2).n_edges == GPT2.n_edges
    assert EdgePlan.parse("all,none,8.6>9.1.q", GPT2).edges() == ["8.6>9.1.q"]
    assert EdgePlan.parse("*>*", GPT2) == EdgePlan.parse("all", GPT2)


@pytest.mark.parametrize("text", ["all", "none", "8.6>9.1.q", "all,-8.6>9.1.q,-0.mlp>*",
                                  "embed>*", "*>logits", "0-3.0-11>5.mlp,*>11.0-11.qkv",
                                  "EMBED>3.MLP , 2.1>3.2.V"])
def test_canonical_text_round_trips(text):
    plan = EdgePlan.parse(text, GPT2)
    again = EdgePlan.parse(str(plan), GPT2)
    assert again == plan and str(again) == str(plan)


def test_canonical_text_is_short():
    assert str(EdgePlan.parse("embed>*", GPT2)) == "embed>*"
    assert str(EdgePlan.parse("*>logits", GPT2)) == "*>logits"
    assert str(EdgePlan.parse("all,-0.mlp>*,-8.6>9.1.q", GPT2)) == "all,-0.mlp>*,-8.6>9.1.q"
    assert str(EdgePlan.parse("*>9.0-11.q,*>9.0-11.k,*>9.0-11.v", GPT2)) == "*>9.0-11.qkv"


@pytest.mark.parametrize("text, match", [
    ("9.1>8.6.q", "receiver 8.6.q comes before sender 9.1"),
    ("5.mlp>5.mlp", "receiver 5.mlp comes before sender 5.mlp"),
    ("0-11.0>6.mlp", "receiver 6.mlp comes before sender 7.0"),
    ("8.12>9.1.q", "head 12 does not exist"),
    ("12.mlp>logits", "layer 12 does not exist"),
    ("8.6>9.1.x", "'x' is not a head input"),
    ("8.6", r"an edge item is S>R"),
    ("8.6.q>9.1.q", "q/k/v inputs are receivers"),
    (">logits", "needs a sender"),
    ("8.6>9.1.q>10.mlp", "one '>' per item"),
    ("embed>1.kv0.q", "a key/value head has no query input"),
    ("-none", "'none' cannot be removed"),
    ("8.6>9.1.q,,", "item 2"),
])
def test_bad_items_name_the_item(text, match):
    with pytest.raises(fs.PlanError, match=match):
        EdgePlan.parse(text, GPT2)


def test_grouped_models_need_the_key_value_spelling():
    with pytest.raises(fs.PlanError, match=r"write L.kvG.k"):
        EdgePlan.parse("0.1>1.0.k", GQA)
    with pytest.raises(fs.PlanError, match="key/value head 2 does not exist"):
        EdgePlan.parse("0.1>1.kv2.v", GQA)
    plan = EdgePlan.parse("0.1>1.kv0.kv,0.1>1.3.q", GQA)
    assert plan.edges() == ["0.1>1.3.q", "0.1>1.kv0.k", "0.1>1.kv0.v"]
    assert EdgePlan.parse(str(plan), GQA) == plan


def test_unbound_plans_and_other_graphs():
    plan = EdgePlan.parse("all,-8.6>9.1.q")
    assert not plan.bound and str(plan) == "all,-8.6>9.1.q"
    with pytest.raises(fs.PlanError, match="not bound"):
        plan.mask  # noqa: B018
    bound = plan.bind(GPT2)
    with pytest.raises(fs.PlanError, match="was made for"):
        bound.bind(EdgeGraph(12, 12, 4))


def test_from_plan_removes_every_out_edge_of_removed_nodes():
    plan = EdgePlan.from_plan("all,-10.7,-3.mlp", GPT2)
    gone = {GPT2.head_sender(10, 7), GPT2.mlp_sender(3)}
    want = ~np.isin(GPT2.edge_sender, list(gone))
    assert np.array_equal(plan.mask, want)
    assert str(plan) == "all,-3.mlp>*,-10.7>*"
    assert EdgePlan.from_plan("all", GPT2) == EdgePlan.parse("all", GPT2)
    with pytest.raises(fs.PlanError, match="removes the attention of layer 8 with its output"):
        EdgePlan.from_plan("0-7,9-11", GPT2)
    with pytest.raises(fs.PlanError, match="/noln"):
        EdgePlan.from_plan("all,9.mlp/noln", GPT2)


def test_masks_dense_and_flat():
    rng = np.random.default_rng(0)
    m = rng.random(GQA.n_edges) < 0.3
    plan = EdgePlan.from_mask(m, GQA)
    dense = GQA.dense(m[None])[0]
    assert EdgePlan.from_mask(dense, GQA) == plan
    assert np.array_equal(GQA.flat(dense[None])[0], m)
    bad = dense.copy()
    bad[GQA.q_receiver(0, 0), GQA.mlp_sender(2)] = True
    with pytest.raises(fs.PlanError, match="2.mlp>0.0.q, which is no edge"):
        EdgePlan.from_mask(bad, GQA)
    with pytest.raises(fs.PlanError, match="boolean"):
        EdgePlan.from_mask(m.astype(int), GQA)
    with pytest.raises(fs.PlanError, match="shape"):
        EdgePlan.from_mask(m[:-1], GQA)


def test_top_n_keeps_the_highest_scores():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=GPT2.n_edges)
    plan = EdgePlan.top_n(scores, 10, GPT2)
    assert plan.n_edges == 10
    assert set(np.flatnonzero(plan.mask)) == set(np.argsort(-scores)[:10])
    ties = np.zeros(GPT2.n_edges)
    assert np.array_equal(np.flatnonzero(EdgePlan.top_n(ties, 3, GPT2).mask), [0, 1, 2])
    scores[5] = np.nan
    assert not EdgePlan.top_n(scores, GPT2.n_edges - 1, GPT2).mask[5]
    curve = EdgePlanSet.top_n(np.abs(scores), [0, 1, 100, GPT2.n_edges], GPT2)
    assert curve.masks.sum(1).tolist() == [0, 1, 100, GPT2.n_edges]
    assert (curve.masks[1] <= curve.masks[2]).all()  # nested
    with pytest.raises(fs.PlanError, match="between 0 and 32491"):
        EdgePlan.top_n(scores, GPT2.n_edges + 1, GPT2)
    with pytest.raises(fs.PlanError, match="one value per edge"):
        EdgePlan.top_n(scores[:10], 3, GPT2)


def test_edge_plan_sets():
    ps = EdgePlanSet.from_plans(["all", "all,-8.6>9.1.q", fs.Plan.parse("all,-3.mlp"),
                                 EdgePlan.parse("none")], GPT2)
    assert len(ps) == 4 and ps.masks.shape == (4, GPT2.n_edges)
    assert ps.texts() == ["all", "all,-8.6>9.1.q", "all,-3.mlp>*", "none"]
    assert ps[1] == EdgePlan.parse("all,-8.6>9.1.q", GPT2)
    assert ps.take([3, 0]).texts() == ["none", "all"]
    assert list(ps.lazy_texts()) == ps.texts()
    assert EdgePlanSet.from_plans(ps, GPT2) is ps
    assert EdgePlanSet(ps.masks, GPT2).texts() == ps.texts()  # computed afresh
    assert holds_edge_plans(["all", "8.6>9.1.q"]) and holds_edge_plans(ps)
    assert not holds_edge_plans(["all", "0-7,9.mlp"])
    with pytest.raises(fs.PlanError, match="empty"):
        EdgePlanSet.from_plans([], GPT2)
