"""Metrics of answer tokens from logits, computed on the device for many rows
at once (never a Python loop over plans).

Rank = number of vocabulary entries with a strictly larger logit (0 = top-1),
so exact ties share a rank. A row whose logits overflowed (inf/NaN) gets rank
-1 and NaN logit/probability, and is flagged, never a made-up rank.
Probabilities are the softmax over the whole vocabulary, computed as
exp(logit - logsumexp) in fp32.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import OverflowWarning
from ..inputs import PromptBatch
from ..plans.planset import NamedPlans
from ..results import Results
from .vocab_reductions import fused_logit_reductions


@dataclass
class AnswerMetrics:
    """Per row: the answer token's logit, log-probability and rank, and the
    top-k ids/logits/log-probabilities."""

    logit: torch.Tensor  # [m]
    logprob: torch.Tensor  # [m]
    rank: torch.Tensor  # [m] int64
    topk_ids: torch.Tensor  # [m, k]
    topk_logits: torch.Tensor  # [m, k]
    topk_logprobs: torch.Tensor  # [m, k]
    nonfinite: torch.Tensor  # [m] bool: the row overflowed (inf/NaN logits); rank -1


def answer_metrics(logits: torch.Tensor, answer: torch.Tensor, top_k: int) -> AnswerMetrics:
    """logits [m, V] (any float dtype; metrics in fp32), answer [m] token ids."""
    ans = logits.gather(1, answer[:, None].long()).float()
    # one fused pass: log-sum-exp, entries above the answer (its rank), the minimum
    lse, above, low = fused_logit_reductions(logits, ans)
    ans, rank = ans[:, 0], above.long()
    k = min(max(int(top_k), 0), logits.shape[1])
    top_logits, top_ids = logits.topk(k, dim=1) if k else (logits[:, :0], answer[:, None][:, :0])
    top_logits = top_logits.float()
    # overflowed rows (inf/NaN anywhere) have no meaningful rank: never report one.
    # NaN or +inf anywhere makes the log-sum-exp NaN/inf, -inf shows in the minimum
    bad = ~(torch.isfinite(lse) & torch.isfinite(low))
    if bool(bad.any()):
        nan = torch.tensor(float("nan"), device=logits.device)
        rank = torch.where(bad, torch.full_like(rank, -1), rank)
        ans, lse = torch.where(bad, nan, ans), torch.where(bad, nan, lse)
        top_ids = torch.where(bad[:, None], torch.full_like(top_ids, -1), top_ids)
        top_logits = torch.where(bad[:, None], nan, top_logits)
    return AnswerMetrics(
        logit=ans, logprob=ans - lse, rank=rank, topk_ids=top_ids,
        topk_logits=top_logits, topk_logprobs=top_logits - lse[:, None], nonfinite=bad,
    )


class MetricTables:
    """Per-plan metric tensors, filled batch by batch of final states.

    Shapes: [P, N, A] (rank, logit, logprob), [P, N, A, k] (top-k), [P, N]
    (wrong-answer logit, KL). ``record_gap`` also keeps, per row, the distance from
    the answer's logit to the nearest other entry (``gap``) and the RMS of the final
    state (``state_rms``): what whole reduced precision decides by.
    """

    def __init__(self, P: int, answer_ids: torch.Tensor, top_k: int,
                 wrong: torch.Tensor | None = None, full_logprobs: torch.Tensor | None = None,
                 record_gap: bool = False):
        N, A = answer_ids.shape
        dev = answer_ids.device
        nan = float("nan")
        self.answer_ids, self.k, self.wrong, self.full_lp = answer_ids, top_k, wrong, full_logprobs
        self.record_gap = record_gap
        self.rank = torch.full((P, N, A), -1, dtype=torch.long, device=dev)
        self.logit = torch.full((P, N, A), nan, device=dev)
        self.logprob = torch.full((P, N, A), nan, device=dev)
        self.topk_ids = torch.full((P, N, A, top_k), -1, dtype=torch.long, device=dev)
        self.topk_logits = torch.full((P, N, A, top_k), nan, device=dev)
        self.topk_logprobs = torch.full((P, N, A, top_k), nan, device=dev)
        self.wrong_logit = torch.full((P, N), nan, device=dev) if wrong is not None else None
        self.kl = torch.full((P, N), nan, device=dev) if full_logprobs is not None else None
        self.gap = torch.full((P, N, A), math.inf, device=dev) if record_gap else None
        self.state_rms = torch.full((P, N, A), nan, device=dev) if record_gap else None
        self.nonfinite = torch.zeros((P, N, A), dtype=torch.bool, device=dev)
        self.logprob_bound: torch.Tensor | None = None  # [P, N, A], mixed precision only

    def add(self, logits: torch.Tensor, plans: torch.Tensor, rows: torch.Tensor) -> None:
        """logits [m, N, A, V] of m distinct final states; plan ``plans[i]`` uses
        state ``rows[i]``."""
        m, N, A, V = logits.shape
        flat = logits.reshape(m * N * A, V)
        met = answer_metrics(flat, self.answer_ids.reshape(-1).repeat(m), self.k)
        self.add_metrics(met, plans, rows, m)
        first = logits[:, :, 0]  # [m, N, V] at the first answer position
        if self.wrong is not None:
            wl = first.gather(2, self.wrong[None, :, None].expand(m, N, 1))[..., 0].float()
            self.add_wrong(wl, plans, rows)
        self.add_kl(first, plans, rows)
        if self.gap is not None:
            dist = (flat.float() - met.logit[:, None]).abs_()
            dist.scatter_(1, self.answer_ids.reshape(-1).repeat(m)[:, None], math.inf)
            self.gap[plans] = dist.amin(1).view(m, N, A)[rows]

    def add_states(self, states: torch.Tensor, plans: torch.Tensor, rows: torch.Tensor) -> None:
        """The RMS of final states [m, N, A, d] (with ``record_gap``)."""
        if self.state_rms is not None:
            rms = states.float().pow(2).mean(-1).sqrt()
            self.state_rms[plans] = rms[rows]

    def add_metrics(self, met: AnswerMetrics, plans: torch.Tensor, rows: torch.Tensor, m: int,
                    logprob_bound: torch.Tensor | None = None) -> None:
        """Metrics of m * N * A rows (state-major), as ``answer_metrics`` gives them;
        ``logprob_bound`` [m * N * A]: their probabilities' bound (mixed precision)."""
        N, A = self.answer_ids.shape
        shaped = lambda t: t.view(m, N, A, *t.shape[1:])[rows]  # noqa: E731
        self.rank[plans] = shaped(met.rank)
        self.logit[plans] = shaped(met.logit)
        self.logprob[plans] = shaped(met.logprob)
        self.topk_ids[plans] = shaped(met.topk_ids)
        self.topk_logits[plans] = shaped(met.topk_logits)
        self.topk_logprobs[plans] = shaped(met.topk_logprobs)
        self.nonfinite[plans] = shaped(met.nonfinite)
        if logprob_bound is not None:
            if self.logprob_bound is None:
                self.logprob_bound = torch.zeros_like(self.logit, dtype=torch.float64)
            self.logprob_bound[plans] = shaped(logprob_bound)

    def add_wrong(self, wrong_logit: torch.Tensor, plans: torch.Tensor, rows: torch.Tensor
                  ) -> None:
        """The wrong answers' logits [m, N] at the first answer position."""
        self.wrong_logit[plans] = wrong_logit[rows]  # type: ignore[index]

    def add_kl(self, first: torch.Tensor, plans: torch.Tensor, rows: torch.Tensor) -> None:
        """KL from the full model, from logits [m, N, V] at the first answer position."""
        if self.full_lp is not None:
            lp = first.float().log_softmax(-1)
            div = (self.full_lp.exp()[None] * (self.full_lp[None] - lp)).sum(-1)
            self.kl[plans] = div[rows]  # type: ignore[index]

    def results(self, plans: Sequence[str], batch: PromptBatch, model_name: str,
                info: dict[str, Any]) -> Results:
        """The tables as ``Results`` of ``batch`` (after ``mask_padding``)."""
        logit_diff = None
        if self.wrong_logit is not None:
            logit_diff = self.logit[:, :, 0] - self.wrong_logit
        return Results(
            plans=plans, prompts=batch.prompts, answers=batch.answers,
            answer_str_tokens=batch.answer_str_tokens, prompt_str_tokens=batch.prompt_str_tokens,
            answer_ids=batch.answer_ids, answer_mask=batch.answer_mask, rank=self.rank,
            logit=self.logit, prob=self.logprob.exp(), topk_ids=self.topk_ids,
            topk_logits=self.topk_logits, topk_probs=self.topk_logprobs.exp(),
            model_name=model_name, logit_diff=logit_diff, kl=self.kl, info=info)

    def mask_padding(self, answer_mask: torch.Tensor) -> None:
        pad = ~answer_mask
        self.rank[:, pad] = -1
        self.logit[:, pad] = float("nan")
        self.logprob[:, pad] = float("nan")
        self.topk_ids[:, pad] = -1
        self.nonfinite[:, pad] = False
        if self.gap is not None and self.state_rms is not None:
            self.gap[:, pad] = math.inf
            self.state_rms[:, pad] = float("nan")
        if self.logprob_bound is not None:
            self.logprob_bound[:, pad] = float("nan")


def rank_bounds(logits: torch.Tensor, answer: torch.Tensor, tol: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranks an answer may be reported with when logits are known to ``tol``:
    from the entries other than the answer lying above its logit by more than tol
    (certainly above) to those above it minus tol (possibly above). logits [..., V],
    answer [...] token ids; both bounds [...]. With tol = 0 both are the exact rank."""
    own = logits.gather(-1, answer[..., None].long())  # [..., 1]
    others = logits.scatter(-1, answer[..., None].long(), float("-inf"))  # the answer left out
    return (others > own + tol).sum(-1), (others > own - tol).sum(-1)


def ranks_agree_up_to_ties(rank_a: torch.Tensor, rank_b: torch.Tensor, logits: torch.Tensor,
                           answer_ids: torch.Tensor, tol: float) -> bool:
    """Whether two rank tables [P, N, A] of the same plans agree: they may differ only
    where an entry other than the answer lies within ``tol`` of the answer's logit
    (``logits`` [P, N, A, V], ``answer_ids`` [N, A]; two computations with different
    round-off order such entries differently), by at most the number of such entries,
    and must be equal everywhere else."""
    idx = answer_ids[None, :, :, None].expand(logits.shape[0], -1, -1, 1).long()
    own = logits.float().gather(-1, idx)
    others = logits.float().scatter(-1, idx, float("inf"))  # the answer is not its own tie
    near = ((others - own).abs() <= tol).sum(-1)
    return bool(((rank_a - rank_b).abs() <= near).all())


def warn_nonfinite(nonfinite: torch.Tensor, ps: NamedPlans) -> None:
    """Warn, naming a plan, when some rows overflowed (their ranks are -1)."""
    bad = nonfinite.flatten(1).any(dim=1).nonzero().flatten().cpu().tolist()
    if bad:
        warnings.warn(
            f"{len(bad)} of {len(ps)} plans overflow (inf/NaN logits), e.g. plan {bad[0]} "
            f"'{ps.text(bad[0])}'; their ranks are -1 and logits/probabilities NaN "
            "(Results.info['nonfinite'] marks the rows). Many /noln components can let the "
            "residual stream grow without bound.", OverflowWarning, stacklevel=4)
