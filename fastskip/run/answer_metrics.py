"""Metrics of answer tokens from logits, computed on the device for many rows
at once (never a Python loop over plans).

Rank = number of vocabulary entries with a strictly larger logit (0 = top-1),
so exact ties share a rank. A row whose logits overflowed (inf/NaN) gets rank
-1 and NaN logit/probability, and is flagged, never a made-up rank.
Probabilities are the softmax over the whole vocabulary, computed as
exp(logit - logsumexp) in fp32.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import OverflowWarning
from ..plans.planset import NamedPlans


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
    x = logits.float()
    ans = x.gather(1, answer[:, None].long())[:, 0]
    lse = torch.logsumexp(x, dim=1)
    rank = (x > ans[:, None]).sum(dim=1)
    k = min(max(int(top_k), 0), x.shape[1])
    top_logits, top_ids = x.topk(k, dim=1) if k else (x[:, :0], answer[:, None][:, :0])
    # overflowed rows (inf/NaN anywhere) have no meaningful rank: never report one.
    # NaN or +inf anywhere makes logsumexp NaN/inf, -inf shows in the minimum: two
    # cheap reductions instead of an elementwise isfinite over the vocabulary
    bad = ~(torch.isfinite(lse) & torch.isfinite(x.amin(dim=1)))
    if bool(bad.any()):
        nan = torch.tensor(float("nan"), device=x.device)
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
    (wrong-answer logit, KL). ``window`` > 0 also flags rows whose rank is
    ambiguous at that logit tolerance (an entry other than the answer within
    ``window`` of the answer's logit).
    """

    def __init__(self, P: int, answer_ids: torch.Tensor, top_k: int,
                 wrong: torch.Tensor | None = None, full_logprobs: torch.Tensor | None = None,
                 window: float = 0.0):
        N, A = answer_ids.shape
        dev = answer_ids.device
        nan = float("nan")
        self.answer_ids, self.k, self.wrong, self.full_lp = answer_ids, top_k, wrong, full_logprobs
        self.window = window
        self.rank = torch.full((P, N, A), -1, dtype=torch.long, device=dev)
        self.logit = torch.full((P, N, A), nan, device=dev)
        self.logprob = torch.full((P, N, A), nan, device=dev)
        self.topk_ids = torch.full((P, N, A, top_k), -1, dtype=torch.long, device=dev)
        self.topk_logits = torch.full((P, N, A, top_k), nan, device=dev)
        self.topk_logprobs = torch.full((P, N, A, top_k), nan, device=dev)
        self.wrong_logit = torch.full((P, N), nan, device=dev) if wrong is not None else None
        self.kl = torch.full((P, N), nan, device=dev) if full_logprobs is not None else None
        self.ambiguous = torch.zeros((P, N, A), dtype=torch.bool, device=dev)
        self.nonfinite = torch.zeros((P, N, A), dtype=torch.bool, device=dev)

    def add(self, logits: torch.Tensor, plans: torch.Tensor, rows: torch.Tensor) -> None:
        """logits [m, N, A, V] of m distinct final states; plan ``plans[i]`` uses
        state ``rows[i]``."""
        m, N, A, V = logits.shape
        flat = logits.reshape(m * N * A, V)
        met = answer_metrics(flat, self.answer_ids.reshape(-1).repeat(m), self.k)
        shaped = lambda t: t.view(m, N, A, *t.shape[1:])[rows]  # noqa: E731
        self.rank[plans] = shaped(met.rank)
        self.logit[plans] = shaped(met.logit)
        self.logprob[plans] = shaped(met.logprob)
        self.topk_ids[plans] = shaped(met.topk_ids)
        self.topk_logits[plans] = shaped(met.topk_logits)
        self.topk_logprobs[plans] = shaped(met.topk_logprobs)
        self.nonfinite[plans] = shaped(met.nonfinite)
        first = logits[:, :, 0]  # [m, N, V] at the first answer position
        if self.wrong is not None:
            wl = first.gather(2, self.wrong[None, :, None].expand(m, N, 1))[..., 0].float()
            self.wrong_logit[plans] = wl[rows]  # type: ignore[index]
        if self.full_lp is not None:
            lp = first.float().log_softmax(-1)
            div = (self.full_lp.exp()[None] * (self.full_lp[None] - lp)).sum(-1)
            self.kl[plans] = div[rows]  # type: ignore[index]
        if self.window > 0:
            near = (flat.float() - met.logit[:, None]).abs() <= self.window
            self.ambiguous[plans] = shaped(near.sum(1) > 1)

    def mask_padding(self, answer_mask: torch.Tensor) -> None:
        pad = ~answer_mask
        self.rank[:, pad] = -1
        self.logit[:, pad] = float("nan")
        self.logprob[:, pad] = float("nan")
        self.topk_ids[:, pad] = -1
        self.ambiguous[:, pad] = False
        self.nonfinite[:, pad] = False


def warn_nonfinite(nonfinite: torch.Tensor, ps: NamedPlans) -> None:
    """Warn, naming a plan, when some rows overflowed (their ranks are -1)."""
    bad = nonfinite.flatten(1).any(dim=1).nonzero().flatten().tolist()
    if bad:
        warnings.warn(
            f"{len(bad)} of {len(ps)} plans overflow (inf/NaN logits), e.g. plan {bad[0]} "
            f"'{ps.text(bad[0])}'; their ranks are -1 and logits/probabilities NaN "
            "(Results.info['nonfinite'] marks the rows). Many /noln components can let the "
            "residual stream grow without bound.", OverflowWarning, stacklevel=4)
