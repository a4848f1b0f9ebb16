"""Mixed precision (``fs.Runner(model, precision="mixed")``): the blocks in fp32, the
unembedding product in bf16 with fp32 accumulation, and fp32 for every vocabulary
entry whose order against the answer (ranks) or the k-th largest logit (top-k) a
*proven* bound on the bf16 error leaves open. Ranks and top-k ids are those of an
fp32 run by construction, up to entries within fp32 round-off of the answer or of
the k-th logit (exact ties for fp32: two fp32 computations may order them either
way). The answer's logit, the top-k logits and every recomputed entry are fp32
dot products; probabilities come from the bf16 log-sum-exp with a proven bound
(``logprob_bound``). The bounds and their proofs: ``fastskip.run.mixed_bounds``.

Per batch of final states: tier 1 (one bf16 product, the answer's logit and the
bias folded in as extra terms, so that the output is y - ya and its bf16 rounding
is small exactly where it matters), one fused pass over each row for the ranks'
certain part, the band count and the log-sum-exp, top-k candidates, and fp32 dot
products for the entries the bound leaves open; tier 2 (two correction products)
where bf16 products are much cheaper than fp32 ones (GPUs).

Routing: before any of this, the fp32 logits of a fixed sample of ``SAMPLE``
vocabulary columns (2% of the product) estimate how many entries each row would
leave ambiguous; rows that would have more than ``MAX_AMBIGUOUS`` (more than
``ROUTE_TO_FP32`` after tier 2, where tier 2 is on) get a whole fp32 unembedding at
once: an answer deep inside a flat distribution, as random weights give, has
thousands of entries within the bf16 bound of it. So does a whole batch when fewer
than 1/8 of its rows would take the bf16 product (it would stream the bf16 matrix
for a handful of rows). This only decides speed: every route gives the same ranks
and top-k ids. Non-finite
final states, or values whose products could leave fp32's range, go to the fp32
path unchanged (which reports overflow as an fp32 run does).
``self_check`` tests the arithmetic model on this device's GEMM.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Literal

import torch

from ..errors import FastskipError
from ..model import StackedWeights, blocks
from .answer_metrics import AnswerMetrics, answer_metrics
from .mixed_bounds import U_OUT, ColumnConstants, U, exact_split, row_bounds, split3
from .vocab_reductions import fused_band_reductions
from .workspace import Workspace

Precision = Literal["mixed"]
PRECISIONS: tuple[Precision, ...] = ("mixed",)
PAD = 16  # the tier-1 GEMM's K: d + 6 extra terms, padded to a multiple of 16
SAMPLE = 1024  # vocabulary columns whose fp32 logits route each row
ROUTE_TO_FP32 = 128  # estimated tier-2 ambiguous entries above which a row goes to fp32
MAX_AMBIGUOUS = 192  # tier-1 ambiguous entries a row may have before tier 2
MAX_AMBIGUOUS_TIGHT = 512  # tier-2 ambiguous entries before a whole fp32 row
TOPK_SLACK = 48  # top-k candidates looked at beyond k, per group
GATHER_CHUNK = 16384  # entries per fp32 recomputation batch (x d floats)
SAFE_PRODUCT = 2.0**100  # |h_i| max|W| below this: no product or sum can overflow fp32


@contextlib.contextmanager
def fp32_accumulation(device: torch.device) -> Iterator[None]:
    """cuBLAS may reduce bf16 products in bf16 unless told not to; the bound needs
    fp32 accumulation (the setting is restored afterwards)."""
    if device.type != "cuda":
        yield
        return
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag


@dataclass
class MixedStats:
    """What mixed precision did, summed over batches (``Results.info["mixed"]``)."""

    rows: int = 0
    tight_rows: int = 0  # rows that needed tier 2
    fp32_rows: int = 0  # rows unembedded in fp32 (routed, still ambiguous, non-finite)
    recomputed_entries: int = 0  # vocabulary entries computed in fp32 (ranks, top-k)

    def add(self, other: MixedStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class MixedUnembedding:
    """The bf16 copies of W_U and the constants of the bound, made once per runner
    (about 8 bytes per W_U entry beside the fp32 weights: W1 with its extra rows, W2
    and a transposed fp32 copy for single entries), vocabulary sorted by scale."""

    def __init__(self, weights: StackedWeights):
        if weights.dtype != torch.float32:
            raise ValueError("mixed precision needs fp32 weights")
        self.w = weights
        W0, b0 = weights.W_U, weights.b_U  # [d, V], [V]
        d, V = W0.shape
        self.d, self.V, self.K = d, V, -(-(d + 6) // PAD) * PAD
        norms = W0.double().norm(dim=0)
        p0 = torch.exp2(torch.round(torch.log2(norms.clamp_min(1e-30)))).float()
        if not torch.equal(W0 / p0 * p0, W0) or not bool(torch.isfinite(1 / p0).all()):
            p0 = torch.ones_like(p0)  # a scaled entry would leave fp32's normal range
        self.perm = torch.sort(p0, stable=True).indices  # sorted position -> token id
        self.inv = torch.empty_like(self.perm)
        self.inv[self.perm] = torch.arange(V, device=W0.device)  # token id -> position
        W, b, p = W0[:, self.perm], b0[self.perm], p0[self.perm]
        scales, counts = torch.unique_consecutive(p, return_counts=True)
        ends = counts.cumsum(0).tolist()
        self.groups = [(e - c, e, float(s)) for e, c, s in zip(ends, counts.tolist(),
                                                               scales.tolist(), strict=True)]
        w = W / p  # exact: p is a power of two
        W1 = w.bfloat16()
        W2 = (w - W1.float()).bfloat16()
        bias = split3(b / p)
        if not exact_split(b / p, bias) or not torch.equal((1 / p).bfloat16().float(), 1 / p):
            raise ValueError("the unembedding does not split exactly into bf16 parts")
        aug = torch.zeros((self.K - d, V), dtype=torch.bfloat16, device=W.device)
        aug[0], aug[1], aug[2] = bias
        aug[3:6] = (1 / p).bfloat16()
        self.W1aug = torch.cat([W1, aug]).contiguous()  # [K, V]
        self.W2 = W2.contiguous()  # [d, V]
        self.WT = W.t().contiguous()  # [V, d] fp32: one row per vocabulary entry
        self.b, self.p = b, p
        cols = torch.linspace(0, V - 1, min(SAMPLE, V), device=W.device).round().long()
        self.W_sample, self.b_sample, self.p_sample = W[:, cols].contiguous(), b[cols], p[cols]
        self.P = float(p.max())
        self.consts = ColumnConstants.of(w, W1, W2, bias, p, self.K,
                                         float(self.W1aug.abs().max().float()))
        # tier 2 (two more bf16 products) pays off where bf16 products are much faster
        # than fp32 ones (GPUs); on CPU, rows it would take get an fp32 unembedding
        self.tight = W0.device.type == "cuda"
        self.route = True  # False: every row takes tier 1 (tests of the hard cases)
        self.max_ambiguous = MAX_AMBIGUOUS
        self.stats = MixedStats()

    # -- the pieces -------------------------------------------------------------------
    def exact_entries(self, h: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
                      ) -> torch.Tensor:
        """fp32 logits of rows[i] at sorted positions cols[i]: h . W_U[:, v] + b_U[v]."""
        out = torch.empty(rows.shape, dtype=torch.float32, device=h.device)
        for a in range(0, len(rows), GATHER_CHUNK):
            r, c = rows[a:a + GATHER_CHUNK], cols[a:a + GATHER_CHUNK]
            dots = torch.bmm(h.index_select(0, r)[:, None, :],
                             self.WT.index_select(0, c)[:, :, None])[:, 0, 0]
            out[a:a + GATHER_CHUNK] = dots + self.b[c]
        return out

    def estimate(self, h: torch.Tensor, ya: torch.Tensor, bound: torch.Tensor
                 ) -> torch.Tensor:
        """Estimated entries per row with |t_v| <= bound [R], from the fp32 logits of a
        fixed sample of SAMPLE columns (2% of the product): routing only."""
        t = (torch.addmm(self.b_sample, h, self.W_sample) - ya[:, None]) / self.p_sample
        return (t.abs() <= bound.float()[:, None]).sum(1) * (self.V / t.shape[1])

    def tier1(self, h: torch.Tensor, ya: torch.Tensor) -> torch.Tensor:
        """o [R, V] bf16 ~ (y - ya) / p: one GEMM with the bias and the shift as extra terms."""
        lhs = torch.zeros((h.shape[0], self.K), dtype=torch.bfloat16, device=h.device)
        lhs[:, :self.d] = h
        lhs[:, self.d:self.d + 3] = 1
        for j, part in enumerate(split3(-ya)):
            lhs[:, self.d + 3 + j] = part
        with fp32_accumulation(h.device):
            return lhs @ self.W1aug  # bf16 x bf16 with fp32 accumulation: the fast product

    def tier2(self, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """o2 [R, V] fp32 = o + bf16(H1.W2) + bf16(H2.W1): the correction products."""
        H1 = h.bfloat16()
        H2 = (h - H1.float()).bfloat16()
        with fp32_accumulation(h.device):
            c1, c2 = H1 @ self.W2, H2 @ self.W1aug[:self.d]
        return o.float().add_(c1.float()).add_(c2.float())

    def logits_at(self, states: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final states [R, d] (before the final norm) at token ids [R]."""
        w = self.w
        h = blocks.normalize(states, w.lnf_w, w.lnf_b, w.config, True)
        return self.exact_entries(h, torch.arange(len(h), device=h.device),
                                  self.inv[ids.long()])

    # -- one batch of rows ------------------------------------------------------------
    def metrics(self, states: torch.Tensor, answer: torch.Tensor, top_k: int,
                logits: Workspace | None = None) -> tuple[AnswerMetrics, torch.Tensor]:
        """Metrics of final states [R, d] (before the final norm), answers [R] (token
        ids): fp32 ranks, top-k ids and logits; bf16 probabilities with their bound [R].
        ``logits``: where the rows unembedded in fp32 write their logits."""
        w = self.w
        h = blocks.normalize(states, w.lnf_w, w.lnf_b, w.config, True)
        R, dev = h.shape[0], h.device
        k = min(max(int(top_k), 0), self.V)
        stats = MixedStats(rows=R)
        ans = self.inv[answer.long()]
        ya = self.exact_entries(h, torch.arange(R, device=dev), ans)
        nan = lambda *shape: torch.full(shape, math.nan, device=dev)  # noqa: E731
        met = AnswerMetrics(
            logit=ya, logprob=nan(R), rank=torch.full((R,), -1, dtype=torch.long, device=dev),
            topk_ids=torch.full((R, k), -1, dtype=torch.long, device=dev),
            topk_logits=nan(R, k), topk_logprobs=nan(R, k),
            nonfinite=torch.zeros(R, dtype=torch.bool, device=dev))
        bound = torch.zeros(R, dtype=torch.float64, device=dev)
        ok = torch.isfinite(h).all(1) & torch.isfinite(ya)
        ok &= h.abs().amax(1) * max(self.consts.Wmax, 1.0) < SAFE_PRODUCT
        idx = ok.nonzero()[:, 0]
        redo = [(~ok).nonzero()[:, 0]]
        if len(idx):
            theta, E2, E1 = row_bounds(self.consts, h[idx], ya[idx])
            # rows the bound would leave too open (an answer deep in a flat distribution):
            # a whole fp32 unembedding from the start
            if not self.route:
                fast = torch.ones(len(idx), dtype=torch.bool, device=dev)
            elif self.tight:
                fast = self.estimate(h[idx], ya[idx], E2) <= ROUTE_TO_FP32
            else:
                fast = self.estimate(h[idx], ya[idx], theta) <= self.max_ambiguous
            if self.route and int(fast.sum()) * 8 < len(idx):  # too few rows for the bf16
                fast[:] = False  # matrix to be worth streaming
            redo.append(idx[~fast])
            if bool(fast.any()):
                redo.append(self._fast_rows(h, ans, ya, idx[fast], k, met, bound, stats,
                                            theta[fast], E2[fast], E1[fast]))
        rows = torch.cat(redo)
        if len(rows):  # whole fp32 unembeddings, exactly as an fp32 run
            stats.fp32_rows += len(rows)
            out = None if logits is None else logits.take(len(rows), self.V)
            full = answer_metrics(torch.addmm(w.b_U, h[rows], w.W_U, out=out),
                                  answer[rows].long(), k)
            for f in fields(met):
                getattr(met, f.name)[rows] = getattr(full, f.name)
            bound[rows] = 0.0
        self.stats.add(stats)
        return met, bound

    def _fast_rows(self, h_all: torch.Tensor, ans_all: torch.Tensor, ya_all: torch.Tensor,
                   idx: torch.Tensor, k: int, met: AnswerMetrics, bound: torch.Tensor,
                   stats: MixedStats, theta: torch.Tensor, E2: torch.Tensor, E1: torch.Tensor
                   ) -> torch.Tensor:
        """Tiers 1 and 2 for rows ``idx``; fills ``met``/``bound`` there and returns the
        rows that need a whole fp32 unembedding after all."""
        h, ans, ya = h_all[idx], ans_all[idx], ya_all[idx]
        dev = h.device
        o = self.tier1(h, ya)  # [n, V] bf16
        th = (theta * (1 + 2 * U)).to(torch.bfloat16)[:, None]  # rounded up to bf16
        # one fused pass per scale group: max, exp-sum, above, in the band, min
        parts = [fused_band_reductions(o[:, a:b], torch.tensor(pg, device=dev), th)
                 for a, b, pg in self.groups]
        own = o.gather(1, ans[:, None])  # the answer is neither above itself ...
        rank = sum(part[2] for part in parts).long() - (own > th)[:, 0].long()
        n_band = sum(part[3] for part in parts) - (own.abs() <= th)[:, 0].int()  # ... nor ambiguous
        fail = self._top_k(h, ya, o, k, E1, idx, met, bound, stats, parts)
        # ranks: the ambiguous entries in fp32 (few per row), tier 2 first where many
        many = (n_band > self.max_ambiguous) & ~fail
        if not self.tight:
            fail |= many
            many &= False
        open_ = ((n_band > 0) & ~fail).nonzero()[:, 0]
        if len(open_) == 0:
            met.rank[idx] = rank
            return idx[fail]
        amb = o[open_].abs() <= th[open_]
        amb.scatter_(1, ans[open_, None], False)
        tight = many[open_].nonzero()[:, 0]
        if len(tight):
            stats.tight_rows += len(tight)
            rows = open_[tight]
            o2 = self.tier2(h[rows], o[rows])
            e2 = E2[rows].float()[:, None] * (1 + 4 * 2.0**-24)
            amb2 = amb[tight]
            rank[rows] += (amb2 & (o2 > e2)).sum(1, dtype=torch.int32).long()
            amb2 &= o2.abs() <= e2
            amb[tight] = amb2
            fail[rows] |= amb2.sum(1) > MAX_AMBIGUOUS_TIGHT
            amb[fail[open_]] = False
        r, c = amb.nonzero(as_tuple=True)
        if len(r):
            stats.recomputed_entries += len(r)
            rows = open_[r]
            rank.index_add_(0, rows, (self.exact_entries(h, rows, c) > ya[rows]).long())
        met.rank[idx] = rank
        return idx[fail]

    def _top_k(self, h: torch.Tensor, ya: torch.Tensor, o: torch.Tensor, k: int,
               E1: torch.Tensor, idx: torch.Tensor, met: AnswerMetrics, bound: torch.Tensor,
               stats: MixedStats, parts: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Top-k ids and logits (fp32) and the log-sum-exp with its bound, for rows
        ``idx`` of tier-1 output o; returns the rows whose candidates may go on."""
        n, dev = o.shape[0], o.device
        e1 = E1.float()[:, None] * (1 + 2.0**-20)
        vals, ids, errs = [], [], []
        for a, b, pg in self.groups:  # z = p_g o in each group, exact
            v, i = o[:, a:b].topk(min(b - a, max(k, 1) + TOPK_SLACK), dim=1)
            v = v.float() * pg
            vals.append(v)
            ids.append(i + a)
            errs.append(pg * e1 + U_OUT * v.abs())
        zval, zid, err = torch.cat(vals, 1), torch.cat(ids, 1), torch.cat(errs, 1)  # [n, c]
        fail = torch.zeros(n, dtype=torch.bool, device=dev)
        if k:
            tau = (zval - err).topk(k, dim=1).values[:, -1:]  # k-th largest lower bound
            cand = zval + err >= tau  # may be in the top k
            end = 0
            for v, (a, b, _) in zip(vals, self.groups, strict=True):
                end += v.shape[1]
                if v.shape[1] < b - a:
                    fail |= cand[:, end - 1]  # this group's candidates may go on
        else:  # no top-k: the largest entry alone is computed exactly
            cand = zval >= zval.amax(1, keepdim=True)
        r, j = cand.nonzero(as_tuple=True)
        stats.recomputed_entries += len(r)
        y = torch.full(zval.shape, -math.inf, device=dev)
        y[r, j] = self.exact_entries(h, r, zid[r, j]) - ya[r]  # exact y - ya, candidates
        if k:
            top_y, at = y.topk(k, dim=1)
            met.topk_ids[idx] = self.perm[zid.gather(1, at)]
            met.topk_logits[idx] = top_y + ya[:, None]
        # log-sum-exp: the candidates exactly, every other entry from bf16
        m = torch.stack([part[0] for part in parts], 1).amax(1, keepdim=True)
        zabs = torch.maximum(m[:, 0].abs(), torch.stack([part[4] for part in parts], 1)
                             .amin(1).abs()).double()
        cand_exact = (y - m).exp().sum(1)  # exp(-inf) = 0 off the candidates
        rest, weights, start = [], [], 0
        for v, part, (_, _, pg) in zip(vals, parts, self.groups, strict=True):
            c = cand[:, start:start + v.shape[1]]
            start += v.shape[1]
            group_total = part[1] * (part[0] - m[:, 0]).exp()
            rest.append((group_total - torch.where(c, (v - m).exp(), 0).sum(1)).clamp_min(0))
            weights.append(torch.expm1(pg * E1 + U_OUT * zabs))
        total = sum(rest) + cand_exact
        lse = ya + m[:, 0] + total.log()
        met.logprob[idx] = ya - lse
        if k:
            met.topk_logprobs[idx] = met.topk_logits[idx] - lse[:, None]
        share = torch.zeros(n, dtype=torch.float64, device=dev)
        for r_, w_ in zip(rest, weights, strict=True):
            share += (r_ / total).double().clamp(0, 1) * w_
        bound[idx] = torch.log1p(share)
        return fail

    # -- the arithmetic model, checked --------------------------------------------------
    def self_check(self, rows: int = 48, seed: int = 0) -> float:
        """Tier 1 against float64 on random states of this model's width (including one
        row alone, which a library may send down another kernel): the largest
        |o - t| / (E1 + u'|o|), which must be at most 1."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        h = torch.randn(rows, self.d, generator=g).to(self.w.W_U.device)
        h = h / h.norm(dim=1, keepdim=True) * math.sqrt(self.d)
        h[0] *= 1e-3  # a small state and a large one
        h[1] *= 30
        cols = torch.arange(0, self.V, max(1, self.V // 4096), device=h.device)
        worst = 0.0
        for part in (h[:1], h):
            ya = self.exact_entries(part, torch.arange(len(part), device=h.device),
                                    torch.zeros(len(part), dtype=torch.long, device=h.device))
            o = self.tier1(part, ya)[:, cols].double()
            exact = (part.double() @ self.WT[cols].double().T + self.b[cols].double()
                     - ya.double()[:, None]) / self.p[cols].double()
            theta = row_bounds(self.consts, part, ya)[0]
            E1 = theta * (1 - U_OUT)
            ratio = (o - exact).abs() / (E1[:, None] + U_OUT * o.abs())
            worst = max(worst, float(ratio.max()))
        return worst


def mixed_unembedding(precision: Precision | None, weights: StackedWeights
                      ) -> MixedUnembedding | None:
    """A runner's bf16 unembedding for ``precision="mixed"`` (None for the default),
    after checking this device's bf16 product against the bound it relies on
    (``MixedUnembedding.self_check``)."""
    if precision is None:
        return None
    if precision not in PRECISIONS:
        raise FastskipError(f"precision must be one of {PRECISIONS} or None, got "
                            f"{precision!r}")
    if weights.dtype != torch.float32:
        raise FastskipError("precision='mixed' runs the blocks in fp32 and the unembedding "
                            f"in bf16; it cannot take dtype={weights.dtype}")
    mixed = MixedUnembedding(weights)
    worst = mixed.self_check()
    if not worst <= 1.0:
        raise FastskipError(f"precision='mixed': this device's bf16 matrix product is "
                            f"{worst:.2f}x outside the error bound it is proven under "
                            "(fp32 accumulation); use the default precision")
    return mixed
