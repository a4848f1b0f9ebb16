"""Reduced precision (bf16/fp16) with exact fp32 ranks: the pieces the Runner
puts together.

The whole plan set runs in reduced precision. Each call first measures the
reduced-precision error on a sample of plans against fp32 (max |logit error|
over the whole vocabulary at the asked positions, ``measure_error``) and takes
twice that as the error bound e (``error_bound``). A rank can only differ from
the fp32 rank if some vocabulary entry lies within 2e of the answer's logit;
every plan with such a row is recomputed in fp32 (``plans_to_redo``) and its
results replace the reduced-precision ones (``splice``). So ranks are fp32 ranks
(up to the bound being an empirical one), and logits, probabilities and top-k
of the plans not recomputed carry the reduced-precision error reported in
``Results.info["error_bound"]``.

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
from typing import NamedTuple

import numpy as np
import torch

from ..results import Results

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


def measure_error(low: torch.Tensor, exact: torch.Tensor, answer_mask: torch.Tensor,
                  sampled: np.ndarray) -> Measured:
    """The error of reduced-precision logits ``low`` against fp32 logits ``exact``
    (both [S, N, A, V] at the asked positions of the ``sampled`` plans), over the
    rows whose logits are finite in both precisions; ``answer_mask`` [N, A]."""
    lo, hi = low.float(), exact.float()
    valid = answer_mask[None]  # [1, N, A]
    lo_ok, hi_ok = torch.isfinite(lo).all(-1), torch.isfinite(hi).all(-1)  # [S, N, A]
    disagree = sampled[((lo_ok != hi_ok) & valid).flatten(1).any(1).cpu().numpy()]
    rows = lo_ok & hi_ok & valid
    if not bool(rows.any()):
        return Measured(None, disagree)
    error = float((lo[rows] - hi[rows]).abs().max())
    return Measured(error if math.isfinite(error) else None, disagree)


def error_bound(measured: Measured) -> float:
    """The logit tolerance applied to every plan: SAFETY x the measured error."""
    assert measured.error is not None
    return SAFETY * max(measured.error, torch.finfo(torch.float32).eps)


def plans_to_redo(res: Results, measured: Measured) -> np.ndarray:
    """Plans whose reduced-precision ranks cannot be trusted: an ambiguous row (an
    entry within the window of the answer's logit), an overflowing row, or a
    sampled plan that overflowed in one precision only."""
    ambiguous = res.info["ambiguous"].flatten(1).any(dim=1)
    overflow = res.info["nonfinite"].flatten(1).any(dim=1)
    return np.union1d(np.nonzero((ambiguous | overflow).cpu().numpy())[0], measured.disagree)


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
