"""The error bounds of mixed precision (``fastskip.run.mixed_unembed``), proven here:
how far a bf16 unembedding product with fp32 accumulation can be from the exact
logits, per row, and what that decides about ranks, top-k and probabilities.

Notation, one row: h in R^d the final normalised state (fp32, as an fp32 run has
it), a the answer, y_v = h.W_U[:, v] + b_U[v] in exact arithmetic, ya the answer's
logit computed in fp32 (the logit reported). The rank reported is the number of
v != a with y_v > ya; it equals an fp32 run's rank except for entries within fp32
round-off of the answer. u = 2^-8 (bf16, round to nearest), u' = u / (1 - u),
u_acc = 2^-24 on CPU and 2^-23 on GPUs (below), gamma_n = n u_acc / (1 - n u_acc),
||.|| the 2-norm.

Once per runner (``MixedUnembedding.__init__``): column scales p_v = 2^round(log2
||W_U[:, v]||) (powers of two, so scaling is exact), w_v = W_U[:, v] / p_v, W1 =
bf16(w), W2 = bf16(w - W1), rw = w - W1 - W2 (each exact in fp32), and b_v / p_v
split into three bf16 numbers that sum to it exactly. Constants (maxima over v,
computed in float64 and rounded up): A = ||w_v||, A1 = ||W1_v||, D1 = ||w_v - W1_v||,
D2 = ||W2_v||, Rw = ||rw_v||, P = p_v, Pinv = 1 / p_v, B = the bias parts' |sum|.

**Tier 1** (every row). H1 = bf16(h), dh = h - H1; -ya split into three bf16
numbers (sum |parts| = Y); one GEMM over K = d + 6 terms (+ zero padding),

    o_v = bf16(fp32 sum of [H1_i W1_iv (i < d), b_v/p_v parts x 1, -ya parts x 1/p_v]),

estimates t_v = (y_v - ya) / p_v. Claim: |o_v - t_v| <= E1 + u'|o_v|, with

    E1 = ||dh|| (A1 + D1) + ||H1|| D1 + gamma_K M1 + eta,   M1 = ||H1|| A1 + B + Y Pinv.

Proof. (1) A product of two bf16 numbers has at most 16 significant bits, so it is
exact in fp32, and the parts sum exactly to b_v/p_v and -ya/p_v: the exact sum of
the GEMM's terms is T_v = H1.W1_v + (b_v - ya)/p_v, and t_v - T_v = h.w_v - H1.W1_v
= dh.W1_v + H1.(w_v - W1_v) + dh.(w_v - W1_v), at most ||dh|| A1 + ||H1|| D1 +
||dh|| D1 by Cauchy-Schwarz. (2) A sum of K terms in fp32, in any order, each
addition rounded with relative error at most u_acc (round to nearest: 2^-24, what
AVX512-BF16 and AMX do, fused multiply-adds rounded to nearest; 2^-23 also covers
accumulators that truncate, as GPU tensor cores may), is within
gamma_K sum|terms| of the exact sum (Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., Lemma 3.1 and section 4.2), and sum|terms| <= M1 by
Cauchy-Schwarz. (3) Subnormals flushed to zero (AMX, AVX512-BF16 and tensor cores
flush them) change each input, product or partial sum by less than 2^-126 times
max(1, the other factor): eta = (K + 1) 2^-126 (2 + max|H1| + max|W|) covers them.
(4) Rounding the fp32 sum s to bf16 (round to nearest): |o - s| <= u|s| <= u'|o|.
Adding (1)-(4) gives the claim. Hence, with theta = E1 / (1 - u'): o_v > theta
implies y_v > ya (certainly above), o_v < -theta implies y_v < ya, and the entries
with |o_v| <= theta are *ambiguous*: their y_v is computed in fp32 from h.

**Tier 2** (rows with more than ``MAX_AMBIGUOUS`` ambiguous entries). H2 =
bf16(dh), rh = dh - H2; two more GEMMs c1 = bf16(H1.W2), c2 = bf16(H2.W1) (K = d
each), o2 = o + c1 + c2 in fp32, for the ambiguous entries only. Since h.w =
H1.W1 + H1.W2 + H2.W1 + [H2.W2 + (H1 + H2).rw + rh.w], the same four steps give
|o2_v - t_v| <= E2 with

    E2 = gamma_K M1 + u' theta' + gamma_d (||H1|| D2 + ||H2|| A1) + u (C1 + C2) + 3 eta
         + ||H2|| D2 + ||H1 + H2|| Rw + ||rh|| A + 2 u_acc (theta' + (1 + u)(C1 + C2)),

C1 = (1 + gamma_d) ||H1|| D2 + eta and C2 = (1 + gamma_d) ||H2|| A1 + eta bounding
|c1| / (1 + u) and |c2| / (1 + u), theta' = (1 + 4u) theta the bf16 threshold used:
the output roundings of o (|o_v| <= theta' there),
c1 and c2, their accumulation, the terms left out and the two fp32 additions.
Entries still ambiguous at E2 are computed in fp32; a row with more than
``MAX_AMBIGUOUS_TIGHT`` of them gets a whole fp32 unembedding.

**Top-k.** The vocabulary is kept sorted by p (a few groups of equal scale). In
group g, z_v = p_g o_v is within e_v = p_g E1 + u'|z_v| of y_v - ya, and both z -
e(z) and z + e(z) increase with z. The k-th largest lower bound tau among the
``k + TOPK_SLACK`` largest z of each group is at most the true k-th largest logit
(minus ya), so only entries with z_v + e_v >= tau can be in the top k; in each
group they are among its ``k + TOPK_SLACK`` largest when the smallest of those
already fails the test. The candidates are computed in fp32 and the top k taken
among them (if a group's candidates may go on, the row gets a whole fp32
unembedding).

**Probabilities.** lse = ya + log(sum_v exp(z_v)), with the candidates (or, for
k = 0, the largest entry) replaced by their fp32 values. If q_g is the share of
the sum from group g's other entries, each of those is off by a factor of at most
exp(e_g), e_g = p_g E1 + u' max|z|, so the log-sum-exp is within log(1 + sum_g q_g
(exp(e_g) - 1)) of the exact logits' one (in both directions, by Chebyshev's sum
inequality); this is ``logprob_bound`` (the fp32 evaluation of the softmax adds
the round-off an fp32 run has too). Rows computed in fp32 have bound 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

U = 2.0**-8  # bf16 unit round-off (round to nearest)
U_OUT = U / (1 - U)  # |fl(s) - s| <= U_OUT |fl(s)|
U_ACC = 2.0**-23  # relative error of one fp32 accumulation step (covers truncation)
TINY = 2.0**-126  # below this, subnormals may be flushed to zero


def gamma(n: int, u_acc: float = U_ACC) -> float:
    """gamma_n = n u_acc / (1 - n u_acc): the relative bound of an n-term fp32 sum."""
    return n * u_acc / (1 - n * u_acc)


def accumulation_unit(device: torch.device) -> float:
    """u_acc for this device's bf16 GEMM: 2^-24 on CPU (AVX512-BF16 and AMX accumulate
    with fused multiply-adds rounded to nearest, as PyTorch's fallback kernel does in
    fp32), 2^-23 elsewhere (GPU tensor cores may truncate)."""
    return 2.0**-24 if device.type == "cpu" else U_ACC


def split3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three bf16 tensors summing exactly to fp32 ``x`` (each step is exact by Sterbenz's
    lemma; 24 significant bits fit in three 8-bit parts); ``exact_split`` checks it."""
    hi = x.bfloat16()
    r = x - hi.float()
    mid = r.bfloat16()
    return hi, mid, (r - mid.float()).bfloat16()


def exact_split(x: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> bool:
    """Whether the parts sum to x exactly (float64 holds each such sum exactly)."""
    total = torch.zeros_like(x, dtype=torch.float64)
    for p in parts:
        total += p.double()
    return bool((total == x.double()).all())


def up(x: float) -> float:
    """A float64 bound rounded up a little (covers the round-off of computing it)."""
    return x * (1 + 1e-9) + 1e-300


@dataclass(frozen=True)
class ColumnConstants:
    """The maxima over vocabulary columns the bounds use (see the module docstring)."""

    d: int  # d_model
    K: int  # terms of the tier-1 product (d + 6, padded)
    A: float  # max ||w_v||
    A1: float  # max ||W1_v||
    D1: float  # max ||w_v - W1_v||
    D2: float  # max ||W2_v||
    Rw: float  # max ||rw_v||
    B: float  # max sum |parts of b_v / p_v|
    Pinv: float  # max 1 / p_v
    Wmax: float  # max |entry| of the tier-1 right-hand side

    @classmethod
    def of(cls, w: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor,
           bias: tuple[torch.Tensor, ...], p: torch.Tensor, K: int, Wmax: float
           ) -> ColumnConstants:
        """From the scaled columns w [d, V], their parts W1, W2 (bf16), the bias parts
        and the scales p [V]."""
        d1 = w - W1.float()
        rw = d1 - W2.float()
        n = lambda t: up(float(t.double().norm(dim=0).max()))  # noqa: E731
        B = bias[0].double().abs() + bias[1].double().abs() + bias[2].double().abs()
        return cls(d=w.shape[0], K=K, A=n(w), A1=n(W1), D1=n(d1), D2=n(W2), Rw=n(rw),
                   B=up(float(B.max())),
                   Pinv=float((1 / p).max()), Wmax=Wmax)


def row_bounds(c: ColumnConstants, h: torch.Tensor, ya: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of h [R, d] (fp32) with answer logits ya [R], float64: theta (tier 1's
    threshold), E2 (tier 2's bound) and E1 (tier 1's bound), in scaled units."""
    u_acc = accumulation_unit(h.device)
    H1 = h.bfloat16()
    dh = h - H1.float()  # exact
    H2 = dh.bfloat16()
    rh = dh - H2.float()  # exact
    safe = 1 + 2 * c.d * 2.0**-24  # fp32 norms of d terms, rounded up
    nH1, ndh, nH2, nrh = (torch.linalg.vector_norm(t.float(), dim=1).double() * safe
                          for t in (H1, dh, H2, rh))
    Y = sum(t.double().abs() for t in split3(-ya))
    eta = (c.K + 1) * TINY * (2 + H1.abs().amax(1).double() + c.Wmax)
    gK, gd = gamma(c.K, u_acc), gamma(c.d, u_acc)
    M1 = nH1 * c.A1 + c.B + Y * c.Pinv
    E1 = ndh * (c.A1 + c.D1) + nH1 * c.D1 + gK * M1 + eta
    theta = E1 / (1 - U_OUT)
    thb = theta * (1 + 4 * U)  # the bf16 threshold used is at most this
    C1 = (1 + gd) * nH1 * c.D2 + eta
    C2 = (1 + gd) * nH2 * c.A1 + eta
    E2 = (gK * M1 + U_OUT * thb + gd * (nH1 * c.D2 + nH2 * c.A1) + U * (C1 + C2) + 3 * eta
          + nH2 * c.D2 + (nH1 + nH2) * c.Rw + nrh * c.A + 2 * u_acc * (thb + (1 + U) * (C1 + C2)))
    return up(1.0) * theta, up(1.0) * E2, up(1.0) * E1
