"""The tree executor: walk a plan set's prefix tree and produce every plan's
final residual stream at the asked positions.

States live in an *arena*, a tensor [capacity, B, T, d] whose slots are planned
ahead by ``tree.assign_slots``: a skipped component costs nothing, a chain is
updated in place, and every distinct state is computed once. After the last
step that has attention work, only the positions whose logits are asked for are
kept (MLPs are per position), so the last MLPs and the unembedding run on those
positions only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..model import StackedWeights, blocks
from ..model.ops import StepOps
from ..plans import PlanSet
from .memory import ensure_fits, state_bytes
from .sources import Sources
from .tree import (
    Step,
    StepKeys,
    Tree,
    arena_sizes,
    assign_slots,
    build_tree,
    lexicographic_order,
    step_keys,
)


@dataclass
class FinalStates:
    """One batch of final states: ``states[row_of[i]]`` is the final residual
    stream of plan ``plans[i]`` at the asked positions ([B, Q, d] each)."""

    states: torch.Tensor  # [m, B, Q, d]
    plans: np.ndarray  # [k] plan indices (into the plan set given to the executor)
    row_of: np.ndarray  # [k] row of each plan in states


@dataclass
class StepIO:
    """Where one step reads and writes: the previous step's states sit in
    ``src[src_slots]``, this step's go to ``dst[dst_slots]``. With ``q_pos`` [B, Q],
    ``dst`` holds the asked positions only (``src`` every position); ``sources``
    (at dst's positions) is what a skipped component adds (None: zero ablation)."""

    src: torch.Tensor
    src_slots: np.ndarray
    dst: torch.Tensor
    dst_slots: np.ndarray
    q_pos: torch.Tensor | None
    sources: Sources | None


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


class TreeExecutor:
    """Runs plan sets over stacked weights with prefix sharing; ``max_rows``
    states per matmul batch."""

    def __init__(self, weights: StackedWeights, max_rows: int = 256, ops: StepOps | None = None):
        self.w = weights
        self.ops = ops or StepOps(weights)
        self.max_rows = max(1, int(max_rows))

    def chunks(self, keys: StepKeys, full_bytes: int, asked_bytes: int, budget: int,
               free_skips: bool = True) -> Iterator[tuple[np.ndarray, Tree]]:
        """Split the plans (in lexicographic key order, so that each chunk is a
        few whole subtrees) until each chunk's arenas fit in ``budget`` bytes."""
        pending = [lexicographic_order(keys.keys)]
        while pending:
            idx = pending.pop(0)
            tree = build_tree(keys.keys[idx])
            sizes = arena_sizes(tree, free_skips)
            need = sizes.full * full_bytes + sizes.asked * asked_bytes
            if need <= budget:
                yield idx, tree
            elif len(idx) == 1:
                ensure_fits(need, budget, "one plan's residual-stream states",
                            "raise max_memory or use fewer/shorter prompts")
            else:
                half = len(idx) // 2
                pending[:0] = [idx[:half], idx[half:]]

    def run(self, plans: PlanSet, tokens: torch.Tensor, q_pos: torch.Tensor,
            unembed_rows: int = 64, arena_bytes: int = 2**30, sources: Sources | None = None
            ) -> Iterator[FinalStates]:
        """Yield the final states of every plan, in batches of at most
        ``unembed_rows`` distinct states. tokens [B, T]; q_pos [B, Q] positions
        to keep; the state arenas stay within ``arena_bytes``. ``sources``: what
        skipped components contribute (mean/resample ablation; None = zero)."""
        keys = step_keys(plans)
        B, T = tokens.shape
        sb = state_bytes(self.w, B, T, q_pos.shape[1])
        for idx, tree in self.chunks(keys, sb.full, sb.asked, arena_bytes, sources is None):
            for fs in self._run_tree(keys, tree, tokens, q_pos, unembed_rows, sources):
                yield FinalStates(fs.states, idx[fs.plans], fs.row_of)

    def _run_tree(self, keys: StepKeys, tree: Tree, tokens: torch.Tensor, q_pos: torch.Tensor,
                  unembed_rows: int, sources: Sources | None) -> Iterator[FinalStates]:
        w = self.w
        free = sources is None
        sizes = arena_sizes(tree, free)
        last = sizes.last_attention
        B, T = tokens.shape
        Q = q_pos.shape[1]
        sources_q = sources.at(q_pos) if sources is not None else None
        asked = w.W_E.new_empty((sizes.asked, B, Q, w.d_model))
        start = np.zeros(1, np.int64)  # the embedding, in slot 0
        if last >= 0:
            full = w.W_E.new_empty((sizes.full, B, T, w.d_model))
            full[0] = blocks.embed(tokens, w)
            prev = start
            for s, slots in enumerate(assign_slots(tree, 0, last, start, free).slots):
                self._step(tree.steps[s], keys, StepIO(full, prev, full, slots, None, sources))
                prev = slots
            # the last attention step reads every position and writes the asked ones only
            at_last = np.arange(len(tree.steps[last].parent))
            self._step(tree.steps[last], keys, StepIO(full, prev, asked, at_last, q_pos,
                                                      sources_q))
            del full
            prev, first = at_last, last + 1
        else:  # no attention in any plan: every component is per position
            asked[0] = blocks.embed(tokens, w, q_pos)
            prev, first = start, 0
        for s, slots in enumerate(assign_slots(tree, first, len(tree.steps), prev, free).slots,
                                  start=first):
            self._step(tree.steps[s], keys, StepIO(asked, prev, asked, slots, None, sources_q))
            prev = slots
        # hand out the final states, one batch of distinct states at a time
        final_slot = prev[tree.final_state]
        uniq, row_of = np.unique(final_slot, return_inverse=True)
        row_of = row_of.reshape(-1)
        by_row = np.argsort(row_of, kind="stable")
        for a in range(0, len(uniq), unembed_rows):
            b = min(a + unembed_rows, len(uniq))
            lo, hi = np.searchsorted(row_of[by_row], [a, b])
            owners = by_row[lo:hi]
            states = asked.index_select(0, torch.as_tensor(uniq[a:b], device=asked.device))
            yield FinalStates(states, owners, row_of[owners] - a)

    def _step(self, step: Step, keys: StepKeys, io: StepIO) -> None:
        """Make the states of ``step`` from those of the step before it."""
        dev = io.src.device
        parent_slot = io.src_slots[step.parent]
        skipped = step.skipped
        # a skipped state shares its parent's slot, unless it must move to the asked
        # positions or take its ablation source
        if len(skipped) and (io.q_pos is not None or io.sources is not None):
            add = None if io.sources is None else io.sources.output(step.kind, step.layer)
            for a in range(0, len(skipped), self.max_rows):
                c = skipped[a:a + self.max_rows]
                x = io.src.index_select(0, torch.as_tensor(parent_slot[c], device=dev))
                if io.q_pos is not None:
                    x = blocks.at_positions(x, io.q_pos)
                io.dst[torch.as_tensor(io.dst_slots[c], device=dev)] = x if add is None \
                    else x + add
        comp = step.computed
        if len(comp) == 0:
            return
        apply_norm = keys.applies_norm(step.layer, step.kind, step.key[comp])
        order = norm_then_parent(apply_norm, step.parent[comp], len(io.src_slots))
        for batch in batches(order, apply_norm, self.max_rows):
            children = comp[batch]
            norm = bool(apply_norm[batch[0]])
            if step.kind == "attn":
                heads = keys.attn_heads[step.layer][step.key[children]]
                new = self._attention(io, parent_slot[children], heads, step.layer, norm)
            else:
                x = io.src.index_select(0, torch.as_tensor(parent_slot[children], device=dev))
                new = self.ops.mlp_update(x, step.layer, norm)
            io.dst[torch.as_tensor(io.dst_slots[children], device=dev)] = new

    def _attention(self, io: StepIO, parent_slots: np.ndarray, heads: np.ndarray, layer: int,
                   apply_norm: bool) -> torch.Tensor:
        """Residual + attention output for children with the given parent slots and
        head masks [n, H]; z is computed once per distinct parent. Removed heads
        take the source's z (zero ablation: nothing)."""
        dev = io.src.device
        uniq, group = np.unique(parent_slots, return_inverse=True)
        group = group.reshape(-1)
        x = io.src.index_select(0, torch.as_tensor(uniq, device=dev))
        resid = x if io.q_pos is None else blocks.at_positions(x, io.q_pos)
        new = resid.index_select(0, torch.as_tensor(group, device=dev))
        has_heads = heads.any(axis=1)
        if not has_heads.all():  # every head removed: the output bias (+ the source's heads)
            none = torch.as_tensor(np.nonzero(~has_heads)[0], device=dev)
            new[none] += (self.w.layers.b_O[layer] if io.sources is None
                          else io.sources.attn[layer])
        if has_heads.any():
            need = np.unique(group[has_heads])
            z = self.ops.attention_z(x.index_select(0, torch.as_tensor(need, device=dev)),
                                     layer, apply_norm, io.q_pos)
            where = np.full(len(uniq), -1)
            where[need] = np.arange(len(need))
            sel = np.nonzero(has_heads)[0]
            z = z.index_select(0, torch.as_tensor(where[group[sel]], device=dev))
            mask = None if heads[sel].all() else torch.as_tensor(heads[sel], device=dev)
            if mask is not None and io.sources is not None:
                z = torch.where(mask[:, None, None, :, None], z, io.sources.z[layer])
                mask = None
            sel_t = torch.as_tensor(sel, device=dev)
            new[sel_t] = self.ops.attention_update(new[sel_t], z, layer, mask)
        return new

