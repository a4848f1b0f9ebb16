"""Scheduling: a plan set as a prefix tree in model order.

Computation runs in steps, in the model's order: layer 0 attention, layer 0
MLP, layer 1 attention, ... Each plan has a *key* per step: 0 = skipped,
otherwise an id of what the step does (which heads, whether the norm is
applied). Plans that agree on every key up to a step share the residual stream
there, so the distinct states at step s are the distinct pairs (state at s-1,
key at s). A skipped step creates no work: its state *is* the parent's state.

Everything here is numpy over [P, steps] arrays; no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from ..plans import PlanSet

StepKind = Literal["attn", "mlp"]
SKIPPED = 0  # the key of a skipped step, in every step

# MLP keys: what an MLP step does. MLP_APPLIES_NORM[key] says whether the norm is
# applied (entry 0, the skipped key, is never read).
MLP_WITH_NORM, MLP_NO_NORM = 1, 2
MLP_APPLIES_NORM = np.array([True, True, False])


def step_index(layer: int, kind: StepKind) -> int:
    """The position of a layer's attention or MLP in the model's order."""
    return 2 * layer + (kind == "mlp")


def step_name(s: int) -> tuple[int, StepKind]:
    """The layer and kind of step ``s``."""
    return s // 2, "attn" if s % 2 == 0 else "mlp"


@dataclass
class StepKeys:
    """Per-plan keys of every step, and what each attention key means."""

    keys: np.ndarray  # [P, 2L] int64, columns in model order (see step_index)
    attn_heads: list[np.ndarray]  # per layer: [n_keys, H] the heads attention key k keeps
    attn_norm: list[np.ndarray]  # per layer: [n_keys] bool, attention key k applies the norm

    @property
    def n_steps(self) -> int:
        return int(self.keys.shape[1])

    def applies_norm(self, layer: int, kind: StepKind, key: np.ndarray) -> np.ndarray:
        """Whether each of these keys of a step applies the norm before it."""
        table = self.attn_norm[layer] if kind == "attn" else MLP_APPLIES_NORM
        return table[key]


def step_keys(plans: PlanSet) -> StepKeys:
    """Encode a plan set as step keys: an attention key is a per-layer id of the
    pair (norm flag, head mask), an MLP key is MLP_WITH_NORM or MLP_NO_NORM."""
    P, L = plans.attn.shape
    keys = np.zeros((P, 2 * L), dtype=np.int64)
    attn_heads, attn_norm = [], []
    for layer in range(L):
        rows = np.concatenate(
            [plans.attn_ln[:, layer, None], plans.heads[:, layer]], axis=1
        ).astype(np.uint8)
        uniq, inv = np.unique(rows, axis=0, return_inverse=True)
        keys[:, step_index(layer, "attn")] = np.where(plans.attn[:, layer], inv.reshape(-1) + 1,
                                                      SKIPPED)
        attn_norm.append(np.concatenate([[True], uniq[:, 0].astype(bool)]))
        attn_heads.append(np.concatenate([np.zeros((1, uniq.shape[1] - 1), bool),
                                          uniq[:, 1:].astype(bool)]))
        keys[:, step_index(layer, "mlp")] = np.where(
            plans.mlp[:, layer], np.where(plans.mlp_ln[:, layer], MLP_WITH_NORM, MLP_NO_NORM),
            SKIPPED)
    return StepKeys(keys, attn_heads, attn_norm)


@dataclass
class Step:
    """The states created by one step: state i of this step has parent state
    ``parent[i]`` of the previous step and was made with ``key[i]`` (SKIPPED =
    the parent's state passed on)."""

    layer: int
    kind: StepKind
    parent: np.ndarray  # [S] int64
    key: np.ndarray  # [S] int64

    @property
    def computed(self) -> np.ndarray:
        """The states this step computes (not skipped)."""
        return np.nonzero(self.key != SKIPPED)[0]

    @property
    def skipped(self) -> np.ndarray:
        """The states that pass their parent's state on."""
        return np.nonzero(self.key == SKIPPED)[0]


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
            if self.steps[s].kind == "attn" and len(self.steps[s].computed):
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
        steps.append(Step(*step_name(s), parent=uniq // width, key=uniq % width))
        state = inv.reshape(-1).astype(np.int64)
    return Tree(steps, state)


def lexicographic_order(keys: np.ndarray) -> np.ndarray:
    """Plan order that puts plans sharing long prefixes next to each other."""
    return np.lexsort(keys.T[::-1])


def naive_evaluations(keys: np.ndarray) -> int:
    """Component evaluations without any sharing (every plan computes every kept
    component): the baseline the tree is compared with."""
    return int((keys != SKIPPED).sum())


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
        copy = (step.key == SKIPPED) if free_skips else np.zeros(len(step.key), dtype=bool)
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


class ArenaSizes(NamedTuple):
    """Slots a tree needs: until its last attention step every position is kept
    (``full`` slots of [B, T, d]); from there on only the asked positions
    (``asked`` slots of [B, Q, d])."""

    last_attention: int  # -1: no plan has attention
    full: int
    asked: int


def arena_sizes(tree: Tree, free_skips: bool = True) -> ArenaSizes:
    """The arena slots ``tree`` needs (see ``ArenaSizes``)."""
    last = tree.last_attention_step()
    n_steps = len(tree.steps)
    start = np.zeros(1, np.int64)
    if last < 0:
        asked = assign_slots(tree, 0, n_steps, start, free_skips).capacity
        return ArenaSizes(last, 0, max(asked, 1))
    full = assign_slots(tree, 0, last, start, free_skips).capacity
    n_at_last = len(tree.steps[last].parent)
    asked = assign_slots(tree, last + 1, n_steps, np.arange(n_at_last), free_skips).capacity
    return ArenaSizes(last, max(full, 1), max(asked, n_at_last))
