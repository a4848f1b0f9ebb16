"""Scheduling: a plan set as a prefix tree in model order.

Computation runs in steps (layer 0 attention, layer 0 MLP, layer 1 attention,
...). Each plan has a *key* per step: 0 = skipped, otherwise an id of what the
step does (which heads, whether the norm is applied). Plans that agree on every
key up to a step share the residual stream there, so the distinct states at
step s are the distinct pairs (state at s-1, key at s). A skipped step creates
no work: its state *is* the parent's state.

Everything here is numpy over [P, steps] arrays; no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .planset import PlanSet


@dataclass
class StepKeys:
    """Per-plan keys of every step, and what each key means."""

    keys: np.ndarray  # [P, 2L] int64; column 2L is attention of layer L, 2L+1 its MLP
    attn_heads: list[np.ndarray]  # per layer: [n_keys, H] head mask of attention key k
    attn_ln: list[np.ndarray]  # per layer: [n_keys] bool
    mlp_ln: np.ndarray  # [3]: key 1 = with norm, key 2 = /noln

    @property
    def n_steps(self) -> int:
        return int(self.keys.shape[1])


def step_keys(plans: PlanSet) -> StepKeys:
    """Encode a plan set as step keys (attention keys are per-layer ids of
    (norm flag, head mask); MLP keys are 1 = norm, 2 = /noln)."""
    P, L = plans.attn.shape
    keys = np.zeros((P, 2 * L), dtype=np.int64)
    attn_heads, attn_ln = [], []
    for layer in range(L):
        rows = np.concatenate(
            [plans.attn_ln[:, layer, None], plans.heads[:, layer]], axis=1
        ).astype(np.uint8)
        uniq, inv = np.unique(rows, axis=0, return_inverse=True)
        keys[:, 2 * layer] = np.where(plans.attn[:, layer], inv.reshape(-1) + 1, 0)
        attn_ln.append(np.concatenate([[True], uniq[:, 0].astype(bool)]))
        attn_heads.append(np.concatenate([np.zeros((1, uniq.shape[1] - 1), bool),
                                          uniq[:, 1:].astype(bool)]))
        keys[:, 2 * layer + 1] = np.where(plans.mlp[:, layer],
                                          np.where(plans.mlp_ln[:, layer], 1, 2), 0)
    return StepKeys(keys, attn_heads, attn_ln, np.array([True, True, False]))


@dataclass
class Step:
    """The states created by one step: state i of this step has parent state
    ``parent[i]`` of the previous step and was made with ``key[i]`` (0 = copy)."""

    parent: np.ndarray  # [S] int64
    key: np.ndarray  # [S] int64

    @property
    def computed(self) -> np.ndarray:
        return np.nonzero(self.key != 0)[0]


@dataclass
class Tree:
    """Prefix tree of a plan set. ``final_state[p]`` is plan p's state after the
    last step; ``steps[s]`` describes the states of step s."""

    steps: list[Step]
    final_state: np.ndarray  # [P] int64

    def evaluations(self) -> np.ndarray:
        """Computed (non-skipped) states per step: the work the tree does."""
        return np.array([len(s.computed) for s in self.steps])

    def last_attention_step(self) -> int:
        """Index of the last step with attention work (-1 if none)."""
        for s in range(len(self.steps) - 1, -1, -1):
            if s % 2 == 0 and len(self.steps[s].computed):
                return s
        return -1


def build_tree(keys: np.ndarray) -> Tree:
    """Prefix tree from step keys [P, S]."""
    P, S = keys.shape
    state = np.zeros(P, dtype=np.int64)  # everyone starts from the embedding
    steps = []
    for s in range(S):
        k = keys[:, s]
        width = int(k.max()) + 1
        pair = state * width + k
        uniq, inv = np.unique(pair, return_inverse=True)
        steps.append(Step(parent=uniq // width, key=uniq % width))
        state = inv.reshape(-1).astype(np.int64)
    return Tree(steps, state)


def lexicographic_order(keys: np.ndarray) -> np.ndarray:
    """Plan order that puts plans sharing long prefixes next to each other."""
    return np.lexsort(keys.T[::-1])


def naive_evaluations(keys: np.ndarray) -> int:
    """Component evaluations without any sharing (every plan computes every kept
    component): the baseline the tree is compared with."""
    return int((keys != 0).sum())


@dataclass
class SlotPlan:
    """Where each state lives in a fixed-size arena of state tensors.

    ``slots[i][j]`` is the arena slot of state j of step ``first + i``. A state
    made by a skipped step shares its parent's slot; a computed state whose
    parent has no other child is updated in place; other computed states take
    a slot no state of the previous step uses. ``capacity`` = slots needed.
    """

    first: int
    slots: list[np.ndarray]
    capacity: int


def assign_slots(tree: Tree, first: int, stop: int, start_slots: np.ndarray,
                 free_skips: bool = True) -> SlotPlan:
    """Arena slots for steps ``first .. stop-1`` whose input states (the states
    of step ``first - 1``) sit in ``start_slots``. ``free_skips=False`` (mean
    or resample ablation) gives skipped components a slot of their own too."""
    prev = np.asarray(start_slots, dtype=np.int64)
    capacity = int(prev.max()) + 1 if len(prev) else 0
    out = []
    for s in range(first, stop):
        step = tree.steps[s]
        slot = np.empty(len(step.parent), dtype=np.int64)
        copy = (step.key == 0) if free_skips else np.zeros(len(step.key), dtype=bool)
        slot[copy] = prev[step.parent[copy]]
        children = np.bincount(step.parent, minlength=len(prev))
        inplace = ~copy & (children[step.parent] == 1)
        slot[inplace] = prev[step.parent[inplace]]
        fresh = ~copy & ~inplace
        need = int(fresh.sum())
        if need:
            used = np.zeros(capacity + need, dtype=bool)
            used[prev] = True
            free = np.nonzero(~used)[0][:need]
            slot[fresh] = free
            capacity = max(capacity, int(free.max()) + 1)
        out.append(slot)
        prev = slot
    return SlotPlan(first, out, capacity)
