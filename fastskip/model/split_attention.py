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

from .blocks import NEG_INF, mlp_hidden, mlp_out, normalize, rotate
from .weights import BlockConfig, LayerWeights, Rotary


def receiver_norm(x: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                  cfg: BlockConfig) -> torch.Tensor:
    """A receiver's norm on its inputs x [n, B, T, d]: ``blocks.normalize`` (edge
    plans normalise every head's q, k and v input separately, so the norm runs on
    tens of inputs per plan where node plans run it on one)."""
    return normalize(x, scale, bias, cfg, True)


def attention_norm(x: torch.Tensor, lw: LayerWeights, cfg: BlockConfig) -> torch.Tensor:
    """The norm before attention (``ln1``) on receiver inputs x [n, B, T, d]."""
    return receiver_norm(x, lw.ln1_w, lw.ln1_b, cfg)


def mlp(x: torch.Tensor, lw: LayerWeights, cfg: BlockConfig) -> torch.Tensor:
    """The MLP's output [n, B, T, d] from its receiver inputs x: ``blocks.mlp`` with
    the norm and GELU-tanh (gelu_new) as fused kernels (one pass each instead of
    eight over the hidden activations)."""
    xn = receiver_norm(x, lw.ln2_w, lw.ln2_b, cfg)
    if lw.W_gate is None and cfg.act_fn in ("gelu_new", "gelu_pytorch_tanh"):
        hidden = torch.nn.functional.gelu(xn @ lw.W_in + lw.b_in, approximate="tanh")
    else:
        hidden = mlp_hidden(xn, lw._replace(ln2_w=None, ln2_b=None), cfg, False)
    return mlp_out(hidden, lw)


def head_weights(lw: LayerWeights, cfg: BlockConfig, kind: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head projection weights [heads, d, dh] and biases [heads, dh] of
    ``kind`` "q" (query heads), "k" or "v" (key/value heads; W_KV holds keys, then
    values), head-major so that one batched product serves every head."""
    d, dh = lw.W_Q.shape[0], cfg.d_head  # (copied contiguous: 3 d^2 numbers per layer)
    if kind == "q":
        W, b, n = lw.W_Q, lw.b_Q, cfg.n_heads
    else:
        K = cfg.n_kv_heads
        half = slice(0, K * dh) if kind == "k" else slice(K * dh, 2 * K * dh)
        W, b, n = lw.W_KV[:, half], lw.b_KV[half], K
    return W.reshape(d, n, dh).permute(1, 0, 2).contiguous(), b.reshape(n, dh)


def w_o_heads(lw: LayerWeights, cfg: BlockConfig) -> torch.Tensor:
    """W_O split by query head: [H, dh, d] (a head's output, without b_O, is z @ it)."""
    return lw.W_O.view(cfg.n_heads, cfg.d_head, -1)


def rotated(x: torch.Tensor, cfg: BlockConfig, rotary: Rotary | None) -> torch.Tensor:
    """Rotary positions 0..T-1 on queries or keys [n, B, T, dh] (None: unchanged)."""
    return _rotated(x, cfg, rotary)


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


def head_outputs_of_z(z: torch.Tensor, lw: LayerWeights, cfg: BlockConfig) -> torch.Tensor:
    """Every head's output through W_O (no b_O) from z [..., H, dh]: [H, ..., d]."""
    W_O = lw.W_O.view(cfg.n_heads, cfg.d_head, -1)  # [H, dh, d]
    zh = z.movedim(-2, 0)  # [H, ..., dh]
    flat = zh.reshape(cfg.n_heads, -1, cfg.d_head)
    return torch.bmm(flat, W_O).view(*zh.shape[:-1], W_O.shape[-1])
