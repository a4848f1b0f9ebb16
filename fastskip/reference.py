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


def _float64_copy(model: Any) -> Any:
    import copy

    return copy.deepcopy(model).to(torch.float64, print_details=False)


@torch.no_grad()
def check(runner: Any, plans: Any, tokens: torch.Tensor, atol: float = 1e-4,
          arbitrate: bool = True) -> float:
    """Compare ``runner.logits`` with ``reference_logits`` for every plan.

    Returns the largest absolute logit difference from the fp32 reference and
    raises ``CheckError`` naming the worst failing plan. A plan fails when it
    differs by more than ``atol`` *and* (with ``arbitrate``) a float64 run of the
    reference shows the fast path further from exact than twice the fp32
    reference's own error. The second test exists for ill-conditioned plans (e.g.
    many /noln components let the residual stream grow by orders of magnitude):
    there, fp32 round-off alone separates any two fp32 implementations by more
    than 1e-4, TransformerLens's own fp32 result included.
    """
    ps: PlanSet = runner.plan_set(plans)
    fast = runner.logits(ps, tokens)
    model64 = None
    worst, failures = 0.0, []
    for i, plan in enumerate(ps):
        ref = reference_logits(runner.model, plan, tokens).to(fast.device, torch.float32)
        diff = (fast[i].float() - ref).abs()
        if torch.isnan(diff).any():
            raise CheckError(f"NaN in the logits of plan {i} '{plan}'")
        err = float(diff.max())
        worst = max(worst, err)
        if err <= atol:
            continue
        where = tuple(int(v) for v in torch.nonzero(diff == diff.max())[0])
        if arbitrate:
            model64 = model64 if model64 is not None else _float64_copy(runner.model)
            exact = reference_logits(model64, plan, tokens).to(fast.device)
            ours = float((fast[i].double() - exact).abs().max())
            theirs = float((ref.double() - exact).abs().max())
            if ours <= 2 * theirs:
                continue
            failures.append((err, i, where, f"; float64 says fastskip is {ours:.2g} from exact, "
                                           f"TransformerLens fp32 {theirs:.2g}"))
        else:
            failures.append((err, i, where, ""))
    if failures:
        err, i, (b, t, v), extra = max(failures)
        raise CheckError(
            f"plan {i} '{ps.texts()[i]}' differs from the TransformerLens reference by {err:.3g} "
            f"(> atol {atol:g}) at [prompt {b}, pos {t}, token {v}]{extra}"
            + (f" ({len(failures)} plans fail)" if len(failures) > 1 else "")
        )
    return worst
