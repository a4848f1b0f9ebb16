"""Attention one head at a time, each head's query, key and value read from
inputs of their own (edge plans give every head input its own residual
stream), over stacked weights.

Shapes: n states of B prompts and T positions, d = d_model, dh = d_head. The
formulas are those of ``blocks.attention_z`` (TransformerLens's), split by head:
query head h uses columns ``h*dh:(h+1)*dh`` of W_Q and rows of W_O, and reads
the keys and values of key/value head ``h // (H / K)``.
"""

from __future__ import annotations

import torch

from .blocks import NEG_INF, normalize, rotate
from .weights import BlockConfig, LayerWeights, Rotary


def attention_norm(x: torch.Tensor, lw: LayerWeights, cfg: BlockConfig) -> torch.Tensor:
    """The norm before attention (``ln1``) on receiver inputs x [n, B, T, d]."""
    return normalize(x, lw.ln1_w, lw.ln1_b, cfg, True)


def query(xn: torch.Tensor, lw: LayerWeights, cfg: BlockConfig, head: int,
          rotary: Rotary | None) -> torch.Tensor:
    """Queries [n, B, T, dh] of query head ``head`` from normed inputs xn [n, B, T, d]."""
    cols = slice(head * cfg.d_head, (head + 1) * cfg.d_head)
    return _rotated(xn @ lw.W_Q[:, cols] + lw.b_Q[cols], cfg, rotary)


def key(xn: torch.Tensor, lw: LayerWeights, cfg: BlockConfig, kv_head: int,
        rotary: Rotary | None) -> torch.Tensor:
    """Keys [n, B, T, dh] of key/value head ``kv_head`` (W_KV holds keys, then values)."""
    cols = slice(kv_head * cfg.d_head, (kv_head + 1) * cfg.d_head)
    return _rotated(xn @ lw.W_KV[:, cols] + lw.b_KV[cols], cfg, rotary)


def value(xn: torch.Tensor, lw: LayerWeights, cfg: BlockConfig, kv_head: int) -> torch.Tensor:
    """Values [n, B, T, dh] of key/value head ``kv_head``."""
    start = (cfg.n_kv_heads + kv_head) * cfg.d_head
    cols = slice(start, start + cfg.d_head)
    return xn @ lw.W_KV[:, cols] + lw.b_KV[cols]


def _rotated(x: torch.Tensor, cfg: BlockConfig, rotary: Rotary | None) -> torch.Tensor:
    """Rotary positions 0..T-1 on one head's queries or keys [n, B, T, dh]."""
    if rotary is None:
        return x
    T = x.shape[2]
    cos, sin = rotary.cos[:T, None, :], rotary.sin[:T, None, :]  # [T, 1, r]
    return rotate(x[..., None, :], cos, sin, cfg.rotary_dim)[..., 0, :]


def attention_z(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: BlockConfig
                ) -> torch.Tensor:
    """Causal attention of queries, keys and values [n, B, T, dh] (each row its
    own head): z [n, B, T, dh]."""
    T = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) / cfg.attn_scale  # [n, B, T, T]
    pos = torch.arange(T, device=q.device)
    allowed = pos[None, :] <= pos[:, None]
    pattern = torch.softmax(scores.masked_fill(~allowed, NEG_INF), dim=-1)
    return pattern @ v


def w_o_rows(lw: LayerWeights, cfg: BlockConfig, head: int) -> torch.Tensor:
    """Query head ``head``'s rows of W_O [dh, d]: its output (no b_O) is z @ them."""
    return lw.W_O[head * cfg.d_head:(head + 1) * cfg.d_head]


def head_outputs_of_z(z: torch.Tensor, lw: LayerWeights, cfg: BlockConfig) -> torch.Tensor:
    """Every head's output through W_O (no b_O) from z [..., H, dh]: [H, ..., d]."""
    W_O = lw.W_O.view(cfg.n_heads, cfg.d_head, -1)  # [H, dh, d]
    zh = z.movedim(-2, 0)  # [H, ..., dh]
    flat = zh.reshape(cfg.n_heads, -1, cfg.d_head)
    return torch.bmm(flat, W_O).view(*zh.shape[:-1], W_O.shape[-1])
