"""Layer updates of head/MLP circuits under per-position mean ablation, on a node
batch: ``x [n, B, T, d]`` holds n circuits' residual streams of the same B
prompts. A head outside a circuit outputs its mean z (TransformerLens's
``hook_z`` replaced by the mean), an MLP outside it its mean output
(``hook_mlp_out`` replaced); the attention output bias always stays.

Only heads some circuit of the batch keeps are computed: queries, keys and values
of the others are never formed, and their (constant) mean outputs are added as one
[T, d] term. This is what makes sparse circuits cheap.

Shapes: H query heads, K key/value heads, dh = d_head, Q = T or 1 asked positions.
"""

from __future__ import annotations

import torch

from ..model import StackedWeights, blocks
from ..model.weights import BlockConfig, LayerWeights


def head_subset(lw: LayerWeights, cfg: BlockConfig, heads: torch.Tensor
                ) -> tuple[LayerWeights, BlockConfig]:
    """Layer weights and config restricted to query heads ``heads`` (long [k]):
    W_Q/b_Q columns and W_O rows of those heads, and for each its own copy of its
    key/value head (grouped-query models share one among H/K query heads), so
    the subset is a plain k-head attention. Every head: the layer as it is."""
    if int(heads.numel()) == cfg.n_heads:
        return lw, cfg
    dh = cfg.d_head
    offs = torch.arange(dh, device=heads.device)
    q_cols = (heads[:, None] * dh + offs).reshape(-1)
    kv_heads = heads // (cfg.n_heads // cfg.n_kv_heads)
    k_cols = (kv_heads[:, None] * dh + offs).reshape(-1)
    kv_cols = torch.cat([k_cols, k_cols + cfg.n_kv_heads * dh])  # keys, then values
    sub = lw._replace(W_Q=lw.W_Q[:, q_cols], b_Q=lw.b_Q[q_cols], W_KV=lw.W_KV[:, kv_cols],
                      b_KV=lw.b_KV[kv_cols], W_O=lw.W_O[q_cols])
    k = int(heads.numel())
    return sub, cfg._replace(n_heads=k, n_kv_heads=k)


def attention_update(w: StackedWeights, layer: int, x: torch.Tensor, keep: torch.Tensor,
                     z_mean: torch.Tensor | None, q_pos: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Residual after layer ``layer``'s attention, for circuits keeping heads
    ``keep`` (bool [n, H]); removed heads output ``z_mean`` ([Q, H, dh], at the
    asked positions). x: [n, B, T, d], or [1, B, T, d] when all n circuits start
    from the same state (then z is computed once for all of them); with ``q_pos``
    [B, Q] only those query positions are computed (keys and values use every
    position).

    Returns (residual [n, B, Q, d], z [n, B, Q, k, dh] of the computed heads
    ``keep.any(0)`` before their mean fill, or None when no head is computed).
    ``z_mean`` may be None when every circuit keeps every head."""
    lw, cfg = w.layer(layer), w.config
    resid = x if q_pos is None else blocks.at_positions(x, q_pos)
    Q = resid.shape[2]
    computed = keep.any(0)
    out = lw.b_O.expand(Q, -1)
    absent = (~computed).nonzero()[:, 0]
    if absent.numel():  # heads no circuit keeps: one constant [Q, d] for the whole batch
        assert z_mean is not None
        W_O = lw.W_O.view(cfg.n_heads, cfg.d_head, -1)[absent].reshape(-1, lw.W_O.shape[1])
        out = out + z_mean[:, absent].reshape(Q, -1) @ W_O
    n = keep.shape[0]
    idx = computed.nonzero()[:, 0]
    if not idx.numel():
        return (resid + out).expand(n, -1, -1, -1), None
    sub, sub_cfg = head_subset(lw, cfg, idx)
    z = blocks.attention_z(x, sub, sub_cfg, True, q_pos, w.rotary)  # only the kept heads
    kept = keep[:, idx]
    if bool(kept.all()):
        filled = z
    else:
        assert z_mean is not None
        filled = torch.where(kept[:, None, None, :, None], z, z_mean[:, idx])
    new = resid + (filled.reshape(*filled.shape[:3], -1) @ sub.W_O + out)
    return new.expand(n, -1, -1, -1), z


def mlp_output(w: StackedWeights, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The MLP's output [..., d] (its norm applied) of residual states x [..., d]."""
    return blocks.mlp(x, w.layer(layer), w.config, True)


def mlp_update(w: StackedWeights, layer: int, x: torch.Tensor, keep: torch.Tensor,
               means: torch.Tensor | None) -> torch.Tensor:
    """Residual after the MLP of ``layer`` for circuits that keep it (bool [n]) or
    replace its output by their own mean (``means`` [n, Q, d], read where not
    kept). x: [n, B, Q, d]. The MLP runs on the keeping circuits only."""
    if bool(keep.all()):
        return x + mlp_output(w, layer, x)
    assert means is not None
    out = x + means[:, None]
    sel = keep.nonzero()[:, 0]
    if sel.numel():
        kept = x.index_select(0, sel)
        out[sel] = kept + mlp_output(w, layer, kept)
    return out
