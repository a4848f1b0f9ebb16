"""PlanSet: many plans as stacked mask arrays.

The runner works on arrays ``[P, n_layers(, n_heads)]`` rather than on Python
objects, so a grid of 65,536 plans costs a few megabytes and no per-plan Python
work until a plan's text is asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, overload

import numpy as np

from ..errors import PlanError
from .mask import PlanMask, normal_form
from .plan import Plan, PlanLike, as_plans


class PlanSet(Sequence[Plan]):
    """An ordered set of bound plans stored as boolean mask arrays.

    Index it like a list (``ps[3]`` is a ``Plan``); ``ps.texts()`` gives the
    canonical strings. Build one with ``PlanSet.from_plans`` or the ``fs.grid``
    helpers.
    """

    def __init__(self, attn: np.ndarray, heads: np.ndarray | None, mlp: np.ndarray,
                 attn_ln: np.ndarray, mlp_ln: np.ndarray):
        """``heads=None`` means every head of each kept attention layer; such a
        set binds to a model with any number of heads."""
        attn, mlp, attn_ln, mlp_ln = (np.asarray(a) for a in (attn, mlp, attn_ln, mlp_ln))
        if attn.ndim != 2:
            raise PlanError(f"attn masks must have shape [plans, n_layers], got {attn.shape}")
        p, n_layers = attn.shape
        self._any_heads = heads is None
        if heads is None:
            heads = attn[:, :, None]
        heads = np.asarray(heads)
        if heads.ndim != 3 or heads.shape[:2] != (p, n_layers):
            raise PlanError(f"heads masks must have shape [{p}, {n_layers}, n_heads]")
        for name, a in (("mlp", mlp), ("attn_ln", attn_ln), ("mlp_ln", mlp_ln)):
            if a.shape != (p, n_layers):
                raise PlanError(f"{name} masks must have shape [{p}, {n_layers}], got {a.shape}")
        if p == 0:
            raise PlanError("the plan set is empty; give at least one plan (e.g. 'all')")
        self.attn, self.heads, self.mlp, self.attn_ln, self.mlp_ln = normal_form(
            attn, heads, mlp, attn_ln, mlp_ln)
        self._texts: list[str] | None = None

    # construction ----------------------------------------------------------
    @classmethod
    def from_plans(cls, plans: PlanLike | Sequence[PlanLike] | PlanSet, n_layers: int,
                   n_heads: int) -> PlanSet:
        """Bind and stack plans (strings, ``Plan`` objects or another PlanSet)."""
        if isinstance(plans, PlanSet):
            if plans._any_heads and plans.n_layers == n_layers:
                heads = np.repeat(plans.attn[:, :, None], n_heads, axis=2)
                out = cls(plans.attn, heads, plans.mlp, plans.attn_ln, plans.mlp_ln)
                out._texts = plans._texts
                return out
            if (plans.n_layers, plans.n_heads) != (n_layers, n_heads):
                raise PlanError(
                    f"this plan set was made for {plans.n_layers} layers x {plans.n_heads} "
                    f"heads; the model has {n_layers} x {n_heads}"
                )
            return plans
        bound = as_plans(plans, n_layers, n_heads)
        masks = [p.mask for p in bound]
        ps = cls(*(np.stack([getattr(m, f) for m in masks]) for f in
                   ("attn", "heads", "mlp", "attn_ln", "mlp_ln")))
        ps._texts = [str(p) for p in bound]
        return ps

    @classmethod
    def from_blocks(cls, blocks: np.ndarray, n_heads: int | None = None) -> PlanSet:
        """Whole-block plans from a boolean array ``[P, n_layers]``."""
        blocks = np.asarray(blocks, dtype=bool)
        ones = np.ones_like(blocks)
        heads = None if n_heads is None else np.repeat(blocks[:, :, None], n_heads, axis=2)
        return cls(blocks, heads, blocks.copy(), ones, ones.copy())

    # sequence protocol -------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.attn.shape[1])

    @property
    def n_heads(self) -> int | None:
        """Heads per layer, or None for a set that keeps whole attention layers only."""
        return None if self._any_heads else int(self.heads.shape[2])

    def __len__(self) -> int:
        return int(self.attn.shape[0])

    def mask(self, i: int) -> PlanMask:
        return PlanMask(self.attn[i], self.heads[i], self.mlp[i], self.attn_ln[i], self.mlp_ln[i])

    @overload
    def __getitem__(self, i: int) -> Plan: ...

    @overload
    def __getitem__(self, i: slice) -> PlanSet: ...

    def __getitem__(self, i: int | slice) -> Plan | PlanSet:
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        if isinstance(i, (int, np.integer)):
            n = len(self)
            if not -n <= i < n:
                raise IndexError(f"plan index {i} out of range for {n} plans")
            plan = Plan.from_mask(self.mask(int(i) % n))
            return Plan.parse(plan.text) if self._any_heads else plan
        raise TypeError(f"PlanSet indices must be integers or slices, not {type(i).__name__}")

    def __iter__(self) -> Iterator[Plan]:
        for i in range(len(self)):
            yield self[i]

    def take(self, index: np.ndarray | Sequence[int]) -> PlanSet:
        """The plans at ``index`` (in that order) as a new PlanSet."""
        idx = np.asarray(index, dtype=np.int64)
        heads = None if self._any_heads else self.heads[idx]
        out = PlanSet(self.attn[idx], heads, self.mlp[idx], self.attn_ln[idx], self.mlp_ln[idx])
        if self._texts is not None:
            out._texts = [self._texts[i] for i in idx]
        return out

    def text(self, i: int) -> str:
        """Canonical text of plan ``i`` (cached)."""
        if self._texts is not None:
            return self._texts[i]
        cache = self.__dict__.setdefault("_text_cache", {})
        if i not in cache:
            cache[i] = str(self[i])
        return cache[i]

    def texts(self) -> list[str]:
        """Canonical text of every plan (computed once, then cached)."""
        if self._texts is None:
            self._texts = [self.text(i) for i in range(len(self))]
        return self._texts

    def lazy_texts(self) -> PlanTexts:
        """The plans' canonical texts as a sequence computed on access."""
        return PlanTexts(self)

    def __repr__(self) -> str:
        heads = "whole attention layers" if self._any_heads else f"{self.n_heads} heads"
        return f"PlanSet({len(self)} plans, {self.n_layers} layers, {heads})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PlanSet):
            return NotImplemented
        return all(np.array_equal(getattr(self, f), getattr(other, f))
                   for f in ("attn", "heads", "mlp", "attn_ln", "mlp_ln"))

    __hash__ = None  # type: ignore[assignment]


PlansLike = PlanLike | Sequence[PlanLike] | PlanSet  # what every call that takes plans accepts


class NamedPlans(Protocol):
    """What ``PlanTexts`` reads: a plan count and each plan's text (a ``PlanSet``
    or an ``EdgePlanSet``)."""

    def __len__(self) -> int: ...

    def text(self, i: int) -> str: ...


class PlanTexts(Sequence[str]):
    """Canonical plan texts of a PlanSet, each computed when first read (a grid
    of 65,536 plans should not pay for 65,536 texts nobody prints)."""

    def __init__(self, plans: NamedPlans):
        self._plans = plans

    def __len__(self) -> int:
        return len(self._plans)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self._plans.text(j) for j in range(len(self))[i]]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"plan index {i} out of range for {n} plans")
        return self._plans.text(int(i) % n)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other,
                                                                          strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(self[i]) for i in range(min(3, len(self))))
        return f"PlanTexts([{head}{', ...' if len(self) > 3 else ''}] ({len(self)} plans))"
