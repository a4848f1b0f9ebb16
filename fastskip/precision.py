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
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .inputs import PromptBatch
from .planset import PlanSet
from .results import Results

REDUCED = (torch.bfloat16, torch.float16)
SAFETY = 2.0  # error bound = SAFETY x the error measured on the sample
SAMPLE = 8  # plans measured in fp32 per call


def sample_plans(n: int, k: int = SAMPLE) -> np.ndarray:
    """``k`` plan indices spread evenly over ``n`` plans."""
    return np.unique(np.linspace(0, n - 1, num=min(k, n)).round().astype(np.int64))


def measure_error(low: Any, exact: Any, ps: PlanSet, batch: PromptBatch,
                  ablation: Any = None) -> float:
    """Max |reduced - fp32| logit over the vocabulary at the asked positions."""
    idx = sample_plans(len(ps))
    sample = ps.take(idx)
    lo = low.asked_logits(sample, batch, ablation).float()
    hi = exact.asked_logits(sample, batch, ablation).float()
    valid = batch.answer_mask[None, :, :, None]
    return float(torch.where(valid, (lo - hi).abs(), torch.zeros_like(lo)).max())


_FIELDS = ("rank", "logit", "prob", "topk_ids", "topk_logits", "topk_probs", "logit_diff", "kl")


def splice(res: Results, other: Results, plans: np.ndarray) -> None:
    """Replace the rows of ``plans`` in ``res`` by ``other`` (same prompts)."""
    idx = torch.as_tensor(plans, device=res.rank.device)
    for name in _FIELDS:
        mine, theirs = getattr(res, name), getattr(other, name)
        if mine is not None and theirs is not None:
            mine[idx] = theirs.to(mine.device, mine.dtype)


def run_with_exact_ranks(runner: Any, ps: PlanSet, batch: PromptBatch, top_k: int,
                         wrong: torch.Tensor | None, kl: bool, progress: bool | None,
                         ablation: Any = None) -> Results:
    """``runner._run_batch`` in reduced precision, with fp32 ranks (see module doc)."""
    exact = runner.exact_runner()
    measured = measure_error(runner, exact, ps, batch, ablation)
    bound = SAFETY * max(measured, torch.finfo(torch.float32).eps)
    res = runner._run_batch(ps, batch, top_k, wrong, kl, progress, window=2 * bound,
                            ablation=ablation)
    ambiguous = res.info["ambiguous"].flatten(1).any(dim=1).cpu().numpy()
    redo = np.nonzero(ambiguous)[0]
    if len(redo):
        fixed = exact._run_batch(ps.take(redo), batch, top_k, wrong, kl, progress,
                                 ablation=ablation)
        splice(res, fixed, redo)
    res.info.update(measured_error=measured, error_bound=bound, recomputed_plans=int(len(redo)),
                    ambiguous_rows=int(res.info["ambiguous"].sum()), dtype=str(runner.dtype))
    return res
