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
from dataclasses import dataclass, field
from typing import Any

import torch

from .ablation import as_ablation
from .errors import CheckError
from .inputs import check_tokens
from .plan import Plan, PlanLike
from .planset import PlanSet

Hook = tuple[str, Callable[..., Any]]


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
def reference_sources(model: Any, ablation: Any, tokens: torch.Tensor
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
def reference_logits(model: Any, plan: PlanLike, tokens: torch.Tensor, ablation: Any = None
                     ) -> torch.Tensor:
    """Logits [B, T, d_vocab] of ``plan`` computed by TransformerLens with hooks
    (``ablation``: "zero" or an ``fs.Ablation`` given as tokens)."""
    cfg = model.cfg
    bound = (Plan.parse(plan) if isinstance(plan, str) else plan).bind(cfg.n_layers, cfg.n_heads)
    device = next(model.parameters()).device
    tokens = check_tokens(tokens, cfg.d_vocab, cfg.n_ctx, device)
    sources = reference_sources(model, ablation, tokens)
    # an explicit all-ones mask: no position is treated as padding
    mask = torch.ones_like(tokens)
    return model.run_with_hooks(tokens, fwd_hooks=plan_hooks(bound, sources),
                                attention_mask=mask)


def _float64_copy(model: Any) -> Any:
    import copy

    return copy.deepcopy(model).to(torch.float64, print_details=False)


FP32_SQUARE_MAX = float(torch.finfo(torch.float32).max) ** 0.5  # ~1.8e19


@torch.no_grad()
def max_residual(model: Any, plan: Plan, tokens: torch.Tensor, ablation: Any = None) -> float:
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


@dataclass
class CheckReport:
    """Per-plan comparison with the reference (see ``check``)."""

    plans: list[str]
    errors: list[float]  # max |fast - reference fp32| per plan (finite logits)
    arbitrated: dict[int, tuple[float, float]] = field(default_factory=dict)
    # plan index -> (fastskip's, TransformerLens fp32's) max error against float64
    failures: list[tuple[float, int, tuple[int, ...], str]] = field(default_factory=list)
    overflowing: list[int] = field(default_factory=list)  # plans with inf/NaN logits (both)

    @property
    def max_error(self) -> float:
        return max(self.errors) if self.errors else 0.0


@torch.no_grad()
def check_report(runner: Any, plans: Any, tokens: torch.Tensor, atol: float = 1e-4,
                 rtol: float = 0.0, arbitrate: bool = True, ablation: Any = None,
                 fast: torch.Tensor | None = None) -> CheckReport:
    """Compare every plan with the reference; see ``check`` for the rules.
    ``fast``: logits [P, B, T', V] already computed by the runner (else computed);
    T' < T compares the last T' positions."""
    ps: PlanSet = runner.plan_set(plans)
    if fast is None:
        fast = runner.logits(ps, tokens, ablation=ablation)
    model64 = None
    report = CheckReport(plans=ps.texts(), errors=[])
    for i, plan in enumerate(ps):
        ref = reference_logits(runner.model, plan, tokens, ablation).to(fast.device,
                                                                         torch.float32)
        ref = ref[:, ref.shape[1] - fast.shape[2]:]
        mine = fast[i].float()
        # a prompt whose residual stream overflows (inf/NaN logits) must overflow in
        # both; where exactly it turns inf depends on round-off, so rows are compared
        # only where both are finite
        ref_ok = torch.isfinite(ref).flatten(1).all(1)
        mine_ok = torch.isfinite(mine).flatten(1).all(1)
        if not torch.equal(ref_ok, mine_ok):
            b = int((ref_ok != mine_ok).nonzero()[0])
            if arbitrate:  # does the residual stream leave fp32's range (x^2 overflows)?
                model64 = model64 if model64 is not None else _float64_copy(runner.model)
                if max_residual(model64, plan, tokens, ablation) > FP32_SQUARE_MAX:
                    report.errors.append(0.0)
                    report.overflowing.append(i)
                    continue
            report.errors.append(float("inf"))
            report.failures.append((float("inf"), i, (b, 0, 0), "; one of the fast path and "
                                    "the reference overflows (inf/NaN) on this prompt, the "
                                    "other does not"))
            continue
        if not bool(ref_ok.all()):
            report.overflowing.append(i)
        finite = ref_ok[:, None, None].expand_as(ref)
        diff = torch.where(finite, (mine - ref).abs(), torch.zeros_like(ref))
        err = float(diff.max())
        report.errors.append(err)
        scale = float(ref[finite].abs().max()) if finite.any() else 0.0
        if err <= atol + rtol * scale:
            continue
        where = tuple(int(v) for v in torch.nonzero(diff == diff.max())[0])
        if arbitrate:
            model64 = model64 if model64 is not None else _float64_copy(runner.model)
            exact = reference_logits(model64, plan, tokens, ablation).to(fast.device)
            exact = exact[:, exact.shape[1] - fast.shape[2]:]
            ours = float((fast[i].double() - exact).abs().max())
            theirs = float((ref.double() - exact).abs().max())
            if ours <= 2 * theirs:
                report.arbitrated[i] = (ours, theirs)
                continue
            report.failures.append((err, i, where, f"; float64 says fastskip is {ours:.2g} "
                                    f"from exact, TransformerLens fp32 {theirs:.2g}"))
        else:
            report.failures.append((err, i, where, ""))
    return report


@torch.no_grad()
def check(runner: Any, plans: Any, tokens: torch.Tensor, atol: float = 1e-4,
          rtol: float = 0.0, arbitrate: bool = True, ablation: Any = None) -> float:
    """Compare ``runner.logits`` with ``reference_logits`` for every plan.

    Returns the largest absolute logit difference from the fp32 reference and
    raises ``CheckError`` naming the worst failing plan. A plan fails when it
    differs by more than ``atol + rtol * max|reference logit|`` *and* (with
    ``arbitrate``) a float64 run of the reference shows the fast path further
    from exact than twice the fp32 reference's own error. The second test exists
    for ill-conditioned plans (e.g. many /noln components let the residual
    stream grow by orders of magnitude): there, fp32 round-off alone separates
    any two fp32 implementations by more than 1e-4, TransformerLens's own fp32
    result included. Overflow (inf/NaN logits: e.g. many /noln components in a
    Llama model) must happen on the same prompts in both, unless a float64 run
    shows the residual stream leaving fp32's range (|x|^2 > fp32 max), where
    TransformerLens returns finite garbage (e.g. all-zero logits) and fastskip
    NaN; such plans are counted in ``CheckReport.overflowing``.
    ``ablation``: "zero" (default) or an ``fs.Ablation`` given as tokens.
    """
    report = check_report(runner, plans, tokens, atol, rtol, arbitrate, ablation)
    if report.failures:
        err, i, (b, t, v), extra = max(report.failures)
        raise CheckError(
            f"plan {i} '{report.plans[i]}' differs from the TransformerLens reference by "
            f"{err:.3g} (> atol {atol:g} + rtol {rtol:g} x logit scale) at [prompt {b}, pos {t}, "
            f"token {v}]{extra}"
            + (f" ({len(report.failures)} plans fail)" if len(report.failures) > 1 else "")
        )
    return report.max_error
