"""Metrics of answer tokens from logits, computed on the device for many rows
at once (never a Python loop over plans).

Rank = number of vocabulary entries with a strictly larger logit (0 = top-1),
so exact ties share a rank. Probabilities are the softmax over the whole
vocabulary, computed as exp(logit - logsumexp) in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def answer_metrics(logits: torch.Tensor, answer: torch.Tensor, top_k: int) -> AnswerMetrics:
    """logits [m, V] (any float dtype; metrics in fp32), answer [m] token ids."""
    x = logits.float()
    ans = x.gather(1, answer[:, None].long())[:, 0]
    lse = torch.logsumexp(x, dim=1)
    rank = (x > ans[:, None]).sum(dim=1)
    k = min(max(int(top_k), 0), x.shape[1])
    top_logits, top_ids = x.topk(k, dim=1) if k else (x[:, :0], answer[:, None][:, :0])
    return AnswerMetrics(
        logit=ans, logprob=ans - lse, rank=rank, topk_ids=top_ids,
        topk_logits=top_logits, topk_logprobs=top_logits - lse[:, None],
    )
