"""Loading models: the random GPT-2 small, a local Hugging Face folder, and the
normal ``from_pretrained`` path served from a local (offline) hub cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastskip as fs
from fastskip.model.load import gpt2_tokenizer_folder

PROMPTS = ["1 2 3 4", "January February March April"]


def tiny_hf_gpt2(folder: Path) -> torch.nn.Module:
    """A 2-layer random GPT-2 saved as a Hugging Face checkpoint with the real tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_ctx"] = 128  # the hub's gpt2 config.json has it; TransformerLens reads it
    (folder / "config.json").write_text(json.dumps(config))
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(gpt2_tokenizer_folder() / f, folder / f)
    return model


def test_random_gpt2_small_is_seeded_with_random_biases():
    a = fs.model.load.random_gpt2_small(seed=3, n_layers=1)
    b = fs.model.load.random_gpt2_small(seed=3, n_layers=1)
    assert torch.equal(a.blocks[0].mlp.W_in, b.blocks[0].mlp.W_in)
    assert a.blocks[0].attn.b_O.abs().min() > 0 and a.unembed.b_U.std() > 0.05
    assert a.cfg.d_model == 768 and a.cfg.normalization_type == "LNPre"
    assert a.to_str_tokens("1 2 3 4") == ["<|endoftext|>", "1", " 2", " 3", " 4"]


def test_local_folder_matches_huggingface(tmp_path):
    hf = tiny_hf_gpt2(tmp_path / "gpt2-tiny")
    model = fs.load_model(tmp_path / "gpt2-tiny")
    assert model.cfg.n_layers == 2 and model.cfg.normalization_type == "LNPre"  # processed
    tokens = model.to_tokens(PROMPTS)
    with torch.no_grad():
        want = hf(tokens).logits.log_softmax(-1)
        got = fs.Runner(model).logits(["all"], tokens)[0].log_softmax(-1)
    # centring the unembedding shifts logits by a constant per position: compare log-probs
    assert (got - want).abs().max() < 1e-4


def test_unknown_model_name():
    with pytest.raises(fs.FastskipError, match="unknown model 'gpt3'"):
        fs.load_model("gpt3")


@pytest.mark.slow
def test_from_pretrained_path_with_a_local_hub_cache(tmp_path):
    """``load_model("gpt2-small")`` goes through HookedTransformer.from_pretrained;
    here the hub is a local cache folder (HF_HUB_OFFLINE=1) holding a tiny GPT-2."""
    snapshot = tmp_path / "hub" / "models--gpt2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    hf = tiny_hf_gpt2(snapshot)
    (tmp_path / "hub" / "models--gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--gpt2" / "refs" / "main").write_text("0" * 40)
    tokens = torch.tensor([[50256, 16, 362, 513, 604]])
    with torch.no_grad():
        want = hf(tokens).logits.log_softmax(-1)
    torch.save(want, tmp_path / "want.pt")
    code = textwrap.dedent(f"""
        import torch, fastskip as fs
        model = fs.load_model("gpt2-small")
        assert model.cfg.n_layers == 2, model.cfg.n_layers
        assert model.cfg.normalization_type == "LNPre"  # fold_ln as in the notebook
        tokens = torch.tensor([[50256, 16, 362, 513, 604]])
        got = fs.Runner(model).logits(["all"], tokens)[0].log_softmax(-1)
        want = torch.load({json.dumps(str(tmp_path / "want.pt"))})
        print("max error", float((got - want).abs().max()))
        assert (got - want).abs().max() < 1e-4
    """)
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PATH": "/usr/bin:/bin", "FASTSKIP_CACHE": str(tmp_path / "fs-cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "max error" in out.stdout


def test_gpt2_small_without_hub_gives_a_clear_error(tmp_path):
    code = ("import fastskip as fs\n"
            "try:\n    fs.load_model('gpt2-small')\n"
            "except fs.FastskipError as e:\n    print('ERR', e)\n")
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "FASTSKIP_CACHE": str(tmp_path / "fs-cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "ERR could not load gpt2-small" in out.stdout, out.stderr[-2000:]
