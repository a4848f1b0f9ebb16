"""Ablation sources: what skipped components contribute under mean or resample
ablation, computed with the full model on the ablation's source prompts, for
one batch of prompts (zero ablation has no sources: ``None``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..ablation import Ablation
from ..errors import InputError
from ..inputs import PromptBatch, check_tokens
from ..model import StackedWeights, blocks
from .tree import StepKind

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


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


@dataclass
class Sources:
    """Per-layer outputs of the full model on the ablation source, for B rows:
    attention outputs [L, B, T, d], per-head z [L, B, T, H, dh], MLP outputs
    [L, B, T, d], and the embedding [1, B, T, d] (what an edge plan's removed
    edge from ``embed`` carries)."""

    attn: torch.Tensor
    z: torch.Tensor
    mlp: torch.Tensor
    embed: torch.Tensor

    def output(self, kind: StepKind, layer: int) -> torch.Tensor:
        """What a skipped attention or MLP of ``layer`` adds: [B, T, d]."""
        return (self.attn if kind == "attn" else self.mlp)[layer]

    def at(self, q_pos: torch.Tensor) -> Sources:
        """The same at positions q_pos [B, Q]."""
        def pick(t: torch.Tensor) -> torch.Tensor:
            idx = q_pos[None, :, :].reshape(1, *q_pos.shape, *([1] * (t.ndim - 3)))
            return torch.gather(t, 2, idx.expand(t.shape[0], *q_pos.shape, *t.shape[3:]))
        return Sources(pick(self.attn), pick(self.z), pick(self.mlp), pick(self.embed))


def full_model_outputs(w: StackedWeights, tokens: torch.Tensor) -> Sources:
    """Every component's output of the full model on tokens [R, T]."""
    return Sources(*blocks.full_forward(w, tokens), blocks.embed(tokens, w)[None])


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
    return Sources(avg(full.attn), avg(full.z), avg(full.mlp), avg(full.embed))


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


def sources_for_batch(ablation: Ablation, model: HookedTransformer, w: StackedWeights,
                      batch: PromptBatch) -> Sources:
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
