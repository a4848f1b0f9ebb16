"""The tree executor's schedule: every index a walk of one prefix tree needs,
worked out on the host (numpy) before any device work and uploaded in one copy.

Why: indexing a device tensor with a host array is an upload, and on CUDA an
upload from ordinary (pageable) memory waits until the device has finished
everything queued before it. Done per step and batch, as a naive walk does
(about ten index arrays per attention batch), the host would stop the GPU dozens
of times per run and the launches could never run ahead of it. Here the walk is
planned first; the executor then only issues device work: slices of one index
tensor, gathers, the step math and scatters. An index array that is a run of
consecutive slots becomes a slice (a view: no gather, no launch). (CUDA graphs
are not used: the batch shapes of every step change with the plan set, so a
captured graph would replay for no other call.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .tree import Step, StepKeys, Tree


@dataclass(frozen=True)
class Index:
    """An index array in a packed buffer: entries ``start:stop`` (reshaped to
    ``shape``); ``run`` = (a, b) when the values are a, a+1, ..., b-1."""

    start: int
    stop: int
    shape: tuple[int, ...]
    run: tuple[int, int] | None = None
    mask: bool = False  # a bool array (head masks), packed apart from the int64 ones

    def __len__(self) -> int:
        return self.shape[0]


def consecutive(a: np.ndarray) -> tuple[int, int] | None:
    """(a[0], a[-1] + 1) when ``a`` is a run of consecutive integers, else None."""
    if len(a) == 0 or a.ndim != 1:
        return None
    lo = int(a[0])
    return (lo, lo + len(a)) if int(a[-1]) == lo + len(a) - 1 and (
        len(a) < 3 or bool((np.diff(a) == 1).all())) else None


class IndexPack:
    """Host index arrays collected into one int64 and one bool buffer."""

    def __init__(self) -> None:
        self._parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
        self._size = {False: 0, True: 0}

    def add(self, a: np.ndarray, mask: bool = False) -> Index:
        a = np.ascontiguousarray(a, dtype=bool if mask else np.int64)
        start = self._size[mask]
        self._parts[mask].append(a.reshape(-1))
        self._size[mask] += a.size
        run = None if mask else consecutive(a)
        return Index(start, start + a.size, a.shape, run, mask)

    def upload(self, device: torch.device) -> Indices:
        """Both buffers on ``device``, one copy each (pinned and asynchronous on CUDA)."""
        def one(mask: bool) -> torch.Tensor:
            parts = self._parts[mask]
            host = torch.from_numpy(np.concatenate(parts) if parts else
                                    np.zeros(0, bool if mask else np.int64))
            if device.type == "cuda" and torch.cuda.is_available():
                return host.pin_memory().to(device, non_blocking=True)
            return host.to(device)
        return Indices(one(False), one(True))


@dataclass
class Indices:
    """The uploaded buffers; ``get`` gives an index as a device tensor (a view)."""

    ints: torch.Tensor
    masks: torch.Tensor

    def get(self, ix: Index) -> torch.Tensor:
        buf = self.masks if ix.mask else self.ints
        return buf[ix.start:ix.stop].view(ix.shape)

    def take(self, t: torch.Tensor, ix: Index) -> torch.Tensor:
        """``t[ix]`` along dim 0: a view for a run of slots, else a gather."""
        if ix.run is not None:
            return t[ix.run[0]:ix.run[1]]
        return t.index_select(0, self.get(ix))

    def put(self, t: torch.Tensor, ix: Index, value: torch.Tensor) -> None:
        """``t[ix] = value`` along dim 0."""
        if ix.run is not None:
            t[ix.run[0]:ix.run[1]] = value
        else:
            t.index_copy_(0, self.get(ix), value)


# -- the work of one step ----------------------------------------------------
@dataclass
class Move:
    """Skipped states that still need their own slot: moved to the asked
    positions, or given their ablation source (``src`` slots -> ``dst`` slots)."""

    src: Index
    dst: Index


@dataclass
class MlpBatch:
    """States ``src`` -> MLP update (norm applied or not) -> slots ``dst``."""

    norm: bool
    src: Index
    dst: Index


@dataclass
class AttnBatch:
    """Attention for children of the distinct parent slots ``parents``: child i
    is parent ``group[i]``'s residual plus the output of its heads. z is computed
    once per parent in ``need`` (rows of ``parents``); child ``with_heads[j]``
    reads z row ``z_rows[j]`` and keeps the heads of row j of ``head_mask`` (None:
    every head). Children in ``no_heads`` keep no head: output bias (or the
    ablation source) only."""

    norm: bool
    parents: Index
    group: Index
    no_heads: Index | None
    need: Index | None
    z_rows: Index | None
    with_heads: Index | None
    head_mask: Index | None
    dst: Index


@dataclass
class StepWork:
    step: Step
    moves: list[Move] = field(default_factory=list)
    batches: list[MlpBatch | AttnBatch] = field(default_factory=list)


@dataclass
class FinalBatch:
    """Distinct final states (``slots`` of the asked arena); plan ``plans[i]`` (its
    index in the plan set given to the executor) is row ``rows[i]`` of them."""

    slots: Index
    plans: Index
    rows: Index


# -- planning ------------------------------------------------------------------
def runs_of_equal(values: np.ndarray) -> list[tuple[int, int]]:
    """Start/stop of runs of equal values in a sorted array."""
    if len(values) == 0:
        return []
    cut = np.nonzero(np.diff(values.astype(np.int64)))[0] + 1
    edges = np.concatenate([[0], cut, [len(values)]])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def norm_then_parent(apply_norm: np.ndarray, parent: np.ndarray, n_parents: int) -> np.ndarray:
    """Sort key of a step's computed states: by norm flag (one batch applies one
    norm), then by parent (children of one parent sit together, so that the
    parent's attention z is computed once for all its head subsets)."""
    return apply_norm.astype(np.int64) * (n_parents + 1) + parent


def batches(order: np.ndarray, group: np.ndarray, max_rows: int) -> list[np.ndarray]:
    """Indices sorted by ``order``, split where ``group`` changes and cut into
    pieces of at most ``max_rows``."""
    idx = np.argsort(order, kind="stable")
    out = []
    for a, b in runs_of_equal(group[idx]):
        for c in range(a, b, max_rows):
            out.append(idx[c:min(b, c + max_rows)])
    return out


def plan_step(pack: IndexPack, step: Step, keys: StepKeys, src_slots: np.ndarray,
              dst_slots: np.ndarray, move_skipped: bool, max_rows: int) -> StepWork:
    """The work of one step whose input states sit in ``src_slots`` and whose
    states go to ``dst_slots``; ``move_skipped``: skipped states need a slot of
    their own (asked positions, ablation sources)."""
    work = StepWork(step)
    parent_slot = src_slots[step.parent]
    skipped = step.skipped
    if move_skipped:
        for a in range(0, len(skipped), max_rows):
            c = skipped[a:a + max_rows]
            work.moves.append(Move(pack.add(parent_slot[c]), pack.add(dst_slots[c])))
    comp = step.computed
    if len(comp) == 0:
        return work
    apply_norm = keys.applies_norm(step.layer, step.kind, step.key[comp])
    order = norm_then_parent(apply_norm, step.parent[comp], len(src_slots))
    for batch in batches(order, apply_norm, max_rows):
        children = comp[batch]
        norm = bool(apply_norm[batch[0]])
        dst = pack.add(dst_slots[children])
        if step.kind == "mlp":
            work.batches.append(MlpBatch(norm, pack.add(parent_slot[children]), dst))
            continue
        heads = keys.attn_heads[step.layer][step.key[children]]  # [n, H]
        uniq, group = np.unique(parent_slot[children], return_inverse=True)
        group = group.reshape(-1)
        has_heads = heads.any(axis=1)
        no_heads = pack.add(np.nonzero(~has_heads)[0]) if not has_heads.all() else None
        need = z_rows = with_heads = head_mask = None
        if has_heads.any():
            needed = np.unique(group[has_heads])
            where = np.full(len(uniq), -1)
            where[needed] = np.arange(len(needed))
            sel = np.nonzero(has_heads)[0]
            need, z_rows, with_heads = (pack.add(needed), pack.add(where[group[sel]]),
                                        pack.add(sel))
            if not heads[sel].all():
                head_mask = pack.add(heads[sel], mask=True)
        work.batches.append(AttnBatch(norm, pack.add(uniq), pack.add(group), no_heads, need,
                                      z_rows, with_heads, head_mask, dst))
    return work


def plan_finals(pack: IndexPack, tree: Tree, final_slots: np.ndarray, plan_index: np.ndarray,
                unembed_rows: int) -> list[FinalBatch]:
    """The final states in batches of at most ``unembed_rows`` distinct states;
    ``final_slots[s]`` is the slot of final state s, ``plan_index`` the plan-set
    index of each plan of the tree."""
    final_slot = final_slots[tree.final_state]
    uniq, row_of = np.unique(final_slot, return_inverse=True)
    row_of = row_of.reshape(-1)
    by_row = np.argsort(row_of, kind="stable")
    out = []
    for a in range(0, len(uniq), unembed_rows):
        b = min(a + unembed_rows, len(uniq))
        lo, hi = np.searchsorted(row_of[by_row], [a, b])
        owners = by_row[lo:hi]
        out.append(FinalBatch(pack.add(uniq[a:b]), pack.add(plan_index[owners]),
                              pack.add(row_of[owners] - a)))
    return out
