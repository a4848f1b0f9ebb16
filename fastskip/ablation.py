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

This module is the user's description of an ablation; ``fastskip.run.sources``
computes what it contributes for a given model and batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .errors import InputError
from .inputs import token_ids

AblationKind = Literal["zero", "mean", "resample"]
KINDS: tuple[AblationKind, ...] = ("zero", "mean", "resample")


@dataclass(frozen=True)
class Ablation:
    """An ablation type and its source prompts (or token ids)."""

    kind: AblationKind = "zero"
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
    def _make(cls, kind: AblationKind, prompts: Sequence[str] | None, tokens: torch.Tensor | None
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


def as_ablation(value: Any) -> Ablation | None:
    """None for zero ablation (the fast path), else an ``Ablation``."""
    if value is None or value == "zero":
        return None
    if isinstance(value, Ablation):
        return None if value.kind == "zero" else value
    raise InputError(f"ablation must be 'zero' or an fs.Ablation (fs.Ablation.mean(prompts), "
                     f"fs.Ablation.resample(prompts)); got {value!r}")
