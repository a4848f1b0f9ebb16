"""Speculative evaluation of a sequential greedy walk over candidates.

The walk decides candidates one at a time: candidate j is evaluated on the
circuit left by the decisions on candidates before it, and removed for good
when its score stays >= the threshold (or passes another rule, ``removes``: the
paper's search removes strictly above it). Each decision depends on all earlier
ones, so the plain walk makes one model call per candidate.

Here one ``runner.run`` call evaluates up to ``batch`` plans: candidate j under
several *hypotheses* about the undecided candidates before it (a tree of
decision paths from the next undecided candidate). After the call the walk
follows the real decisions down the tree as far as the tree reaches; every
decision uses the plan whose removals are exactly the real ones, so the result
is the plain walk's. Evaluations on paths that turned out wrong are discarded
(their scores only guide the next tree).

Trees:
* ``"keep"``: a chain that assumes every candidate in it is kept (plan_j = removed
  so far + candidate j); a removal ends the useful part of the chain.
* ``"adaptive"`` (default): the ``batch`` most likely paths, best first, from a
  probability of removal per candidate. A candidate evaluated before on a
  discarded path has a known *effect* (its score minus the score of the circuit
  it was removed from); along a path, the circuit's score is predicted as the
  current score plus the effects of the path's removals, and the candidate's
  probability is how far its predicted score lies above the threshold, in units
  of the typical prediction error so far, capped by the share of predictions
  that were right so far. Candidates never evaluated get the share of removals
  so far.
  Paths less likely than ``MIN_PROB`` are left out, so a call evaluates few plans
  when the next decisions are uncertain and up to ``batch`` along a confident
  run. Long runs of removals (the common case at a low threshold) and of keeps
  both cost one call per ``batch`` candidates.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

Path = tuple[bool, ...]  # decisions (True = removed) on the candidates after the next one
Predict = Callable[[int, float], tuple[float, float]]
SPECULATE = ("adaptive", "keep")
MIN_PROB = 0.25  # (adaptive) paths less likely than this are not evaluated


@dataclass
class WalkStats:
    calls: int = 0
    plans: int = 0
    wasted: int = 0  # evaluations discarded
    per_call: list[int] = field(default_factory=list)  # candidates decided per call


def decision_tree(n_left: int, budget: int, predict: Predict, min_prob: float = 0.0,
                  base: float = 1.0) -> list[Path]:
    """The ``budget`` most likely decision paths (best first, prefix-closed).

    Path ``p`` evaluates candidate ``len(p)`` (counted from the next undecided
    one) assuming the decisions ``p`` on the candidates before it.
    ``predict(k, score)`` gives the probability that candidate k is removed from
    a circuit of that score, and the circuit's score if it is; ``base`` is the
    score now. Paths less likely than ``min_prob`` are left out."""
    out: list[Path] = []
    heap: list[tuple[float, int, Path, float]] = [(-1.0, 0, (), base)]
    tie = 1
    while heap and len(out) < budget:
        neg, _, path, score = heapq.heappop(heap)
        out.append(path)
        k = len(path)
        if k + 1 >= n_left:
            continue
        p, after = predict(k, score)
        for removed, q, nxt in ((True, p, after), (False, 1.0 - p, score)):
            if q > 0 and -neg * q >= min_prob:
                heapq.heappush(heap, (neg * q, tie, path + (removed,), nxt))
                tie += 1
    return out


def _agreement(p: Path, real: Path) -> int:
    """Length of the common prefix of two decision paths."""
    return next((k for k, (a, b) in enumerate(zip(p, real, strict=False)) if a != b),
                min(len(p), len(real)))


def walk(candidates: Sequence[object], state: object, threshold: float,
         evaluate: Callable[[list[object]], np.ndarray],
         remove: Callable[[object, object], object],
         record: Callable[[int, bool, float], None],
         batch: int = 32, speculate: str = "adaptive", stats: WalkStats | None = None,
         min_prob: float | None = None, score: float = 1.0,
         removes: Callable[[float], bool] | None = None) -> object:
    """Decide every candidate in order; returns the final state.

    ``remove(state, candidate)`` returns a new state without the candidate;
    ``evaluate(states)`` scores states in one call; ``record(index, removed,
    score)`` is told every decision in order; ``score`` is the score of
    ``state``. A candidate is removed when ``removes(score)`` (default: score >=
    ``threshold``). A call evaluates at most ``batch`` states, none on a path less
    likely than ``min_prob`` (default ``MIN_PROB`` for "adaptive", 0 for "keep")."""
    passes: Callable[[float], bool] = removes or (lambda s: s >= threshold)
    if speculate not in SPECULATE:
        raise ValueError(f"speculate must be one of {SPECULATE}, got '{speculate}'")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    stats = stats if stats is not None else WalkStats()
    floor = (MIN_PROB if speculate == "adaptive" else 0.0) if min_prob is None else min_prob
    n = len(candidates)
    effect: dict[int, float] = {}  # candidate -> score change its removal caused, last seen
    errors: list[float] = []  # |real score - predicted score| of decided candidates
    hits = predicted = 0  # decisions the effects predicted right, of those predicted
    decided = removed_count = 0
    i = 0

    def predict(k: int, base: float) -> tuple[float, float]:
        if speculate == "keep":
            return 0.0, base
        d = effect.get(i + k)
        if d is None or not math.isfinite(base + d):
            return (removed_count + 1) / (decided + 2), base
        # the prediction is off by about the typical error seen so far, and is never
        # trusted more than predictions were right so far
        tau = max(float(np.median(errors[-64:])) if errors else 0.05, 1e-6)
        z = (base + d - threshold) / (tau * math.sqrt(2.0))
        cap = min(max((hits + 1) / (predicted + 2), 0.5), 0.98)
        return min(max(0.5 * (1.0 + math.erf(z)), 1.0 - cap), cap), base + d

    while i < n:
        paths = decision_tree(n - i, batch, predict, floor, score)
        plans = []
        for path in paths:
            st = state
            for k, rem in enumerate(path):
                if rem:
                    st = remove(st, candidates[i + k])
            plans.append(remove(st, candidates[i + len(path)]))
        scores = evaluate(plans)
        where = {path: row for row, path in enumerate(paths)}
        start, start_score = i, score
        real: Path = ()
        while i < n and real in where:
            s = float(scores[where[real]])
            rem = passes(s)
            if i in effect and math.isfinite(s) and math.isfinite(score + effect[i]):
                errors.append(abs(s - score - effect[i]))
                hits += passes(score + effect[i]) == rem
                predicted += 1
            if rem:
                state, score = remove(state, candidates[i]), s
            record(i, rem, s)
            decided += 1
            removed_count += int(rem)
            real += (rem,)
            i += 1
        # per undecided candidate, its effect under the hypothesis that agrees longest
        # with the real decisions; a hypothesis' circuit score is that of its last removal
        best: dict[int, tuple[int, float]] = {}
        for p, row in where.items():
            j = start + len(p)
            if j < i:
                continue
            last = max((m for m, r in enumerate(p) if r), default=None)
            base = start_score if last is None else float(scores[where[p[:last]]])
            agree = _agreement(p, real)
            if j not in best or agree > best[j][0]:
                best[j] = (agree, float(scores[row]) - base)
        effect.update({j: d for j, (_, d) in best.items()})
        stats.calls += 1
        stats.plans += len(plans)
        stats.wasted += len(plans) - (i - start)
        stats.per_call.append(i - start)
    return state
