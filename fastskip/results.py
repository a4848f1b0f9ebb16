"""Results of ``Runner.run``: rank / logit / probability / top-k of every
answer token for every plan and prompt, as tensors and as a DataFrame."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch


@dataclass
class Results:
    """Tensors are indexed [plan, prompt, answer token] (``[..., k]`` for top-k).

    Answers of different lengths are padded to the longest: padded slots have
    ``answer_mask`` False, rank -1, logit/prob NaN and top-k ids -1.
    """

    plans: Sequence[str]  # canonical plan texts (computed when read)
    prompts: list[str]
    answers: list[str]
    answer_str_tokens: list[list[str]]
    prompt_str_tokens: list[list[str]]
    answer_ids: torch.Tensor  # [N, A]
    answer_mask: torch.Tensor  # [N, A]
    rank: torch.Tensor  # [P, N, A] int64
    logit: torch.Tensor  # [P, N, A]
    prob: torch.Tensor  # [P, N, A]
    topk_ids: torch.Tensor  # [P, N, A, k]
    topk_logits: torch.Tensor  # [P, N, A, k]
    topk_probs: torch.Tensor  # [P, N, A, k]
    model_name: str = ""
    logit_diff: torch.Tensor | None = None  # [P, N] answer - wrong answer (first tokens)
    kl: torch.Tensor | None = None  # [P, N] KL(full model || plan) at the first answer position
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_plans(self) -> int:
        return len(self.plans)

    @property
    def device(self) -> torch.device:
        return self.rank.device

    def cpu(self) -> Results:
        """The same results with every tensor on the host (``self`` when already
        there): what to hand to numpy, pandas or Python code when the runner runs
        on a GPU. One copy per tensor, not one per element read."""
        if self.device.type == "cpu":
            return self
        moved = {f.name: getattr(self, f.name).cpu() for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        info = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in self.info.items()}
        return replace(self, **moved, info=info)

    def to_pandas(self, top_k: int | None = None) -> Any:
        """One row per plan x prompt x answer token: plan, prompt, answer,
        position in the answer, token, rank, logit, prob, and (when top-k was
        asked) the top-k tokens as a list column."""
        import pandas as pd

        mask = self.answer_mask.cpu().numpy()
        n_idx, a_idx = np.nonzero(mask)
        P = self.n_plans
        rows = len(n_idx)
        plan_col = np.repeat(np.asarray(list(self.plans), dtype=object), rows)
        prompt_col = np.tile(np.asarray(self.prompts, dtype=object)[n_idx], P)
        answer_col = np.tile(np.asarray(self.answers, dtype=object)[n_idx], P)
        token_col = np.tile(np.array([self.answer_str_tokens[n][a]
                                      for n, a in zip(n_idx, a_idx, strict=True)],
                                     dtype=object), P)
        pick = lambda t: t.cpu().numpy()[:, n_idx, a_idx].reshape(-1)  # noqa: E731
        df = pd.DataFrame({
            "plan": plan_col,
            "prompt": prompt_col,
            "answer": answer_col,
            "answer_pos": np.tile(a_idx, P),
            "token": token_col,
            "token_id": np.tile(self.answer_ids.cpu().numpy()[n_idx, a_idx], P),
            "rank": pick(self.rank),
            "logit": pick(self.logit),
            "prob": pick(self.prob),
        })
        for name in ("logit_diff", "kl"):
            values = getattr(self, name)
            if values is not None:
                df[name] = values.cpu().numpy()[:, n_idx].reshape(-1)
        k = self.topk_ids.shape[-1] if top_k is None else min(top_k, self.topk_ids.shape[-1])
        if k:
            ids = self.topk_ids.cpu().numpy()[:, n_idx, a_idx, :k].reshape(-1, k)
            df["topk_ids"] = list(ids)
        return df

    def answer_prob(self) -> torch.Tensor:
        """Probability of the whole answer (product over its tokens) [P, N]."""
        p = torch.where(self.answer_mask, self.prob, torch.ones_like(self.prob))
        return p.prod(dim=-1)
