"""The reference: a plan expressed as TransformerLens hooks on the original
model, written independently of the fast path (``check`` compares the two).

Hooks (see DESIGN.md): a skipped attention or MLP has ``hook_attn_out`` /
``hook_mlp_out`` zeroed; a removed head has its slice of ``attn.hook_z``
zeroed; ``/noln`` replaces ``lnX.hook_normalized`` by the norm's input (the
residual stream captured at ``hook_resid_pre`` / ``hook_resid_mid``), so
weights TransformerLens applies after that hook still apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..ablation import Ablation, as_ablation
from ..errors import CheckError
from ..inputs import check_tokens
from ..plans import EdgePlan, Plan, PlanLike
from ..plans.edge_set import is_edge_text
from .edge_hooks import edge_reference_logits

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

Hook = tuple[str | Callable[..., Any], Callable[..., Any]]  # (hook name or filter, function)


def plan_hooks(plan: Plan, sources: dict[str, torch.Tensor] | None = None) -> list[Hook]:
    """TransformerLens forward hooks that make the full model compute ``plan``.

    ``sources`` (from ``reference_sources``) maps hook names to what a skipped
    component or removed head contributes (mean/resample ablation); without it
    skipped components contribute zero.
    """
    m = plan.mask
    hooks: list[Hook] = []
    captured: dict[str, torch.Tensor] = {}

    def zero(act: torch.Tensor, hook: Any) -> torch.Tensor:
        if sources is not None:
            return sources[hook.name].to(act.dtype).expand_as(act)
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
            keep_z = keep.to(device=z.device)[None, None, :, None]
            other = torch.zeros_like(z) if sources is None else sources[hook.name].to(z.dtype)
            return torch.where(keep_z, z, other)
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


SOURCE_HOOKS = ("hook_attn_out", "attn.hook_z", "hook_mlp_out")


@torch.no_grad()
def reference_sources(model: HookedTransformer, ablation: Ablation | str | None,
                      tokens: torch.Tensor
                      ) -> dict[str, torch.Tensor] | None:
    """Per-hook ablation values for ``tokens`` [B, T], computed with
    TransformerLens's own forward (``run_with_cache``) on the ablation's source
    tokens: the mean over source rows (mean) or the row itself (resample)."""
    abl = as_ablation(ablation)
    if abl is None:
        return None
    if abl.tokens is None:
        raise CheckError("reference_logits takes ablations given as tokens")
    src = abl.tokens.to(tokens.device)
    if abl.kind == "resample" and src.shape != tokens.shape:
        raise CheckError(f"resample tokens {tuple(src.shape)} must match {tuple(tokens.shape)}")
    T = tokens.shape[1]
    _, cache = model.run_with_cache(src[:, :T], attention_mask=torch.ones_like(src[:, :T]),
                                    names_filter=lambda n: n.endswith(SOURCE_HOOKS))
    out = {}
    for name, act in cache.items():
        out[name] = act.mean(0, keepdim=True) if abl.kind == "mean" else act
    return out


@torch.no_grad()
def reference_logits(model: HookedTransformer, plan: PlanLike | EdgePlan, tokens: torch.Tensor,
                     ablation: Ablation | str | None = None) -> torch.Tensor:
    """Logits [B, T, d_vocab] of ``plan`` computed by TransformerLens with hooks
    (``ablation``: "zero" or an ``fs.Ablation`` given as tokens). Edge plans
    (``fs.EdgePlan``, text with '>') go to ``edge_reference_logits``."""
    if isinstance(plan, EdgePlan) or (isinstance(plan, str) and is_edge_text(plan)):
        return edge_reference_logits(model, plan, tokens, ablation)
    cfg = model.cfg
    bound = (Plan.parse(plan) if isinstance(plan, str) else plan).bind(cfg.n_layers, cfg.n_heads)
    device = next(model.parameters()).device
    tokens = check_tokens(tokens, cfg.d_vocab, cfg.n_ctx, device)
    sources = reference_sources(model, ablation, tokens)
    # an explicit all-ones mask: no position is treated as padding
    mask = torch.ones_like(tokens)
    return model.run_with_hooks(tokens, fwd_hooks=plan_hooks(bound, sources),
                                attention_mask=mask)


FP32_SQUARE_MAX = float(torch.finfo(torch.float32).max) ** 0.5  # ~1.8e19


@torch.no_grad()
def max_residual(model: HookedTransformer, plan: Plan, tokens: torch.Tensor,
                 ablation: Ablation | str | None = None) -> float:
    """Largest |residual stream| value while the model computes ``plan`` (run it
    in float64 to learn whether fp32 can represent the plan at all)."""
    top = [0.0]

    def record(act: torch.Tensor, hook: Any) -> torch.Tensor:
        top[0] = max(top[0], float(act.abs().max()))
        return act

    names = lambda n: n.endswith(("hook_resid_mid", "hook_resid_post"))  # noqa: E731
    hooks = plan_hooks(plan, reference_sources(model, ablation, tokens))
    model.run_with_hooks(tokens, fwd_hooks=[*hooks, (names, record)],
                         attention_mask=torch.ones_like(tokens))
    return top[0]
