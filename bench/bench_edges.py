"""Edge plans on the random GPT-2 small (32,491 edges) and the notebook's 6 prompts,
against the tools a researcher uses today, timed in the same run:

* a faithfulness curve of 32 circuit sizes (1 edge to all, logarithmic; edges
  ranked by auto-circuit's own edge attribution scores, ``mask_gradient_prune_scores``
  with ``grad_function="logit"``, ``mask_val=0``: EAP) with resample ablation from
  the corrupted prompts: ``fs.search.faithfulness_curve`` (logit difference, KL and
  accuracy of every circuit) against auto-circuit 1.0.1's ``run_circuits``
  (``PatchType.TREE_PATCH``, ``AblationType.RESAMPLE``: the same circuits), per circuit;
* leave-one-edge-out over the edges inside a 20-node circuit (the 20 heads and MLPs
  with the largest attribution over their out-edges; mean ablation as in the
  paper's path patching): ``fs.search.path_patch`` against one TransformerLens
  ``run_with_hooks`` per edge, written for speed (``baselines.EdgeHooks``: split
  q/k/v inputs, the senders' outputs stacked as the forward makes them, one einsum
  per group of receivers; checked against the plain reference
  ``edge_reference_logits`` and against fastskip's logits outside the timed region),
  timed on a sample of edges and scaled per edge.

The logits of the two are compared on the same circuits (max |difference| in
``extra_info``). auto-circuit imports ``attr`` and TransformerLens's old
``HookedTransformerKeyValueCache``: the shim lives in the test helpers
(``tests/helpers.py: import_auto_circuit``), never in the library.

    flock /tmp/fastskip-timing.lock .venv/bin/python -m pytest bench/bench_edges.py -s
    FASTSKIP_BENCH_THREADS=1 flock ...      # both sides on one thread
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from baselines import EdgeHooks
from bench_search import WRONG
from conftest import ANSWERS, PROMPTS, machine

import fastskip as fs
from fastskip.plans import EdgePlan, EdgePlanSet
from fastskip.reference.edge_hooks import edge_reference_logits, sender_ablations
from fastskip.reference.timing import synced, timed
from fastskip.search import faithfulness_curve, path_patch
from fastskip.search.autocircuit import from_prune_scores
from fastskip.search.faithfulness import default_sizes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import import_auto_circuit  # noqa: E402

CORRUPT = [1, 2, 3, 4, 5, 0]  # corrupted prompt i = prompt i+1 (all are 5 tokens)
SAMPLE = 12  # edges timed with one run_with_hooks each
needs_auto_circuit = pytest.mark.skipif(
    importlib.util.find_spec("auto_circuit") is None,
    reason="auto-circuit is not installed: pip install auto-circuit==1.0.1 attrs (bench extra)")


@pytest.fixture(scope="module", autouse=True)
def threads():
    """``FASTSKIP_BENCH_THREADS=1`` runs both sides on one thread (on a loaded
    2-core machine two threads wait on each other; the count is in extra_info)."""
    before = torch.get_num_threads()
    if os.environ.get("FASTSKIP_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["FASTSKIP_BENCH_THREADS"]))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setting(gpt2, tokens):
    """The runner, the task (answers oriented so that the full model's logit
    difference is positive), auto-circuit's patchable copy of the model, its data
    loader and its EAP scores as PruneScores."""
    ac = import_auto_circuit()
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores

    runner = fs.Runner(gpt2, verbose=False)
    res = runner.run(["all"], PROMPTS, ANSWERS, wrong_answers=WRONG, top_k=0)
    answers, wrong = (ANSWERS, WRONG) if float(res.logit_diff.mean()) > 0 else (WRONG, ANSWERS)
    task = SimpleNamespace(prompts=PROMPTS, answers=answers, wrong_answers=wrong,
                           corrupted=[PROMPTS[i] for i in CORRUPT])
    corrupt = tokens[CORRUPT]
    patched = copy.deepcopy(gpt2)
    patched.set_use_attn_result(True)
    patched.set_use_split_qkv_input(True)
    patched.set_use_hook_mlp_in(True)
    pm = ac.patchable_model(patched, factorized=True, slice_output="last_seq",
                            separate_qkv=True, device=torch.device("cpu"))
    ids = lambda xs: [torch.tensor([gpt2.to_single_token(x)]) for x in xs]  # noqa: E731
    loader = PromptDataLoader(PromptDataset(list(tokens), list(corrupt), ids(answers),
                                            ids(wrong)), seq_len=None, diverge_idx=0,
                              batch_size=len(PROMPTS))
    with torch.enable_grad():  # the suite runs without gradients (conftest)
        prune_scores = mask_gradient_prune_scores(pm, loader, None, grad_function="logit",
                                                  answer_function="avg_diff", mask_val=0.0)
    return SimpleNamespace(ac=ac, runner=runner, task=task, tokens=tokens, corrupt=corrupt,
                           pm=pm, prune_scores=prune_scores)


ROUNDS = 3  # fastskip and the peer alternate (the peer between rounds): best of each


@needs_auto_circuit
def test_faithfulness_curve_vs_auto_circuit(benchmark, setting):
    s = setting
    g = s.runner.edges
    sizes = default_sizes(g.n_edges, 32)
    device = s.runner.device
    faithfulness_curve(s.runner, s.task, s.prune_scores, sizes[:2])  # warm-up
    outs: dict[int, torch.Tensor] = {}
    peer: list[float] = []

    def auto_circuit() -> None:  # timed between fastskip's rounds (pedantic's setup)
        run, seconds = timed(lambda: s.ac.run_tree_patch(s.pm, s.tokens, s.corrupt,
                                                         s.prune_scores, sizes), device)
        outs.update(run)
        peer.append(seconds)
    curve = benchmark.pedantic(synced(faithfulness_curve, device),
                               args=(s.runner, s.task, s.prune_scores, sizes),
                               setup=auto_circuit, rounds=ROUNDS, iterations=1)
    fast = benchmark.stats.stats.min / len(sizes)
    slow = min(peer) / len(sizes)
    # the same circuits: auto-circuit ranks |fp32 score|, as fastskip does here
    plans = EdgePlanSet.top_n(np.abs(from_prune_scores(s.prune_scores, g)), sizes, g)
    mine = s.runner.logits(plans, s.tokens, last_only=True,
                           ablation=fs.Ablation.resample(tokens=s.corrupt))
    err = max(float((outs[n] - mine[i]).abs().max()) for i, n in enumerate(sizes))
    assert err <= 1e-3, err
    benchmark.extra_info.update(
        circuits=len(sizes), sizes=sizes, n_edges=g.n_edges, prompts=len(PROMPTS),
        scores="auto-circuit mask_gradient_prune_scores (EAP: logit, mask_val 0)",
        ablation="resample from the corrupted prompts", fastskip_s_per_circuit=fast,
        timing=f"best of {ROUNDS} alternating runs of all 32 circuits, each side",
        auto_circuit_s_per_circuit=slow, auto_circuit_runs_s=peer,
        ratio_vs_auto_circuit=slow / fast, max_logit_difference=err,
        faithfulness=curve.faithfulness.tolist(), machine=machine())
    print(f"\nfaithfulness curve, {len(sizes)} circuits over {g.n_edges} edges: fastskip "
          f"{fast * 1e3:.0f} ms/circuit, auto-circuit run_circuits {slow * 1e3:.0f} ms/circuit "
          f"-> {slow / fast:.1f}x (max |logit difference| {err:.1e})")


def twenty_nodes(setting) -> dict[str, list]:
    """The 20 heads and MLPs with the largest |attribution| summed over their out-edges."""
    g = setting.runner.edges
    scores = np.abs(from_prune_scores(setting.prune_scores, g))
    per_sender = np.bincount(g.edge_sender, weights=scores, minlength=g.n_senders)
    per_sender[0] = -1  # the embedding is always in
    top = np.argsort(-per_sender)[:20]
    heads, mlps = [], []
    for s in sorted(int(x) for x in top):
        layer, k = divmod(s - 1, g.n_heads + 1)
        (mlps.append(layer) if k == g.n_heads else heads.append([layer, k]))
    return {"heads": heads, "mlps": mlps}


@needs_auto_circuit
def test_leave_one_edge_out_vs_run_with_hooks(benchmark, setting):
    s = setting
    g = s.runner.edges
    circuit = twenty_nodes(s)
    device = s.runner.device
    res = path_patch(s.runner, s.task, circuit)  # warm-up
    mean = fs.Ablation.mean(tokens=s.corrupt)
    n = len(res.candidates)
    sample = res.candidates[np.linspace(0, n - 1, SAMPLE).round().astype(int)]
    trials = np.repeat(res.base[None], SAMPLE, axis=0)
    trials[np.arange(SAMPLE), sample] = False
    model = s.runner.model
    edge_hooks = EdgeHooks(model, sender_ablations(model, mean, s.tokens), s.tokens)
    refs: list[torch.Tensor] = []
    peer: list[float] = []

    def hooks() -> None:  # timed between fastskip's rounds (pedantic's setup)
        run, seconds = timed(lambda: [edge_hooks.logits(m, s.tokens)[:, -1] for m in trials],
                             device)
        refs[:] = run
        peer.append(seconds)
    res = benchmark.pedantic(synced(path_patch, device), args=(s.runner, s.task, circuit),
                             setup=hooks, rounds=ROUNDS, iterations=1)
    fast = benchmark.stats.stats.min / (n + 1)
    slow = min(peer) / SAMPLE
    # the plain reference agrees with the vectorised hooks on the first trial
    first = edge_reference_logits(model, EdgePlan.from_mask(trials[0], g), s.tokens, mean)
    assert (first[:, -1] - refs[0]).abs().max() <= 1e-3
    mine = s.runner.logits(EdgePlanSet(trials, g), s.tokens, last_only=True, ablation=mean)
    err = max(float((r - mine[i]).abs().max()) for i, r in enumerate(refs))
    assert err <= 1e-3, err
    benchmark.extra_info.update(
        circuit=circuit, edges_scored=n, kept=len(res.kept), prompts=len(PROMPTS),
        ablation="mean over the corrupted prompts", fastskip_ms_per_edge=fast * 1e3,
        run_with_hooks_ms_per_edge=slow * 1e3, ratio_vs_run_with_hooks=slow / fast,
        hooks_timing=f"one run_with_hooks per edge (bench/baselines.py EdgeHooks: stacked "
                     f"sender outputs, one einsum per receiver group) on {SAMPLE} of the {n} "
                     f"edges, best of {ROUNDS} alternating with fastskip's rounds",
        max_logit_difference=err, machine=machine())
    print(f"\nleave-one-edge-out over a 20-node circuit ({n} edges): fastskip "
          f"{fast * 1e3:.1f} ms/edge, one run_with_hooks per edge {slow * 1e3:.0f} ms/edge -> "
          f"{slow / fast:.1f}x (max |logit difference| {err:.1e})")
