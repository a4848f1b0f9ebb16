"""Inputs: prompts and answers into one padded token batch, with the positions
whose logits predict each answer token (answers are teacher-forced, as in the
notebook's ``test_prompt``), and checks that name the bad prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import InputError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass
class PromptBatch:
    """Prompts + answers, tokenized. Row i of ``tokens`` is prompt i followed by
    all but the last token of answer i, right-padded (causal attention makes
    right padding exact). ``q_pos[i, j]`` is the position whose logits predict
    answer token j; padded answer slots repeat the last valid position and are
    marked False in ``answer_mask``."""

    prompts: list[str]
    answers: list[str]
    tokens: torch.Tensor  # [N, T]
    prompt_len: np.ndarray  # [N]
    answer_len: np.ndarray  # [N]
    answer_ids: torch.Tensor  # [N, A]
    answer_mask: torch.Tensor  # [N, A] bool
    q_pos: torch.Tensor  # [N, A]
    prompt_str_tokens: list[list[str]]
    answer_str_tokens: list[list[str]]
    prepend_bos: bool = True

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    @property
    def max_answer_len(self) -> int:
        return int(self.answer_ids.shape[1])


def _as_str_list(values: str | Sequence[str], what: str) -> list[str]:
    if isinstance(values, str):
        return [values]
    if isinstance(values, (bytes, bytearray)):
        raise InputError(f"{what} must be a string or a list of strings, got bytes "
                         f"({values!r}); decode it first")
    if not isinstance(values, Sequence):
        raise InputError(f"{what} must be a string or a list of strings, got "
                         f"{type(values).__name__}")
    out = list(values)
    for i, v in enumerate(out):
        if not isinstance(v, str):
            one = what[:-1].replace("_", " ")
            raise InputError(f"{one} {i} is a {type(v).__name__} ({v!r}); expected a string")
    return out


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def make_batch(model: HookedTransformer, prompts: str | Sequence[str], answers: str | Sequence[str],
               prepend_bos: bool | None = None, prepend_space_to_answer: bool = False,
               device: torch.device | str = "cpu", what: str = "answers") -> PromptBatch:
    """Tokenize prompts and answers with ``model``'s tokenizer (TransformerLens's
    ``to_tokens``); raises ``InputError`` naming the prompt at fault. ``what``
    names the answers in messages (``"wrong_answers"`` for the logit difference)."""
    prompts_l = _as_str_list(prompts, "prompts")
    answers_l = _as_str_list(answers, what)
    one = what[:-1].replace("_", " ")  # "answer", "wrong answer"
    if not prompts_l:
        raise InputError("no prompts given")
    if len(prompts_l) != len(answers_l):
        raise InputError(f"{what}: got {len(prompts_l)} prompts but {len(answers_l)} {what}; "
                         f"give one {one} per prompt")
    for i, (p, a) in enumerate(zip(prompts_l, answers_l, strict=True)):
        if a == "":
            raise InputError(f"{one} {i} (for prompt {i} {_short(p)}) is empty")
    if getattr(model, "tokenizer", None) is None:
        raise InputError("the model has no tokenizer; pass token ids to runner.logits instead")
    if prepend_bos is None:
        prepend_bos = bool(model.cfg.default_prepend_bos)
    if prepend_space_to_answer:
        answers_l = [a if a.startswith(" ") else " " + a for a in answers_l]
    n_ctx = model.cfg.n_ctx
    rows, p_lens, a_ids = [], [], []
    for i, (p, a) in enumerate(zip(prompts_l, answers_l, strict=True)):
        pt = model.to_tokens(p, prepend_bos=prepend_bos, truncate=False)[0].cpu() if p or \
            prepend_bos else torch.zeros(0, dtype=torch.long)
        at = model.to_tokens(a, prepend_bos=False, truncate=False)[0].cpu()
        if len(pt) == 0:
            raise InputError(f"prompt {i} {_short(p)} is empty after tokenization "
                             "(with prepend_bos=False): there is nothing to predict from")
        if len(at) == 0:
            raise InputError(f"{one} {i} {_short(a)} is empty after tokenization")
        need = len(pt) + len(at) - 1
        if need > n_ctx:
            raise InputError(
                f"prompt {i} {_short(p)} ({len(pt)} tokens) plus its answer ({len(at)} tokens) "
                f"needs {need} positions; the model's context is {n_ctx}"
            )
        rows.append(torch.cat([pt, at[:-1]]))
        p_lens.append(len(pt))
        a_ids.append(at)
    N, T, A = len(rows), max(len(r) for r in rows), max(len(a) for a in a_ids)
    tokens = torch.zeros((N, T), dtype=torch.long)
    answer_ids = torch.zeros((N, A), dtype=torch.long)
    answer_mask = torch.zeros((N, A), dtype=torch.bool)
    q_pos = torch.zeros((N, A), dtype=torch.long)
    for i, (r, pl, at) in enumerate(zip(rows, p_lens, a_ids, strict=True)):
        tokens[i, : len(r)] = r
        tokens[i, len(r):] = r[-1]  # padding: any valid id; never read
        answer_ids[i, : len(at)] = at
        answer_mask[i, : len(at)] = True
        pos = torch.arange(pl - 1, pl - 1 + len(at))
        q_pos[i, : len(at)] = pos
        q_pos[i, len(at):] = pos[-1]
    str_tok = lambda t: [str(model.to_string(t[j: j + 1])) for j in range(len(t))]  # noqa: E731
    return PromptBatch(
        prompts=prompts_l, answers=answers_l, tokens=tokens.to(device),
        prompt_len=np.array(p_lens), answer_len=np.array([len(a) for a in a_ids]),
        answer_ids=answer_ids.to(device), answer_mask=answer_mask.to(device),
        q_pos=q_pos.to(device),
        prompt_str_tokens=[str_tok(r[:pl]) for r, pl in zip(rows, p_lens, strict=True)],
        answer_str_tokens=[str_tok(a) for a in a_ids], prepend_bos=prepend_bos,
    )


def token_ids(tokens: Any, what: str = "tokens") -> torch.Tensor:
    """Check the structure of token ids (a tensor with values, an integer dtype,
    shape [batch, pos] or [pos]) and return them as [batch, pos]; ``what``
    names them in messages."""
    if not isinstance(tokens, torch.Tensor):
        raise InputError(f"{what} must be a torch.LongTensor [batch, pos], got "
                         f"{type(tokens).__name__}")
    if tokens.device.type == "meta":
        raise InputError(f"{what} are on the meta device, which holds no values; give real "
                         "token ids")
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise InputError(f"{what} must be integer ids (torch.long), got dtype {tokens.dtype}")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] == 0 or tokens.shape[0] == 0:
        raise InputError(f"{what} must have shape [batch, pos] with pos >= 1, got "
                         f"{tuple(tokens.shape)}")
    return tokens


def check_tokens(tokens: Any, d_vocab: int, n_ctx: int, device: torch.device) -> torch.Tensor:
    """Validate a token tensor [B, T] (or [T]) and move it to ``device``."""
    tokens = token_ids(tokens)
    if tokens.shape[1] > n_ctx:
        raise InputError(f"tokens have {tokens.shape[1]} positions; the model's context is "
                         f"{n_ctx}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= d_vocab:
        bad = lo if lo < 0 else hi
        where = (tokens == bad).nonzero()[0].tolist()
        raise InputError(f"token id {bad} at [batch {where[0]}, pos {where[1]}] is outside the "
                         f"vocabulary (0..{d_vocab - 1})")
    return tokens.to(device=device, dtype=torch.long)
