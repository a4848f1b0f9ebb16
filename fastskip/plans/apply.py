"""Applying plan items to masks, left to right: for one plan (``Plan.bind``) and for
a whole grid of plans at once (``grid.component_subsets``), by the same code.

The rule for norms (the README's plan table says it the same way): an item with
``/noln`` switches off the norm before each component it names; an item without
it switches the norm on only where it keeps something that was not kept before
(a component, or a head of the layer's attention). So ``all/noln,8.3`` keeps
layer 8's attention without its norm (head 8.3 was kept already), and
``all,9.mlp/noln`` is the full model with MLP 9's norm skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .mask import normal_form


@dataclass
class MaskArrays:
    """Masks of P plans being built: attn, mlp, attn_ln, mlp_ln [P, L]; heads [P, L, H]."""

    attn: np.ndarray
    heads: np.ndarray
    mlp: np.ndarray
    attn_ln: np.ndarray
    mlp_ln: np.ndarray

    @classmethod
    def empty(cls, n_plans: int, n_layers: int, n_heads: int) -> MaskArrays:
        """P plans keeping nothing (the plan 'none')."""
        off = np.zeros((n_plans, n_layers), bool)
        return cls(off.copy(), np.zeros((n_plans, n_layers, n_heads), bool), off.copy(),
                   ~off, ~off.copy())

    def normal(self) -> tuple[np.ndarray, ...]:
        return normal_form(self.attn, self.heads, self.mlp, self.attn_ln, self.mlp_ln)


def apply_item(m: MaskArrays, target: str, remove: bool, noln: bool,
               layers: slice, heads: slice | None, plans: np.ndarray | slice) -> None:
    """Apply one item to the selected ``plans`` of ``m``, in place. ``target``: "none",
    "block" (also for "all", over every layer), "attn", "mlp" or "heads"; ``layers`` and
    ``heads`` the ranges it names (ranges already checked against the model)."""
    if target == "none":
        m.attn[plans] = m.mlp[plans] = False
        m.heads[plans] = False
        return
    if target in ("block", "attn", "heads"):
        named = np.zeros(m.heads.shape[2], bool)
        named[heads if target == "heads" else slice(None)] = True
        attn, kept = m.attn[plans, layers], m.heads[plans, layers]  # [n, l], [n, l, H]
        if remove and target == "heads":  # the attention (and its output bias) stays
            m.heads[plans, layers] = kept & ~named
        elif remove:  # the whole attention: every head and the bias
            m.attn[plans, layers] = False
            m.heads[plans, layers] = False
        else:
            adds = ~attn | (named & ~kept).any(axis=-1)  # a component or a head not kept before
            m.attn[plans, layers] = True
            m.heads[plans, layers] = kept | named
            # /noln: the norm off; otherwise on where the item adds something, else unchanged
            m.attn_ln[plans, layers] = False if noln else m.attn_ln[plans, layers] | adds
    if target in ("block", "mlp"):
        adds = ~m.mlp[plans, layers]
        m.mlp[plans, layers] = not remove
        if not remove:
            m.mlp_ln[plans, layers] = False if noln else m.mlp_ln[plans, layers] | adds
