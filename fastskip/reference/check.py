"""``check``: the fast path against the TransformerLens reference, plan by plan,
with float64 arbitration for plans that fp32 cannot compute well."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch

from ..ablation import Ablation
from ..errors import CheckError
from ..plans import EdgePlan, EdgePlanSet, Plan, PlanSet, PlansLike
from ..plans.edge_set import EdgePlansLike
from .hooks import FP32_SQUARE_MAX, max_residual, reference_logits

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


class LogitsRunner(Protocol):
    """What ``check`` needs of a runner (``fs.Runner`` is one)."""

    model: HookedTransformer

    def plan_set(self, plans: PlansLike | EdgePlansLike) -> PlanSet | EdgePlanSet: ...

    def logits(self, plans: PlansLike | EdgePlansLike, tokens: torch.Tensor,
               last_only: bool = False,
               progress: bool | None = None, ablation: Ablation | str | None = None
               ) -> torch.Tensor: ...


def float64_copy(model: HookedTransformer) -> HookedTransformer:
    """A float64 copy of ``model`` (the arbiter of ill-conditioned plans)."""
    return copy.deepcopy(model).to(torch.float64, print_details=False)


class Arbitration(NamedTuple):
    """How float64 judged a plan that differs from the fp32 reference by more than
    the tolerance: the max error of fastskip and of TransformerLens fp32 against a
    float64 run, and ``growth``, the plan's largest residual-stream value over the
    full model's (fp32 round-off grows with the magnitudes it rounds)."""

    ours: float
    theirs: float
    growth: float

    def passes(self, tol: float) -> bool:
        """fastskip is no further from exact than twice TransformerLens fp32, or
        within the tolerance scaled by the residual stream's growth."""
        return self.ours <= 2 * self.theirs or self.ours <= tol * max(1.0, self.growth)


@dataclass
class CheckReport:
    """Per-plan comparison with the reference (see ``check``)."""

    plans: list[str]
    errors: list[float]  # max |fast - reference fp32| per plan (finite logits)
    arbitrated: dict[int, Arbitration] = field(default_factory=dict)  # plans passed by float64
    failures: list[tuple[float, int, tuple[int, ...], str]] = field(default_factory=list)
    overflowing: list[int] = field(default_factory=list)  # plans with inf/NaN logits (both)

    @property
    def max_error(self) -> float:
        return max(self.errors) if self.errors else 0.0


@torch.no_grad()
def check_report(runner: LogitsRunner, plans: PlansLike | EdgePlansLike, tokens: torch.Tensor,
                 atol: float = 1e-4, rtol: float = 0.0, arbitrate: bool = True,
                 ablation: Ablation | str | None = None, fast: torch.Tensor | None = None
                 ) -> CheckReport:
    """Compare every plan with the reference; see ``check`` for the rules.
    ``fast``: logits [P, B, T', V] already computed by the runner (else computed);
    T' < T compares the last T' positions."""
    ps = runner.plan_set(plans)
    if fast is None:
        fast = runner.logits(ps, tokens, ablation=ablation)
    model64 = None
    full_residual: float | None = None  # the full model's largest residual value (float64)
    report = CheckReport(plans=ps.texts(), errors=[])
    for i in range(len(ps)):
        plan: Plan | EdgePlan = ps[i]
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
            if arbitrate and isinstance(plan, Plan):  # does the residual stream leave fp32's
                model64 = model64 if model64 is not None else float64_copy(runner.model)
                if max_residual(model64, plan, tokens, ablation) > FP32_SQUARE_MAX:  # range?
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
            model64 = model64 if model64 is not None else float64_copy(runner.model)
            growth = 1.0  # edge plans apply every norm: no residual growth to allow for
            if isinstance(plan, Plan):
                if full_residual is None:
                    full = Plan.parse("all", ps.n_layers, runner.model.cfg.n_heads)
                    full_residual = max_residual(model64, full, tokens, ablation)
                growth = max_residual(model64, plan, tokens, ablation) / max(full_residual,
                                                                             1e-30)
            exact = reference_logits(model64, plan, tokens, ablation).to(fast.device)
            exact = exact[:, exact.shape[1] - fast.shape[2]:]
            verdict = Arbitration(
                ours=float((fast[i].double() - exact).abs().max()),
                theirs=float((ref.double() - exact).abs().max()), growth=growth)
            if verdict.passes(atol + rtol * scale):
                report.arbitrated[i] = verdict
                continue
            report.failures.append((err, i, where, f"; float64 says fastskip is "
                                    f"{verdict.ours:.2g} from exact, TransformerLens fp32 "
                                    f"{verdict.theirs:.2g} (residual growth "
                                    f"{verdict.growth:.2g}x)"))
        else:
            report.failures.append((err, i, where, ""))
    return report


@torch.no_grad()
def check(runner: LogitsRunner, plans: PlansLike | EdgePlansLike, tokens: torch.Tensor,
          atol: float = 1e-4, rtol: float = 0.0, arbitrate: bool = True,
          ablation: Ablation | str | None = None) -> float:
    """Compare ``runner.logits`` with ``reference_logits`` for every plan.

    Returns the largest absolute logit difference from the fp32 reference and raises
    ``CheckError`` naming the worst failing plan. A plan fails when it differs by
    more than tol = ``atol + rtol * max|reference logit|`` *and* (with
    ``arbitrate``) a float64 run of the reference shows the fast path further from
    exact than both twice the fp32 reference's own error and tol scaled by the
    plan's residual growth (its largest residual-stream value over the full model's;
    see ``Arbitration``). The second test exists for ill-conditioned plans (e.g.
    many /noln components let the residual stream grow by orders of magnitude):
    there, fp32 round-off alone separates any two fp32 implementations by more than
    1e-4, TransformerLens's own fp32 result included, and round-off grows with the
    values it rounds. Overflow (inf/NaN logits: e.g. many /noln components in a
    Llama model) must happen on the same prompts in both, unless a float64 run shows
    the residual stream leaving fp32's range (|x|^2 > fp32 max), where
    TransformerLens returns finite garbage (e.g. all-zero logits) and fastskip NaN;
    such plans are counted in ``CheckReport.overflowing``. ``ablation``: "zero"
    (default) or an ``fs.Ablation`` given as tokens.
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
