"""The reference: a plan expressed as TransformerLens hooks on the original
model, and ``check`` that compares the fast path against it.

Hooks (see DESIGN.md): a skipped attention or MLP has ``hook_attn_out`` /
``hook_mlp_out`` zeroed; a removed head has its slice of ``attn.hook_z``
zeroed; ``/noln`` replaces ``lnX.hook_normalized`` by the norm's input (the
residual stream captured at ``hook_resid_pre`` / ``hook_resid_mid``), so
weights TransformerLens applies after that hook still apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .errors import CheckError
from .inputs import check_tokens
from .plan import Plan, PlanLike
from .planset import PlanSet

Hook = tuple[str, Callable[..., Any]]


def plan_hooks(plan: Plan) -> list[Hook]:
    """TransformerLens forward hooks that make the full model compute ``plan``."""
    m = plan.mask
    hooks: list[Hook] = []
    captured: dict[str, torch.Tensor] = {}

    def zero(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(act)

    def capture(key: str) -> Callable[..., Any]:
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            captured[key] = act
            return act
        return fn

    def replace_with(key: str) -> Callable[..., Any]:
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return captured[key].to(act.dtype)
        return fn

    def keep_heads(keep: torch.Tensor) -> Callable[..., Any]:
        def fn(z: torch.Tensor, hook: Any) -> torch.Tensor:
            return z * keep.to(device=z.device, dtype=z.dtype)[None, None, :, None]
        return fn

    for L in range(m.n_layers):
        b = f"blocks.{L}"
        if not m.attn[L]:
            hooks.append((f"{b}.hook_attn_out", zero))
        else:
            if not m.heads[L].all():
                hooks.append((f"{b}.attn.hook_z", keep_heads(torch.as_tensor(m.heads[L]))))
            if not m.attn_ln[L]:
                hooks.append((f"{b}.hook_resid_pre", capture(f"pre{L}")))
                hooks.append((f"{b}.ln1.hook_normalized", replace_with(f"pre{L}")))
        if not m.mlp[L]:
            hooks.append((f"{b}.hook_mlp_out", zero))
        elif not m.mlp_ln[L]:
            hooks.append((f"{b}.hook_resid_mid", capture(f"mid{L}")))
            hooks.append((f"{b}.ln2.hook_normalized", replace_with(f"mid{L}")))
    return hooks


@torch.no_grad()
def reference_logits(model: Any, plan: PlanLike, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, d_vocab] of ``plan`` computed by TransformerLens with hooks."""
    cfg = model.cfg
    bound = (Plan.parse(plan) if isinstance(plan, str) else plan).bind(cfg.n_layers, cfg.n_heads)
    device = next(model.parameters()).device
    tokens = check_tokens(tokens, cfg.d_vocab, cfg.n_ctx, device)
    # an explicit all-ones mask: no position is treated as padding
    mask = torch.ones_like(tokens)
    return model.run_with_hooks(tokens, fwd_hooks=plan_hooks(bound), attention_mask=mask)


@torch.no_grad()
def check(runner: Any, plans: Any, tokens: torch.Tensor, atol: float = 1e-4) -> float:
    """Compare ``runner.logits`` with ``reference_logits`` for every plan.

    Returns the largest absolute logit error; raises ``CheckError`` naming the
    worst plan when it exceeds ``atol``.
    """
    ps: PlanSet = runner.plan_set(plans)
    fast = runner.logits(ps, tokens)
    worst, worst_i, worst_at = -1.0, -1, (0, 0, 0)
    for i, plan in enumerate(ps):
        ref = reference_logits(runner.model, plan, tokens).to(fast.device, torch.float32)
        err = (fast[i].float() - ref).abs()
        if torch.isnan(err).any():
            raise CheckError(f"NaN in the logits of plan {i} '{plan}'")
        e = float(err.max())
        if e > worst:
            worst, worst_i = e, i
            worst_at = tuple(int(v) for v in torch.nonzero(err == err.max())[0])
    if worst > atol:
        b, t, v = worst_at
        raise CheckError(
            f"plan {worst_i} '{ps.texts()[worst_i]}' differs from the TransformerLens reference "
            f"by {worst:.3g} (> atol {atol:g}) at [prompt {b}, pos {t}, token {v}]"
        )
    return worst
