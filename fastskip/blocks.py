"""Block math over stacked weights: normalisation, attention, MLP, unembedding.

Pure functions of tensors with a node axis in front (``x: [n, B, T, d]`` = n
residual-stream states of B prompts), written for ``torch.compile``: no hooks,
no data-dependent Python branches (the flags are Python bools that select a
static graph), the same formulas TransformerLens uses.
"""

from __future__ import annotations

import math

import torch

from .weights import StackedWeights

NEG_INF = float("-inf")


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """The MLP nonlinearity, with TransformerLens's formulas."""
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    if name == "gelu_fast":
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "relu":
        return torch.relu(x)
    if name == "silu":
        return torch.nn.functional.silu(x)
    raise ValueError(f"unknown activation {name}")


def normalize(x: torch.Tensor, w: StackedWeights, layer: int | None, which: str,
              apply: bool) -> torch.Tensor:
    """The norm before a component (``which`` = "ln1", "ln2" or "lnf").

    ``apply=False`` is ``/noln``: the normalisation is skipped, weights that
    TransformerLens keeps after it (unfolded LN/RMS) still apply.
    """
    if apply:
        h = x.float()
        if w.norm in ("LN", "LNPre"):
            h = h - h.mean(-1, keepdim=True)
        h = h / (h.pow(2).mean(-1, keepdim=True) + w.eps).sqrt()
        h = h.to(x.dtype)
    else:
        h = x
    scale = getattr(w, f"{which}_w")
    bias = getattr(w, f"{which}_b")
    if scale is not None:
        h = h * (scale if layer is None else scale[layer])
    if bias is not None:
        h = h + (bias if layer is None else bias[layer])
    return h


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int
           ) -> torch.Tensor:
    """Rotary embedding (GPT-NeoX/Llama half-split layout) on the first
    ``rotary_dim`` features. x: [..., T, heads, dh]; cos/sin: [..., T, 1, rotary_dim]."""
    xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    flipped = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    out = xr * cos + flipped * sin
    return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out


def attention_z(x: torch.Tensor, w: StackedWeights, layer: int,
                q_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head attention outputs z of normalised inputs.

    x: [n, B, T, d]. ``q_pos`` [B, Q] restricts the queries to those positions
    (keys/values still use every position); returns z [n, B, Q, H, dh]
    (Q = T when q_pos is None).
    """
    n, B, T, _ = x.shape
    H, K, dh = w.n_heads, w.n_kv_heads, w.d_head
    if q_pos is None:
        xq = x
    else:
        idx = q_pos[None, :, :, None].expand(n, B, q_pos.shape[1], x.shape[-1])
        xq = torch.gather(x, 2, idx)
    Q = xq.shape[2]
    q = (xq @ w.W_Q[layer] + w.b_Q[layer]).view(n, B, Q, H, dh)
    kv = (x @ w.W_KV[layer] + w.b_KV[layer]).view(n, B, T, 2, K, dh)
    k, v = kv[:, :, :, 0], kv[:, :, :, 1]
    if w.rotary_cos is not None:
        pos_q = torch.arange(T, device=x.device) if q_pos is None else q_pos
        cos_q, sin_q = w.rotary_cos[pos_q], w.rotary_sin[pos_q]  # [(B,) Q, r]
        q = rotate(q, cos_q[..., None, :], sin_q[..., None, :], w.rotary_dim)
        k = rotate(k, w.rotary_cos[:T, None, :], w.rotary_sin[:T, None, :], w.rotary_dim)
    if K != H:  # grouped-query attention: each key/value head serves H/K query heads
        k = k.repeat_interleave(H // K, dim=3)
        v = v.repeat_interleave(H // K, dim=3)
    q = q.permute(0, 1, 3, 2, 4)  # [n, B, H, Q, dh]
    k = k.permute(0, 1, 3, 4, 2)  # [n, B, H, dh, T]
    v = v.permute(0, 1, 3, 2, 4)  # [n, B, H, T, dh]
    scores = (q @ k) / w.attn_scale  # [n, B, H, Q, T]
    keys = torch.arange(T, device=x.device)
    if q_pos is None:
        allowed = keys[None, :] <= keys[:, None]  # [Q, T]
        allowed = allowed[None, None, None]
    else:
        allowed = (keys[None, None, :] <= q_pos[:, :, None])[None, :, None]  # [1, B, 1, Q, T]
    scores = scores.masked_fill(~allowed, NEG_INF)
    pattern = torch.softmax(scores, dim=-1)
    z = pattern @ v  # [n, B, H, Q, dh]
    return z.permute(0, 1, 3, 2, 4)  # [n, B, Q, H, dh]


def attention_out(z: torch.Tensor, w: StackedWeights, layer: int,
                  head_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention output from z [n, B, Q, H, dh]; ``head_mask`` [n, H] keeps heads
    per node (the output bias b_O is always added)."""
    if head_mask is not None:
        z = z * head_mask[:, None, None, :, None].to(z.dtype)
    flat = z.reshape(*z.shape[:3], -1)
    return flat @ w.W_O[layer] + w.b_O[layer]


def mlp(x: torch.Tensor, w: StackedWeights, layer: int) -> torch.Tensor:
    """MLP output of normalised inputs x [..., d]."""
    pre = x @ w.W_in[layer] + w.b_in[layer]
    if w.W_gate is not None:
        hidden = activation(x @ w.W_gate[layer], w.act_fn) * pre
    else:
        hidden = activation(pre, w.act_fn)
    return hidden @ w.W_out[layer] + w.b_out[layer]


def embed(tokens: torch.Tensor, w: StackedWeights, positions: torch.Tensor | None = None
          ) -> torch.Tensor:
    """Token (+ learned position) embeddings: [B, T, d]; ``positions`` [B, Q]
    selects positions (for plans without any attention)."""
    if positions is not None:
        tokens = torch.gather(tokens, 1, positions)
    x = w.W_E[tokens]
    if w.W_pos is not None:
        pos = torch.arange(tokens.shape[1], device=tokens.device) if positions is None \
            else positions
        x = x + w.W_pos[pos]
    return x


def unembed(x: torch.Tensor, w: StackedWeights) -> torch.Tensor:
    """Final norm and unembedding: logits [..., d_vocab_out]."""
    return normalize(x, w, None, "lnf", True) @ w.W_U + w.b_U
