"""Block math over stacked weights: normalisation, attention, MLP, unembedding.

Pure functions of tensors with a node axis in front (``x: [n, B, T, d]`` = n
residual-stream states of B prompts), written for ``torch.compile``: weights
come in as a ``LayerWeights`` tuple and the static numbers as a ``BlockConfig``
(identical for every layer, so one compiled graph serves all layers), flags are
Python bools that select a static graph, and the formulas are TransformerLens's.

Shapes: d = d_model, H query heads, K key/value heads, dh = d_head, F = d_mlp,
V = d_vocab_out; T positions of the prompts, Q asked positions (Q <= T).
"""

from __future__ import annotations

import torch

from .weights import BlockConfig, LayerWeights, Rotary, StackedWeights

NEG_INF = float("-inf")


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """The MLP nonlinearity, with TransformerLens's formulas."""
    if name in ("gelu_new", "gelu_pytorch_tanh"):  # the same formula, in one pass
        return torch.nn.functional.gelu(x, approximate="tanh")
    if name == "gelu_fast":
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "relu":
        return torch.relu(x)
    if name == "silu":
        return torch.nn.functional.silu(x)
    raise ValueError(f"unknown activation {name}")


def _normalized(x: torch.Tensor, cfg: BlockConfig) -> torch.Tensor:
    """TransformerLens's LayerNormPre ((x - mean) / sqrt(var + eps), biased var) as one
    fused torch op; RMSNormPre (x / sqrt(mean(x^2) + eps)) in TransformerLens's own op
    order, as are rotary and the gated product below: with fused versions of the three
    (F.rms_norm, addcmul) fastskip's fp32 logits on SmolLM2 were 2-3x further from
    float64 than TransformerLens's on some of 300 random plans
    (tests/model/test_llama.py::test_smollm2_300_random_plans_of_every_kind).
    bf16/fp16 in fp32, fp32/fp64 as they are."""
    h = x.float() if x.element_size() < 4 else x
    if cfg.norm in ("LN", "LNPre"):
        return torch.nn.functional.layer_norm(h, (h.shape[-1],), eps=cfg.eps).to(x.dtype)
    return (h / (h.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()).to(x.dtype)


def normalize(x: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
              cfg: BlockConfig, apply: bool | torch.Tensor) -> torch.Tensor:
    """The norm before a component. ``apply=False`` is ``/noln``: the
    normalisation is skipped; weights TransformerLens applies after it (unfolded
    LN/RMS) still apply. ``apply`` may be a 0-d bool tensor: the flag as data, so
    that one compiled graph serves both (the norm is computed and selected away)."""
    if isinstance(apply, torch.Tensor):
        h = torch.where(apply, _normalized(x, cfg), x)
    elif apply:
        h = _normalized(x, cfg)
    else:
        h = x
    if scale is not None:
        h = h * scale
    if bias is not None:
        h = h + bias
    return h


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int
           ) -> torch.Tensor:
    """Rotary embedding (GPT-NeoX/Llama half-split layout) on the first
    ``rotary_dim`` features. x: [..., T, heads, dh]; cos/sin: [..., T, 1, rotary_dim]."""
    xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    flipped = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    out = xr * cos + flipped * sin  # TransformerLens's op order (its rounding)
    return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out


def attention_z(x: torch.Tensor, lw: LayerWeights, cfg: BlockConfig,
                apply_ln: bool | torch.Tensor, q_pos: torch.Tensor | None = None,
                rotary: Rotary | None = None) -> torch.Tensor:
    """Per-head attention outputs z from residual states x [n, B, T, d] (the
    norm before attention is applied here). ``q_pos`` [B, Q] restricts the
    queries to those positions (keys and values use every position); returns
    z [n, B, Q, H, dh] (Q = T when q_pos is None). ``rotary``: the tables of
    models with rotary positions."""
    x = normalize(x, lw.ln1_w, lw.ln1_b, cfg, apply_ln)
    n, B, T, d = x.shape
    H, K, dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    xq = x if q_pos is None else at_positions(x, q_pos)
    Q = xq.shape[2]
    q = affine(xq, lw.W_Q, lw.b_Q).view(n, B, Q, H, dh)
    kv = affine(x, lw.W_KV, lw.b_KV).view(n, B, T, 2, K, dh)
    k, v = kv[:, :, :, 0], kv[:, :, :, 1]
    if rotary is not None:
        pos_q = torch.arange(T, device=x.device) if q_pos is None else q_pos
        cos_q, sin_q = rotary.cos[pos_q], rotary.sin[pos_q]  # [(B,) Q, r]
        q = rotate(q, cos_q[..., None, :], sin_q[..., None, :], cfg.rotary_dim)
        k = rotate(k, rotary.cos[:T, None, :], rotary.sin[:T, None, :], cfg.rotary_dim)
    # grouped-query attention without copying keys and values: the G = H/K query heads
    # of each key/value head are one [G*Q] batch of queries against it (head = k*G + g)
    G = H // K
    q = q.view(n, B, Q, K, G, dh).permute(0, 1, 3, 4, 2, 5).reshape(n, B, K, G * Q, dh)
    k = k.permute(0, 1, 3, 4, 2)  # [n, B, K, dh, T]
    v = v.permute(0, 1, 3, 2, 4)  # [n, B, K, T, dh]
    scores = ((q @ k) / cfg.attn_scale).view(n, B, K, G, Q, T)
    keys = torch.arange(T, device=x.device)
    if q_pos is None:
        allowed = (keys[None, :] <= keys[:, None])[None, None, None, None]  # [1, 1, 1, 1, T, T]
    else:  # [1, B, 1, 1, Q, T]
        allowed = (keys[None, None, :] <= q_pos[:, :, None])[None, :, None, None]
    pattern = torch.softmax(scores.masked_fill(~allowed, NEG_INF), dim=-1)
    z = pattern.view(n, B, K, G * Q, T) @ v  # [n, B, K, G*Q, dh]
    return z.view(n, B, K, G, Q, dh).permute(0, 1, 4, 2, 3, 5).reshape(n, B, Q, H, dh)


def where_kept(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` where ``keep`` (bool, or nonzero numbers; broadcast against x), else exactly 0.

    A select, not ``x * keep``: a switched-off component whose output is inf or NaN
    contributes 0, not NaN (inf x 0 = NaN x 0 = NaN)."""
    if keep.dtype != torch.bool:
        keep = keep != 0
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def attention_out(z: torch.Tensor, lw: LayerWeights, head_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Attention output from z [n, B, Q, H, dh]; ``head_mask`` [n, H] keeps heads
    per node (the output bias b_O is always added). Removed heads contribute
    exactly zero, like TransformerLens's hook_z set to zero, even where their z
    is inf or NaN."""
    if head_mask is not None:
        z = where_kept(head_mask[:, None, None, :, None], z)
    return affine(z.reshape(*z.shape[:3], -1), lw.W_O, lw.b_O)


def mlp_hidden(x: torch.Tensor, lw: LayerWeights, cfg: BlockConfig,
               apply_ln: bool | torch.Tensor) -> torch.Tensor:
    """The MLP's hidden activations [..., F] from residual states x [..., d] (its
    norm applied here): act(x W_in + b_in), or act(x W_gate) * (x W_in) + b_in
    for gated MLPs (TransformerLens' GatedMLP adds b_in after the product). (The
    first half the fused kernels replace.)"""
    x = normalize(x, lw.ln2_w, lw.ln2_b, cfg, apply_ln)
    if lw.W_gate is not None:
        return activation(x @ lw.W_gate, cfg.act_fn) * (x @ lw.W_in) + lw.b_in
    return activation(affine(x, lw.W_in, lw.b_in), cfg.act_fn)


def affine(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [..., k] @ W [k, m] + b [m], the bias added inside the product (one pass)."""
    return torch.addmm(b, x.reshape(-1, x.shape[-1]), W).view(*x.shape[:-1], W.shape[-1])


def mlp_out(hidden: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
    """The MLP's output [..., d] from its hidden activations [..., F]."""
    return affine(hidden, lw.W_out, lw.b_out)


def mlp(x: torch.Tensor, lw: LayerWeights, cfg: BlockConfig, apply_ln: bool | torch.Tensor
        ) -> torch.Tensor:
    """MLP output [..., d] of residual states x [..., d] (its norm applied here)."""
    return mlp_out(mlp_hidden(x, lw, cfg, apply_ln), lw)


def at_positions(x: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """x [n, B, T, d] at positions q_pos [B, Q] -> [n, B, Q, d]."""
    n, B, _, d = x.shape
    return torch.gather(x, 2, q_pos[None, :, :, None].expand(n, B, q_pos.shape[1], d))


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


def unembed(x: torch.Tensor, w: StackedWeights, out: torch.Tensor | None = None
            ) -> torch.Tensor:
    """Final norm and unembedding: logits [..., d_vocab_out] (written into ``out``,
    [rows, d_vocab_out], where given)."""
    h = normalize(x, w.lnf_w, w.lnf_b, w.config, True)
    flat = torch.addmm(w.b_U, h.reshape(-1, h.shape[-1]), w.W_U, out=out)  # bias in the GEMM
    return flat.view(*h.shape[:-1], flat.shape[-1])


@torch.no_grad()
def full_forward(w: StackedWeights, tokens: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full model on tokens [R, T], keeping every component's output: attention
    outputs [L, R, T, d], per-head z [L, R, T, H, dh] and MLP outputs [L, R, T, d]."""
    x = embed(tokens, w)[None]  # one state of R rows
    attn, zs, mlps = [], [], []
    for layer in range(w.n_layers):
        lw = w.layer(layer)
        z = attention_z(x, lw, w.config, True, rotary=w.rotary)
        out = attention_out(z, lw)
        x = x + out
        m = mlp(x, lw, w.config, True)
        x = x + m
        attn.append(out[0])
        zs.append(z[0])
        mlps.append(m[0])
    return torch.stack(attn), torch.stack(zs), torch.stack(mlps)
