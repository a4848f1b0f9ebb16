"""Fused LayerNormPre -> ``x @ W_in + b_in`` -> gelu_new (first half of a GPT-2 style MLP).

It replaces ``fastskip.model.blocks.mlp_hidden`` of a GPT-2 style MLP (weightless LayerNormPre,
gelu_new) on GPUs; the tests compare it with that function.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import (
    LazyKernel,
    cdiv,
    check_2d,
    check_device,
    check_dtype,
    check_precision,
    check_shape,
    default_block_k,
    pick_block,
)

# triton.language, bound by LazyKernel at the first launch: importing this module never imports
# triton. Annotations stay strings (`from __future__ import annotations`).
tl: Any = None

_OP = "ln_pre_gelu_mlp_in"


def _ln_pre_gelu_kernel(
    x_ptr, w_ptr, b_ptr, h_ptr,
    M, D, F,
    stride_xm, stride_xd, stride_wd, stride_wf, stride_b, stride_hm, stride_hf,
    eps,
    NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # 1-D grid, N-tiles fastest: neighbouring programs share the same rows of x (L2 reuse).
    pid = tl.program_id(0)
    num_n = tl.cdiv(F, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < F
    # int64 row offsets: M * D can pass 2**31 for large token batches.
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm

    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    rstd = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    if NORMALIZE:
        # Prologue: row statistics in two passes over D, like TransformerLens LayerNormPre
        # (centre first, then the mean square of the centred values; not E[x^2] - E[x]^2).
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            mask_x = mask_m[:, None] & ((k0 + offs_k)[None, :] < D)
            xk = tl.load(x_rows + (k0 + offs_k)[None, :] * stride_xd, mask=mask_x, other=0.0)
            row_sum += tl.sum(xk.to(tl.float32), axis=1)
        mean = row_sum / D
        row_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            mask_x = mask_m[:, None] & ((k0 + offs_k)[None, :] < D)
            xk = tl.load(x_rows + (k0 + offs_k)[None, :] * stride_xd, mask=mask_x, other=0.0)
            xc = tl.where(mask_x, xk.to(tl.float32) - mean[:, None], 0.0)
            row_sq += tl.sum(xc * xc, axis=1)
        rstd = 1.0 / tl.sqrt_rn(row_sq / D + eps)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        mask_k = (k0 + offs_k) < D
        mask_x = mask_m[:, None] & mask_k[None, :]
        xk = tl.load(x_rows + (k0 + offs_k)[None, :] * stride_xd, mask=mask_x, other=0.0)
        if NORMALIZE:
            # Normalise in fp32, then round to the weight dtype like TransformerLens does
            # before its matmul (a no-op for fp32). Padding lanes stay 0.
            xn = tl.where(mask_x, (xk.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            xk = xn.to(w_ptr.dtype.element_ty)
        w_ptrs = w_ptr + (k0 + offs_k)[:, None] * stride_wd + offs_n[None, :] * stride_wf
        wk = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        # "ieee" (default): true fp32 products for fp32 inputs, no TF32; 16-bit inputs ignore it.
        acc = tl.dot(xk, wk, acc, input_precision=DOT_PRECISION)

    bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(tl.float32)
    u = acc + bias[None, :]
    # gelu_new(u) = 0.5 u (1 + tanh(z)), z = sqrt(2/pi) (u + 0.044715 u^3). Since
    # 0.5 (1 + tanh(z)) == sigmoid(2 z), this is u / (1 + exp(-2 z)): no tanh needed, and it
    # saturates cleanly (exp -> inf gives -0, exp -> 0 gives u).
    z = 0.7978845608028654 * (u + 0.044715 * u * u * u)
    h = u / (1.0 + tl.exp(-2.0 * z))
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hf
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_kernel = LazyKernel(_ln_pre_gelu_kernel)


def ln_pre_gelu_mlp_in(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-5,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int = 8,
    num_stages: int = 3,
    dot_precision: str = "ieee",
) -> torch.Tensor:
    """``gelu_new(LNPre(x) @ w_in + b_in)`` in one Triton kernel.

    Args:
        x: [M, D] activations (rows = tokens), float32 / bfloat16 / float16.
        w_in: [D, F] weight, same dtype as ``x``.
        b_in: [F] bias (any float dtype; added in fp32).
        normalize: apply the weightless LayerNorm (TransformerLens LayerNormPre) to ``x`` first.
        eps: LayerNorm epsilon.
        block_m, block_n, block_k: tile sizes (powers of two >= 16); None = GPU defaults
            (64, 128, 32; block_k 16 for float32, which keeps H100 registers spill-free).
        num_warps, num_stages: Triton launch settings.
        dot_precision: ``tl.dot`` input precision for float32 inputs: "ieee" (exact fp32,
            default), "tf32" or "tf32x3" (faster, ~1e-3 / ~1e-6 relative error).

    Returns:
        h: [M, F] in ``x.dtype`` (a new contiguous tensor). Accumulation is fp32 throughout.
        Strided (non-contiguous) inputs are accepted.
    """
    check_2d(_OP, x=x, w_in=w_in)
    M, D = x.shape
    F = w_in.shape[1]
    check_shape(_OP, "w_in", w_in, (D, F))
    check_shape(_OP, "b_in", b_in, (F,))
    check_dtype(_OP, x.dtype, w_in=w_in)
    check_precision(_OP, dot_precision)
    check_device(_OP, x, w_in=w_in, b_in=b_in)
    h = torch.empty((M, F), dtype=x.dtype, device=x.device)
    if M == 0 or F == 0:
        return h
    bm = pick_block(M, block_m, 64)
    bn = pick_block(F, block_n, 128)
    bk = pick_block(D, block_k, default_block_k(x.dtype))
    grid = (cdiv(M, bm) * cdiv(F, bn),)
    _kernel[grid](
        x, w_in, b_in, h,
        M, D, F,
        x.stride(0), x.stride(1), w_in.stride(0), w_in.stride(1), b_in.stride(0),
        h.stride(0), h.stride(1),
        float(eps),
        NORMALIZE=bool(normalize), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        DOT_PRECISION=dot_precision, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return h
