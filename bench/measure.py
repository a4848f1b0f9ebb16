"""One measurement of the speed suite: a plan set timed with fastskip (fp32 and
``precision="mixed"``) against the peers -- the TransformerLens ways (one
run_with_hooks per plan; one forward over all plans with mask-multiplying hooks),
nnsight both ways and auto-circuit's batched node masks (``peers.py``) -- and
fastskip's naive masked batch, all in one run, with the machine's fp32 and bf16
matmul peaks measured in the same run. fastskip runs every plan; the peers run a
sample of plans spread over the set and are reported per plan. Agreement of the
peers' answer logits with fastskip is checked outside the timed regions."""

from __future__ import annotations

import numpy as np
import torch
from baselines import tl_masked_batch
from breakdown import breakdown
from conftest import machine
from peers import Peer, auto_circuit_equivalent

import fastskip as fs
from fastskip.inputs import make_batch
from fastskip.reference.timing import best_of, hook_loop_per_plan, synced, timed
from fastskip.run.answer_metrics import ranks_agree_up_to_ties
from fastskip.run.flops import work_flops
from fastskip.run.tree import build_tree, step_keys
from fastskip.run.vocab_reductions import (
    COMPILE_AFTER_ROWS,
    fused_band_reductions,
    fused_logit_reductions,
)

PEER_SAMPLE = {"tl_masked_batch": 32, "nnsight_per_row_masks": 32, "nnsight_invokes": 16,
               "auto_circuit_node_masks": 8}
AGREE = 1e-4  # max |answer logit - fastskip's| / max(1, |fastskip's|) of a peer, fp32


def sample(plans: fs.PlanSet, k: int) -> fs.PlanSet:
    """``k`` plans spread evenly over the set."""
    return plans.take(np.unique(np.linspace(0, len(plans) - 1, k).round().astype(int)))


def matmul_peaks(n: int = 2048) -> dict[str, float]:
    """GFLOP/s of one n x n x n product in fp32 and in bf16 (fp32 accumulation), best of 3."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up
        out[name] = 2 * n**3 / best_of(lambda a=a, b=b: a @ b, 3) / 1e9
    return out


def warm_metrics(V: int) -> None:
    """Compile the fused vocabulary reductions before any timed run (they compile
    once per process after COMPILE_AFTER_ROWS rows, which would land in a timing)."""
    m = COMPILE_AFTER_ROWS + 8
    x = torch.randn(m, min(V, 1024))  # dynamic shapes: one compile serves every V
    fused_logit_reductions(x, x[:, :1])
    fused_band_reductions(x.bfloat16(), torch.ones(x.shape[1]), x[:, :1].bfloat16())


def time_fastskip(benchmark, runner, plans, prompts, answers):
    """(results, seconds per plan) of ``runner.run`` on every plan, timed by the benchmark."""
    warm_metrics(runner.weights.d_vocab_out)
    runner.run(sample(plans, 4), prompts, answers)  # warm-up
    res = benchmark.pedantic(synced(runner.run, runner.device), args=(plans, prompts, answers),
                             kwargs={"top_k": 10, "progress": False}, rounds=1, iterations=1)
    return res, benchmark.stats.stats.min / len(plans)


def time_peer(name: str, fn: Peer, plans: fs.PlanSet, tokens: torch.Tensor, runner, batch
              ) -> tuple[float, float]:
    """(seconds per plan on a sample, max |answer logit - fastskip's| / max(1, |fastskip's|))
    of one peer."""
    part = sample(plans, min(len(plans), PEER_SAMPLE.get(name, 16)))
    if name.startswith("auto_circuit"):
        part = auto_circuit_equivalent(part)  # what its node masks can express
    pos = batch.q_pos[:, 0].to(tokens.device)  # each prompt's last token (right padding)
    fn(part.take([0]), tokens, pos)  # warm-up
    logits, seconds = timed(lambda: fn(part, tokens, pos), tokens.device)
    ours = runner.asked_logits(part, batch)[:, :, 0]  # [p, N, V], outside the timed region
    ids = batch.answer_ids[:, 0]
    answer = lambda lg: lg.gather(2, ids[None, :, None].expand(len(part), -1, 1))  # noqa: E731
    ours = answer(ours)
    # relative to the logit's size: plans with /noln parts grow the residual stream by
    # orders of magnitude, and fp32 round-off of two implementations with it
    err = float(((answer(logits.float()) - ours).abs() / ours.abs().clamp_min(1.0)).max())
    return seconds / len(part), err


def time_plan_set(benchmark, model, tokens, plans: fs.PlanSet, prompts: list[str],
                  answers: list[str], label: str, peers: dict | None = None,
                  mixed: bool = True, parts: bool = False, agree: float = AGREE) -> dict:
    """Time fastskip (fp32: the benchmark itself; mixed: one more run) on all plans and
    every peer on samples; store per-plan times, ratios, peaks and GFLOP/s (and, with
    ``parts``, where the time goes) in ``extra_info``."""
    runner = fs.Runner(model, verbose=False)
    plans = runner.plan_set(plans)
    peaks = matmul_peaks()
    res, fast = time_fastskip(benchmark, runner, plans, prompts, answers)
    ms = {"fastskip_fp32": fast * 1e3}
    info: dict = {}
    batch = make_batch(model, prompts, answers)
    if mixed:
        mixed_runner = fs.Runner(model, verbose=False, precision="mixed")
        mixed_runner.run(sample(plans, 4), prompts, answers)  # warm-up
        mres, seconds = timed(lambda: mixed_runner.run(plans, prompts, answers, top_k=10,
                                                       progress=False), runner.device)
        ms["fastskip_mixed"] = seconds / len(plans) * 1e3
        # outside the timed region: mixed ranks and top-k ids are those of fp32, up to ties
        for a in range(0, len(plans), 512):
            sl = slice(a, min(a + 512, len(plans)))
            logits = runner.asked_logits(plans.take(range(sl.start, sl.stop)), batch)
            assert ranks_agree_up_to_ties(mres.rank[sl], res.rank[sl], logits,
                                          batch.answer_ids, 1e-5), f"{label}: mixed ranks"
        info["mixed_stats"] = mres.info["mixed"]
        info["mixed_topk_id_differences_vs_fp32"] = int((mres.topk_ids != res.topk_ids).sum())
        info["mixed_vs_fp32"] = ms["fastskip_fp32"] / ms["fastskip_mixed"]
    naive_sample = sample(plans, min(len(plans), 128))
    masked = fs.Runner(model, strategy="masked", verbose=False)
    ms["naive_masked_batch"] = best_of(lambda: masked.run(naive_sample, prompts, answers,
                                                          progress=False), 1,
                                       masked.device) / len(naive_sample) * 1e3
    peer_ms = {"run_with_hooks": hook_loop_per_plan(model, plans, tokens) * 1e3}
    agreement = {}
    all_peers = {"tl_masked_batch": lambda p, t, q: tl_masked_batch(model, p, t, q),
                 **(peers or {})}
    for name, fn in all_peers.items():
        seconds, err = time_peer(name, fn, plans, tokens, runner, batch)
        peer_ms[name], agreement[name] = seconds * 1e3, err
        assert err <= agree, f"{label}: {name}'s answer logits differ from fastskip's by {err}"
    best = min(ms[k] for k in ("fastskip_fp32", "fastskip_mixed") if k in ms)
    fastest = min(peer_ms, key=peer_ms.__getitem__)
    work = work_flops(step_keys(plans).keys, runner.weights, len(prompts), tokens.shape[1], 1)
    finals = len(np.unique(build_tree(step_keys(plans).keys).final_state))
    unembed = finals * len(prompts) * runner.weights.flops_per_token()["unembed"]
    at_peak_fp32 = work["tree"] / (peaks["fp32"] * 1e9)
    at_peak_mixed = (work["tree"] - unembed) / (peaks["fp32"] * 1e9) + unembed / (
        peaks["bf16"] * 1e9)
    info.update({
        "plans": len(plans), "prompts": len(prompts), "tokens": int(tokens.shape[1]),
        "model": runner.model_name, "ms_per_plan": {**ms, **peer_ms},
        "peer_sample_plans": {k: min(len(plans), PEER_SAMPLE.get(k, 16)) for k in all_peers},
        "peer_max_answer_logit_error": agreement, "fastest_peer": fastest,
        "ratio_vs_fastest_peer": peer_ms[fastest] / best,
        "ratio_vs_fastest_peer_fp32": peer_ms[fastest] / ms["fastskip_fp32"],
        **{f"ratio_vs_{k}": v / best for k, v in peer_ms.items()},
        "ratio_vs_naive_masked_batch": ms["naive_masked_batch"] / best,
        "gflop_tree": work["tree"] / 1e9, "gflop_unembed": unembed / 1e9,
        "gflop_naive": work["naive"] / 1e9, "peak_gflops": peaks,
        "achieved_gflops_fp32": work["tree"] / (fast * len(plans)) / 1e9,
        "fraction_of_peak_fp32": at_peak_fp32 / (fast * len(plans)),
        "machine": machine(),
    })
    if mixed:
        info["fraction_of_peak_mixed"] = at_peak_mixed / (ms["fastskip_mixed"] / 1e3
                                                          * len(plans))
    if parts:
        info["seconds_fp32"] = breakdown(runner, plans, prompts, answers)
        if mixed:
            info["seconds_mixed"] = breakdown(mixed_runner, plans, prompts, answers)
    benchmark.extra_info.update(info)
    report(label, info)
    return info


def report(label: str, info: dict) -> None:
    ms = info["ms_per_plan"]
    print(f"\n{label} ({info['plans']} plans; peaks fp32 {info['peak_gflops']['fp32']:.0f}, "
          f"bf16 {info['peak_gflops']['bf16']:.0f} GFLOP/s): " + " | ".join(
              f"{k} {v:.2f}" for k, v in ms.items()) + " ms/plan")
    print(f"  vs fastest peer ({info['fastest_peer']}): {info['ratio_vs_fastest_peer']:.1f}x"
          f" (fp32 alone {info['ratio_vs_fastest_peer_fp32']:.1f}x); mixed vs fp32 "
          f"{info.get('mixed_vs_fp32', float('nan')):.2f}x; fraction of peak fp32 "
          f"{info['fraction_of_peak_fp32']:.2f}; peers' logit error "
          f"{max(info['peer_max_answer_logit_error'].values()):.1e}")
    for key in ("seconds_fp32", "seconds_mixed"):
        if key in info:
            t = info[key]
            print(f"  {key}: " + ", ".join(f"{k} {v / t['total']:.0%}" for k, v in t.items()
                                           if k != "total") + f" of {t['total']:.1f} s")
