"""Fused RMSNormPre -> SwiGLU input projection (first half of a Llama style MLP).

``h = silu(RMSPre(x) @ W_gate) * (RMSPre(x) @ W_in)``; no biases.
It replaces ``fastskip.model.blocks.mlp_hidden`` of a Llama style MLP (weightless RMSNormPre,
gated SiLU) on GPUs; the tests compare it with that function.
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

_OP = "rms_pre_swiglu_mlp_in"


def _rms_pre_swiglu_kernel(
    x_ptr, wg_ptr, wi_ptr, h_ptr,
    M, D, F,
    stride_xm, stride_xd, stride_gd, stride_gf, stride_id, stride_if, stride_hm, stride_hf,
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
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # int64: M * D can pass 2**31

    rstd = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    if NORMALIZE:
        # Prologue: mean of squares over D (TransformerLens RMSNormPre has no centring).
        row_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            mask_x = mask_m[:, None] & ((k0 + offs_k)[None, :] < D)
            xk = tl.load(x_rows + (k0 + offs_k)[None, :] * stride_xd, mask=mask_x, other=0.0)
            xk = xk.to(tl.float32)
            row_sq += tl.sum(xk * xk, axis=1)
        rstd = 1.0 / tl.sqrt_rn(row_sq / D + eps)

    # Two accumulators share each loaded (and normalised) x tile.
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        mask_k = (k0 + offs_k) < D
        mask_w = mask_k[:, None] & mask_n[None, :]
        xk = tl.load(
            x_rows + (k0 + offs_k)[None, :] * stride_xd,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        if NORMALIZE:
            # Normalise in fp32, round to the weight dtype like TransformerLens (no-op for fp32).
            xk = (xk.to(tl.float32) * rstd[:, None]).to(wg_ptr.dtype.element_ty)
        g_ptrs = wg_ptr + (k0 + offs_k)[:, None] * stride_gd + offs_n[None, :] * stride_gf
        i_ptrs = wi_ptr + (k0 + offs_k)[:, None] * stride_id + offs_n[None, :] * stride_if
        wg = tl.load(g_ptrs, mask=mask_w, other=0.0)
        wi = tl.load(i_ptrs, mask=mask_w, other=0.0)
        # "ieee" (default): true fp32 products for fp32 inputs, no TF32; 16-bit inputs ignore it.
        acc_g = tl.dot(xk, wg, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(xk, wi, acc_u, input_precision=DOT_PRECISION)

    # silu(g) = g * sigmoid(g) = g / (1 + exp(-g)); exp -> inf for very negative g gives -0.
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hf
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_kernel = LazyKernel(_rms_pre_swiglu_kernel)


def rms_pre_swiglu_mlp_in(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_in: torch.Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int = 8,
    num_stages: int = 3,
    dot_precision: str = "ieee",
) -> torch.Tensor:
    """``silu(RMSPre(x) @ w_gate) * (RMSPre(x) @ w_in)`` in one Triton kernel.

    Args:
        x: [M, D] activations (rows = tokens), float32 / bfloat16 / float16.
        w_gate, w_in: [D, F] weights, same dtype as ``x``.
        normalize: apply the weightless RMSNorm (TransformerLens RMSNormPre) to ``x`` first.
        eps: RMSNorm epsilon.
        block_m, block_n, block_k: tile sizes (powers of two >= 16); None = GPU defaults
            (64, 128, 32; block_k 16 for float32, which keeps H100 registers spill-free).
        num_warps, num_stages: Triton launch settings.
        dot_precision: ``tl.dot`` input precision for float32 inputs: "ieee" (exact fp32,
            default), "tf32" or "tf32x3" (faster, ~1e-3 / ~1e-6 relative error).

    Returns:
        h: [M, F] in ``x.dtype`` (a new contiguous tensor). Accumulation is fp32 throughout.
        Strided (non-contiguous) inputs are accepted.
    """
    check_2d(_OP, x=x, w_gate=w_gate, w_in=w_in)
    M, D = x.shape
    F = w_in.shape[1]
    check_shape(_OP, "w_gate", w_gate, (D, F))
    check_shape(_OP, "w_in", w_in, (D, F))
    check_dtype(_OP, x.dtype, w_gate=w_gate, w_in=w_in)
    check_precision(_OP, dot_precision)
    check_device(_OP, x, w_gate=w_gate, w_in=w_in)
    h = torch.empty((M, F), dtype=x.dtype, device=x.device)
    if M == 0 or F == 0:
        return h
    bm = pick_block(M, block_m, 64)
    bn = pick_block(F, block_n, 128)
    bk = pick_block(D, block_k, default_block_k(x.dtype))
    grid = (cdiv(M, bm) * cdiv(F, bn),)
    _kernel[grid](
        x, w_gate, w_in, h,
        M, D, F,
        x.stride(0), x.stride(1), w_gate.stride(0), w_gate.stride(1),
        w_in.stride(0), w_in.stride(1), h.stride(0), h.stride(1),
        float(eps),
        NORMALIZE=bool(normalize), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        DOT_PRECISION=dot_precision, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return h
