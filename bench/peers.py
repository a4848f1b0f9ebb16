"""The peers researchers use to evaluate many subnetworks, set up on the same weights
as fastskip for the benchmarks (never imported by the library):

* **nnsight 0.8.1** over the equivalent Hugging Face model: GPT-2 small as a
  ``GPT2LMHeadModel`` built from the TransformerLens weights (LNPre becomes LayerNorm
  with weight 1 and bias 0; the unembedding untied, with ``b_U``), SmolLM2 as the
  ``LlamaForCausalLM`` its GGUF file loads to. A plan is applied with nnsight
  interventions: the merged heads before ``c_proj``/``o_proj`` scaled by the head
  mask, the attention and MLP outputs by the component masks, a norm's output
  replaced by its input (times its weight) for ``/noln``. Two ways of batching
  plans: one *invoke* per plan in a trace (nnsight's batching), or one batch of
  plans x prompts with per-row masks. Only the last position is unembedded
  (``logits_to_keep=1``).
* **auto-circuit 1.0.1** node masks, batched (``set_mask_batch_size``): the
  unfactorized node graph (heads via ``use_attn_result``, MLPs) with zero ablation.
  It has no node for a norm (``/noln`` cannot be expressed) nor for the attention
  output bias (a removed attention layer keeps ``b_O``); agreement is checked on the
  plan that means the same (heads removed, bias kept). auto-circuit imports ``attr``
  (package ``attrs``) and TransformerLens's old name ``HookedTransformerKeyValueCache``
  (aliased here, in the harness only).

Every peer returns the logits [P, B, V] at one position per prompt (``pos`` [B]: its
last real token; prompts of different lengths are right-padded, as fastskip pads
them), so that agreement with fastskip is checked outside the timed region. nnsight
unembeds only the distinct positions asked (``logits_to_keep`` as indices).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from collections.abc import Callable

import numpy as np
import torch

from fastskip.plans import PlanSet

HAVE_NNSIGHT = importlib.util.find_spec("nnsight") is not None
HAVE_AUTO_CIRCUIT = importlib.util.find_spec("auto_circuit") is not None


# -- Hugging Face models from the same weights ------------------------------------------

def hf_gpt2(model):
    """A ``GPT2LMHeadModel`` computing what the TransformerLens GPT-2 ``model`` (LNPre,
    folded) computes: LayerNorms with weight 1 and bias 0, an untied unembedding with
    bias ``b_U``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    assert cfg.normalization_type == "LNPre", "the HF copy is built for folded LayerNorms"
    hf_cfg = GPT2Config(vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, n_embd=cfg.d_model,
                        n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_mlp,
                        activation_function=cfg.act_fn, layer_norm_epsilon=cfg.eps,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=False)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    sd = model.state_dict()
    heads = lambda w: w.permute(1, 0, 2).reshape(cfg.d_model, -1)  # noqa: E731
    with torch.no_grad():
        hf.transformer.wte.weight.copy_(sd["embed.W_E"])
        hf.transformer.wpe.weight.copy_(sd["pos_embed.W_pos"])
        for L, block in enumerate(hf.transformer.h):
            p = f"blocks.{L}."
            for ln in (block.ln_1, block.ln_2):
                ln.weight.fill_(1.0)
                ln.bias.zero_()
            block.attn.c_attn.weight.copy_(torch.cat(
                [heads(sd[p + f"attn.W_{x}"]) for x in "QKV"], dim=1))
            block.attn.c_attn.bias.copy_(torch.cat(
                [sd[p + f"attn.b_{x}"].reshape(-1) for x in "QKV"]))
            block.attn.c_proj.weight.copy_(sd[p + "attn.W_O"].reshape(-1, cfg.d_model))
            block.attn.c_proj.bias.copy_(sd[p + "attn.b_O"])
            block.mlp.c_fc.weight.copy_(sd[p + "mlp.W_in"])
            block.mlp.c_fc.bias.copy_(sd[p + "mlp.b_in"])
            block.mlp.c_proj.weight.copy_(sd[p + "mlp.W_out"])
            block.mlp.c_proj.bias.copy_(sd[p + "mlp.b_out"])
        hf.transformer.ln_f.weight.fill_(1.0)
        hf.transformer.ln_f.bias.zero_()
        head = torch.nn.Linear(cfg.d_model, cfg.d_vocab_out, bias=True)
        head.weight.copy_(sd["unembed.W_U"].T)
        head.bias.copy_(sd["unembed.b_U"])
        hf.lm_head = head
    return hf


def hf_smollm2():
    """SmolLM2-135M as ``transformers`` loads its GGUF file (the weights fastskip's
    TransformerLens copy is converted from), and its tokenizer."""
    import contextlib
    import io

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastskip.model.smollm import find_smollm2_gguf

    path = find_smollm2_gguf()
    with contextlib.redirect_stderr(io.StringIO()):  # the dequantization's progress bar
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=torch.float32)
    return hf.eval(), tok


# -- nnsight ------------------------------------------------------------------------------

class NNsightPeer:
    """Plans on an HF causal LM through nnsight (``per_row``: one batch with per-row
    masks; else one invoke per plan)."""

    def __init__(self, hf, tokenizer):
        from nnsight import TransformersModel

        self.lm = TransformersModel(hf, tokenizer=copy.deepcopy(tokenizer))  # it sets padding
        self.gpt2 = hasattr(hf, "transformer")
        self.d_head = hf.config.hidden_size // hf.config.num_attention_heads
        self.blocks = self.lm.transformer.h if self.gpt2 else self.lm.model.layers

    def _parts(self, block):
        """(attention input norm, attention, merged-heads projection, MLP norm, MLP)."""
        if self.gpt2:
            return block.ln_1, block.attn, block.attn.c_proj, block.ln_2, block.mlp
        return (block.input_layernorm, block.self_attn, block.self_attn.o_proj,
                block.post_attention_layernorm, block.mlp)

    def _intervene(self, masks: dict[str, torch.Tensor], dh: int) -> None:
        """Apply per-row masks [rows, ...] inside an open trace/invoke, in the order the
        model computes (nnsight serves values in execution order)."""
        for L, block in enumerate(self.blocks):
            ln1, attn, proj, ln2, mlp = self._parts(block)

            def skip_norm(ln, keep):
                if not bool(keep.all()):
                    raw = ln.input * (1.0 if self.gpt2 else ln.weight)  # the input comes first
                    ln.output = torch.where(keep[:, None, None], ln.output, raw)

            skip_norm(ln1, masks["attn_ln"][:, L])
            heads = masks["heads"][:, L]
            if not bool(heads.all()):
                scale = heads.float().repeat_interleave(dh, dim=1)[:, None, :]
                proj.input = proj.input * scale
            attn_keep = masks["attn"][:, L].float()[:, None, None]
            if not bool((attn_keep == 1).all()):
                out = attn.output
                attn.output = (out[0] * attn_keep, *out[1:])
            skip_norm(ln2, masks["mlp_ln"][:, L])
            mlp_keep = masks["mlp"][:, L].float()[:, None, None]
            if not bool((mlp_keep == 1).all()):
                mlp.output = mlp.output * mlp_keep

    def logits(self, plans: PlanSet, tokens: torch.Tensor, pos: torch.Tensor | None = None,
               chunk: int = 16, per_row: bool = True) -> torch.Tensor:
        """Logits [P, B, V] at positions ``pos`` [B] (default: the last)."""
        B, T = tokens.shape
        pos = torch.full((B,), T - 1) if pos is None else pos.cpu()
        keep = torch.unique(pos)  # only these positions are unembedded
        at = torch.searchsorted(keep, pos)  # [B]: each prompt's position among them
        dh = self.d_head
        out = []
        for a in range(0, len(plans), chunk):
            part = plans.take(list(range(a, min(a + chunk, len(plans)))))
            masks = {k: torch.as_tensor(getattr(part, k)) for k in
                     ("attn", "heads", "mlp", "attn_ln", "mlp_ln")}
            if per_row:
                rows = {k: v.repeat_interleave(B, dim=0) for k, v in masks.items()}
                with self.lm.trace(tokens.repeat(len(part), 1), logits_to_keep=keep):
                    self._intervene(rows, dh)
                    logits = self.lm.output.logits.save()
                out.append(logits[torch.arange(len(logits)), at.repeat(len(part))]
                           .reshape(len(part), B, -1))
            else:
                saved = []
                with self.lm.trace(logits_to_keep=keep) as tracer:
                    for i in range(len(part)):
                        with tracer.invoke(tokens):
                            self._intervene({k: v[i:i + 1].repeat_interleave(B, 0)
                                             for k, v in masks.items()}, dh)
                            saved.append(self.lm.output.logits.save())
                out.append(torch.stack([s[torch.arange(B), at] for s in saved]))
        return torch.cat(out)


# -- auto-circuit ---------------------------------------------------------------------------

def import_auto_circuit() -> types.SimpleNamespace:
    """auto-circuit's pieces, after aliasing TransformerLens's old name of its KV cache
    (``HookedTransformerKeyValueCache``), which auto-circuit 1.0.1 imports."""
    import transformer_lens as tl

    if "transformer_lens.past_key_value_caching" not in sys.modules:
        shim = types.ModuleType("transformer_lens.past_key_value_caching")
        shim.HookedTransformerKeyValueCache = tl.TransformerLensKeyValueCache  # type: ignore
        sys.modules["transformer_lens.past_key_value_caching"] = shim
    tl.HookedTransformerKeyValueCache = tl.TransformerLensKeyValueCache  # type: ignore
    from auto_circuit.types import AblationType
    from auto_circuit.utils.ablation_activations import src_ablations
    from auto_circuit.utils.graph_utils import patch_mode, patchable_model, set_mask_batch_size

    return types.SimpleNamespace(AblationType=AblationType, src_ablations=src_ablations,
                                 patch_mode=patch_mode, patchable_model=patchable_model,
                                 set_mask_batch_size=set_mask_batch_size)


def auto_circuit_equivalent(plans: PlanSet) -> PlanSet:
    """The plans as auto-circuit's node masks can express them: norms kept, a removed
    attention layer keeps its output bias (every head removed, ``b_O`` kept)."""
    attn = np.ones_like(plans.attn)
    heads = plans.heads & plans.attn[..., None]
    ones = np.ones_like(plans.attn)
    return PlanSet(attn, heads, plans.mlp, ones, ones)


class AutoCircuitPeer:
    """Node plans as batched auto-circuit node masks on a copy of the TransformerLens
    model (``use_attn_result``, which auto-circuit's head nodes need)."""

    def __init__(self, model):
        self.ac = import_auto_circuit()
        tl_model = copy.deepcopy(model)
        tl_model.set_use_attn_result(True)
        self.pm = self.ac.patchable_model(tl_model, factorized=False, separate_qkv=False,
                                          device=next(model.parameters()).device)
        self.L, self.H = model.cfg.n_layers, model.cfg.n_heads
        self.head_wrappers = {w.module_name: w for w in self.pm.dest_wrappers}

    def _set_masks(self, plans: PlanSet, B: int) -> None:
        """Mask 1 = patched with the zero ablation, per row (plan-major)."""
        rep = lambda a: torch.as_tensor(a).repeat_interleave(B, dim=0)  # noqa: E731
        heads, mlp = rep(plans.heads & plans.attn[..., None]), rep(plans.mlp)
        for L in range(self.L):
            mid = self.head_wrappers[f"blocks.{L}.hook_resid_mid"]
            m = torch.zeros_like(mid.patch_mask)  # [rows, 1 + H]: resid, heads
            m[:, 1:] = (~heads[:, L]).float()
            mid.patch_mask.data.copy_(m)
            post = self.head_wrappers[f"blocks.{L}.hook_resid_post"]
            m = torch.zeros_like(post.patch_mask)  # [rows, 2]: resid mid, MLP
            m[:, 1] = (~mlp[:, L]).float()
            post.patch_mask.data.copy_(m)

    @torch.no_grad()
    def logits(self, plans: PlanSet, tokens: torch.Tensor, pos: torch.Tensor | None = None,
               chunk: int = 16) -> torch.Tensor:
        """Logits [P, B, V] at positions ``pos`` [B] (default: the last)."""
        B, T = tokens.shape
        pos = torch.full((B,), T - 1, device=tokens.device) if pos is None else pos
        out = []
        for a in range(0, len(plans), chunk):
            part = plans.take(list(range(a, min(a + chunk, len(plans)))))
            batch = tokens.repeat(len(part), 1)
            zeros = self.ac.src_ablations(self.pm, batch, self.ac.AblationType.ZERO)
            with self.ac.set_mask_batch_size(self.pm, len(batch)):
                self._set_masks(part, B)
                with self.ac.patch_mode(self.pm, zeros):
                    logits = self.pm(batch)[torch.arange(len(batch)),
                                            pos.repeat(len(part))]  # [rows, V]
            out.append(logits.reshape(len(part), B, -1))
        return torch.cat(out)


Peer = Callable[[PlanSet, torch.Tensor, torch.Tensor], torch.Tensor]


def peers(model, tokenizer=None, hf=None) -> dict[str, Peer]:
    """The peers that can run here, by name: plans, tokens [B, T], positions [B] ->
    logits [P, B, V] there."""
    out: dict[str, Peer] = {}
    if HAVE_NNSIGHT:
        nn_peer = NNsightPeer(hf if hf is not None else hf_gpt2(model),
                              tokenizer or model.tokenizer)
        out["nnsight_per_row_masks"] = lambda p, t, q: nn_peer.logits(p, t, q, per_row=True)
        out["nnsight_invokes"] = lambda p, t, q: nn_peer.logits(p, t, q, per_row=False)
    if HAVE_AUTO_CIRCUIT and hf is None:  # auto-circuit runs on the TransformerLens model
        ac_peer = AutoCircuitPeer(model)
        out["auto_circuit_node_masks"] = ac_peer.logits
    return out
