"""Ablation types: what a skipped component contributes.

* ``zero`` (default): nothing; the residual stream passes through unchanged.
* ``mean``: the component's output averaged over a reference set of prompts,
  per position, computed with the full model.
* ``resample``: the component's output on a corrupted prompt, row by row
  (corrupted prompt i stands in for prompt i; same token length).

Heads are ablated at their per-head output (``hook_z``): a removed head's z is
the source's z, then W_O and b_O apply as usual. A whole attention layer or MLP
is ablated at its output (``hook_attn_out`` / ``hook_mlp_out``), bias included;
so under mean/resample, removing ``L.attn`` equals removing all of L's heads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import blocks
from .errors import InputError
from .inputs import check_tokens, token_ids
from .weights import StackedWeights

KINDS = ("zero", "mean", "resample")


@dataclass(frozen=True)
class Ablation:
    """An ablation type and its source prompts (or token ids)."""

    kind: str = "zero"
    prompts: tuple[str, ...] | None = None
    tokens: torch.Tensor | None = None

    @classmethod
    def zero(cls) -> Ablation:
        return cls("zero")

    @classmethod
    def mean(cls, prompts: Sequence[str] | None = None, tokens: torch.Tensor | None = None
             ) -> Ablation:
        """Mean over reference ``prompts`` (or token ids [R, T]) per position."""
        return cls._make("mean", prompts, tokens)

    @classmethod
    def resample(cls, prompts: Sequence[str] | None = None, tokens: torch.Tensor | None = None
                 ) -> Ablation:
        """Row by row from corrupted ``prompts`` (or token ids [B, T]), one per prompt."""
        return cls._make("resample", prompts, tokens)

    @classmethod
    def _make(cls, kind: str, prompts: Sequence[str] | None, tokens: torch.Tensor | None
              ) -> Ablation:
        if (prompts is None) == (tokens is None):
            raise InputError(f"{kind} ablation needs either prompts or tokens (exactly one)")
        return cls(kind, None if prompts is None else _check_prompts(kind, prompts), tokens)

    def __post_init__(self) -> None:
        """Check the kind and the source (prompts or token ids) up front, before
        any computation; token ids [T] become one row [1, T]. The vocabulary
        range is checked when the ablation meets a model (``sources_for_tokens``)."""
        kind = self.kind
        if not isinstance(kind, str) or kind not in KINDS:
            raise InputError(f"unknown ablation kind {kind!r}; the kinds are "
                             f"{', '.join(repr(k) for k in KINDS)}")
        if kind == "zero":
            return
        if (self.prompts is None) == (self.tokens is None):
            raise InputError(f"{kind} ablation needs either prompts or tokens (exactly one)")
        if self.prompts is not None:
            object.__setattr__(self, "prompts", _check_prompts(kind, self.prompts))
            return
        object.__setattr__(self, "tokens", token_ids(self.tokens, f"{kind} ablation tokens"))

    def __repr__(self) -> str:
        n = len(self.prompts) if self.prompts else (
            0 if self.tokens is None else self.tokens.shape[0])
        return f"Ablation({self.kind}{f', {n} sources' if n else ''})"


def _check_prompts(kind: str, prompts: Any) -> tuple[str, ...]:
    """Ablation source prompts as a non-empty tuple of strings."""
    if isinstance(prompts, str) or not isinstance(prompts, Iterable):
        raise InputError(f"{kind} ablation prompts must be a list of strings")
    prompts = tuple(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise InputError(f"{kind} ablation prompts must be a list of strings")
    if not prompts:
        raise InputError(f"{kind} ablation needs at least one prompt")
    return prompts


def bound_source_tokens(ablation: Ablation, w: StackedWeights, device: torch.device
                        ) -> torch.Tensor:
    """The ablation's token ids [R, T], checked against the model's vocabulary
    (as prompt tokens are) and moved to ``device`` as torch.long."""
    src = ablation.tokens
    if src is None:
        raise InputError("this call takes token ids: give the ablation as tokens=..., not "
                         "prompts")
    try:
        # No context limit here: a mean source may be longer than the prompts (it
        # is cut to their length) and a resample source must match their shape.
        return check_tokens(src, w.d_vocab, max(w.n_ctx, src.shape[-1]), device)
    except InputError as err:
        raise InputError(f"{ablation.kind} ablation tokens: {err}") from None


def as_ablation(value: Any) -> Ablation | None:
    """None for zero ablation (the fast path), else an ``Ablation``."""
    if value is None or value == "zero":
        return None
    if isinstance(value, Ablation):
        return None if value.kind == "zero" else value
    raise InputError(f"ablation must be 'zero' or an fs.Ablation (fs.Ablation.mean(prompts), "
                     f"fs.Ablation.resample(prompts)); got {value!r}")


@dataclass
class Sources:
    """Per-layer outputs of the full model on the ablation source, for B rows:
    attention outputs [L, B, T, d], per-head z [L, B, T, H, dh], MLP outputs
    [L, B, T, d]."""

    attn: torch.Tensor
    z: torch.Tensor
    mlp: torch.Tensor

    def at(self, q_pos: torch.Tensor) -> Sources:
        """The same at positions q_pos [B, Q]."""
        def pick(t: torch.Tensor) -> torch.Tensor:
            idx = q_pos[None, :, :].reshape(1, *q_pos.shape, *([1] * (t.ndim - 3)))
            return torch.gather(t, 2, idx.expand(t.shape[0], *q_pos.shape, *t.shape[3:]))
        return Sources(pick(self.attn), pick(self.z), pick(self.mlp))


@torch.no_grad()
def full_model_outputs(w: StackedWeights, tokens: torch.Tensor) -> Sources:
    """Run the full model on tokens [R, T], keeping every component's output."""
    x = blocks.embed(tokens, w)[None]  # one state, R rows
    attn, zs, mlps = [], [], []
    for layer in range(w.n_layers):
        lw = w.layer(layer)
        z = blocks.attention_z(x, lw, w.config, True)
        out = blocks.attention_out(z, lw)
        x = x + out
        m = blocks.mlp(x, lw, w.config, True)
        x = x + m
        attn.append(out[0])
        zs.append(z[0])
        mlps.append(m[0])
    return Sources(torch.stack(attn), torch.stack(zs), torch.stack(mlps))


def mean_sources(w: StackedWeights, tokens: torch.Tensor, lengths: torch.Tensor, T: int,
                 B: int) -> Sources:
    """Per-position means over source rows (row r valid below lengths[r]),
    broadcast to B rows and the first T positions."""
    if int(lengths.max()) < T:
        raise InputError(f"mean ablation needs reference prompts at least as long as the "
                         f"prompts ({T} tokens); the longest has {int(lengths.max())}")
    full = full_model_outputs(w, tokens[:, :T])
    valid = (torch.arange(T, device=tokens.device)[None, :] < lengths[:, None]).to(w.dtype)
    count = valid.sum(0)  # [T]
    if bool((count == 0).any()):
        t = int((count == 0).nonzero()[0])
        raise InputError(f"mean ablation: no reference prompt reaches position {t}")

    def avg(t: torch.Tensor) -> torch.Tensor:  # [L, R, T, ...] -> [L, B, T, ...]
        v = valid.reshape(1, *valid.shape, *([1] * (t.ndim - 3)))
        mean = (t * v).sum(1) / count.reshape(1, T, *([1] * (t.ndim - 3)))
        return mean[:, None].expand(t.shape[0], B, *mean.shape[1:])
    return Sources(avg(full.attn), avg(full.z), avg(full.mlp))


def sources_for_tokens(ablation: Ablation, w: StackedWeights, tokens: torch.Tensor
                       ) -> Sources:
    """Sources for a token batch [B, T] from an ablation given as token ids."""
    B, T = tokens.shape
    src = bound_source_tokens(ablation, w, tokens.device)
    if ablation.kind == "mean":
        lengths = torch.full((src.shape[0],), src.shape[1], device=tokens.device)
        return mean_sources(w, src, lengths, T, B)
    if src.shape != tokens.shape:
        raise InputError(f"resample ablation tokens have shape {tuple(src.shape)}; they must "
                         f"match the tokens' shape {tuple(tokens.shape)} (one row per row)")
    return full_model_outputs(w, src)


def sources_for_batch(ablation: Ablation, model: Any, w: StackedWeights, batch: Any
                      ) -> Sources:
    """Sources for a prompt batch (``inputs.PromptBatch``). Resample rows are the
    corrupted prompt followed by the same answer tokens (teacher forcing)."""
    if ablation.prompts is None:
        return sources_for_tokens(ablation, w, batch.tokens)
    N, T = batch.tokens.shape
    dev = batch.tokens.device
    tok = [model.to_tokens(p, prepend_bos=batch.prepend_bos, truncate=False)[0].to(dev)
           if p or batch.prepend_bos else torch.zeros(0, dtype=torch.long, device=dev)
           for p in ablation.prompts]
    if ablation.kind == "mean":
        lengths = torch.tensor([len(t) for t in tok], device=dev)
        width = max(T, int(lengths.max()))
        rows = torch.stack([torch.cat([t, t[-1:].expand(width - len(t))]) for t in tok])
        return mean_sources(w, rows, lengths, T, N)
    if len(tok) != N:
        raise InputError(f"resample ablation needs one corrupted prompt per prompt: got "
                         f"{len(tok)} for {N} prompts")
    rows = batch.tokens.clone()
    for i, t in enumerate(tok):
        if len(t) != int(batch.prompt_len[i]):
            raise InputError(
                f"resample ablation: corrupted prompt {i} {ablation.prompts[i]!r} has {len(t)} "
                f"tokens but prompt {i} has {int(batch.prompt_len[i])}; they must align")
        rows[i, : len(t)] = t
    return full_model_outputs(w, rows)
