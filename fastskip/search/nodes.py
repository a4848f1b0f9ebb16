"""Iterative node pruning, fastskip's "backward" variant
(``prune_nodes(..., algorithm="backward")``, the default).

Start from the full model. Walk the candidates backward (layer L-1 to 0; in each
layer the MLP first, then the heads from last to first); ablate each candidate on
top of what is already removed and remove it for good if the circuit's score
(its mean logit difference as a fraction of the full model's) stays >=
``threshold``. Optionally walk the survivors again, forward (layer 0 to L-1;
heads first to last, then the MLP).

    task = fs.tasks.make_task("numerals", n=32)
    res = fs.search.prune_nodes(runner, task, threshold=0.8)
    print(res.plan, res.kept_heads, res.kept_mlps)

It follows the idea of Lan & Barez's search but not their code: the paper's
algorithm (``algorithm="seqcont"``, ``fastskip.search.seqcont``) walks a layer's
heads first to last, removes only strictly above the threshold, alternates
passes until one removes nothing, mean-ablates every trial with MLP means taken
under that trial's head ablation, and scores the last position without BOS.
Here the ablation is any ``fs.Ablation`` (zero by default; "mean" takes MLP and
head means from the full model), and one or two passes are made.

Removing heads keeps the layer's attention output bias (as zeroing the heads'
``hook_z`` does); the plan then reads e.g. ``9.attn,-9.0-11``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..ablation import Ablation, as_ablation
from ..errors import InputError
from ..plans import Plan
from ..reference import plan_hooks, reference_sources
from ..run import Runner
from .common import (
    AblationArg,
    Evaluator,
    TaskArg,
    check_full,
    mask_set,
    resolve_ablation,
    resolve_inputs,
)
from .speculate import WalkStats, walk

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

Candidate = tuple[int, int]  # (layer, head); head -1 = the layer's MLP
State = tuple[np.ndarray, np.ndarray]  # kept heads [L, H], kept MLPs [L]


@dataclass
class Step:
    """One decision: the candidate ("9.mlp", "9.11"), whether it was removed,
    the score of the circuit with it ablated (what decided), the circuit's score
    after the decision, and the pass (1 backward, 2 forward)."""

    candidate: str
    removed: bool
    score: float
    circuit_score: float
    pass_no: int = 1


@dataclass
class PruneResult:
    """The circuit ``prune_nodes`` found, and how."""

    plan: Plan
    kept_heads: list[tuple[int, int]]
    kept_mlps: list[int]
    score: float  # the circuit's mean logit difference / the full model's
    trace: list[Step]
    threshold: float
    full_logit_diff: float
    stats: dict[str, Any] = field(default_factory=dict)
    passes: int = 1  # passes over the candidates (backward, forward, ...)
    algorithm: str = "backward"  # "backward" (this module) or "seqcont" (the paper's)

    @property
    def removed(self) -> list[str]:
        """The removed candidates, in the order they were removed."""
        return [s.candidate for s in self.trace if s.removed]

    def to_pandas(self) -> Any:
        """The trace, one row per decision."""
        import pandas as pd

        return pd.DataFrame([vars(s) for s in self.trace])


def candidate_name(c: Candidate) -> str:
    return f"{c[0]}.mlp" if c[1] < 0 else f"{c[0]}.{c[1]}"


def backward_candidates(n_layers: int, n_heads: int) -> list[Candidate]:
    """Layer L-1 to 0; in each layer the MLP, then heads H-1 to 0."""
    return [c for L in reversed(range(n_layers))
            for c in [(L, -1)] + [(L, h) for h in reversed(range(n_heads))]]


def forward_candidates(state: State) -> list[Candidate]:
    """The survivors of ``state``, layer 0 to L-1; in each the heads 0 to H-1, then the MLP."""
    heads, mlp = state
    return [c for L in range(len(mlp))
            for c in [(L, h) for h in range(heads.shape[1]) if heads[L, h]]
            + ([(L, -1)] if mlp[L] else [])]


def without(state: State, c: Candidate) -> State:
    heads, mlp = state[0].copy(), state[1].copy()
    if c[1] < 0:
        mlp[c[0]] = False
    else:
        heads[c[0], c[1]] = False
    return heads, mlp


def state_plan(state: State) -> Plan:
    heads, mlp = state
    return Plan.from_masks(np.ones(len(mlp), dtype=bool), mlp, heads=heads)


def _result(state: State, trace: list[Step], threshold: float, full: float,
            stats: dict[str, Any], passes: int) -> PruneResult:
    heads, mlp = state
    return PruneResult(
        plan=state_plan(state),
        kept_heads=[(int(L), int(h)) for L, h in zip(*np.nonzero(heads), strict=True)],
        kept_mlps=[int(L) for L in np.flatnonzero(mlp)],
        score=trace[-1].circuit_score if trace else 1.0, trace=trace, threshold=threshold,
        full_logit_diff=full, stats=stats, passes=passes)


def prune_nodes(runner: Runner, task: TaskArg = None, *, prompts: Sequence[str] | None = None,
                answers: Sequence[str] | None = None,
                wrong_answers: Sequence[str] | None = None, threshold: float = 0.8,
                ablation: AblationArg = None, second_pass: bool = False, batch: int = 32,
                speculate: str = "adaptive", prepend_bos: bool | None = None,
                progress: bool | None = None) -> PruneResult:
    """Iterative node pruning (see the module docstring), batched.

    ``task``: a ``fs.tasks.Task`` (or give ``prompts``, ``answers``,
    ``wrong_answers``). ``threshold``: the smallest score (fraction of the full
    model's mean logit difference) a removal may leave. ``ablation``: None (zero
    ablation), "mean" or "resample" (sources: the task's corrupted prompts) or an
    ``fs.Ablation``; passed to ``runner.run`` when not None.

    The result is the plain sequential walk's (``prune_nodes_sequential``): each
    ``runner.run`` call evaluates up to ``batch`` candidates speculatively and
    every decision uses the plan with exactly the real removals (see
    ``fastskip.search.speculate``; ``speculate="keep"`` assumes the next
    candidates are kept). Scores agree with the sequential walk to fp32
    round-off, so a score within ~1e-6 of the threshold may decide differently.
    ``progress=True`` shows a bar of decided candidates. ``stats`` in the result
    counts runner calls and evaluated plans.
    """
    ev = Evaluator(runner, resolve_inputs(task, prompts, answers, wrong_answers),
                   resolve_ablation(ablation, task), prepend_bos, progress=False)
    full = ev.full
    L, H = runner.n_layers, runner.n_heads
    state: State = (np.ones((L, H), dtype=bool), np.ones(L, dtype=bool))
    trace: list[Step] = []
    stats = WalkStats()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=L * (H + 1), desc="prune_nodes", unit="candidate", leave=False)

    def evaluate(states: list[State]) -> np.ndarray:
        return ev.score(mask_set(np.stack([s[0] for s in states]),
                                 np.stack([s[1] for s in states])))

    for pass_no in (1, 2) if second_pass else (1,):
        cands = backward_candidates(L, H) if pass_no == 1 else forward_candidates(state)

        def record(i: int, removed: bool, score: float, cands: list[Candidate] = cands,
                   pass_no: int = pass_no) -> None:
            last = trace[-1].circuit_score if trace else 1.0
            trace.append(Step(candidate_name(cands[i]), removed, score,
                              score if removed else last, pass_no))
            if bar is not None:
                bar.update(1)

        if bar is not None and pass_no == 2:
            bar.total += len(cands)
        state = walk(cands, state, threshold, evaluate, without, record,  # type: ignore
                     batch=batch, speculate=speculate, stats=stats,
                     score=trace[-1].circuit_score if trace else 1.0)
    if bar is not None:
        bar.close()
    info = dict(runner_calls=ev.calls, plans_evaluated=ev.plans, wasted=stats.wasted,
                decided_per_call=stats.per_call)
    return _result(state, trace, threshold, full, info, 2 if second_pass else 1)


# --------------------------------------------------------------------------- reference


def _pad(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Rows right-padded to ``width`` with their last token (never read: causal)."""
    out = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        out[i, len(r):] = r[-1]
    return out


def _tl_sources(model: HookedTransformer, ablation: Ablation | str | None,
                tokens: torch.Tensor, lengths: list[int],
                bos: bool) -> dict[str, torch.Tensor] | None:
    """``reference_sources`` for an ablation given as prompts or tokens."""
    abl = as_ablation(ablation)
    if abl is None or abl.prompts is None:
        return reference_sources(model, abl, tokens)
    rows = [model.to_tokens(p, prepend_bos=bos, truncate=False)[0].cpu() for p in abl.prompts]
    if abl.kind == "resample":
        if [len(r) for r in rows] != lengths:
            raise InputError("resample ablation: every corrupted prompt must have as many "
                             "tokens as its prompt")
        src = _pad(rows, tokens.shape[1])
    else:
        if len({len(r) for r in rows}) != 1 or len(rows[0]) < tokens.shape[1]:
            raise InputError("the sequential reference takes mean-ablation prompts of one "
                             "token length, at least as long as the prompts")
        src = torch.stack(rows)
    return reference_sources(model, Ablation(abl.kind, None, src.to(tokens.device)), tokens)


@torch.no_grad()
def prune_nodes_sequential(model: HookedTransformer, task: TaskArg = None, *,
                           prompts: Sequence[str] | None = None,
                           answers: Sequence[str] | None = None,
                           wrong_answers: Sequence[str] | None = None,
                           threshold: float = 0.8, second_pass: bool = False,
                           ablation: AblationArg = None, prepend_bos: bool | None = None,
                           max_candidates: int | None = None) -> PruneResult:
    """The plain reference: one TransformerLens ``run_with_hooks`` per candidate
    (hooks from ``fs.plan_hooks``), the logit difference computed from its logits.

    ``ablation`` as for ``prune_nodes`` (mean-ablation prompts must share one
    token length here). ``max_candidates`` stops after that many decisions (for
    timing a prefix of the walk).
    """
    inp = resolve_inputs(task, prompts, answers, wrong_answers)
    bos = bool(model.cfg.default_prepend_bos) if prepend_bos is None else prepend_bos
    rows = [model.to_tokens(p, prepend_bos=bos, truncate=False)[0].cpu() for p in inp.prompts]
    device = next(model.parameters()).device
    tokens = _pad(rows, max(len(r) for r in rows)).to(device)
    last = torch.tensor([len(r) - 1 for r in rows], device=device)
    first = lambda xs: torch.stack([model.to_tokens(a, prepend_bos=False)[0, 0]  # noqa: E731
                                    for a in xs]).to(device)
    ans, wrong = first(inp.answers), first(inp.wrong_answers)
    sources = _tl_sources(model, resolve_ablation(ablation, task), tokens,
                          [len(r) for r in rows], bos)
    idx = torch.arange(len(rows), device=device)
    L, H = model.cfg.n_layers, model.cfg.n_heads

    def mean_logit_diff(state: State) -> float:
        logits = model.run_with_hooks(tokens, fwd_hooks=plan_hooks(state_plan(state), sources),
                                      attention_mask=torch.ones_like(tokens))
        at = logits[idx, last].float()
        return float((at[idx, ans] - at[idx, wrong]).mean())

    state: State = (np.ones((L, H), dtype=bool), np.ones(L, dtype=bool))
    full = check_full(mean_logit_diff(state))
    trace: list[Step] = []
    circuit = 1.0
    for pass_no in (1, 2) if second_pass else (1,):
        cands = backward_candidates(L, H) if pass_no == 1 else forward_candidates(state)
        for c in cands:
            if max_candidates is not None and len(trace) >= max_candidates:
                break
            trial = without(state, c)
            score = mean_logit_diff(trial) / full
            removed = score >= threshold
            if removed:
                state, circuit = trial, score
            trace.append(Step(candidate_name(c), removed, score, circuit, pass_no))
    return _result(state, trace, threshold, full, dict(run_with_hooks_calls=len(trace) + 1),
                   2 if second_pass else 1)
