"""The ways a TransformerLens user evaluates many plans today, for the
benchmarks: one ``run_with_hooks`` per plan, or (the best a TL user can do) one
forward over all plans at once with hooks that multiply each component's output
by per-row masks."""

from __future__ import annotations

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
def tl_masked_batch(model, plans: PlanSet, tokens: torch.Tensor, chunk: int = 32
                    ) -> torch.Tensor:
    """Last-position logits [P, B, V] of every plan, ``chunk`` plans per forward."""
    B = tokens.shape[0]
    out = []
    for a in range(0, len(plans), chunk):
        part = plans.take(list(range(a, min(a + chunk, len(plans)))))
        logits = model.run_with_hooks(tokens.repeat(len(part), 1),
                                      fwd_hooks=masked_hooks(part, B))
        out.append(logits[:, -1].reshape(len(part), B, -1))
    return torch.cat(out)
