"""The edge reference: an edge plan through TransformerLens hooks, written
independently of the fast path (``fs.check`` compares the two).

TransformerLens computes every head's query, key and value from its own copy
of the residual stream when ``use_split_qkv_input`` is on (``hook_q_input``
[B, T, H, d], ``hook_k_input`` / ``hook_v_input`` [B, T, K, d] with K key/value
heads), and exposes the MLP's input before its norm with ``use_hook_mlp_in``.
One ``run_with_hooks`` with both switched on (for the call only):

* records every sender's output as the forward reaches it: the embedding at
  ``blocks.0.hook_resid_pre``, head h of layer L as ``hook_z[..., h, :] @ W_O[h]``
  (no ``b_O``), the MLP at ``hook_mlp_out``;
* replaces every receiver's input (``hook_q_input`` / ``hook_k_input`` /
  ``hook_v_input`` per head, ``hook_mlp_in``, and the last block's
  ``hook_resid_post``, which is what ``ln_final`` reads) by its reconstruction:
  for each sender before it, its recorded output if the edge is kept, else its
  ablation value; plus ``b_O`` of every attention layer before it.

Ablation values come from TransformerLens's own forward (``run_with_cache``) on
the ablation's source tokens: zeros, the mean over source rows per position, or
the row itself (resample).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..ablation import Ablation, as_ablation
from ..errors import CheckError
from ..inputs import check_tokens
from ..plans import EdgeGraph, EdgePlan

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

Hook = tuple[str | Callable[..., Any], Callable[..., Any]]  # as TransformerLens types it


def model_graph(model: HookedTransformer) -> EdgeGraph:
    """The edge graph of a TransformerLens model."""
    cfg = model.cfg
    return EdgeGraph(cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads)


def head_outputs(model: HookedTransformer, layer: int, z: torch.Tensor) -> list[torch.Tensor]:
    """Every head's output of ``layer`` from its z [B, T, H, dh]: z_h @ W_O[h] [B, T, d]."""
    W_O = model.blocks[layer].attn.W_O  # [H, dh, d]
    return [z[:, :, h] @ W_O[h].to(z.dtype) for h in range(z.shape[2])]


@torch.no_grad()
def sender_ablations(model: HookedTransformer, ablation: Ablation | str | None,
                     tokens: torch.Tensor) -> list[torch.Tensor] | None:
    """Every sender's ablation value for ``tokens`` [B, T] (None: zero ablation),
    in sender order, each [B or 1, T, d]: from TransformerLens's forward on the
    ablation's source tokens (mean over their rows, or row by row)."""
    abl = as_ablation(ablation)
    if abl is None:
        return None
    if abl.tokens is None:
        raise CheckError("the edge reference takes ablations given as tokens")
    src = abl.tokens.to(tokens.device)
    T = tokens.shape[1]
    if abl.kind == "resample" and src.shape != tokens.shape:
        raise CheckError(f"resample tokens {tuple(src.shape)} must match {tuple(tokens.shape)}")
    src = src[:, :T]
    names = ("blocks.0.hook_resid_pre", "attn.hook_z", "hook_mlp_out")
    _, cache = model.run_with_cache(src, attention_mask=torch.ones_like(src),
                                    names_filter=lambda n: n.endswith(names))
    outs = [cache["blocks.0.hook_resid_pre"]]
    for L in range(model.cfg.n_layers):
        outs += head_outputs(model, L, cache[f"blocks.{L}.attn.hook_z"])
        outs.append(cache[f"blocks.{L}.hook_mlp_out"])
    if abl.kind == "mean":
        outs = [o.mean(0, keepdim=True) for o in outs]
    return outs


class _Reconstruction:
    """The senders' outputs as the forward produces them, and each receiver's
    input rebuilt from them, the ablation values and the output biases."""

    def __init__(self, model: HookedTransformer, plan: EdgePlan,
                 ablations: list[torch.Tensor] | None):
        self.model = model
        self.g = model_graph(model)
        self.kept = plan.mask
        self.ablations = ablations
        self.outputs: dict[int, torch.Tensor] = {}

    def record(self, sender: int, value: torch.Tensor) -> None:
        self.outputs[sender] = value

    def ablation(self, sender: int, like: torch.Tensor) -> torch.Tensor:
        if self.ablations is None:
            return torch.zeros_like(like)
        return self.ablations[sender].to(like.dtype).expand_as(like)

    def input_of(self, receiver: int) -> torch.Tensor:
        g = self.g
        first = g.edge_offset[receiver]
        total: torch.Tensor | None = None
        for s in range(int(g.in_degree[receiver])):
            out = self.outputs[s]
            part = out if self.kept[first + s] else self.ablation(s, out)
            total = part if total is None else total + part
        assert total is not None  # every receiver reads at least the embedding
        for L in range(g.n_layers):  # output biases of the attention layers before it
            if g.receiver_stage[receiver] > 2 * L:
                total = total + self.model.blocks[L].attn.b_O.to(total.dtype)
        return total

    def hooks(self) -> list[Hook]:
        g, model = self.g, self.model
        hooks: list[Hook] = []

        def embed(act: torch.Tensor, hook: Any) -> torch.Tensor:
            self.record(0, act)
            return act

        def heads(layer: int) -> Callable[..., Any]:
            def fn(z: torch.Tensor, hook: Any) -> torch.Tensor:
                for h, out in enumerate(head_outputs(model, layer, z)):
                    self.record(g.head_sender(layer, h), out)
                return z
            return fn

        def mlp_out(layer: int) -> Callable[..., Any]:
            def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
                self.record(g.mlp_sender(layer), act)
                return act
            return fn

        def split_input(receivers: list[int]) -> Callable[..., Any]:
            def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:  # [B, T, heads, d]
                return torch.stack([self.input_of(r) for r in receivers], dim=2)
            return fn

        def whole_input(receiver: int) -> Callable[..., Any]:
            def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
                return self.input_of(receiver)
            return fn

        hooks.append(("blocks.0.hook_resid_pre", embed))
        for L in range(g.n_layers):
            b = f"blocks.{L}"
            hooks += [
                (f"{b}.hook_q_input", split_input([g.q_receiver(L, h) for h in range(g.n_heads)])),
                (f"{b}.hook_k_input",
                 split_input([g.k_receiver(L, h) for h in range(g.n_kv_heads)])),
                (f"{b}.hook_v_input",
                 split_input([g.v_receiver(L, h) for h in range(g.n_kv_heads)])),
                (f"{b}.attn.hook_z", heads(L)),
                (f"{b}.hook_mlp_in", whole_input(g.mlp_receiver(L))),
                (f"{b}.hook_mlp_out", mlp_out(L)),
            ]
        hooks.append((f"blocks.{g.n_layers - 1}.hook_resid_post", whole_input(g.logits_receiver)))
        return hooks


@contextlib.contextmanager
def split_inputs(model: HookedTransformer) -> Iterator[None]:
    """TransformerLens's per-head q/k/v inputs and MLP input hook, on for the block."""
    before = (model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        yield
    finally:
        model.set_use_split_qkv_input(before[0])
        model.set_use_hook_mlp_in(before[1])


@torch.no_grad()
def edge_reference_logits(model: HookedTransformer, plan: EdgePlan | str, tokens: torch.Tensor,
                          ablation: Ablation | str | None = None) -> torch.Tensor:
    """Logits [B, T, d_vocab] of an edge plan computed by TransformerLens with
    hooks (``ablation``: "zero" or an ``fs.Ablation`` given as tokens)."""
    cfg = model.cfg
    bound = EdgePlan.parse(plan, model_graph(model))
    device = next(model.parameters()).device
    tokens = check_tokens(tokens, cfg.d_vocab, cfg.n_ctx, device)
    rebuild = _Reconstruction(model, bound, sender_ablations(model, ablation, tokens))
    with split_inputs(model):
        return model.run_with_hooks(tokens, fwd_hooks=rebuild.hooks(),
                                    attention_mask=torch.ones_like(tokens))
