"""PlanMask: the resolved form of a plan for one model size (boolean arrays)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
        """Irrelevant flags set to a fixed value (no heads without attention,
        normalisation 'on' where the component reads nothing)."""
        attn = self.attn.astype(bool).copy()
        heads = self.heads.astype(bool) & attn[:, None]
        mlp = self.mlp.astype(bool).copy()
        attn_ln = self.attn_ln.astype(bool) | ~heads.any(axis=1)
        mlp_ln = self.mlp_ln.astype(bool) | ~mlp
        return PlanMask(attn, heads, mlp, attn_ln, mlp_ln)

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


def empty_mask(n_layers: int, n_heads: int) -> PlanMask:
    z = np.zeros(n_layers, dtype=bool)
    return PlanMask(z.copy(), np.zeros((n_layers, n_heads), bool), z.copy(), ~z, ~z)


