"""Which TransformerLens configurations the fast path computes exactly.

``architecture_of(cfg)`` names the block math a config needs ('gpt2' or 'llama')
and refuses, by name, every option that would change the forward in a way the
fast path does not implement.
"""

from __future__ import annotations

from typing import Any, Literal

from ..errors import UnsupportedModelError

Architecture = Literal["gpt2", "llama"]

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


def architecture_of(cfg: Any) -> Architecture:
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
    arch: Architecture = "gpt2"
    if norm in ("LN", "LNPre") and pos == "standard" and not gated:
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
