"""Circuits of heads and MLPs scored under the mean ablation of Lan & Barez's
circuit search (their ``add_ablation_hook_MLP_head``), sharing work between
calls. Made by ``Runner.mean_ablated_circuits``; ``fastskip.search.seqcont``
drives it.

The ablation, per position, over the *mean prompts*:

* a head outside the circuit outputs its mean z, taken with the full model;
* an MLP outside it outputs its mean output, taken with the circuit's head
  ablation in place (heads outside the circuit at their means, every MLP
  intact): circuits with different heads have different MLP means.

Scoring a circuit naively takes a forward over every mean prompt (its MLP means)
and one over the prompts. Here:

* the *base* circuit (the search's current one) keeps its residual streams of
  the mean prompts and of the prompts before every layer; a circuit that first
  differs from it at layer L starts from the base's states at L, and a removal
  at layer L leaves the base's states up to L valid (they are recomputed from
  there when a later circuit needs them);
* MLP means are needed only for the circuit's ablated MLPs, and the mean at
  layer l depends only on the heads of layers <= l: means are memoized by that
  key, so circuits that differ only in MLPs, or from the base only above l,
  share them; a circuit whose heads equal the base's needs no means forward;
* only the last position's logits count: above a circuit's highest kept head no
  attention moves information between positions, so from that layer on (its
  queries; its keys and values read every position) the circuit's passes over
  the prompts and over the mean prompts run at the last position only, and its
  MLP means there are needed at the last position only; the unembedding takes
  the two answer columns. Late in a search, when the upper layers' heads are
  gone, this is most of the work saved;
* heads that no circuit of a batch keeps are never computed
  (``circuit_layers``); circuits starting at one layer run as one node batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch

from ..model import StackedWeights, blocks
from .circuit_layers import attention_update, mlp_output, mlp_update
from .mean_memo import MeanMemo
from .memory import element_bytes, ensure_fits


def first_difference(a: np.ndarray, b: np.ndarray) -> int:
    """The first layer (leading axis) where masks a and b differ; len(a) if none."""
    diff = (a != b).reshape(len(a), -1).any(axis=1)
    return int(np.argmax(diff)) if diff.any() else len(a)


class MeanAblatedCircuits:
    """Mean logit differences of circuits (kept heads [L, H], kept MLPs [L]) under
    the seqcont mean ablation, on prompts ``tokens`` [N, T] (all of one length;
    the last position is scored), answer/wrong-answer ids ``cols`` [N, 2] and
    mean prompts ``mean_tokens`` [R, T]. ``max_memory`` bounds the cached states
    and each pass's activations.

    ``set_base(heads, mlps)`` names the circuit whose states are kept;
    ``logit_diff(heads, mlps)`` scores circuits [P, L, H] / [P, L]; ``timing``
    says where the time went (means passes vs trial passes)."""

    def __init__(self, w: StackedWeights, tokens: torch.Tensor, cols: torch.Tensor,
                 mean_tokens: torch.Tensor, max_memory: int):
        self.w = w
        self.L, self.H = w.n_layers, w.n_heads
        self.tokens, self.cols, self.mean_tokens = tokens, cols, mean_tokens
        self.N, self.T = tokens.shape
        self.R = mean_tokens.shape[0]
        elem = element_bytes(w.dtype)
        state = self.T * w.d_model * elem
        cache = self.L * (self.R + self.N) * state
        ensure_fits(cache, max_memory, f"the cached residual streams ({self.L} layers x "
                    f"({self.R} mean prompts + {self.N} prompts) x {self.T} tokens)",
                    "raise max_memory or use fewer prompts or mean prompts")
        # bytes per (circuit, prompt) row in a pass: MLP hidden and a few residual copies
        self.row_bytes = self.T * (3 * w.d_mlp + 8 * w.d_model) * elem
        self.work = max_memory - cache
        ensure_fits(self.row_bytes, self.work, "one prompt's pass beside the cached states",
                    "raise max_memory")
        memo_entry = self.T * w.d_model * elem
        self.memo = MeanMemo(max(4 * self.L, (max_memory // 16) // memo_entry))
        # seconds, and the work as (prompt rows x layers) at every position; a layer
        # run at the last position only counts 1/T
        self.timing = {"means_s": 0.0, "trials_s": 0.0, "means_row_layers": 0.0,
                       "trials_row_layers": 0.0}
        self.base_heads = np.ones((self.L, self.H), dtype=bool)
        self.base_mlps = np.ones(self.L, dtype=bool)
        dev = tokens.device
        self.mean_states = [torch.empty((self.R, self.T, w.d_model), dtype=w.dtype, device=dev)
                            for _ in range(self.L)]
        self.task_states = [torch.empty((self.N, self.T, w.d_model), dtype=w.dtype, device=dev)
                            for _ in range(self.L)]
        self.final = torch.empty((self.N, 1, w.d_model), dtype=w.dtype, device=dev)
        self.task_states[0].copy_(blocks.embed(tokens, w))
        self.task_valid = 0  # task_states[l] valid for l <= task_valid (L: final too)
        self.z_mean = self._full_model_means()
        self.mean_valid = self.L - 1  # mean_states[l] valid for l <= mean_valid

    # -- bookkeeping -------------------------------------------------------------
    def _sync(self) -> float:
        if self.w.device.type == "cuda":
            torch.cuda.synchronize(self.w.device)
        return time.perf_counter()

    def _positions(self, layer: int, rows: int, top: int | None = None
                   ) -> torch.Tensor | None:
        """The query positions of ``layer`` for circuits whose highest kept head is in
        layer ``top`` (default: the last layer): every position below it (None), the
        last one at it (its keys and values still read every position), and above
        it the states hold the last position only (None again)."""
        if layer != (self.L - 1 if top is None else top):
            return None
        return torch.full((rows, 1), self.T - 1, dtype=torch.long, device=self.w.device)

    def _width(self, layer: int, top: int | None = None) -> int:
        """Positions of the outputs of ``layer`` (see ``_positions``): T below
        ``top``, 1 from it on. Above a circuit's highest kept head no attention moves
        information between positions, so only the last position's states reach
        the scored logits: everything else there is never computed."""
        return self.T if layer < (self.L - 1 if top is None else top) else 1

    def _z_mean(self, layer: int, top: int | None = None) -> torch.Tensor:
        """The heads' mean z at ``layer`` at the positions computed there."""
        return self.z_mean[layer] if self._width(layer, top) == self.T \
            else self.z_mean[layer][-1:]

    def _chunks(self, n_rows: int, n_nodes: int) -> Iterator[slice]:
        """Row slices so that ``n_nodes`` circuits x rows fit the work budget."""
        rows = max(1, min(n_rows, self.work // (self.row_bytes * max(1, n_nodes))))
        for a in range(0, n_rows, rows):
            yield slice(a, min(n_rows, a + rows))

    # -- the base circuit ----------------------------------------------------------
    @torch.no_grad()
    def _full_model_means(self) -> list[torch.Tensor]:
        """One pass of the full model over the mean prompts: the heads' mean z per
        layer ([T, H, dh]; the last layer [1, H, dh]), the full model's MLP means
        (memoized) and the base's mean-prompt states."""
        start = self._sync()
        w, L = self.w, self.L
        self.mean_states[0].copy_(blocks.embed(self.mean_tokens, w))
        keep = torch.ones((1, self.H), dtype=torch.bool, device=w.device)
        z_sum = [torch.zeros((self._width(layer), self.H, w.d_head), device=w.device)
                 for layer in range(L)]
        m_sum = [torch.zeros((self._width(layer), w.d_model), device=w.device)
                 for layer in range(L)]
        for rows in self._chunks(self.R, 1):
            x = self.mean_states[0][rows][None]
            for layer in range(L):
                x, z = attention_update(w, layer, x, keep, None,
                                        self._positions(layer, x.shape[1]))
                assert z is not None
                z_sum[layer] += z[0].sum(0, dtype=torch.float32)
                m = mlp_output(w, layer, x)
                m_sum[layer] += m[0].sum(0, dtype=torch.float32)
                x = x + m
                if layer + 1 < L:
                    self.mean_states[layer + 1][rows] = x[0]
        for layer in range(L):
            self.memo.put(self.base_heads, layer, (m_sum[layer] / self.R).to(w.dtype))
        self.timing["means_row_layers"] += self.R * (L - 1 + 1 / self.T)
        self.timing["means_s"] += self._sync() - start
        return [(z / self.R).to(w.dtype) for z in z_sum]

    def set_base(self, heads: np.ndarray, mlps: np.ndarray) -> None:
        """Make (heads [L, H], mlps [L]) the base: states before the first layer
        where it differs from the old base stay valid."""
        heads, mlps = np.asarray(heads, dtype=bool), np.asarray(mlps, dtype=bool)
        lh = first_difference(heads, self.base_heads)
        lm = first_difference(mlps, self.base_mlps)
        self.mean_valid = min(self.mean_valid, lh)
        self.task_valid = min(self.task_valid, lh, lm)
        self.base_heads, self.base_mlps = heads.copy(), mlps.copy()

    @torch.no_grad()
    def _base_layer(self, layer: int, store: bool) -> torch.Tensor:
        """The base's layer ``layer`` over the mean prompts (from its valid states
        there): its MLP mean (memoized, and returned); with ``store``, keep the
        states after it."""
        w = self.w
        start = self._sync()
        keep = torch.as_tensor(self.base_heads[layer][None], device=w.device)
        m_sum = torch.zeros((self._width(layer), w.d_model), device=w.device)
        for rows in self._chunks(self.R, 1):
            x = self.mean_states[layer][rows][None]
            x, _ = attention_update(w, layer, x, keep, self.z_mean[layer],
                                    self._positions(layer, x.shape[1]))
            m = mlp_output(w, layer, x)
            m_sum += m[0].sum(0, dtype=torch.float32)
            if store:
                self.mean_states[layer + 1][rows] = (x + m)[0]
        mean = (m_sum / self.R).to(w.dtype)
        self.memo.put(self.base_heads, layer, mean)
        self.timing["means_row_layers"] += self.R * self._width(layer) / self.T
        self.timing["means_s"] += self._sync() - start
        return mean

    def _advance_means(self, target: int) -> None:
        """Make the base's mean-prompt states valid up to layer ``target`` (< L)."""
        for layer in range(self.mean_valid, min(target, self.L - 1)):
            self._base_layer(layer, store=True)
            self.mean_valid = layer + 1

    def _base_mean(self, layer: int, width: int) -> torch.Tensor:
        """The base's MLP mean at ``layer`` at ``width`` positions (memoized, else
        computed from its states)."""
        got = self.memo.get(self.base_heads, layer, width)
        if got is None:
            self._advance_means(layer)
            store = layer == self.mean_valid and layer + 1 < self.L
            got = self._base_layer(layer, store)[-width:]
            self.mean_valid += int(store)
        return got

    @torch.no_grad()
    def _advance_task(self, target: int) -> None:
        """Run the base over the prompts from its last valid layer through layer
        target - 1 (target L: to the final states at the last position)."""
        w, L = self.w, self.L
        for layer in range(self.task_valid, min(target, L)):
            mean = None if self.base_mlps[layer] else \
                self._base_mean(layer, self._width(layer))[None]
            start = self._sync()
            keep = torch.as_tensor(self.base_heads[layer][None], device=w.device)
            keep_mlp = torch.as_tensor(self.base_mlps[layer:layer + 1], device=w.device)
            for rows in self._chunks(self.N, 1):
                x = self.task_states[layer][rows][None]
                x, _ = attention_update(w, layer, x, keep, self.z_mean[layer],
                                        self._positions(layer, x.shape[1]))
                x = mlp_update(w, layer, x, keep_mlp, mean)
                (self.task_states[layer + 1] if layer + 1 < L else self.final)[rows] = x[0]
            self.task_valid = layer + 1
            self.timing["trials_row_layers"] += self.N * self._width(layer) / self.T
            self.timing["trials_s"] += self._sync() - start

    # -- circuits ----------------------------------------------------------------
    def _logit_diffs(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """Answer minus wrong-answer logit [n, r] from final states x [n, r, 1, d]
        of prompts ``rows`` (two vocabulary columns per prompt, not the whole
        unembedding)."""
        w = self.w
        cols = self.cols[rows]
        W = w.W_U.T[cols].transpose(1, 2)  # [r, d, 2]
        h = blocks.normalize(x[:, :, 0], w.lnf_w, w.lnf_b, w.config, True)
        two = torch.einsum("nrd,rdk->nrk", h, W) + w.b_U[cols]
        return (two[..., 0] - two[..., 1]).float()

    def _start(self, states: torch.Tensor, rows: slice, start: int, top: int) -> torch.Tensor:
        """The base's states before layer ``start`` as one node [1, r, T or 1, d]."""
        x = states[rows][None]  # one state for every circuit: its z is computed once
        return x if start <= top else x[:, :, -1:]

    @torch.no_grad()
    def _circuit_means(self, heads: np.ndarray, start: int, top: int, need: np.ndarray
                       ) -> dict[tuple[bytes, int], torch.Tensor]:
        """Mean-prompt passes of circuits ``heads`` [n, L, H] that agree with the base
        below layer ``start`` and keep no head above layer ``top``: their MLP means
        of layers start..need[i], by (heads as bytes, layer), also memoized."""
        w = self.w
        order = np.argsort(-need, kind="stable")  # the circuits still running form a prefix
        heads, need = heads[order], need[order]
        self._advance_means(start)
        t0 = self._sync()
        n = len(heads)
        keep = torch.as_tensor(heads, device=w.device)
        last = int(need[0])
        sums = {layer: torch.zeros((int((need >= layer).sum()), self._width(layer, top),
                                    w.d_model), device=w.device)
                for layer in range(start, last + 1)}
        for rows in self._chunks(self.R, n):
            x = self._start(self.mean_states[start], rows, start, top)
            for layer in range(start, last + 1):
                k = len(sums[layer])
                x, _ = attention_update(w, layer, x[:k], keep[:k, layer],
                                        self._z_mean(layer, top),
                                        self._positions(layer, x.shape[1], top))
                m = mlp_output(w, layer, x)
                sums[layer] += m.sum(1, dtype=torch.float32)
                x = x + m
                self.timing["means_row_layers"] += k * (rows.stop - rows.start) * \
                    self._width(layer, top) / self.T
        out = {}
        for layer, sm in sums.items():
            for i in range(len(sm)):
                out[heads[i].tobytes(), layer] = mean = (sm[i] / self.R).to(w.dtype)
                self.memo.put(heads[i], layer, mean)
        self.timing["means_s"] += self._sync() - t0
        return out

    @torch.no_grad()
    def _circuit_scores(self, heads: np.ndarray, mlps: np.ndarray, start: int, top: int,
                        means: list[list[torch.Tensor | None]]) -> torch.Tensor:
        """Logit differences [n, N] of circuits that agree with the base below layer
        ``start`` and keep no head above layer ``top``; ``means[i][l]``: circuit
        i's MLP mean where its MLP l is ablated (at the positions computed there)."""
        w, L = self.w, self.L
        self._advance_task(start)
        t0 = self._sync()
        n = len(heads)
        keep = torch.as_tensor(heads, device=w.device)
        keep_mlp = torch.as_tensor(mlps, device=w.device)
        stacked: dict[int, torch.Tensor | None] = {}
        for layer in range(start, L):
            rows_l = [m[layer] for m in means]
            if all(r is None for r in rows_l):
                stacked[layer] = None
                continue
            like = next(r for r in rows_l if r is not None)
            stacked[layer] = torch.stack([like if r is None else r for r in rows_l])
        out = torch.empty((n, self.N), device=w.device)
        for rows in self._chunks(self.N, n):
            x = self._start(self.task_states[start], rows, start, top)
            for layer in range(start, L):
                x, _ = attention_update(w, layer, x, keep[:, layer], self._z_mean(layer, top),
                                        self._positions(layer, x.shape[1], top))
                x = mlp_update(w, layer, x, keep_mlp[:, layer], stacked[layer])
                self.timing["trials_row_layers"] += n * (rows.stop - rows.start) * \
                    self._width(layer, top) / self.T
            out[:, rows] = self._logit_diffs(x, rows)
        self.timing["trials_s"] += self._sync() - t0
        return out

    @torch.no_grad()
    def base_logit_diff(self) -> torch.Tensor:
        """The base circuit's logit differences [N]."""
        self._advance_task(self.L)
        return self._logit_diffs(self.final[None], slice(0, self.N))[0]

    @torch.no_grad()
    def logit_diff(self, heads: np.ndarray, mlps: np.ndarray) -> torch.Tensor:
        """Answer minus wrong-answer logit at the last position, per circuit and
        prompt: [P, N] fp32, for circuits keeping heads [P, L, H] and MLPs [P, L]."""
        heads = np.asarray(heads, dtype=bool).reshape(-1, self.L, self.H)
        mlps = np.asarray(mlps, dtype=bool).reshape(-1, self.L)
        P = len(heads)
        lh = np.array([first_difference(h, self.base_heads) for h in heads])
        lm = np.array([first_difference(m, self.base_mlps) for m in mlps])
        # the highest layer with a kept head (-1: none); above it only the last position
        has_head = np.asarray(heads.any(axis=2))  # [P, L]
        top = np.where(has_head.any(axis=1), self.L - 1 - np.argmax(has_head[:, ::-1], axis=1),
                       -1)
        # 1) MLP means: from the base below the first changed head layer, else own passes
        todo: dict[tuple[int, int], dict[bytes, tuple[np.ndarray, int]]] = {}
        for i in range(P):
            missing = [int(layer) for layer in np.flatnonzero(~mlps[i]) if layer >= lh[i]
                       and self.memo.get(heads[i], int(layer),
                                         self._width(int(layer), int(top[i]))) is None]
            if missing:
                group = todo.setdefault((int(lh[i]), int(top[i])), {})
                key = heads[i].tobytes()
                last = max(max(missing), group.get(key, (heads[i], -1))[1])
                group[key] = (heads[i], last)
        fresh: dict[tuple[bytes, int], torch.Tensor] = {}  # this call's, in case of eviction
        for (start, high), group in sorted(todo.items()):
            members = list(group.values())
            fresh.update(self._circuit_means(np.stack([h for h, _ in members]), start, high,
                                             np.array([t for _, t in members])))
        means: list[list[torch.Tensor | None]] = []
        for i in range(P):
            row: list[torch.Tensor | None] = [None] * self.L
            for layer in np.flatnonzero(np.logical_not(mlps[i])).tolist():
                width = self._width(layer, int(top[i]))
                if layer < lh[i]:
                    row[layer] = self._base_mean(layer, width)
                    continue
                got = fresh.get((heads[i].tobytes(), layer))
                if got is None:
                    got = self.memo.get(heads[i], layer, width)
                if got is None:  # evicted since its pass: run this circuit's pass alone
                    got = self._circuit_means(heads[i][None], int(lh[i]), int(top[i]),
                                              np.array([layer]))[heads[i].tobytes(), layer]
                row[layer] = got[-width:]
            means.append(row)
        # 2) the prompts, from the base's states at the first changed layer
        out = torch.empty((P, self.N), device=self.w.device)
        start = np.minimum(lh, lm)
        for s, high in sorted({(int(a), int(b)) for a, b in zip(start, top, strict=True)}):
            idx = np.flatnonzero((start == s) & (top == high))
            where = torch.as_tensor(idx, device=out.device)
            if s == self.L:  # the base itself
                out[where] = self.base_logit_diff()
                continue
            out[where] = self._circuit_scores(heads[idx], mlps[idx], s, high,
                                              [means[i] for i in idx])
        return out
