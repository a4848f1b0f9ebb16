"""Shards of a sweep: the plan set cut along prefix subtrees, and the one job a
shard is (the same on one machine and on a cluster worker).

    shards = lexicographic_shards(plans, size=256)   # [n_shards] arrays of plan indices
    df = ShardJob(prompts, answers, {"top_k": 10}).run(runner, plans.take(shards[3]))

Plans sorted by their step keys (``fastskip.run.tree``) put plans that share a
prefix next to each other, so a range of that order is a set of whole prefix
subtrees plus at most one cut subtree at each end: the runner's prefix sharing
inside a shard is nearly all the sharing of the whole set, and shards can run
anywhere, in any order. A sweep's shards depend only on the plan set and the
shard size, which is what lets a sweep started on a cluster resume on one machine
and the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..plans import PlanSet
from ..run import Runner
from ..run.tree import build_tree, lexicographic_order, step_keys

LAYOUT = "lexicographic step-key ranges"  # recorded in a sweep's key: how plans are sharded


def lexicographic_shards(plans: PlanSet, size: int) -> list[np.ndarray]:
    """The plan indices of each shard: consecutive ranges of ``size`` plans (the
    last one shorter) of the plans in lexicographic order of their step keys."""
    order = lexicographic_order(step_keys(plans).keys)
    return [order[lo:lo + size] for lo in range(0, len(order), size)]


def shard_evaluations(plans: PlanSet, shards: list[np.ndarray]) -> tuple[int, int]:
    """Component evaluations of the whole set's prefix tree and the sum over the
    shards' own trees: what cutting the set into shards costs in lost sharing."""
    keys = step_keys(plans).keys
    whole = int(build_tree(keys).evaluations().sum())
    cut = sum(int(build_tree(keys[s]).evaluations().sum()) for s in shards)
    return whole, cut


def table_order(shards: list[np.ndarray], rows_per_plan: int) -> np.ndarray:
    """Row indices that turn the shards' tables, concatenated in shard order, into
    the table in the plan set's order (each plan has ``rows_per_plan`` rows)."""
    position = np.empty(sum(len(s) for s in shards), dtype=np.int64)
    position[np.concatenate(shards)] = np.arange(len(position))  # plan -> place in shards
    return (position[:, None] * rows_per_plan + np.arange(rows_per_plan)).reshape(-1)


@dataclass
class ShardJob:
    """What every shard of a sweep computes: ``runner.run`` of its plans on these
    prompts with these options, as a table (``Results.to_pandas()``)."""

    prompts: list[str]
    answers: list[str]
    run_kwargs: dict[str, Any] = field(default_factory=dict)

    def run(self, runner: Runner, plans: PlanSet) -> Any:
        res = runner.run(plans, self.prompts, self.answers, progress=False, **self.run_kwargs)
        return res.to_pandas()
