"""The ways a TransformerLens user evaluates many plans today, for the
benchmarks: one ``run_with_hooks`` per plan, or (the best a TL user can do) one
forward over all plans at once with hooks that multiply each component's output
by per-row masks."""

from __future__ import annotations

import numpy as np
import torch

from fastskip.plans import PlanSet


def masked_hooks(plans: PlanSet, n_prompts: int) -> list:
    """Hooks for a batch whose row r = plan r // n_prompts, prompt r % n_prompts."""
    rows = lambda a: torch.as_tensor(a).repeat_interleave(n_prompts, dim=0)  # noqa: E731
    attn, heads, mlp = rows(plans.attn).float(), rows(plans.heads).float(), rows(plans.mlp).float()
    attn_ln, mlp_ln = rows(plans.attn_ln), rows(plans.mlp_ln)
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for L in range(plans.n_layers):
        b = f"blocks.{L}"

        def z_hook(z, hook, L=L):
            return z * heads[:, L][:, None, :, None].to(z.dtype)

        def scale(out, hook, m=None):
            return out * m[:, None, None].to(out.dtype)

        def keep(act, hook, key=None):
            captured[key] = act
            return act

        def choose(normalized, hook, key=None, ln=None):
            return torch.where(ln[:, None, None], normalized, captured[key])

        hooks += [(f"{b}.attn.hook_z", z_hook),
                  (f"{b}.hook_attn_out", lambda o, hook, m=attn[:, L]: scale(o, hook, m)),
                  (f"{b}.hook_mlp_out", lambda o, hook, m=mlp[:, L]: scale(o, hook, m))]
        if not bool(attn_ln[:, L].all()):
            hooks += [(f"{b}.hook_resid_pre", lambda a, hook, k=f"pre{L}": keep(a, hook, k)),
                      (f"{b}.ln1.hook_normalized",
                       lambda a, hook, k=f"pre{L}", ln=attn_ln[:, L]: choose(a, hook, k, ln))]
        if not bool(mlp_ln[:, L].all()):
            hooks += [(f"{b}.hook_resid_mid", lambda a, hook, k=f"mid{L}": keep(a, hook, k)),
                      (f"{b}.ln2.hook_normalized",
                       lambda a, hook, k=f"mid{L}", ln=mlp_ln[:, L]: choose(a, hook, k, ln))]
    return hooks


@torch.no_grad()
def tl_masked_batch(model, plans: PlanSet, tokens: torch.Tensor,
                    pos: torch.Tensor | None = None, chunk: int = 32) -> torch.Tensor:
    """Logits [P, B, V] of every plan at positions ``pos`` [B] (default: the last),
    ``chunk`` plans per forward."""
    B, T = tokens.shape
    pos = torch.full((B,), T - 1, device=tokens.device) if pos is None else pos
    out = []
    for a in range(0, len(plans), chunk):
        part = plans.take(list(range(a, min(a + chunk, len(plans)))))
        logits = model.run_with_hooks(tokens.repeat(len(part), 1),
                                      fwd_hooks=masked_hooks(part, B))
        rows = torch.arange(len(logits), device=logits.device)
        out.append(logits[rows, pos.repeat(len(part))].reshape(len(part), B, -1))
    return torch.cat(out)


class EdgeHooks:
    """An edge plan as one TransformerLens ``run_with_hooks``, written as a user
    would write it for speed (auto-circuit's way): every sender's output goes into
    one stacked tensor as the forward reaches it, and every receiver's input is one
    einsum of its kept-edge mask with that stack, plus its removed senders'
    ablation values and the output biases (precomputed per plan). Needs the split
    q/k/v inputs and the MLP-input hook (``fastskip.reference.edge_hooks.split_inputs``)."""

    def __init__(self, model, ablations: list[torch.Tensor] | None, tokens: torch.Tensor):
        from fastskip.reference.edge_hooks import model_graph

        self.model, self.g = model, model_graph(model)
        B, T = tokens.shape
        d = model.cfg.d_model
        self.outs = torch.zeros((self.g.n_senders, B, T, d))
        self.abl = (torch.zeros_like(self.outs) if ablations is None
                    else torch.stack([a.expand(B, T, d) for a in ablations]))
        W_O = torch.stack([b.attn.W_O for b in model.blocks])  # [L, H, dh, d]
        b_O = torch.stack([b.attn.b_O for b in model.blocks])  # [L, d]
        self.W_O, self.bias_before = W_O, torch.cumsum(torch.cat([torch.zeros(1, d), b_O]), 0)

    def hooks(self, mask: np.ndarray) -> list:
        g, outs, abl = self.g, self.outs, self.abl
        kept = torch.as_tensor(g.dense(mask[None])[0], dtype=outs.dtype)  # [R, S]

        def receivers(rs: list[int], layers_before: int):
            n = int(g.in_degree[rs[0]])
            m = kept[rs, :n]
            base = torch.einsum("rs,sbtd->rbtd", 1 - m, abl[:n]) + self.bias_before[layers_before]
            return m, n, base

        hooks = []

        def embed(act, hook):
            outs[0] = act
            return act
        hooks.append(("blocks.0.hook_resid_pre", embed))
        for L in range(g.n_layers):
            H, K = g.n_heads, g.n_kv_heads
            qkv = {"q": receivers([g.q_receiver(L, h) for h in range(H)], L),
                   "k": receivers([g.k_receiver(L, h) for h in range(K)], L),
                   "v": receivers([g.v_receiver(L, h) for h in range(K)], L)}
            mlp = receivers([g.mlp_receiver(L)], L + 1)

            def split_input(act, hook, spec=None):
                m, n, base = spec
                return (torch.einsum("rs,sbtd->rbtd", m, outs[:n]) + base).permute(1, 2, 0, 3)

            def heads(z, hook, L=L):
                first = g.head_sender(L, 0)
                outs[first:first + g.n_heads] = torch.einsum("bthk,hkd->hbtd", z, self.W_O[L])
                return z

            def mlp_in(act, hook, spec=mlp):
                m, n, base = spec
                return (torch.einsum("rs,sbtd->rbtd", m, outs[:n]) + base)[0]

            def mlp_out(act, hook, L=L):
                outs[g.mlp_sender(L)] = act
                return act
            b = f"blocks.{L}"
            hooks += [(f"{b}.hook_{k}_input", lambda a, hook, s=spec: split_input(a, hook, s))
                      for k, spec in qkv.items()]
            hooks += [(f"{b}.attn.hook_z", heads), (f"{b}.hook_mlp_in", mlp_in),
                      (f"{b}.hook_mlp_out", mlp_out)]
        final = receivers([g.logits_receiver], g.n_layers)
        hooks.append((f"blocks.{g.n_layers - 1}.hook_resid_post",
                      lambda a, hook: (torch.einsum("rs,sbtd->rbtd", final[0],
                                                    outs[:final[1]]) + final[2])[0]))
        return hooks

    @torch.no_grad()
    def logits(self, mask: np.ndarray, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of the edge plan ``mask`` [n_edges]: one run_with_hooks."""
        from fastskip.reference.edge_hooks import split_inputs

        with split_inputs(self.model):
            return self.model.run_with_hooks(tokens, fwd_hooks=self.hooks(mask),
                                             attention_mask=torch.ones_like(tokens))
