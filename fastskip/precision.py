"""Reduced precision (bf16/fp16) with exact fp32 ranks.

The whole plan set runs in reduced precision. Each call first measures the
reduced-precision error on a sample of plans against fp32 (max |logit error|
over the whole vocabulary at the asked positions) and takes twice that as the
error bound e. A rank can only differ from the fp32 rank if some vocabulary
entry lies within 2e of the answer's logit; every plan with such a row is
recomputed in fp32 and its results replace the reduced-precision ones. So ranks
are fp32 ranks (up to the bound being an empirical one), and logits,
probabilities and top-k of the plans not recomputed carry the reduced-precision
error reported in ``Results.info["error_bound"]``.

Overflow (inf/NaN logits) is judged by fp32 too. The error is measured only on
rows that are finite in both precisions (one overflowing plan in the sample
must not turn the bound into NaN), and every plan with a non-finite
reduced-precision row is recomputed in fp32, as is every sampled plan whose
rows overflow in one precision but not the other. If no sampled row is finite
in both, there is nothing to measure the error on and the whole call runs in
fp32 (``error_bound`` 0).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

from .inputs import PromptBatch
from .planset import PlanSet
from .results import Results

REDUCED = (torch.bfloat16, torch.float16)
SAFETY = 2.0  # error bound = SAFETY x the error measured on the sample
SAMPLE = 8  # plans measured in fp32 per call


class Measured(NamedTuple):
    """The reduced-precision error measured on a sample of plans."""

    error: float | None  # max |reduced - fp32| logit over rows finite in both; None: no such row
    disagree: np.ndarray  # sampled plans with a row finite in one precision only


def sample_plans(n: int, k: int = SAMPLE) -> np.ndarray:
    """``k`` plan indices spread evenly over ``n`` plans."""
    return np.unique(np.linspace(0, n - 1, num=min(k, n)).round().astype(np.int64))


def measure_error(low: Any, exact: Any, ps: PlanSet, batch: PromptBatch,
                  ablation: Any = None) -> Measured:
    """Max |reduced - fp32| logit over the vocabulary at the asked positions of a
    sample of plans, over the rows whose logits are finite in both precisions."""
    idx = sample_plans(len(ps))
    sample = ps.take(idx)
    lo = low.asked_logits(sample, batch, ablation).float()
    hi = exact.asked_logits(sample, batch, ablation).float()
    valid = batch.answer_mask[None]  # [1, N, A]
    lo_ok, hi_ok = torch.isfinite(lo).all(-1), torch.isfinite(hi).all(-1)  # [S, N, A]
    disagree = idx[((lo_ok != hi_ok) & valid).flatten(1).any(1).cpu().numpy()]
    rows = lo_ok & hi_ok & valid
    if not bool(rows.any()):
        return Measured(None, disagree)
    error = float((lo[rows] - hi[rows]).abs().max())
    return Measured(error if math.isfinite(error) else None, disagree)


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


def run_with_exact_ranks(runner: Any, ps: PlanSet, batch: PromptBatch, top_k: int,
                         wrong: torch.Tensor | None, kl: bool, progress: bool | None,
                         ablation: Any = None) -> Results:
    """``runner._run_batch`` in reduced precision, with fp32 ranks (see module doc)."""
    from .engine import OverflowWarning, warn_nonfinite  # engine imports this module

    exact = runner.exact_runner()
    measured = measure_error(runner, exact, ps, batch, ablation)
    if measured.error is None:  # no error to go by: fp32 throughout
        res = exact._run_batch(ps, batch, top_k, wrong, kl, progress, ablation=ablation)
        res.info.update(measured_error=float("nan"), error_bound=0.0,
                        recomputed_plans=len(ps), ambiguous_rows=0, dtype=str(runner.dtype))
        return res
    bound = SAFETY * max(measured.error, torch.finfo(torch.float32).eps)
    with warnings.catch_warnings():  # overflow is warned about once, as fp32 has it
        warnings.simplefilter("ignore", OverflowWarning)
        res = runner._run_batch(ps, batch, top_k, wrong, kl, progress, window=2 * bound,
                                ablation=ablation)
        ambiguous = res.info["ambiguous"].flatten(1).any(dim=1)
        overflow = res.info["nonfinite"].flatten(1).any(dim=1)
        redo = np.union1d(np.nonzero((ambiguous | overflow).cpu().numpy())[0], measured.disagree)
        if len(redo):
            fixed = exact._run_batch(ps.take(redo), batch, top_k, wrong, kl, progress,
                                     ablation=ablation)
            splice(res, fixed, redo)
    warn_nonfinite(res.info["nonfinite"], ps)
    res.info.update(measured_error=measured.error, error_bound=bound,
                    recomputed_plans=int(len(redo)),
                    ambiguous_rows=int(res.info["ambiguous"].sum()), dtype=str(runner.dtype))
    return res
