"""Inputs of the circuit scorer (``Runner.mean_ablated_circuits``): prompts of one
token length, their answer and wrong-answer first tokens, and the mean prompts,
checked with errors that name the prompt at fault."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import InputError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def circuit_inputs(model: HookedTransformer, prompts: Sequence[str], answers: Sequence[str],
                   wrong_answers: Sequence[str], mean_prompts: Sequence[str],
                   prepend_bos: bool, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens [N, T] of the prompts (one token length), the answer and wrong-answer
    first-token ids [N, 2] and the mean prompts' tokens cut to T [R, T]."""
    lists = {"prompts": prompts, "answers": answers, "wrong_answers": wrong_answers,
             "mean_prompts": mean_prompts}
    for what, xs in lists.items():
        if isinstance(xs, str) or not all(isinstance(x, str) for x in xs) or not len(xs):
            raise InputError(f"{what} must be a non-empty list of strings")
    if not len(prompts) == len(answers) == len(wrong_answers):
        raise InputError(f"give one answer and one wrong answer per prompt: got {len(prompts)} "
                         f"prompts, {len(answers)} answers, {len(wrong_answers)} wrong answers")

    def tok(text: str, bos: bool) -> torch.Tensor:
        return model.to_tokens(text, prepend_bos=bos, truncate=False)[0].cpu()

    rows = [tok(p, prepend_bos) for p in prompts]
    T = len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != T:
            raise InputError(
                f"prompt {i} {prompts[i]!r} has {len(r)} tokens but prompt 0 has {T}: per-position "
                "means need prompts of one token length (fs.tasks.load_seqcont drops the others)")
    mean_rows = [tok(p, prepend_bos) for p in mean_prompts]
    for i, r in enumerate(mean_rows):
        if len(r) < T:
            raise InputError(f"mean prompt {i} {mean_prompts[i]!r} has {len(r)} tokens; mean "
                             f"prompts need at least the prompts' {T}")
    firsts = []
    for what, xs in (("answer", answers), ("wrong answer", wrong_answers)):
        ids = [tok(a, False) for a in xs]
        for i, t in enumerate(ids):
            if len(t) == 0:
                raise InputError(f"{what} {i} {xs[i]!r} is empty after tokenization")
        firsts.append(torch.stack([t[0] for t in ids]))
    if model.cfg.n_ctx < T:
        raise InputError(f"prompts have {T} tokens; the model's context is {model.cfg.n_ctx}")
    return (torch.stack(rows).to(device), torch.stack(firsts, dim=1).to(device),
            torch.stack([r[:T] for r in mean_rows]).to(device))
