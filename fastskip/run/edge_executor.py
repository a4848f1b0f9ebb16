"""The edge executor: run the programs of ``edge_schedule`` over stacked weights
and hand out every edge plan's final state (the logits receiver's input at the
asked positions), as the tree executor does for node plans.

Per stage in model order: build the stage's distinct receiver inputs from the
value arena (matrix products for dense inputs, a few gathered rows for sparse
ones and corrections), then compute the values they feed: per query head its
queries, the keys and values of its key/value head and its output through W_O;
or the MLP. A value is stored as D = output - ablation value, so an input is
always ``baseline + sum of its kept senders' D``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..model import StackedWeights, blocks
from ..model import split_attention as split
from ..model.ops import StepOps
from ..plans import EdgeGraph, EdgePlanSet
from .edge_schedule import EdgeProgram, Mixing, StageProgram, build_program
from .memory import MemorySizes, element_bytes, ensure_fits, memory_sizes_per_row
from .schedule import runs_of_equal
from .sources import Sources
from .tree_executor import FinalStates

SYMBOLIC_CELLS = 2**27  # plans x receivers x senders scheduled at once, at most


class EdgeAblation:
    """What removed edges carry, for one batch [B, T]: each sender's ablation
    value (None everywhere: zero ablation) and each stage's baseline (every
    sender before it ablated, plus the attention output biases before it)."""

    def __init__(self, w: StackedWeights, sources: Sources | None, B: int, T: int):
        self.w = w
        self.sources = sources
        self._heads: dict[int, torch.Tensor] = {}
        zero = w.W_E.new_zeros((B, T, w.d_model))
        self.embed = zero if sources is None else sources.embed[0].to(w.dtype)
        base = self.embed
        self.baselines = [base]  # stage 0, 1, ..., 2 n_layers
        for L in range(w.n_layers):
            heads = self.head(L)
            base = base + w.layers.b_O[L] + (0 if heads is None else heads.sum(0))
            self.baselines.append(base)
            mlp = self.mlp(L)
            base = base if mlp is None else base + mlp
            self.baselines.append(base)

    def head(self, layer: int) -> torch.Tensor | None:
        """Ablation values of ``layer``'s heads [H, B, T, d] (None: zero)."""
        if self.sources is None:
            return None
        if layer not in self._heads:
            z = self.sources.z[layer].to(self.w.dtype)
            self._heads[layer] = split.head_outputs_of_z(z, self.w.layer(layer), self.w.config)
        return self._heads[layer]

    def mlp(self, layer: int) -> torch.Tensor | None:
        return None if self.sources is None else self.sources.mlp[layer].to(self.w.dtype)


def _rows(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long, device=device)


class EdgeExecutor:
    """Runs edge plan sets; ``max_rows`` states per matmul batch."""

    def __init__(self, weights: StackedWeights, max_rows: int = 256, ops: StepOps | None = None):
        self.w = weights
        self.ops = ops or StepOps(weights)
        self.max_rows = max(1, int(max_rows))

    def chunks(self, plans: EdgePlanSet, state_bytes: int, budget: int
               ) -> Iterator[tuple[np.ndarray, EdgeProgram]]:
        """Programs for pieces of the plan set whose arena and stage inputs fit in
        ``budget`` bytes (``state_bytes`` per [B, T, d] state); halves until they do."""
        g = plans.graph
        per = max(1, SYMBOLIC_CELLS // (g.n_receivers * g.n_senders))
        pending = [np.arange(a, min(a + per, len(plans))) for a in range(0, len(plans), per)]
        while pending:
            idx = pending.pop(0)
            program = build_program(plans.masks[idx], g)
            need = program_bytes(program, state_bytes)
            if need <= budget:
                yield idx, program
            elif len(idx) == 1:
                ensure_fits(need, budget, "one edge plan's values and receiver inputs",
                            "raise max_memory or use fewer/shorter prompts")
            else:
                half = len(idx) // 2
                pending[:0] = [idx[:half], idx[half:]]

    def run(self, plans: EdgePlanSet, tokens: torch.Tensor, q_pos: torch.Tensor,
            unembed_rows: int = 64, arena_bytes: int = 2**30, sources: Sources | None = None
            ) -> Iterator[FinalStates]:
        """Yield every plan's final state at ``q_pos`` [B, Q], in batches of at most
        ``unembed_rows`` distinct states. tokens [B, T]; ``sources``: the ablation
        (None: zero)."""
        B, T = tokens.shape
        one = B * T * self.w.d_model * element_bytes(self.w.dtype)
        abl = EdgeAblation(self.w, sources, B, T)
        for idx, program in self.chunks(plans, one, arena_bytes):
            for fs in self._run(program, tokens, q_pos, unembed_rows, abl):
                yield FinalStates(fs.states, idx[fs.plans], fs.row_of)

    # -- one program -------------------------------------------------------------------
    def _run(self, program: EdgeProgram, tokens: torch.Tensor, q_pos: torch.Tensor,
             unembed_rows: int, abl: EdgeAblation) -> Iterator[FinalStates]:
        w = self.w
        B, T = tokens.shape
        dev = tokens.device
        arena = w.W_E.new_empty((program.n_rows, B, T, w.d_model))
        embed = blocks.embed(tokens, w) - abl.embed
        arena[_rows(program.embed_rows, dev)] = embed
        final = None
        for st in program.stages:
            x = self._mix(st.mixing, arena, abl.baselines[st.stage])
            if st.kind == "attn":
                self._attention(st, x, arena, abl)
            elif st.kind == "mlp":
                self._mlp(st, x, arena, abl)
            else:
                final = x
            del x
        del arena
        assert final is not None
        # plans that share a final input share its state
        row_of = program.final_of_plan
        by_row = np.argsort(row_of, kind="stable")
        for a in range(0, program.n_final, unembed_rows):
            b = min(a + unembed_rows, program.n_final)
            lo, hi = np.searchsorted(row_of[by_row], [a, b])
            owners = by_row[lo:hi]
            states = blocks.at_positions(final[a:b], q_pos)
            yield FinalStates(states, owners, row_of[owners] - a)

    def _mix(self, mix: Mixing, arena: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
        """The stage's distinct receiver inputs [n, B, T, d]."""
        dev = arena.device
        x = arena.new_empty((mix.n, *arena.shape[1:]))
        width = int(np.prod(arena.shape[1:]))
        flat, x_flat = arena.view(arena.shape[0], width), x.view(mix.n, width)
        base_flat = baseline.reshape(1, -1)
        for grp in mix.dense:
            # one matrix product over the owner plan's block, contiguous arena rows,
            # straight into the inputs' contiguous rows (no gather, no scatter)
            k = grp.coef.shape[1]
            coef = torch.as_tensor(grp.coef, dtype=arena.dtype, device=dev)
            torch.addmm(base_flat, coef, flat[grp.start:grp.start + k],
                        out=x_flat[grp.first:grp.first + grp.count])
        a, b = mix.direct
        x[a:b] = baseline
        c0, c1 = mix.corrected
        late = mix.term_input >= c0
        self._add_terms(x, arena, mix, ~late)
        if c1 > c0:
            # a correction starts from the reference plan's input of the same receiver
            # and adds only the senders whose kept state or value differ from it
            x[c0:c1] = x.index_select(0, _rows(mix.base, dev))
            self._add_terms(x, arena, mix, late)
        return x

    def _add_terms(self, x: torch.Tensor, arena: torch.Tensor, mix: Mixing, which: np.ndarray
                   ) -> None:
        """x[input] += sign * arena[row] for the selected terms, a batch of rows at a time."""
        dev = arena.device
        idx = np.flatnonzero(which)
        for sign in (1.0, -1.0):
            part = idx[mix.term_sign[idx] == sign]
            for a in range(0, len(part), self.max_rows):
                t = part[a:a + self.max_rows]
                x.index_add_(0, _rows(mix.term_input[t], dev),
                             arena.index_select(0, _rows(mix.term_row[t], dev)), alpha=sign)

    def _store(self, st: StageProgram, arena: torch.Tensor, values: np.ndarray,
               delta: torch.Tensor) -> None:
        """Write values (ids) with their D [m, B, T, d] into all their arena rows."""
        sel = np.isin(st.scatter_value, values)
        order = np.argsort(values)
        pos = order[np.searchsorted(values[order], st.scatter_value[sel])]
        dev = arena.device
        arena.index_copy_(0, _rows(st.scatter_row[sel], dev),
                          delta.index_select(0, _rows(pos, dev)))

    def _by_head(self, x: torch.Tensor, rows: np.ndarray, heads: np.ndarray,
                 weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x[rows[i]] @ weight[heads[i]] (+ bias[heads[i]])`` for pairs sorted by
        head: [n, B, T, out]. One batched product over the heads present (each
        head's rows padded to the longest run): a [rows, d] x [d, d_head] product per
        head runs an order of magnitude below a CPU's matmul speed, one batched
        product near it."""
        dev = x.device
        runs = runs_of_equal(heads)
        if not runs:
            return x.new_empty((0, *x.shape[1:-1], weight.shape[-1]))
        longest = max(b - a for a, b in runs)
        pick = np.empty((len(runs), longest), dtype=np.int64)
        real = np.empty(len(rows), dtype=np.int64)
        for j, (a, b) in enumerate(runs):
            pick[j, :b - a] = rows[a:b]
            pick[j, b - a:] = rows[a]  # padding, dropped below
            real[a:b] = j * longest + np.arange(b - a)
        present = _rows(heads[[a for a, _ in runs]], dev)
        grouped = x.index_select(0, _rows(pick.reshape(-1), dev))
        grouped = grouped.view(len(runs), longest * int(np.prod(x.shape[1:-1])), x.shape[-1])
        w = weight.index_select(0, present)
        out = torch.bmm(grouped, w) if bias is None else torch.baddbmm(
            bias.index_select(0, present)[:, None, :], grouped, w)
        out = out.view(len(runs) * longest, *x.shape[1:-1], w.shape[-1])
        return out.index_select(0, _rows(real, dev))

    def _attention(self, st: StageProgram, x: torch.Tensor, arena: torch.Tensor,
                   abl: EdgeAblation) -> None:
        work = st.attention
        assert work is not None
        if not len(work.values):  # no head of this layer is read by a kept path
            return
        w, cfg = self.w, self.w.config
        lw = w.layer(st.layer)
        dev = x.device
        xn = split.attention_norm(x, lw, cfg)
        proj = {}
        for kind, pairs in (("q", work.queries), ("k", work.keys), ("v", work.vals)):
            W, bias = split.head_weights(lw, cfg, kind)
            out = self._by_head(xn, pairs.inputs, pairs.heads, W, bias)
            proj[kind] = split.rotated(out, cfg, w.rotary) if kind != "v" else out
        del xn
        W_O = split.w_o_heads(lw, cfg)
        ablated = abl.head(st.layer)
        for a in range(0, len(work.values), self.max_rows):
            part = slice(a, a + self.max_rows)
            heads = work.heads[part]
            # every head of the layer in one batch: the pattern does not care which head
            z = split.attention_z(proj["q"][_rows(work.q[part], dev)],
                                  proj["k"][_rows(work.k[part], dev)],
                                  proj["v"][_rows(work.v[part], dev)], cfg)
            out = self._by_head(z, np.arange(len(heads)), heads, W_O)
            if ablated is not None:
                out -= ablated.index_select(0, _rows(heads, dev))
            self._store(st, arena, work.values[part], out)

    def _mlp(self, st: StageProgram, x: torch.Tensor, arena: torch.Tensor, abl: EdgeAblation
             ) -> None:
        assert st.mlp_values is not None
        lw = self.w.layer(st.layer)
        ablated = abl.mlp(st.layer)
        for a in range(0, len(st.mlp_values), self.max_rows):
            out = split.mlp(x[a:a + self.max_rows], lw, self.w.config)
            if ablated is not None:
                out -= ablated
            self._store(st, arena, st.mlp_values[a:a + self.max_rows], out)


def edge_memory_sizes(w: StackedWeights, graph: EdgeGraph, B: int, T: int, Q: int
                      ) -> MemorySizes:
    """``MemorySizes`` of edge plans: matmul rows and logits as for node plans; one
    plan's states are a block of every sender's value plus a stage's inputs and
    their norms (q of every head, k and v of every key/value head)."""
    nodes = memory_sizes_per_row(w, B, T, Q)
    per_stage = graph.n_heads + 2 * graph.n_kv_heads
    states = (graph.n_senders + 2 * per_stage) * B * T * w.d_model * element_bytes(w.dtype)
    return MemorySizes(nodes.per_row, nodes.per_final, states)


def program_bytes(program: EdgeProgram, state_bytes: int) -> int:
    """Bytes of a program's arena and of the largest stage's inputs (and their norms)."""
    return (program.n_rows + 2 * program.max_inputs) * state_bytes
