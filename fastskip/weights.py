"""Stacked weights: a TransformerLens model's parameters copied once into
tensors with a leading layer axis, on the runner's device and dtype.

A forward is then a loop over plain tensors: no hooks, no modules, and no
per-call weight copies (TransformerLens re-copies ``W_U.T`` on every forward).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch

from .errors import UnsupportedModelError

GPT2_ACTS = ("gelu_new", "gelu", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu")
SUPPORTED = (
    "GPT-2 style (LayerNorm or LayerNormPre, learned absolute positions, MLP with "
    f"{'/'.join(GPT2_ACTS)}) and Llama style (RMSNorm, rotary, grouped-query attention, "
    "gated SiLU MLP)"
)

# Options that change the math and that the fast path does not implement:
# (config field, value that is supported, how to describe it)
_MUST_BE = [
    ("parallel_attn_mlp", False, "parallel attention + MLP"),
    ("attn_only", False, "attention-only models"),
    ("use_attn_result", False, "use_attn_result (model.set_use_attn_result(False))"),
    ("use_split_qkv_input", False, "use_split_qkv_input (model.set_use_split_qkv_input(False))"),
    ("use_attn_in", False, "use_attn_in (model.set_use_attn_in(False))"),
    ("use_attn_scale", True, "attention without 1/sqrt(d_head) scaling"),
    ("scale_attn_by_inverse_layer_idx", False, "scale_attn_by_inverse_layer_idx"),
    ("attention_dir", "causal", "bidirectional attention"),
    ("post_embedding_ln", False, "post-embedding LayerNorm"),
    ("use_normalization_before_and_after", False, "normalisation before and after"),
    ("use_qk_norm", False, "QK-norm"),
    ("clip_qkv", None, "clip_qkv"),
    ("use_local_attn", False, "local attention"),
    ("num_experts", None, "mixture of experts"),
    ("load_in_4bit", False, "4-bit weights"),
    ("use_logn_attn", False, "log-n attention"),
    ("use_attention_sinks", False, "attention sinks"),
    ("use_dynamic_ntk_rope", False, "dynamic NTK rotary"),
    ("use_yarn_rope", False, "YaRN rotary"),
    ("use_NTK_by_parts_rope", False, "NTK-by-parts rotary"),
]


def architecture_of(cfg: Any) -> str:
    """'gpt2' or 'llama' for a supported TransformerLens config; raises
    ``UnsupportedModelError`` that says what is unsupported and what is."""
    problems = []
    for field, ok, what in _MUST_BE:
        if getattr(cfg, field, ok) != ok:
            problems.append(what)
    for field in ("attn_scores_soft_cap", "output_logits_soft_cap"):
        cap = getattr(cfg, field, -1.0)
        if cap is not None and cap > 0:
            problems.append(field)
    norm = getattr(cfg, "normalization_type", None)
    pos = getattr(cfg, "positional_embedding_type", None)
    act = getattr(cfg, "act_fn", None)
    gated = bool(getattr(cfg, "gated_mlp", False))
    if norm in ("LN", "LNPre") and pos == "standard" and not gated:
        arch = "gpt2"
        if act not in GPT2_ACTS:
            problems.append(f"activation '{act}'")
        if getattr(cfg, "n_key_value_heads", None) not in (None, cfg.n_heads):
            problems.append("grouped-query attention with LayerNorm")
    elif norm in ("RMS", "RMSPre") and pos == "rotary" and gated:
        arch = "llama"
        if act != "silu":
            problems.append(f"gated activation '{act}' (only silu)")
        if getattr(cfg, "rotary_adjacent_pairs", False):
            problems.append("rotary_adjacent_pairs")
    else:
        arch = "?"
        problems.append(
            f"normalization_type={norm!r}, positional_embedding_type={pos!r}, gated_mlp={gated}"
        )
    if problems:
        name = getattr(cfg, "model_name", "this model")
        raise UnsupportedModelError(
            f"unsupported architecture for {name}: {'; '.join(problems)}. fastskip supports "
            f"{SUPPORTED}."
        )
    return arch


class BlockConfig(NamedTuple):
    """The static numbers of a block (the same for every layer)."""

    n_heads: int
    n_kv_heads: int
    d_head: int
    norm: str  # "LN", "LNPre", "RMS", "RMSPre"
    eps: float
    act_fn: str
    attn_scale: float
    rotary_dim: int  # 0 = learned absolute positions


class LayerWeights(NamedTuple):
    """One layer's slice of ``StackedWeights`` (views, no copies)."""

    W_Q: torch.Tensor
    b_Q: torch.Tensor
    W_KV: torch.Tensor
    b_KV: torch.Tensor
    W_O: torch.Tensor
    b_O: torch.Tensor
    W_in: torch.Tensor
    b_in: torch.Tensor
    W_gate: torch.Tensor | None
    W_out: torch.Tensor
    b_out: torch.Tensor
    ln1_w: torch.Tensor | None
    ln1_b: torch.Tensor | None
    ln2_w: torch.Tensor | None
    ln2_b: torch.Tensor | None
    rotary_cos: torch.Tensor | None
    rotary_sin: torch.Tensor | None


@dataclass
class StackedWeights:
    """Per-layer weights stacked along a leading layer axis.

    Shapes (L layers, H query heads, K key/value heads, dh = d_head):
    W_Q [L, d, H*dh], b_Q [L, H*dh], W_KV [L, d, 2*K*dh], b_KV [L, 2*K*dh],
    W_O [L, H*dh, d], b_O [L, d], W_in [L, d, F], b_in [L, F], W_gate [L, d, F]
    (gated MLPs), W_out [L, F, d], b_out [L, d], ln*_w/ln*_b [L, d] for models
    whose norms keep weights, W_U [d, V], b_U [V].
    """

    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_mlp: int
    d_vocab: int
    d_vocab_out: int
    n_ctx: int
    eps: float
    norm: str  # "LN", "LNPre", "RMS", "RMSPre"
    act_fn: str
    attn_scale: float
    W_E: torch.Tensor
    W_pos: torch.Tensor | None
    W_Q: torch.Tensor
    b_Q: torch.Tensor
    W_KV: torch.Tensor
    b_KV: torch.Tensor
    W_O: torch.Tensor
    b_O: torch.Tensor
    W_in: torch.Tensor
    b_in: torch.Tensor
    W_gate: torch.Tensor | None
    W_out: torch.Tensor
    b_out: torch.Tensor
    ln1_w: torch.Tensor | None
    ln1_b: torch.Tensor | None
    ln2_w: torch.Tensor | None
    ln2_b: torch.Tensor | None
    lnf_w: torch.Tensor | None
    lnf_b: torch.Tensor | None
    W_U: torch.Tensor
    b_U: torch.Tensor
    rotary_cos: torch.Tensor | None = None  # [n_ctx, rotary_dim]
    rotary_sin: torch.Tensor | None = None
    rotary_dim: int = 0

    @property
    def config(self) -> BlockConfig:
        return BlockConfig(self.n_heads, self.n_kv_heads, self.d_head, self.norm, self.eps,
                           self.act_fn, self.attn_scale, self.rotary_dim)

    def layer(self, L: int) -> LayerWeights:
        """Views of layer ``L``'s weights."""
        at = lambda t: None if t is None else t[L]  # noqa: E731
        return LayerWeights(
            self.W_Q[L], self.b_Q[L], self.W_KV[L], self.b_KV[L], self.W_O[L], self.b_O[L],
            self.W_in[L], self.b_in[L], at(self.W_gate), self.W_out[L], self.b_out[L],
            at(self.ln1_w), at(self.ln1_b), at(self.ln2_w), at(self.ln2_b),
            self.rotary_cos, self.rotary_sin,
        )

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_E.dtype

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in fields(self)
                   if isinstance(t := getattr(self, f.name), torch.Tensor))

    def flops_per_token(self) -> dict[str, int]:
        """Multiply-add FLOPs (x2) per token of one attention, one MLP, one unembed."""
        d, hd, kd = self.d_model, self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        mlp_mats = 3 if self.W_gate is not None else 2
        return {
            "attn": 2 * d * (2 * hd + 2 * kd),
            "mlp": 2 * d * self.d_mlp * mlp_mats,
            "unembed": 2 * d * self.d_vocab_out,
        }


def _param(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name in sd:
        return sd[name]
    raise UnsupportedModelError(f"the model has no parameter '{name}' (unexpected layout)")


def stack_weights(model: Any, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> StackedWeights:
    """Copy a HookedTransformer's weights into a ``StackedWeights``."""
    cfg = model.cfg
    arch = architecture_of(cfg)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    L, H, dh, d = cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model
    K = cfg.n_key_value_heads if getattr(cfg, "n_key_value_heads", None) else H
    device = torch.device(device) if device is not None else sd["embed.W_E"].device
    dtype = dtype or sd["embed.W_E"].dtype

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    def stack(fmt: str) -> list[torch.Tensor]:
        return [_param(sd, fmt.format(i)) for i in range(L)]

    def kv_name(i: int, which: str, kind: str) -> str:
        plain = f"blocks.{i}.attn.{kind}_{which}"
        return plain if plain in sd else f"blocks.{i}.attn._{kind}_{which}"

    heads_to_cols = lambda w: w.permute(1, 0, 2).reshape(d, -1)  # noqa: E731  [h,d,dh]->[d,h*dh]
    W_Q = torch.stack([heads_to_cols(w) for w in stack("blocks.{}.attn.W_Q")])
    b_Q = torch.stack([b.reshape(-1) for b in stack("blocks.{}.attn.b_Q")])
    W_K = [heads_to_cols(_param(sd, kv_name(i, "K", "W"))) for i in range(L)]
    W_V = [heads_to_cols(_param(sd, kv_name(i, "V", "W"))) for i in range(L)]
    b_K = [_param(sd, kv_name(i, "K", "b")).reshape(-1) for i in range(L)]
    b_V = [_param(sd, kv_name(i, "V", "b")).reshape(-1) for i in range(L)]
    W_KV = torch.stack([torch.cat([k, v], dim=1) for k, v in zip(W_K, W_V, strict=True)])
    b_KV = torch.stack([torch.cat([k, v]) for k, v in zip(b_K, b_V, strict=True)])
    W_O = torch.stack([w.reshape(H * dh, d) for w in stack("blocks.{}.attn.W_O")])
    b_O = torch.stack(stack("blocks.{}.attn.b_O"))

    def maybe(fmt: str) -> torch.Tensor | None:
        names = [fmt.format(i) for i in range(L)]
        return put(torch.stack([sd[n] for n in names])) if names[0] in sd else None

    zeros_b = lambda n: torch.zeros(L, n)  # noqa: E731
    b_in = maybe("blocks.{}.mlp.b_in")
    b_out = maybe("blocks.{}.mlp.b_out")
    rot_cos = rot_sin = None
    rotary_dim = 0
    if arch == "llama":
        attn0 = model.blocks[0].attn
        rotary_dim = int(cfg.rotary_dim)
        rot_cos, rot_sin = put(attn0.rotary_cos), put(attn0.rotary_sin)
    w_pos = sd.get("pos_embed.W_pos")
    return StackedWeights(
        arch=arch, n_layers=L, n_heads=H, n_kv_heads=K, d_head=dh, d_model=d,
        d_mlp=cfg.d_mlp, d_vocab=cfg.d_vocab, d_vocab_out=cfg.d_vocab_out,
        n_ctx=cfg.n_ctx, eps=float(cfg.eps), norm=cfg.normalization_type, act_fn=cfg.act_fn,
        attn_scale=float(model.blocks[0].attn.attn_scale),
        W_E=put(sd["embed.W_E"]), W_pos=put(w_pos) if w_pos is not None else None,
        W_Q=put(W_Q), b_Q=put(b_Q), W_KV=put(W_KV), b_KV=put(b_KV), W_O=put(W_O),
        b_O=put(b_O),
        W_in=put(torch.stack(stack("blocks.{}.mlp.W_in"))),
        b_in=b_in if b_in is not None else put(zeros_b(cfg.d_mlp)),
        W_gate=maybe("blocks.{}.mlp.W_gate"),
        W_out=put(torch.stack(stack("blocks.{}.mlp.W_out"))),
        b_out=b_out if b_out is not None else put(zeros_b(d)),
        ln1_w=maybe("blocks.{}.ln1.w"), ln1_b=maybe("blocks.{}.ln1.b"),
        ln2_w=maybe("blocks.{}.ln2.w"), ln2_b=maybe("blocks.{}.ln2.b"),
        lnf_w=put(sd["ln_final.w"]) if "ln_final.w" in sd else None,
        lnf_b=put(sd["ln_final.b"]) if "ln_final.b" in sd else None,
        W_U=put(sd["unembed.W_U"]),
        b_U=put(sd["unembed.b_U"]) if "unembed.b_U" in sd else put(torch.zeros(cfg.d_vocab_out)),
        rotary_cos=rot_cos, rotary_sin=rot_sin, rotary_dim=rotary_dim,
    )
