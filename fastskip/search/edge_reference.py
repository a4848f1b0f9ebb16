"""The sequential references of the edge searches: one TransformerLens
``run_with_hooks`` per edge plan (``edge_reference_logits``), the metrics
computed from its logits, written independently of the Runner."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..ablation import Ablation, as_ablation
from ..errors import InputError
from ..plans import EdgePlan
from ..reference.edge_hooks import edge_reference_logits
from .common import Inputs, check_full

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def _padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Rows right-padded to ``width`` with their last token (never read: causal)."""
    out = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        out[i, len(r):] = r[-1]
    return out


class SequentialScorer:
    """Mean logit difference and KL of one edge plan at a time, through hooks."""

    def __init__(self, model: HookedTransformer, inputs: Inputs,
                 ablation: Ablation | str | None, prepend_bos: bool | None = None):
        self.model = model
        bos = bool(model.cfg.default_prepend_bos) if prepend_bos is None else prepend_bos
        rows = [model.to_tokens(p, prepend_bos=bos, truncate=False)[0].cpu()
                for p in inputs.prompts]
        device = next(model.parameters()).device
        self.tokens = _padded(rows, max(len(r) for r in rows)).to(device)
        self.last = torch.tensor([len(r) - 1 for r in rows], device=device)
        first = lambda xs: torch.stack([model.to_tokens(a, prepend_bos=False)[0, 0]  # noqa: E731
                                        for a in xs]).to(device)
        self.answer, self.wrong = first(inputs.answers), first(inputs.wrong_answers)
        self.ablation = self._as_tokens(as_ablation(ablation), rows, bos)
        self.runs = 0
        full = self.last_logits(EdgePlan.parse("all"))
        self.full_logprobs = full.log_softmax(-1)
        self.full = check_full(self._mean_logit_diff(full))

    def _as_tokens(self, abl: Ablation | None, rows: list[torch.Tensor], bos: bool
                   ) -> Ablation | None:
        """The ablation with its prompts tokenized as the Runner reads them."""
        if abl is None or abl.prompts is None:
            return abl
        src = [self.model.to_tokens(p, prepend_bos=bos, truncate=False)[0].cpu()
               for p in abl.prompts]
        T = self.tokens.shape[1]
        if abl.kind == "resample":
            if [len(r) for r in src] != [len(r) for r in rows]:
                raise InputError("resample ablation: every corrupted prompt must have as many "
                                 "tokens as its prompt")
            tokens = _padded(src, T)
        else:
            if len({len(r) for r in src}) != 1 or len(src[0]) < T:
                raise InputError("the sequential reference takes mean-ablation prompts of one "
                                 "token length, at least as long as the prompts")
            tokens = torch.stack(src)
        return Ablation(abl.kind, None, tokens.to(self.tokens.device))

    def last_logits(self, plan: EdgePlan) -> torch.Tensor:
        """Logits [N, V] at each prompt's last position (fp32)."""
        self.runs += 1
        logits = edge_reference_logits(self.model, plan, self.tokens, self.ablation)
        return logits[torch.arange(len(self.last)), self.last].float()

    def _mean_logit_diff(self, at: torch.Tensor) -> float:
        n = torch.arange(len(self.last))
        return float((at[n, self.answer] - at[n, self.wrong]).mean())

    def score(self, plan: EdgePlan) -> float:
        """Mean logit difference as a fraction of the full model's."""
        return self._mean_logit_diff(self.last_logits(plan)) / self.full

    def kl(self, plan: EdgePlan) -> float:
        """Mean KL(full model || plan) at the last prompt position."""
        lp = self.last_logits(plan).log_softmax(-1)
        full = self.full_logprobs
        return float((full.exp() * (full - lp)).sum(-1).mean())
