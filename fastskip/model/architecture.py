"""Which TransformerLens configurations the fast path computes exactly.

``architecture_of(cfg)`` names the block math a config needs ('gpt2' or 'llama')
and refuses, by name, every option that would change the forward in a way the
fast path does not implement. Every field of ``HookedTransformerConfig`` is
accounted for below (``tests/model/test_architecture.py`` fails on a field that
is not), so a new TransformerLens option cannot slip through unchecked:

* ``MUST_BE``: options with one supported value;
* ``HANDLED``: options the check or ``stack_weights`` reads (sizes, norm,
  positions, activation, grouped-query heads, rotary tables, the attention scale);
* ``NO_EFFECT``: options that do not change the forward's numbers (names, devices,
  initialisation, hook points, tokenizer settings, checkpoint metadata), or that
  only matter together with a refused option (MoE routing, YaRN/NTK parameters,
  local-attention windows).
"""

from __future__ import annotations

from typing import Any, Literal

from ..errors import UnsupportedModelError

Architecture = Literal["gpt2", "llama"]

GPT2_ACTS = ("gelu_new", "gelu", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu")
SUPPORTED = (
    "GPT-2 style (LayerNorm or LayerNormPre, learned absolute positions, MLP with "
    f"{'/'.join(GPT2_ACTS)}) and Llama style (RMSNorm, rotary, grouped-query attention, "
    "gated SiLU MLP), pre-norm blocks"
)

# (config field, the value that is supported, how to describe the option)
MUST_BE: list[tuple[str, Any, str]] = [
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
    ("rotary_adjacent_pairs", False, "rotary_adjacent_pairs (GPT-J style rotary)"),
    ("attn_scores_soft_cap", -1.0, "attention score soft-capping (attn_scores_soft_cap)"),
    ("output_logits_soft_cap", -1.0, "logit soft-capping (output_logits_soft_cap)"),
]

HANDLED = frozenset({
    "d_model", "d_head", "n_layers", "n_ctx", "n_heads", "d_mlp", "d_vocab", "d_vocab_out",
    "eps", "act_fn", "normalization_type", "final_rms", "uses_rms_norm",
    "positional_embedding_type", "gated_mlp", "n_key_value_heads", "rotary_dim",
    "rotary_base",  # the rotary tables are read from the model's buffers
    "rotary_scaling_factor",  # linear rotary scaling is in those buffers too
    "attn_scale",  # read from the model's attention module
    "original_architecture",  # post-norm and QK-norm architectures are refused by name
})

NO_EFFECT = frozenset({
    "device", "dtype", "n_devices", "model_name", "default_prepend_bos", "tokenizer_name",
    "tokenizer_prepends_bos", "trust_remote_code", "seed", "init_mode", "init_weights",
    "initializer_range", "n_params", "use_hook_mlp_in", "use_hook_tokens",
    "ungroup_grouped_query_attention",  # the same numbers, computed with repeated K/V weights
    "layer_norm_folding", "tie_word_embeddings", "from_checkpoint", "checkpoint_index",
    "checkpoint_label_type", "checkpoint_value", "train_seq_length",  # (log-n attention)
    "experts_per_token", "norm_topk_prob",  # (mixture of experts)
    "window_size", "attn_types", "rotary_base_local",  # (local attention)
    "quantization_method",  # (4-bit weights)
    "relative_attention_max_distance", "relative_attention_num_buckets",  # (positions)
    "decoder_start_token_id",  # encoder-decoder models are not HookedTransformers
    "NTK_by_parts_low_freq_factor", "NTK_by_parts_high_freq_factor", "NTK_by_parts_factor",
    "NTK_original_ctx_len", "yarn_factor", "yarn_attention_factor", "yarn_beta_fast",
    "yarn_beta_slow", "yarn_original_max_position_embeddings", "yarn_truncate",
    "yarn_global_attn_only",
})

# TransformerLens computes these architectures differently from their config flags
POST_NORM = ("Olmo2ForCausalLM", "Olmo3ForCausalLM")  # the norm after each sublayer
QK_NORM = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")  # QK-norm, always


def _refused_architecture(name: object) -> str | None:
    if name in POST_NORM:
        return f"{name}: post-norm blocks (the norm after each sublayer)"
    if name in QK_NORM:
        return f"{name}: QK-norm on the projected queries and keys"
    try:  # a newer TransformerLens may list more post-norm architectures
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
    except ImportError:
        return None
    if name in POST_NORM_ARCHITECTURES:
        return f"{name}: post-norm blocks (the norm after each sublayer)"
    return None


def architecture_of(cfg: Any) -> Architecture:
    """'gpt2' or 'llama' for a supported TransformerLens config; raises
    ``UnsupportedModelError`` that says what is unsupported and what is."""
    problems = []
    for field, ok, what in MUST_BE:
        value = getattr(cfg, field, ok)
        capped = field.endswith("soft_cap") and value is not None and value > 0
        if capped or (not field.endswith("soft_cap") and value != ok):
            problems.append(what)
    if (why := _refused_architecture(getattr(cfg, "original_architecture", None))):
        problems.append(why)
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
        if getattr(cfg, "final_rms", False):
            problems.append("an RMSNorm final norm after LayerNorm blocks (final_rms)")
    elif norm in ("RMS", "RMSPre") and pos == "rotary" and gated:
        arch = "llama"
        if act != "silu":
            problems.append(f"gated activation '{act}' (only silu)")
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
