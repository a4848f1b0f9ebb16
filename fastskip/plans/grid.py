"""Plan grids: the sweeps researchers run by hand, as one PlanSet.

    fs.grid.block_subsets(12)                      # 4,096 plans: every subset of blocks
    fs.grid.leave_one_out(12, 12, units="head")    # 144 plans: all heads but one
    fs.grid.leave_one_out(12, 12, units=("head", "mlp"))   # 156 plans
    fs.grid.component_subsets(["9.mlp", "8.attn", ...], 12, 12)  # 2^k ablations
    fs.grid.random_plans(1024, 12, 12, seed=0)     # mixed random plans (tests, benchmarks)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import PlanError
from .apply import MaskArrays, apply_item
from .plan import parse_items, resolve_item
from .planset import PlanSet

UNITS = ("block", "attn", "mlp", "head")


def _bits(n: int) -> np.ndarray:
    """All 2^n subsets as a boolean array [2^n, n]; bit k of the index = member k."""
    if n > 24:
        raise PlanError(f"2^{n} plans is too many for one grid; split it (n <= 24)")
    idx = np.arange(2**n, dtype=np.int64)[:, None]
    return ((idx >> np.arange(n, dtype=np.int64)) & 1).astype(bool)


def block_subsets(n_layers: int, n_heads: int | None = None) -> PlanSet:
    """Every subset of whole blocks: 2^n_layers plans (plan i keeps layer L iff bit L of i)."""
    return PlanSet.from_blocks(_bits(n_layers), n_heads)


def _full(n_plans: int, n_layers: int, n_heads: int) -> tuple[np.ndarray, ...]:
    t = np.ones((n_plans, n_layers), dtype=bool)
    return t, np.ones((n_plans, n_layers, n_heads), bool), t.copy(), t.copy(), t.copy()


def leave_one_out(n_layers: int, n_heads: int, units: str | Sequence[str] = "block",
                  include_full: bool = False) -> PlanSet:
    """The full model minus one unit per plan.

    ``units``: "block", "attn", "mlp", "head" or a sequence of them ("component"
    is short for ("attn", "mlp")). Order: by unit kind as given, then by layer
    (and head). ``include_full`` puts the plan 'all' first.
    """
    if isinstance(units, str):
        units = ("attn", "mlp") if units == "component" else (units,)
    for u in units:
        if u not in UNITS:
            raise PlanError(f"unknown unit '{u}'; expected one of {', '.join(UNITS)}, component")
    removed: list[tuple[str, int, int]] = []
    for u in units:
        if u == "head":
            removed += [("head", L, h) for L in range(n_layers) for h in range(n_heads)]
        else:
            removed += [(u, L, -1) for L in range(n_layers)]
    n = len(removed) + int(include_full)
    attn, heads, mlp, attn_ln, mlp_ln = _full(n, n_layers, n_heads)
    for i, (u, L, h) in enumerate(removed, start=int(include_full)):
        if u in ("block", "attn"):
            attn[i, L] = False
            heads[i, L] = False
        if u in ("block", "mlp"):
            mlp[i, L] = False
        if u == "head":
            heads[i, L, h] = False
    return PlanSet(attn, heads, mlp, attn_ln, mlp_ln)


def component_subsets(components: Sequence[str], n_layers: int, n_heads: int,
                      base: str = "all") -> PlanSet:
    """All 2^k combinations of removing (base 'all') or adding (base 'none') the
    given components, e.g. ``["9.mlp", "8.attn", "8.11"]``: plan i is the plan text
    ``all,-c_a,-c_b,...`` (base 'none': ``c_a,c_b,...``) of the components c_k whose
    bit k of i is set, in the order given, and equals ``Plan.parse`` of that text.
    A component is a plan item (or several, comma-separated); removals cannot carry
    ``/noln``, so with base 'all' components are written without it."""
    if base not in ("all", "none"):
        raise PlanError(f"base must be 'all' or 'none', got '{base}'")
    verb = "remove" if base == "all" else "add"
    parsed = []
    for c in components:
        if not isinstance(c, str):
            raise PlanError(f"component {c!r} is not a plan item like '9.mlp' or '8.11'")
        if c.strip().startswith("-"):
            raise PlanError(f"component '{c}' names nothing to {verb}; give items like "
                            "'9.mlp', '8.attn', '8.11' (the grid removes or adds them)")
        items = parse_items(c)
        for it in items:
            if it.target in ("all", "none") or it.remove:
                raise PlanError(f"component '{c}': item '{it.text}' is not a component to "
                                f"{verb}; give items like '9.mlp', '8.attn', '8.11'")
            if it.noln and base == "all":
                raise PlanError(f"component '{c}': with base 'all' components are removed, "
                                "and a removal cannot carry /noln; use base='none'")
        parsed.append([(it, resolve_item(it, c, n_layers, n_heads)) for it in items])
    bits = _bits(len(parsed))
    m = MaskArrays.empty(bits.shape[0], n_layers, n_heads)
    if base == "all":
        apply_item(m, "block", False, False, slice(0, n_layers), None, slice(None))
    for k, resolved in enumerate(parsed):  # component k, on the plans that have bit k set
        for it, (target, layers, heads) in resolved:
            apply_item(m, target, base == "all", it.noln, layers, heads, bits[:, k])
    return PlanSet(*m.normal())


def random_plans(n: int, n_layers: int, n_heads: int, seed: int = 0,
                 kinds: Sequence[str] = ("block", "attn", "mlp", "heads", "noln"),
                 p_keep: float = 0.7, p_noln: float = 0.5) -> PlanSet:
    """``n`` random plans mixing the item kinds in ``kinds``.

    Each plan draws one kind per layer from ``kinds``: "block" keeps the block
    with probability ``p_keep``; "attn"/"mlp" keep only that part; "heads" keeps
    a random head subset (sometimes empty: bias only) and the MLP at random;
    "noln" is a kept block whose norms are each skipped with probability ``p_noln``.
    """
    rng = np.random.default_rng(seed)
    allowed = [k for k in kinds if k in ("block", "attn", "mlp", "heads", "noln")]
    if not allowed or len(allowed) != len(kinds):
        raise PlanError(f"kinds must be among block, attn, mlp, heads, noln; got {kinds}")
    attn, heads, mlp, attn_ln, mlp_ln = _full(n, n_layers, n_heads)
    kind = rng.integers(0, len(allowed), size=(n, n_layers))
    keep = rng.random((n, n_layers)) < p_keep
    for k, name in enumerate(allowed):
        sel = kind == k
        if name == "block":
            attn[sel] = mlp[sel] = keep[sel]
        elif name == "attn":
            attn[sel] = keep[sel]
            mlp[sel] = False
        elif name == "mlp":
            attn[sel] = False
            mlp[sel] = keep[sel]
        elif name == "heads":
            attn[sel] = True
            heads[sel] = rng.random((int(sel.sum()), n_heads)) < 0.5
            mlp[sel] = rng.random(int(sel.sum())) < 0.5
        elif name == "noln":
            attn_ln[sel] = rng.random(int(sel.sum())) >= p_noln
            mlp_ln[sel] = rng.random(int(sel.sum())) >= p_noln
    heads &= attn[:, :, None]
    return PlanSet(attn, heads, mlp, attn_ln, mlp_ln)


def concat(*sets: PlanSet) -> PlanSet:
    """Plan sets one after the other (same model size)."""
    if not sets:
        raise PlanError("concat needs at least one plan set")
    sizes = {(s.n_layers, s.n_heads) for s in sets}
    if len({n for n, _ in sizes}) > 1 or len({h for _, h in sizes} - {None}) > 1:
        shown = " and ".join(f"{n} layers x {h or 'any'} heads" for n, h in sorted(
            sizes, key=lambda x: (x[0], x[1] or 0)))
        raise PlanError(f"concat: the plan sets are for different model sizes ({shown})")
    if len(sizes) > 1:  # whole-attention sets (any heads) join sets with heads
        n_heads = max(h for _, h in sizes if h is not None)
        sets = tuple(PlanSet.from_plans(s, s.n_layers, n_heads) for s in sets)
    fields = ("attn", "heads", "mlp", "attn_ln", "mlp_ln")
    return PlanSet(*(np.concatenate([getattr(s, f) for s in sets]) for f in fields))


__all__ = ["block_subsets", "leave_one_out", "component_subsets", "random_plans", "concat"]
