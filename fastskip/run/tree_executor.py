"""The tree executor: walk a plan set's prefix tree and produce every plan's
final residual stream at the asked positions.

States live in an *arena*, a tensor [capacity, B, T, d] whose slots are planned
ahead by ``tree.assign_slots``: a skipped component costs nothing, a chain is
updated in place, and every distinct state is computed once. After the last
step that has attention work, only the positions whose logits are asked for are
kept (MLPs are per position), so the last MLPs and the unembedding run on those
positions only. Every index of the walk is planned on the host first and
uploaded in one copy (``fastskip.run.schedule``): the walk itself only issues
device work.
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
from .schedule import AttnBatch, IndexPack, Indices, StepWork, plan_finals, plan_step
from .sources import Sources
from .tree import (
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
    stream of plan ``plans[i]`` at the asked positions ([B, Q, d] each); the
    indices are host arrays or tensors on the states' device."""

    states: torch.Tensor  # [m, B, Q, d]
    plans: np.ndarray | torch.Tensor  # [k] plan indices (into the plan set given to the executor)
    row_of: np.ndarray | torch.Tensor  # [k] row of each plan in states


@dataclass
class StepIO:
    """Where one step reads and writes: the previous step's states sit in ``src``,
    this step's go to ``dst`` (the same arena, or with ``q_pos`` [B, Q] the asked
    positions' arena while ``src`` holds every position); ``sources`` (at dst's
    positions) is what a skipped component adds (None: zero ablation)."""

    src: torch.Tensor
    dst: torch.Tensor
    q_pos: torch.Tensor | None
    sources: Sources | None


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
            yield from self._run_tree(keys, tree, idx, tokens, q_pos, unembed_rows, sources)

    def _run_tree(self, keys: StepKeys, tree: Tree, plan_index: np.ndarray,
                  tokens: torch.Tensor, q_pos: torch.Tensor, unembed_rows: int,
                  sources: Sources | None) -> Iterator[FinalStates]:
        w = self.w
        free = sources is None
        sizes = arena_sizes(tree, free)
        last = sizes.last_attention
        n_steps = len(tree.steps)
        B, T = tokens.shape
        Q = q_pos.shape[1]
        # 1. the whole walk on the host: slots, batches, every index, one upload
        pack = IndexPack()

        def plan(first: int, stop: int, prev: np.ndarray) -> tuple[list[StepWork], np.ndarray]:
            works = []
            for s, slots in enumerate(assign_slots(tree, first, stop, prev, free).slots,
                                      start=first):
                works.append(plan_step(pack, tree.steps[s], keys, prev, slots, not free,
                                       self.max_rows))
                prev = slots
            return works, prev

        start = np.zeros(1, np.int64)  # the embedding, in slot 0
        before: list[StepWork] = []
        at_last: StepWork | None = None
        if last >= 0:
            before, prev = plan(0, last, start)
            # the last attention step reads every position and writes the asked ones only
            asked_slots = np.arange(len(tree.steps[last].parent))
            at_last = plan_step(pack, tree.steps[last], keys, prev, asked_slots, True,
                                self.max_rows)
            after, final_slots = plan(last + 1, n_steps, asked_slots)
        else:  # no attention in any plan: every component is per position
            after, final_slots = plan(0, n_steps, start)
        finals = plan_finals(pack, tree, final_slots, plan_index, unembed_rows)
        idx = pack.upload(w.device)
        # 2. the device work
        sources_q = sources.at(q_pos) if sources is not None else None
        asked = w.W_E.new_empty((sizes.asked, B, Q, w.d_model))
        if at_last is not None:
            full = w.W_E.new_empty((sizes.full, B, T, w.d_model))
            full[0] = blocks.embed(tokens, w)
            for work in before:
                self._step(work, idx, StepIO(full, full, None, sources))
            self._step(at_last, idx, StepIO(full, asked, q_pos, sources_q))
            del full
        else:
            asked[0] = blocks.embed(tokens, w, q_pos)
        for work in after:
            self._step(work, idx, StepIO(asked, asked, None, sources_q))
        for fb in finals:  # the final states, one batch of distinct states at a time
            yield FinalStates(idx.take(asked, fb.slots), idx.get(fb.plans), idx.get(fb.rows))

    def _step(self, work: StepWork, idx: Indices, io: StepIO) -> None:
        """Make the states of one step from those of the step before it."""
        step = work.step
        if work.moves:  # skipped states that move to the asked positions or take a source
            add = None if io.sources is None else io.sources.output(step.kind, step.layer)
            for m in work.moves:
                x = idx.take(io.src, m.src)
                if io.q_pos is not None:
                    x = blocks.at_positions(x, io.q_pos)
                idx.put(io.dst, m.dst, x if add is None else x + add)
        for b in work.batches:
            if isinstance(b, AttnBatch):
                new = self._attention(idx, io, b, step.layer)
            else:
                new = self.ops.mlp_update(idx.take(io.src, b.src), step.layer, b.norm)
            idx.put(io.dst, b.dst, new)

    def _attention(self, idx: Indices, io: StepIO, b: AttnBatch, layer: int) -> torch.Tensor:
        """Residual + attention output for the children of one batch; z is computed
        once per distinct parent. Removed heads take the source's z (zero ablation:
        nothing)."""
        x = idx.take(io.src, b.parents)
        resid = x if io.q_pos is None else blocks.at_positions(x, io.q_pos)
        if b.no_heads is None:  # every child keeps a head (block plans: the common case)
            assert b.need is not None and b.z_rows is not None
            return self._heads(idx, io, b, layer, x, idx.take(resid, b.group))
        new = resid.index_select(0, idx.get(b.group))  # a copy: rows change in place
        rows = idx.get(b.no_heads)  # every head removed: the output bias (+ the source's)
        bias = self.w.layer(layer).b_O if io.sources is None else io.sources.attn[layer]
        new.index_add_(0, rows, bias.expand(len(rows), *new.shape[1:]))
        if b.with_heads is not None:
            idx.put(new, b.with_heads, self._heads(idx, io, b, layer, x,
                                                   idx.take(new, b.with_heads)))
        return new

    def _heads(self, idx: Indices, io: StepIO, b: AttnBatch, layer: int, x: torch.Tensor,
               resid: torch.Tensor) -> torch.Tensor:
        """resid + the attention output of the children that keep some head."""
        assert b.need is not None and b.z_rows is not None
        z = self.ops.attention_z(idx.take(x, b.need), layer, b.norm, io.q_pos)
        z = idx.take(z, b.z_rows)
        mask = None if b.head_mask is None else idx.get(b.head_mask)
        if mask is not None and io.sources is not None:
            z = torch.where(mask[:, None, None, :, None], z, io.sources.z[layer])
            mask = None
        return self.ops.attention_update(resid, z, layer, mask)
