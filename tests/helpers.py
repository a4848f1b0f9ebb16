"""Test helpers: the notebook's prompts and small random models."""

from __future__ import annotations

import torch

from fastskip.model.load import random_gpt2_small

CUDA = torch.cuda.is_available()
# Where tests run the Triton kernels: on the GPU where there is one (Triton compiled), else
# on CPU tensors in Triton's interpreter (tests/conftest.py turns it on without a GPU).
KERNEL_DEVICE = "cuda" if CUDA else "cpu"

PROMPTS = ["1 2 3 4", "January February March April", "one two three four",
           "Sunday Monday Tuesday Wednesday", "A B C D", "5 6 7 8"]
ANSWERS = [" 5", " May", " five", " Thursday", " E", " 9"]
# the vocabulary metrics always eager: by default a process compiles them after 4,096
# rows (fastskip.run.vocab_reductions) and its later tables round differently in fp32
EAGER_METRICS = {"FASTSKIP_COMPILE_METRICS": "0"}


def small_model(seed: int = 0, normalization_type: str = "LNPre", **overrides):
    """A 3-layer, 4-head, d_model 64 GPT-2-style model with the GPT-2 tokenizer."""
    cfg = dict(n_layers=3, d_model=64, d_head=16, n_heads=4, d_mlp=256, n_ctx=64,
               normalization_type=normalization_type)
    cfg.update(overrides)
    model = random_gpt2_small(seed=seed, **cfg)
    if normalization_type == "LN":  # give the LayerNorm weights non-trivial values
        gen = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".w") and "ln" in name:
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
                elif name.endswith(".b") and "ln" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def small_llama(seed: int = 0, normalization_type: str = "RMSPre", **overrides):
    """A 3-layer Llama-style model (RMSNorm, rotary, 4 query heads sharing 2
    key/value heads, gated SiLU MLP) with the GPT-2 tokenizer, random biases wherever
    the architecture has them (attention, MLP, unembedding) and random RMSNorm weights."""
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from fastskip.model.load import gpt2_tokenizer, randomize_biases

    cfg = dict(n_layers=3, d_model=64, d_head=16, n_heads=4, n_key_value_heads=2, d_mlp=128,
               n_ctx=64, d_vocab=50257, act_fn="silu", normalization_type=normalization_type,
               positional_embedding_type="rotary", rotary_dim=16, rotary_base=10000,
               gated_mlp=True, final_rms=True, original_architecture="LlamaForCausalLM",
               seed=seed, default_prepend_bos=True, eps=1e-5)
    cfg.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(HookedTransformerConfig(**cfg), tokenizer=gpt2_tokenizer())
    gen = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w") and ("ln" in name):  # unfolded RMSNorm weights
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    randomize_biases(model, seed)
    return model.eval()


def rank_band(row, token: int, tol: float) -> tuple[int, int]:
    """The ranks an answer ``token`` may have when the logits ``row`` [V] are known to
    ``tol``: entries other than the answer certainly above it .. possibly above it."""
    own = float(row[token])
    others = torch.cat([row[:token], row[token + 1:]])
    return int((others > own + tol).sum()), int((others > own - tol).sum())


def kernel_runner(model, **kwargs):
    """A Runner on the Triton kernel path (``kernels=True``) on ``KERNEL_DEVICE``,
    not compiled (compile is tested on its own)."""
    import fastskip as fs

    kwargs.setdefault("verbose", False)
    return fs.Runner(model, kernels=True, device=KERNEL_DEVICE, compile=False, **kwargs)


def import_auto_circuit():
    """auto-circuit 1.0.1 with the shims it needs on TransformerLens 3.9 (test
    harness only, never the library): it imports ``HookedTransformerKeyValueCache``
    from ``transformer_lens.past_key_value_caching``, TransformerLens's old name
    of ``TransformerLensKeyValueCache``. Returns what the tests call."""
    import sys
    import types

    import transformer_lens as tl

    if "transformer_lens.past_key_value_caching" not in sys.modules:
        shim = types.ModuleType("transformer_lens.past_key_value_caching")
        shim.HookedTransformerKeyValueCache = tl.TransformerLensKeyValueCache
        sys.modules["transformer_lens.past_key_value_caching"] = shim
    tl.HookedTransformerKeyValueCache = tl.TransformerLensKeyValueCache
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune import run_circuits
    from auto_circuit.types import AblationType, PatchType
    from auto_circuit.utils.graph_utils import patchable_model

    def node_name(name: str, dest: bool) -> str:
        if name in ("Resid Start", "Resid End"):
            return "embed" if name == "Resid Start" else "logits"
        if name.startswith("MLP "):
            return f"{name[4:]}.mlp"
        return name[1:].lower() if dest else name[1:]  # A9.1.Q -> 9.1.q, A9.1 -> 9.1

    def edge_name(edge) -> str:
        return f"{node_name(edge.src.name, False)}>{node_name(edge.dest.name, True)}"

    def run_tree_patch(pm, tokens, corrupt, prune_scores, sizes):
        """Last-position logits {circuit size: [B, V]}: every edge outside the top
        ``size`` edges patched from the corrupted run (PatchType.TREE_PATCH)."""
        ones = [torch.tensor([0]) for _ in range(tokens.shape[0])]
        data = PromptDataset(list(tokens), list(corrupt), ones, ones)
        loader = PromptDataLoader(data, seq_len=None, diverge_idx=0,
                                  batch_size=tokens.shape[0])
        outs = run_circuits(pm, loader, list(sizes), prune_scores,
                            patch_type=PatchType.TREE_PATCH,
                            ablation_type=AblationType.RESAMPLE)
        # with TREE_PATCH, run_circuits keys its outputs by the edges left unpatched
        return {n_kept: next(iter(by_batch.values())) for n_kept, by_batch in outs.items()}

    return types.SimpleNamespace(patchable_model=patchable_model, edge_name=edge_name,
                                 run_tree_patch=run_tree_patch)


class Interrupted(Exception):
    """Raised by ``StopAfter`` to stop a sweep mid-way."""


class StopAfter:
    """A runner whose ``run`` raises after ``n`` calls (a sweep stopped mid-way)."""

    def __init__(self, runner, n):
        self.runner, self.n, self.calls = runner, n, 0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def run(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.n:
            raise Interrupted
        return self.runner.run(*args, **kwargs)
