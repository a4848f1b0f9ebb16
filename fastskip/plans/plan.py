"""Layer plans: which components of the model are kept.

A plan is a comma-separated list of items applied left to right to an initially
empty set of kept components (see the README for the table):

    9, 0-7            whole blocks (attention + MLP)
    9.attn, 0-7.mlp   one part of a block
    8.11, 8.0-3       heads of a layer's attention (the layer's output bias stays)
    .../noln          skip the normalisation before that component
    all, none         every component / nothing
    -X                remove X from what is kept so far (not as the first item: a
                      plan that starts with a removal keeps nothing; write all,-X)

Norms: ``/noln`` switches off the norm before each component the item names; an
item without it switches the norm on only where it keeps something new (see
``fastskip.plans.apply``).

Parsing needs no model; binding a plan to a model size (``Plan.parse(text,
n_layers=12, n_heads=12)`` or ``plan.bind(12, 12)``) resolves it into masks and
checks every layer and head. A bound plan prints a canonical form that parses
back to the same masks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import PlanError
from .apply import MaskArrays, apply_item
from .mask import PlanMask
from .text import canonical_text, range_text

# --------------------------------------------------------------------------- items


@dataclass(frozen=True)
class Item:
    """One parsed plan item, e.g. ``-0-7.mlp/noln``."""

    remove: bool
    target: str  # "all", "none", "block", "attn", "mlp", "heads"
    layers: tuple[int, int] | None  # inclusive range
    heads: tuple[int, int] | None  # inclusive range, target == "heads"
    noln: bool
    text: str  # the item as the user wrote it (stripped)
    index: int  # 1-based position in the plan
    offset: int  # character offset of the item in the plan text

    def __str__(self) -> str:
        if self.target in ("all", "none"):
            body = self.target
        else:
            body = range_text(self.layers)
            if self.target in ("attn", "mlp"):
                body += "." + self.target
            elif self.target == "heads":
                body += "." + range_text(self.heads)
        return ("-" if self.remove else "") + body + ("/noln" if self.noln else "")


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


class _Syntax(Exception):
    pass


def _parse_range(text: str, what: str) -> tuple[int, int]:
    m = _RANGE.match(text)
    if not m:
        if re.match(r"^\d+-$", text):
            raise _Syntax(f"the {what} range '{text}' has no end")
        raise _Syntax(f"'{text}' is not a {what} number or range like 0-7")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if hi < lo:
        raise _Syntax(f"the {what} range '{text}' runs backwards; write {hi}-{lo}")
    return lo, hi


def _parse_item(text: str, index: int, offset: int) -> Item:
    body = text
    remove = body.startswith("-")
    if remove:
        body = body[1:]
    noln = False
    if "/" in body:
        body, _, suffix = body.partition("/")
        if suffix.lower() != "noln":
            raise _Syntax(f"unknown suffix '/{suffix}'; the only suffix is '/noln'")
        noln = True
        if remove:
            raise _Syntax("'/noln' cannot be used on a removal ('-X'); remove, then add X/noln")
    if not body:
        raise _Syntax("nothing before the suffix" if noln else "empty item")
    if re.search(r"\s", body):
        raise _Syntax("spaces inside an item; separate items with commas")
    low = body.lower()
    if low in ("all", "none"):
        if low == "none" and (remove or noln):
            raise _Syntax("'none' cannot be removed or given '/noln'")
        return Item(remove, low, None, None, noln, text, index, offset)
    layer_text, dot, part = body.partition(".")
    layers = _parse_range(layer_text, "layer")
    if not dot:
        return Item(remove, "block", layers, None, noln, text, index, offset)
    part_low = part.lower()
    if part_low in ("attn", "mlp"):
        return Item(remove, part_low, layers, None, noln, text, index, offset)
    if not part:
        raise _Syntax("nothing after '.'; expected attn, mlp or a head number")
    if not part[0].isdigit():
        raise _Syntax(f"unknown part '{part}'; expected attn, mlp or a head number like 11")
    heads = _parse_range(part, "head")
    return Item(remove, "heads", layers, heads, noln, text, index, offset)


def parse_items(text: str) -> tuple[Item, ...]:
    """Parse plan text into items (syntax only; no model needed)."""
    if not isinstance(text, str):
        raise PlanError(f"a plan must be a string, got {type(text).__name__}: {text!r}")
    if not text.strip():
        raise PlanError(
            "empty plan text; write 'none' for embeddings -> unembedding only, or 'all'"
        )
    items = []
    offset = 0
    for index, raw in enumerate(text.split(","), start=1):
        stripped = raw.strip()
        at = offset + (len(raw) - len(raw.lstrip()))
        try:
            items.append(_parse_item(stripped, index, at))
        except _Syntax as e:
            shown = stripped if stripped else "(empty)"
            raise PlanError(
                f"plan '{text}': item {index} '{shown}' at character {at}: {e}"
            ) from None
        offset += len(raw) + 1
    if items[0].remove:
        first = items[0]
        raise PlanError(
            f"plan '{text}': item 1 '{first.text}' removes from an empty plan, which keeps "
            f"nothing; to remove from the full model write 'all,{text.strip()}'")
    return tuple(items)


def resolve_item(it: Item, plan_text: str, n_layers: int, n_heads: int
                 ) -> tuple[str, slice, slice | None]:
    """The item's target for ``apply_item`` ("all" is "block" over every layer) and
    the layer and head ranges it names, checked against the model's size."""
    where = f"plan '{plan_text}': item {it.index} '{it.text}'"
    if it.target in ("all", "none"):
        return ("none" if it.target == "none" else "block"), slice(0, n_layers), None
    assert it.layers is not None
    lo, hi = it.layers
    if hi >= n_layers:
        bad = lo if lo >= n_layers else hi
        raise PlanError(f"{where}: layer {bad} does not exist; the model has layers "
                        f"0-{n_layers - 1}")
    heads = None
    if it.target == "heads":
        assert it.heads is not None
        hlo, hhi = it.heads
        if hhi >= n_heads:
            bad = hlo if hlo >= n_heads else hhi
            raise PlanError(f"{where}: head {bad} does not exist; each layer has heads "
                            f"0-{n_heads - 1}")
        heads = slice(hlo, hhi + 1)
    return it.target, slice(lo, hi + 1), heads


def _apply(items: Sequence[Item], plan_text: str, n_layers: int, n_heads: int) -> PlanMask:
    m = MaskArrays.empty(1, n_layers, n_heads)
    for it in items:
        target, layers, heads = resolve_item(it, plan_text, n_layers, n_heads)
        apply_item(m, target, it.remove, it.noln, layers, heads, slice(None))
    return PlanMask(*(a[0] for a in m.normal()))


# --------------------------------------------------------------------------- Plan


class Plan:
    """A set of kept components, parsed from text or built from masks.

    ``Plan.parse("0-7,9.mlp")`` gives an unbound plan (syntax checked);
    ``plan.bind(n_layers, n_heads)`` (or passing the sizes to ``parse``) resolves
    it, checks every layer/head and gives ``plan.mask``. ``str(plan)`` is the
    canonical text for bound plans and the normalised item text otherwise.
    """

    __slots__ = ("items", "text", "_mask")

    def __init__(self, items: tuple[Item, ...], text: str, mask: PlanMask | None = None):
        self.items = items
        self.text = text
        self._mask = mask

    # construction ---------------------------------------------------------
    @classmethod
    def parse(cls, text: str | Plan, n_layers: int | None = None, n_heads: int | None = None
              ) -> Plan:
        """Parse plan text; bind it when the model size is given."""
        if isinstance(text, Plan):
            plan = text
        else:
            items = parse_items(text)
            plan = cls(items, ",".join(str(i) for i in items))
        if n_layers is not None:
            if n_heads is None:
                raise PlanError("give n_heads together with n_layers to bind a plan")
            return plan.bind(n_layers, n_heads)
        return plan

    @classmethod
    def from_masks(
        cls,
        attn: Sequence[bool] | np.ndarray,
        mlp: Sequence[bool] | np.ndarray,
        heads: np.ndarray | Sequence[Sequence[bool]] | None = None,
        attn_ln: Sequence[bool] | np.ndarray | None = None,
        mlp_ln: Sequence[bool] | np.ndarray | None = None,
        n_heads: int | None = None,
    ) -> Plan:
        """Build a bound plan from boolean masks over layers (and heads).

        ``heads`` defaults to every head of each kept attention layer (then
        ``n_heads`` is required); ``attn_ln``/``mlp_ln`` default to True.
        """
        attn_a = np.asarray(attn, dtype=bool)
        mlp_a = np.asarray(mlp, dtype=bool)
        if attn_a.ndim != 1 or mlp_a.shape != attn_a.shape:
            raise PlanError(
                f"attn and mlp masks must be 1-D of the same length, got shapes "
                f"{attn_a.shape} and {mlp_a.shape}"
            )
        n_layers = attn_a.shape[0]
        if heads is None:
            if n_heads is None:
                raise PlanError("from_masks needs heads=... or n_heads=...")
            heads_a = np.repeat(attn_a[:, None], n_heads, axis=1)
        else:
            heads_a = np.asarray(heads, dtype=bool)
            if heads_a.ndim != 2 or heads_a.shape[0] != n_layers:
                raise PlanError(
                    f"heads mask must have shape [n_layers={n_layers}, n_heads], "
                    f"got {heads_a.shape}"
                )
        ones = np.ones(n_layers, dtype=bool)
        a_ln = ones if attn_ln is None else np.asarray(attn_ln, dtype=bool)
        m_ln = ones if mlp_ln is None else np.asarray(mlp_ln, dtype=bool)
        if a_ln.shape != (n_layers,) or m_ln.shape != (n_layers,):
            raise PlanError(f"attn_ln and mlp_ln masks must have shape ({n_layers},)")
        mask = PlanMask(attn_a, heads_a, mlp_a, a_ln, m_ln).normalized()
        return cls.from_mask(mask)

    @classmethod
    def from_mask(cls, mask: PlanMask) -> Plan:
        """A bound plan from a ``PlanMask`` (normalised first)."""
        mask = mask.normalized()
        text = canonical_text(mask)
        return cls(parse_items(text), text, mask)

    def bind(self, n_layers: int, n_heads: int) -> Plan:
        """Resolve the plan for a model size; raises ``PlanError`` naming the item."""
        if self._mask is not None:
            if (self._mask.n_layers, self._mask.n_heads) != (n_layers, n_heads):
                raise PlanError(
                    f"plan '{self}' was made for a model with {self._mask.n_layers} layers x "
                    f"{self._mask.n_heads} heads; this model has {n_layers} x {n_heads}"
                )
            return self
        mask = _apply(self.items, self.text, n_layers, n_heads)
        return Plan(self.items, canonical_text(mask), mask)

    # access ----------------------------------------------------------------
    @property
    def bound(self) -> bool:
        return self._mask is not None

    @property
    def mask(self) -> PlanMask:
        if self._mask is None:
            raise PlanError(
                f"plan '{self.text}' is not bound to a model size yet; use "
                "plan.bind(n_layers, n_heads) or Plan.parse(text, n_layers, n_heads)"
            )
        return self._mask

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Plan('{self.text}')"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        if self.bound and other.bound:
            return self.mask == other.mask
        return not self.bound and not other.bound and self.text == other.text

    def __hash__(self) -> int:
        return hash(self._mask) if self._mask is not None else hash(self.text)


PlanLike = Plan | str


def as_plans(plans: PlanLike | Sequence[PlanLike], n_layers: int, n_heads: int) -> list[Plan]:
    """Normalise one plan or a sequence of plans/strings into bound plans."""
    if isinstance(plans, (str, Plan)):
        plans = [plans]
    if isinstance(plans, (bytes, bytearray)):
        raise PlanError(f"plans must be a Plan, a string or a list of them, got bytes "
                        f"({plans!r}); decode it first")
    if isinstance(plans, np.ndarray) or not isinstance(plans, Sequence):
        try:
            plans = list(plans)
        except TypeError:
            raise PlanError(
                f"plans must be a Plan, a string or a list of them, got {type(plans).__name__}"
            ) from None
    if len(plans) == 0:
        raise PlanError("the plan set is empty; give at least one plan (e.g. 'all')")
    out = []
    for i, p in enumerate(plans):
        if isinstance(p, str):
            p = Plan.parse(p)
        elif not isinstance(p, Plan):
            raise PlanError(
                f"plan #{i} is a {type(p).__name__} ({p!r}); expected a Plan or a string"
            )
        out.append(p.bind(n_layers, n_heads))
    return out
