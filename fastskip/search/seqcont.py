"""The circuit search of "Towards Interpretable Sequence Continuation" (Lan &
Barez) exactly as its code runs it (apartresearch/seqcont_circuits,
``src/iter_node_pruning``), batched: ``prune_nodes(runner, task,
algorithm="seqcont")``.

* Tokens: the tokenizer on the raw text, no BOS; answers are the first tokens of
  ``corr`` and ``incorr``. Score: the mean over prompts of logit(corr) -
  logit(incorr) at the last position, as a percentage of the full model's.
* Ablation, per position over the mean prompts (``task.mean_prompts``: every
  prompt of the paper's ``random.json``): heads outside the circuit get their
  full-model mean z; MLPs outside it their mean output under the trial's own
  head ablation (``Runner.mean_ablated_circuits``).
* Order: a backward pass (layer L-1 down to 0: the layer's MLP, then its heads
  0..H-1), then a forward pass (layer 0 up: heads 0..H-1, then the MLP), and so
  on, alternating until a pass removes nothing. Each candidate still in the
  circuit is a trial: the circuit without it. It is removed for good when the
  trial's score is strictly above the threshold (``100 - score < 100 * (1 -
  threshold)``, the paper's rule), and each trial is built on exactly the
  removals made so far.
* Batched: trials are evaluated speculatively, several per call
  (``fastskip.search.speculate``); every decision uses the trial with exactly
  the real removals, so the result is the sequential one
  (``prune_nodes_seqcont_reference``) up to fp32 round-off: a score within
  ~1e-6 of the threshold may decide differently (``stats["close_calls"]`` lists
  such trials).

Not copied from the paper's code: its loop resets an empty circuit to the full
model (it marks "start from the full model" with an empty list), and its final
``new_score`` is the last trial's; here an emptied circuit stays empty and the
result's score is the final circuit's, evaluated.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..run import Runner
from .common import TaskArg, check_full, mean_prompts_of, resolve_inputs
from .nodes import Candidate, PruneResult, State, Step, candidate_name, state_plan, without
from .speculate import SPECULATE, WalkStats, walk

CLOSE = 1e-6  # scores this close to the threshold may decide either way in fp32


def backward_order(state: State) -> list[Candidate]:
    """The survivors, layer L-1 to 0; in each the MLP, then heads 0 to H-1."""
    heads, mlp = state
    return [c for L in reversed(range(len(mlp)))
            for c in ([(L, -1)] if mlp[L] else []) + [(L, h) for h in range(heads.shape[1])
                                                       if heads[L, h]]]


def forward_order(state: State) -> list[Candidate]:
    """The survivors, layer 0 to L-1; in each heads 0 to H-1, then the MLP."""
    heads, mlp = state
    return [c for L in range(len(mlp))
            for c in [(L, h) for h in range(heads.shape[1]) if heads[L, h]]
            + ([(L, -1)] if mlp[L] else [])]


def removal_rule(threshold: float) -> Any:
    """The paper's rule on a score (fraction of the full model's): remove when
    100 - percent < 100 * (1 - threshold); the limit is rounded to 1e-9 so that
    0.8 gives the paper's integer 20 exactly."""
    limit = round(100 * (1 - threshold), 9)
    return lambda score: bool(100 - 100 * score < limit)


def prune_nodes_seqcont(runner: Runner, task: TaskArg = None, *,
                        prompts: Sequence[str] | None = None,
                        answers: Sequence[str] | None = None,
                        wrong_answers: Sequence[str] | None = None,
                        mean_prompts: Sequence[str] | None = None, threshold: float = 0.8,
                        batch: int = 8, speculate: str = "adaptive",
                        max_passes: int | None = None, prepend_bos: bool = False,
                        progress: bool | None = None) -> PruneResult:
    """The paper's iterative node pruning (see the module docstring), batched.

    ``task``: a ``fs.tasks.Task`` (``fs.tasks.load_seqcont`` gives the paper's),
    or ``prompts``/``answers``/``wrong_answers``; mean prompts are
    ``mean_prompts``, else the task's ``mean_prompts``, else its ``corrupted``
    prompts. Prompts must share one token length. ``batch``: trials per call,
    at most; ``max_passes``: stop after that many passes (the paper's
    ``--one_iter`` is 2). ``progress=True`` shows a bar of trials decided.

    Returns a ``PruneResult``: kept heads and MLPs, the final circuit's score
    (fraction of the full model's mean logit difference), every trial in
    ``trace`` (``pass_no`` odd: backward, even: forward), ``passes``, and in
    ``stats`` runner calls, trials evaluated, seconds in mean-prompt passes
    (``means_s``) and in trial passes (``trials_s``), and close calls.
    """
    if speculate not in SPECULATE:
        raise InputError(f"speculate must be one of {SPECULATE}, got '{speculate}'")
    if not 0 < threshold <= 1 or isinstance(batch, bool) or batch < 1:
        raise InputError(f"threshold must be in (0, 1] and batch >= 1; got {threshold}, {batch}")
    inp = resolve_inputs(task, prompts, answers, wrong_answers)
    means = list(mean_prompts) if mean_prompts is not None else mean_prompts_of(task)
    if not means:
        raise InputError("the seqcont search needs mean prompts: a task with mean_prompts or "
                         "corrupted prompts (fs.tasks.load_seqcont), or mean_prompts=")
    t0 = time.perf_counter()
    circuits = runner.mean_ablated_circuits(inp.prompts, inp.answers, inp.wrong_answers, means,
                                            prepend_bos=prepend_bos)
    full = check_full(float(circuits.base_logit_diff().double().mean()))
    L, H = runner.n_layers, runner.n_heads
    state: State = (np.ones((L, H), dtype=bool), np.ones(L, dtype=bool))
    current = [state]  # the real circuit so far (decisions arrive through record)
    trace: list[Step] = []
    stats = WalkStats()
    removes = removal_rule(threshold)
    calls = [0]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=L * (H + 1), desc="seqcont trials", unit="trial", leave=False)

    def evaluate(states: list[State]) -> np.ndarray:
        circuits.set_base(*current[0])
        diff = circuits.logit_diff(np.stack([s[0] for s in states]),
                                   np.stack([s[1] for s in states]))
        calls[0] += 1
        return diff.double().mean(dim=1).cpu().numpy() / full

    passes = 0
    while max_passes is None or passes < max_passes:
        passes += 1
        cands = backward_order(state) if passes % 2 else forward_order(state)
        if bar is not None and passes > 1:
            bar.total += len(cands)
            bar.refresh()

        def record(i: int, removed: bool, score: float, cands: list[Candidate] = cands,
                   pass_no: int = passes) -> None:
            last = trace[-1].circuit_score if trace else 1.0
            if removed:
                current[0] = without(current[0], cands[i])
            trace.append(Step(candidate_name(cands[i]), removed, score,
                              score if removed else last, pass_no))
            if bar is not None:
                bar.update(1)

        n_before = len(trace)
        state = walk(cands, state, threshold, evaluate, without, record,  # type: ignore
                     batch=batch, speculate=speculate, stats=stats,
                     score=trace[-1].circuit_score if trace else 1.0, removes=removes)
        if not any(s.removed for s in trace[n_before:]):
            break
    if bar is not None:
        bar.close()
    circuits.set_base(*state)
    score = float(circuits.base_logit_diff().double().mean()) / full
    heads, mlp = state
    info: dict[str, Any] = dict(
        runner_calls=calls[0] + 2, trials=len(trace), trials_evaluated=stats.plans,
        wasted=stats.wasted, decided_per_call=stats.per_call, passes=passes,
        seconds=time.perf_counter() - t0, mean_prompts=len(means), prompts=len(inp.prompts),
        close_calls=[s.candidate for s in trace if abs(s.score - threshold) < CLOSE],
        **circuits.timing)
    return PruneResult(
        plan=state_plan(state),
        kept_heads=[(int(a), int(b)) for a, b in zip(*np.nonzero(heads), strict=True)],
        kept_mlps=[int(a) for a in np.flatnonzero(mlp)], score=score, trace=trace,
        threshold=threshold, full_logit_diff=full, stats=info, passes=passes,
        algorithm="seqcont")
