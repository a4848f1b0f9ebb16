"""Whole reduced precision (``fs.Runner(model, dtype=torch.bfloat16)``, blocks and
unembedding in bf16/fp16) with fp32 ranks: the pieces the Runner puts together.
Its guarantee is **empirical** (``Results.info["guarantee"]``): the error bound is
measured, not proven. ``precision="mixed"`` (``fastskip.run.mixed_unembed``) is the
mode with a proven bound.

1. The whole plan set runs in reduced precision; for every row the distance from
   the answer's logit to the nearest other vocabulary entry (``gap``) and every
   plan's *growth* g_p (the largest RMS of its final residual streams, over the
   prompts and positions, relative to the smallest of the call: plans with many
   ``/noln`` components grow by orders of magnitude and their round-off with them)
   are recorded.
2. A sample of plans is recomputed in fp32 (``sample_plans``): ``SAMPLE`` spread
   evenly over the call and the ``SAMPLE_GROWN`` with the largest growth, so that
   the worst-conditioned plans are measured, never extrapolated to.
3. Each plan's bound is e_p = SAFETY x the largest error measured on the sample
   (max |logit error| over rows finite in both precisions) x max(1, g_p / G), G the
   largest growth among the measured plans: checked per plan against its own
   growth, never carried unscaled to a plan that grew more than every measured one
   (with the most-grown plans in the sample, those are plans tied with them).
4. Recomputed in fp32 (``splice``): every sampled plan (its fp32 results are known
   anyway), every plan with a row whose gap is at most 2 e_p (its rank could
   differ), every plan with a non-finite reduced-precision row, and every plan
   that overflowed in one precision only. If no sampled row is finite in both
   precisions, the whole call runs in fp32.

``Results.info["error_bound"]`` is the largest e_p of the plans not recomputed (the
tolerance of their logits and probabilities), ``info["plan_error_bound"]`` [P] the
bound of each plan (0 where recomputed).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..results import Results

REDUCED = (torch.bfloat16, torch.float16)
SAFETY = 2.0  # e_p = SAFETY x (measured error per unit of growth) x the plan's growth
SAMPLE = 8  # plans spread evenly over the call, measured in fp32
SAMPLE_GROWN = 4  # plans with the largest growth, measured in fp32 too


class Measured(NamedTuple):
    """The reduced-precision error measured on the sampled plans."""

    error: float | None  # max |reduced - fp32| logit over rows finite in both; None: no row
    growth: float  # the largest growth among the sampled plans measured
    disagree: np.ndarray  # sampled plans with a row finite in one precision only


def plan_growth(state_rms: torch.Tensor) -> torch.Tensor:
    """Growth g_p [P] from the final states' RMS [P, N, A] (padding NaN): each plan's
    largest RMS over the smallest positive one of the call (at least 1)."""
    rms = torch.nan_to_num(state_rms.float(), nan=0.0, posinf=math.inf)
    top = rms.flatten(1).amax(1)
    floor = rms[rms > 0].amin() if bool((rms > 0).any()) else torch.ones(())
    return (top / floor).clamp_min(1.0)


def sample_plans(growth: torch.Tensor, k: int = SAMPLE, k_grown: int = SAMPLE_GROWN
                 ) -> np.ndarray:
    """``k`` plan indices spread evenly over the call and the ``k_grown`` plans with
    the largest growth [P]."""
    n = len(growth)
    even = np.linspace(0, n - 1, num=min(k, n)).round().astype(np.int64)
    grown = torch.argsort(growth.cpu(), descending=True, stable=True)[:k_grown].numpy()
    return np.unique(np.concatenate([even, grown]))


def measure_error(low: torch.Tensor, exact: torch.Tensor, answer_mask: torch.Tensor,
                  sampled: np.ndarray, growth: torch.Tensor) -> Measured:
    """The error of reduced-precision logits ``low`` against fp32 logits ``exact``
    (both [S, N, A, V] at the asked positions of the ``sampled`` plans) over the rows
    finite in both precisions; ``answer_mask`` [N, A], ``growth`` [P]."""
    lo, hi = low.float(), exact.float()
    valid = answer_mask[None]  # [1, N, A]
    lo_ok, hi_ok = torch.isfinite(lo).all(-1), torch.isfinite(hi).all(-1)  # [S, N, A]
    disagree = sampled[((lo_ok != hi_ok) & valid).flatten(1).any(1).cpu().numpy()]
    rows = lo_ok & hi_ok & valid
    if not bool(rows.any()):
        return Measured(None, 1.0, disagree)
    error = float((lo[rows] - hi[rows]).abs().max())
    measured = rows.flatten(1).any(1).cpu().numpy()
    g = float(growth[torch.as_tensor(sampled[measured], device=growth.device)].max())
    return Measured(error if math.isfinite(error) else None, g, disagree)


def plan_bounds(measured: Measured, growth: torch.Tensor) -> torch.Tensor:
    """e_p [P] = SAFETY x the largest measured error x max(1, g_p / the largest sampled
    growth): a plan that grew more than every measured one gets a bound scaled up in
    proportion."""
    assert measured.error is not None
    error = max(measured.error, torch.finfo(torch.float32).eps)
    return SAFETY * error * (growth.double() / measured.growth).clamp_min(1.0)


def plans_to_redo(res: Results, gap: torch.Tensor, growth: torch.Tensor, sampled: np.ndarray,
                  measured: Measured) -> tuple[np.ndarray, torch.Tensor]:
    """Plans whose reduced-precision ranks cannot be trusted, and each plan's bound e_p
    [P]: a row with another entry within 2 e_p of the answer's logit (``gap`` [P, N,
    A]), a non-finite row, a sampled plan (its fp32 results are at hand) or one that
    overflowed in one precision only; every plan when nothing could be measured."""
    if measured.error is None:  # no error to go by: fp32 throughout
        return np.arange(len(growth)), torch.zeros(len(growth), dtype=torch.float64)
    bounds = plan_bounds(measured, growth)
    near = (gap <= 2 * bounds.to(gap.device, gap.dtype)[:, None, None]).flatten(1).any(1)
    overflow = res.info["nonfinite"].flatten(1).any(dim=1)
    bad = np.nonzero((near | overflow).cpu().numpy())[0]
    return np.union1d(np.union1d(bad, measured.disagree), sampled), bounds


def report(res: Results, measured: Measured, bounds: torch.Tensor, redo: np.ndarray,
           sampled: np.ndarray, dtype: torch.dtype) -> None:
    """What the call did and guarantees, in ``res.info``."""
    bounds = bounds.clone()
    bounds[torch.as_tensor(redo, dtype=torch.long)] = 0.0
    res.info.update(measured_error=math.nan if measured.error is None else measured.error,
                    error_bound=float(bounds.max()) if len(bounds) else 0.0,
                    plan_error_bound=bounds, recomputed_plans=int(len(redo)),
                    sampled_plans=int(len(sampled)), guarantee="empirical", dtype=str(dtype))


_FIELDS = ("rank", "logit", "prob", "topk_ids", "topk_logits", "topk_probs", "logit_diff", "kl")


def splice(res: Results, other: Results, plans: np.ndarray) -> None:
    """Replace the rows of ``plans`` in ``res`` by ``other`` (same prompts),
    overflow flags (``info["nonfinite"]``) included."""
    idx = torch.as_tensor(plans, device=res.rank.device)
    for name in _FIELDS:
        mine, theirs = getattr(res, name), getattr(other, name)
        if mine is not None and theirs is not None:
            mine[idx] = theirs.to(mine.device, mine.dtype)
    res.info["nonfinite"][idx] = other.info["nonfinite"].to(res.rank.device)
