"""Execution: walk a plan set's prefix tree and produce every plan's final
residual stream at the asked positions.

States live in an *arena*, a tensor [capacity, B, T, d] whose slots are planned
ahead by ``schedule.assign_slots``: a skipped component costs nothing, a chain
is updated in place, and every distinct state is computed once. After the last
step that has attention work, only the positions whose logits are asked for are
kept (MLPs are per position), so the last MLPs and the unembedding run on those
positions only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from . import blocks
from .ablation import Sources
from .errors import MemoryBudgetError
from .ops import StepOps
from .planset import PlanSet
from .schedule import StepKeys, Tree, assign_slots, build_tree, lexicographic_order, step_keys
from .weights import StackedWeights


@dataclass
class FinalStates:
    """One batch of final states: ``states[row_of[i]]`` is the final residual
    stream of plan ``plans[i]`` at the asked positions ([B, Q, d] each)."""

    states: torch.Tensor  # [m, B, Q, d]
    plans: np.ndarray  # [k] plan indices (into the plan set given to the executor)
    row_of: np.ndarray  # [k] row of each plan in states


def format_bytes(n: float) -> str:
    """A size for messages: 512 B, 40.0 KiB, 3.2 MiB, 1.50 GiB."""
    if n < 2**10:
        return f"{int(n)} B"
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    if n < 2**30:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**30:.2f} GiB"


def one_plan_arena(plans: PlanSet, full_bytes: int, small_bytes: int, free_skips: bool) -> int:
    """Bytes of residual-stream states one plan of this set can need: a chain
    through every layer (``all``), or through every MLP when no plan has attention."""
    L = plans.n_layers
    ones = np.ones((1, L), bool)
    attn = ones if plans.attn.any() else ~ones
    chain = PlanSet(attn, None, ones, ones, ones)
    _, full, small = TreeExecutor.arena_sizes(build_tree(step_keys(chain).keys), free_skips)
    return full * full_bytes + small * small_bytes


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """Start/stop of runs of equal values in a sorted array."""
    if len(flags) == 0:
        return []
    cut = np.nonzero(np.diff(flags.astype(np.int64)))[0] + 1
    edges = np.concatenate([[0], cut, [len(flags)]])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _batches(order: np.ndarray, group: np.ndarray, max_rows: int) -> list[np.ndarray]:
    """Indices sorted by ``order``, split where ``group`` changes and cut into
    pieces of at most ``max_rows``."""
    idx = np.argsort(order, kind="stable")
    out = []
    for a, b in _runs(group[idx]):
        for c in range(a, b, max_rows):
            out.append(idx[c:min(b, c + max_rows)])
    return out


class TreeExecutor:
    """Runs plan sets over stacked weights with prefix sharing."""

    def __init__(self, weights: StackedWeights, max_rows: int = 256, ops: StepOps | None = None):
        self.w = weights
        self.ops = ops or StepOps(weights)
        self.max_rows = max(1, int(max_rows))  # states per matmul batch

    # -- planning ----------------------------------------------------------
    @staticmethod
    def arena_sizes(tree: Tree, free_skips: bool = True) -> tuple[int, int, int]:
        """(last attention step, full-position slots, asked-position slots)."""
        last = tree.last_attention_step()
        n_steps = len(tree.steps)
        start = np.zeros(1, np.int64)
        if last < 0:
            return last, 0, max(assign_slots(tree, 0, n_steps, start, free_skips).capacity, 1)
        full = assign_slots(tree, 0, last, start, free_skips).capacity
        n_at_last = len(tree.steps[last].parent)
        reduced = assign_slots(tree, last + 1, n_steps, np.arange(n_at_last), free_skips).capacity
        return last, max(full, 1), max(reduced, n_at_last)

    def chunks(self, keys: StepKeys, full_bytes: int, small_bytes: int, budget: int,
               free_skips: bool = True) -> Iterator[tuple[np.ndarray, Tree]]:
        """Split the plans (in lexicographic key order, so that each chunk is a
        few whole subtrees) until each chunk's arenas fit in ``budget`` bytes."""
        pending = [lexicographic_order(keys.keys)]
        while pending:
            idx = pending.pop(0)
            tree = build_tree(keys.keys[idx])
            _, full, small = self.arena_sizes(tree, free_skips)
            need = full * full_bytes + small * small_bytes
            if need <= budget:
                yield idx, tree
            elif len(idx) == 1:
                raise MemoryBudgetError(
                    f"one plan needs {format_bytes(need)} of residual-stream states but the "
                    f"memory budget leaves {format_bytes(budget)} for them; raise max_memory "
                    "or use fewer/shorter prompts"
                )
            else:
                half = len(idx) // 2
                pending[:0] = [idx[:half], idx[half:]]

    # -- running -----------------------------------------------------------
    def run(self, plans: PlanSet, tokens: torch.Tensor, q_pos: torch.Tensor,
            unembed_rows: int = 64, arena_bytes: int = 2**30, sources: Sources | None = None
            ) -> Iterator[FinalStates]:
        """Yield the final states of every plan, in batches of at most
        ``unembed_rows`` distinct states. tokens [B, T]; q_pos [B, Q] positions
        to keep; the state arenas stay within ``arena_bytes``. ``sources``: what
        skipped components contribute (mean/resample ablation; None = zero)."""
        self.sources = sources
        self.sources_q = sources.at(q_pos) if sources is not None else None
        keys = step_keys(plans)
        B, T = tokens.shape
        elem = self.w.dtype.itemsize if hasattr(self.w.dtype, "itemsize") else 4
        full_bytes = B * T * self.w.d_model * elem
        small_bytes = B * q_pos.shape[1] * self.w.d_model * elem
        for idx, tree in self.chunks(keys, full_bytes, small_bytes, arena_bytes,
                                     sources is None):
            for fs in self._run_tree(keys, tree, tokens, q_pos, unembed_rows):
                yield FinalStates(fs.states, idx[fs.plans], fs.row_of)

    def _run_tree(self, keys: StepKeys, tree: Tree, tokens: torch.Tensor, q_pos: torch.Tensor,
                  unembed_rows: int) -> Iterator[FinalStates]:
        w = self.w
        free = self.sources is None
        last, full_cap, small_cap = self.arena_sizes(tree, free)
        n_steps = len(tree.steps)
        B, T = tokens.shape
        Q = q_pos.shape[1]
        if last >= 0:
            full_plan = assign_slots(tree, 0, last, np.zeros(1, np.int64), free)
            arena = w.W_E.new_empty((full_cap, B, T, w.d_model))
            arena[0] = blocks.embed(tokens, w)
            prev = np.zeros(1, np.int64)
            for s in range(0, last):
                slots = full_plan.slots[s]
                self._step(s, keys, tree, arena, prev, arena, slots, None, self.sources)
                prev = slots
            # the last attention step reads every position and writes asked ones only
            n_at_last = len(tree.steps[last].parent)
            small = w.W_E.new_empty((small_cap, B, Q, w.d_model))
            self._step(last, keys, tree, arena, prev, small, np.arange(n_at_last), q_pos,
                       self.sources_q)
            del arena
            prev = np.arange(n_at_last)
            first = last + 1
        else:  # no attention in any plan: every component is per position
            small = w.W_E.new_empty((small_cap, B, Q, w.d_model))
            small[0] = blocks.embed(tokens, w, q_pos)
            prev = np.zeros(1, np.int64)
            first = 0
        reduced_plan = assign_slots(tree, first, n_steps, prev, free)
        for i, s in enumerate(range(first, n_steps)):
            slots = reduced_plan.slots[i]
            self._step(s, keys, tree, small, prev, small, slots, None, self.sources_q)
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
            states = small.index_select(0, torch.as_tensor(uniq[a:b], device=small.device))
            yield FinalStates(states, owners, row_of[owners] - a)

    def _step(self, s: int, keys: StepKeys, tree: Tree, src: torch.Tensor, src_slots: np.ndarray,
              dst: torch.Tensor, dst_slots: np.ndarray, q_pos: torch.Tensor | None,
              sources: Sources | None) -> None:
        """Make the states of step ``s`` in ``dst`` from those of step s-1 in ``src``.
        With ``q_pos``, ``dst`` holds asked positions only (src has every position);
        ``sources`` (at dst's positions) is what a skipped component adds."""
        step = tree.steps[s]
        dev = src.device
        parent_slot = src_slots[step.parent]
        layer, is_attn = s // 2, s % 2 == 0
        skipped = np.nonzero(step.key == 0)[0]
        if len(skipped) and (q_pos is not None or sources is not None):
            add = None if sources is None else (sources.attn if is_attn else sources.mlp)[layer]
            for a in range(0, len(skipped), self.max_rows):
                c = skipped[a:a + self.max_rows]
                x = src.index_select(0, torch.as_tensor(parent_slot[c], device=dev))
                if q_pos is not None:
                    x = blocks.at_positions(x, q_pos)
                dst[torch.as_tensor(dst_slots[c], device=dev)] = x if add is None else x + add
        comp = step.computed
        if len(comp) == 0:
            return
        k = step.key[comp]
        if is_attn:
            ln = keys.attn_ln[layer][k]
            heads = keys.attn_heads[layer][k]
        else:
            ln = keys.mlp_ln[k]
            heads = None
        # batch by (norm flag, parent) so one z serves every head subset of a parent
        order = ln.astype(np.int64) * (len(src_slots) + 1) + step.parent[comp]
        for batch in _batches(order, ln, self.max_rows):
            children = comp[batch]
            out_slots = torch.as_tensor(dst_slots[children], device=dev)
            apply_ln = bool(ln[batch[0]])
            if is_attn:
                new = self._attention(src, parent_slot[children], heads[batch], layer, apply_ln,
                                      q_pos, sources)
            else:
                x = src.index_select(0, torch.as_tensor(parent_slot[children], device=dev))
                new = self.ops.mlp_update(x, layer, apply_ln)
            dst[out_slots] = new

    def _attention(self, src: torch.Tensor, parent_slots: np.ndarray, heads: np.ndarray,
                   layer: int, apply_ln: bool, q_pos: torch.Tensor | None,
                   sources: Sources | None) -> torch.Tensor:
        """Residual + attention output for children with the given parents and
        head masks; z is computed once per distinct parent. Removed heads take
        the source's z (zero ablation: nothing)."""
        dev = src.device
        uniq, group = np.unique(parent_slots, return_inverse=True)
        group = group.reshape(-1)
        x = src.index_select(0, torch.as_tensor(uniq, device=dev))
        resid = x if q_pos is None else blocks.at_positions(x, q_pos)
        new = resid.index_select(0, torch.as_tensor(group, device=dev))
        has_heads = heads.any(axis=1)
        if not has_heads.all():  # every head removed: the output bias (+ the source's heads)
            none = torch.as_tensor(np.nonzero(~has_heads)[0], device=dev)
            new[none] += self.w.b_O[layer] if sources is None else sources.attn[layer]
        if has_heads.any():
            need = np.unique(group[has_heads])
            z = self.ops.attention_z(x.index_select(0, torch.as_tensor(need, device=dev)),
                                     layer, apply_ln, q_pos)
            where = np.full(len(uniq), -1)
            where[need] = np.arange(len(need))
            sel = np.nonzero(has_heads)[0]
            z = z.index_select(0, torch.as_tensor(where[group[sel]], device=dev))
            mask = None if heads[sel].all() else torch.as_tensor(heads[sel], device=dev)
            if mask is not None and sources is not None:
                z = torch.where(mask[:, None, None, :, None], z, sources.z[layer])
                mask = None
            sel_t = torch.as_tensor(sel, device=dev)
            new[sel_t] = self.ops.attention_update(new[sel_t], z, layer, mask)
        return new


def work_flops(keys: np.ndarray, w: StackedWeights, n_prompts: int, n_tokens: int,
               n_asked: int) -> dict[str, float]:
    """Matmul FLOPs of a plan set with step keys [P, 2L]: ``tree`` is what the
    executor spends (distinct states only; after the last attention step, asked
    positions only), ``naive`` what the same plans cost without sharing (every
    plan computes its kept components at every position)."""
    tree = build_tree(keys)
    per_tok = w.flops_per_token()
    d, hd, kd = w.d_model, w.n_heads * w.d_head, w.n_kv_heads * w.d_head
    qo, kv = 2 * d * 2 * hd, 2 * d * 2 * kd  # per token: Q and O projections; K and V
    last = tree.last_attention_step()
    B, T, Q = n_prompts, n_tokens, n_asked
    shared = 0.0
    for s, step in enumerate(tree.steps):
        n = len(step.computed)
        if s % 2 == 0:
            shared += n * B * (T * kv + (T if s < last else Q) * qo)
        else:
            shared += n * B * (T if s < last else Q) * per_tok["mlp"]
    P = keys.shape[0]
    finals = len(np.unique(tree.final_state))
    unembed = B * Q * per_tok["unembed"]
    kept_attn, kept_mlp = (keys[:, 0::2] != 0).sum(), (keys[:, 1::2] != 0).sum()
    naive = B * T * (kept_attn * per_tok["attn"] + kept_mlp * per_tok["mlp"]) + P * unembed
    return {"tree": shared + finals * unembed, "naive": float(naive), "plans": float(P)}
