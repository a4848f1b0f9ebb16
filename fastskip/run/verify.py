"""``Runner(..., verify=k)``: every call re-checks k of its plans, chosen at
random, against the TransformerLens reference and raises ``CheckError`` on
disagreement, so a long sweep cannot silently drift from the reference.

fp32 results must match the reference logits within 1e-4 + 1e-5 x the logit
scale (with check's float64 arbitration for ill-conditioned plans); reduced
precision results within the call's measured error bound, and their ranks,
when exact ranks are on, must be the reference's ranks (up to near-ties).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ..ablation import Ablation
from ..errors import CheckError, InputError
from ..inputs import PromptBatch
from ..plans import EdgePlanSet, PlanSet
from ..reference import check_report, reference_logits
from ..reference.check import LogitsRunner
from ..results import Results
from .answer_metrics import rank_bounds


class VerifiedRunner(LogitsRunner, Protocol):
    """What ``verify`` needs of a runner."""

    dtype: torch.dtype
    exact_ranks: bool

ATOL, RTOL = 1e-4, 1e-5


def pick(n_plans: int, k: int, seed: int) -> np.ndarray:
    """``k`` distinct plan indices (all when k >= n)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_plans, size=min(k, n_plans), replace=False))


def verify_logits(runner: VerifiedRunner, ps: PlanSet | EdgePlanSet, tokens: torch.Tensor,
                  logits: torch.Tensor, k: int, seed: int, ablation: Ablation | None) -> None:
    """Re-check the returned logits [P, B, T, V] of k plans of a ``logits`` call
    (reduced precision: within 0.1 + 1% of the logit scale)."""
    idx = pick(len(ps), k, seed)
    reduced = runner.dtype != torch.float32
    atol, rtol = (0.1, 1e-2) if reduced else (ATOL, RTOL)
    report = check_report(runner, ps.take(idx), tokens, atol, rtol, arbitrate=not reduced,
                          ablation=ablation, fast=logits[torch.as_tensor(idx)])
    if report.failures:
        err, i, _, extra = max(report.failures)
        raise CheckError(f"verify: plan '{report.plans[i]}' differs from the TransformerLens "
                         f"reference by {err:.3g}{extra}")


def verify_run(runner: VerifiedRunner, ps: PlanSet | EdgePlanSet, batch: PromptBatch,
               res: Results, k: int, seed: int, ablation: Ablation | None) -> None:
    """Re-check the returned answer logits and ranks of k plans of a ``run`` call."""
    if ablation is not None and ablation.tokens is None:
        raise InputError("verify needs the ablation as tokens (fs.Ablation.mean(tokens=...) "
                         "or fs.Ablation.resample(tokens=...)) to rebuild it with hooks")
    idx = pick(len(ps), k, seed)
    reduced = runner.dtype != torch.float32
    tol_extra = float(res.info.get("error_bound", 0.0)) if reduced else 0.0
    mask = batch.answer_mask
    for p in idx:
        ref = reference_logits(runner.model, ps[int(p)], batch.tokens, ablation).float()
        rows = ref[torch.arange(len(batch.prompts))[:, None], batch.q_pos.cpu()]  # [N, A, V]
        rows = rows.to(res.logit.device)
        want = rows.gather(2, batch.answer_ids[:, :, None])[..., 0]
        got = res.logit[p]
        finite = torch.isfinite(want) & mask
        scale = float(want[finite].abs().max()) if finite.any() else 0.0
        tol = ATOL + RTOL * scale + (2 * tol_extra if reduced else 0.0)
        err = float((got - want)[finite].abs().max()) if finite.any() else 0.0
        if err > tol:
            raise CheckError(f"verify: plan {int(p)} '{ps.text(int(p))}' answer logits differ "
                             f"from the TransformerLens reference by {err:.3g} (> {tol:.3g})")
        if reduced and not runner.exact_ranks:
            continue
        # a rank may differ only by the entries within tol of the answer's logit
        lo, hi = rank_bounds(rows, batch.answer_ids, tol)
        rank = res.rank[p]
        bad = finite & ((rank < lo) | (rank > hi))
        if bool(bad.any()):
            n, a = (int(v) for v in bad.nonzero()[0])
            raise CheckError(f"verify: plan {int(p)} '{ps.text(int(p))}' reports rank "
                             f"{int(rank[n, a])} for prompt {n}, answer token {a}; the "
                             f"reference gives {int(lo[n, a])}..{int(hi[n, a])}")


def verify_logit_diff(runner: VerifiedRunner, ps: PlanSet | EdgePlanSet, batch: PromptBatch,
                      wrong: torch.Tensor, diff: torch.Tensor, k: int, seed: int,
                      ablation: Ablation | None) -> None:
    """Re-check the logit differences [P, N] of k plans of a ``logit_diff`` call
    (answer's first token minus the wrong answer's ``wrong`` [N], at the first
    answer position) against the reference."""
    if ablation is not None and ablation.tokens is None:
        raise InputError("verify needs the ablation as tokens (fs.Ablation.mean(tokens=...) "
                         "or fs.Ablation.resample(tokens=...)) to rebuild it with hooks")
    reduced = runner.dtype != torch.float32 and not runner.exact_ranks
    atol, rtol = (0.1, 1e-2) if reduced else (ATOL, RTOL)
    n = torch.arange(len(batch.prompts))
    for p in pick(len(ps), k, seed):
        ref = reference_logits(runner.model, ps[int(p)], batch.tokens, ablation).float()
        at = ref[n, batch.q_pos[:, 0].cpu()].to(diff.device)  # [N, V]
        want = at.gather(1, batch.answer_ids[:, :1]) - at.gather(1, wrong[:, None])
        scale = float(at.abs().max())
        err = float((diff[p] - want[:, 0]).abs().max())
        if not err <= atol + rtol * scale:
            raise CheckError(f"verify: plan {int(p)} '{ps.text(int(p))}' logit differences "
                             f"differ from the TransformerLens reference by {err:.3g} (> "
                             f"{atol + rtol * scale:.3g})")
