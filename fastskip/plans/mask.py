"""PlanMask: the resolved form of a plan for one model size (boolean arrays),
and the normal form that plan masks and plan sets share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Masks = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def normal_form(attn: np.ndarray, heads: np.ndarray, mlp: np.ndarray, attn_ln: np.ndarray,
                mlp_ln: np.ndarray) -> Masks:
    """Masks with irrelevant flags set to a fixed value, so that equal plans have
    equal masks: no heads without attention, and the norm 'on' where the component
    reads nothing (no kept head, no MLP). Works on one plan (``attn`` [L], ``heads``
    [L, H]) and on plan sets (``attn`` [P, L], ``heads`` [P, L, H]) alike."""
    attn = np.asarray(attn).astype(bool)
    heads = np.asarray(heads).astype(bool) & attn[..., None]
    mlp = np.asarray(mlp).astype(bool)
    attn_ln = np.asarray(attn_ln).astype(bool) | ~heads.any(axis=-1)
    mlp_ln = np.asarray(mlp_ln).astype(bool) | ~mlp
    return attn, heads, mlp, attn_ln, mlp_ln


@dataclass(frozen=True, eq=False)
class PlanMask:
    """The resolved form of a plan for a model with ``n_layers`` x ``n_heads``.

    ``attn[L]``: the attention of layer L contributes (its kept heads and b_O).
    ``heads[L, H]``: head H of layer L is kept (only meaningful where attn[L]).
    ``mlp[L]``: the MLP of layer L contributes.
    ``attn_ln[L]`` / ``mlp_ln[L]``: the normalisation before it is applied.
    Normal form: heads, attn_ln are all-True/False-free where irrelevant (see
    ``normalized``), so equal plans have equal masks.
    """

    attn: np.ndarray
    heads: np.ndarray
    mlp: np.ndarray
    attn_ln: np.ndarray
    mlp_ln: np.ndarray

    @property
    def n_layers(self) -> int:
        return int(self.attn.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.heads.shape[1])

    def normalized(self) -> PlanMask:
        """The same plan in normal form (see ``normal_form``)."""
        return PlanMask(*normal_form(self.attn, self.heads, self.mlp, self.attn_ln, self.mlp_ln))

    def key(self) -> bytes:
        """Bytes that identify the masks (for hashing and deduplication)."""
        parts = (self.attn, self.heads, self.mlp, self.attn_ln, self.mlp_ln)
        return b"".join(np.packbits(p.astype(bool).ravel()).tobytes() for p in parts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlanMask) and self.heads.shape == other.heads.shape and (
            self.key() == other.key()
        )

    def __hash__(self) -> int:
        return hash((self.heads.shape, self.key()))

    def n_components(self) -> tuple[int, int, int]:
        """(kept attention layers, kept heads, kept MLPs)."""
        return int(self.attn.sum()), int(self.heads.sum()), int(self.mlp.sum())
