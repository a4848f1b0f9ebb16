"""The architecture check: every TransformerLens config option is accounted for, and
every one that changes the forward in a way the fast path does not compute is refused
by name."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest

import fastskip as fs
from fastskip.model.architecture import HANDLED, MUST_BE, NO_EFFECT, architecture_of
from helpers import small_llama, small_model

BAD_VALUE = {None: 1.0, False: True, True: False, "causal": "bidirectional", -1.0: 30.0}


def test_every_config_field_is_accounted_for():
    """A new TransformerLens option must be classified before it can pass the check."""
    from transformer_lens import HookedTransformerConfig

    fields = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    known = {name for name, _, _ in MUST_BE} | HANDLED | NO_EFFECT
    assert fields - known == set(), f"unclassified config fields: {sorted(fields - known)}"
    assert not (HANDLED & NO_EFFECT)


@pytest.mark.parametrize("field,ok,what", MUST_BE, ids=[m[0] for m in MUST_BE])
def test_each_refused_option_is_named(field, ok, what):
    cfg = copy.copy(small_model().cfg)
    setattr(cfg, field, BAD_VALUE[ok] if field != "clip_qkv" else 8.0)
    with pytest.raises(fs.UnsupportedModelError, match="unsupported architecture") as err:
        architecture_of(cfg)
    assert what.split(" (")[0] in str(err.value)


def olmo2_style(use_qk_norm: bool = False):
    """A small Llama-shaped model that TransformerLens computes as OLMo 2 (post-norm)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=32, d_vocab=97,
        act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=8, gated_mlp=True, final_rms=True, use_qk_norm=use_qk_norm,
        original_architecture="Olmo2ForCausalLM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HookedTransformer(cfg)


def test_post_norm_architecture_is_refused():
    """Fixed (issue 12, item 4): an OLMo-2-style config (post-norm, use_qk_norm=False)
    was accepted and its logits differed from TransformerLens by 1.76."""
    with pytest.raises(fs.UnsupportedModelError, match="Olmo2ForCausalLM: post-norm"):
        fs.Runner(olmo2_style())


def test_rms_final_norm_after_layernorm_blocks_is_refused():
    model = small_model(seed=3)
    model.cfg.final_rms = True
    with pytest.raises(fs.UnsupportedModelError, match="final_rms"):
        fs.Runner(model)


def test_supported_models_pass():
    assert architecture_of(small_model().cfg) == "gpt2"
    assert architecture_of(small_model(normalization_type="LN").cfg) == "gpt2"
    assert architecture_of(small_llama().cfg) == "llama"
    assert architecture_of(small_llama(normalization_type="RMS").cfg) == "llama"
