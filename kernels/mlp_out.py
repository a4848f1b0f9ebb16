"""Fused MLP output projection + residual: ``resid + scale[:, None] * (h @ W_out + b_out)``.

A row whose scale is 0 gets exactly ``resid``: the scale selects rather than multiplies, so a
non-finite MLP output in a switched-off row (NaN x 0 = NaN) cannot leak into the result.

``mlp_out_residual`` is the Triton kernel (bias, per-row scale and residual add live in the
matmul epilogue); it replaces ``resid + scale * fastskip.model.blocks.mlp_out(h)`` on GPUs.
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

_OP = "mlp_out_residual"


def _mlp_out_kernel(
    h_ptr, w_ptr, b_ptr, s_ptr, r_ptr, o_ptr,
    M, F, D,
    stride_hm, stride_hf, stride_wf, stride_wd, stride_b, stride_s,
    stride_rm, stride_rd, stride_om, stride_od,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # 1-D grid, N-tiles (over D) fastest: neighbouring programs share the same rows of h.
    pid = tl.program_id(0)
    num_n = tl.cdiv(D, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < D
    rows = offs_m.to(tl.int64)  # int64: M * F can pass 2**31 for large token batches

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        mask_k = (k0 + offs_k) < F
        h_ptrs = h_ptr + rows[:, None] * stride_hm + (k0 + offs_k)[None, :] * stride_hf
        hk = tl.load(h_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_ptrs = w_ptr + (k0 + offs_k)[:, None] * stride_wf + offs_n[None, :] * stride_wd
        wk = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        # "ieee" (default): true fp32 products for fp32 inputs, no TF32; 16-bit inputs ignore it.
        acc = tl.dot(hk, wk, acc, input_precision=DOT_PRECISION)

    # Epilogue, all in fp32: + bias, * per-row scale, + residual; one rounding at the store.
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        scale = tl.load(s_ptr + rows * stride_s, mask=mask_m, other=0.0).to(tl.float32)
        # select, not multiply: a switched-off row adds exactly 0 even if its acc is inf/NaN
        acc = tl.where(scale[:, None] != 0.0, acc * scale[:, None], 0.0)
    mask_o = mask_m[:, None] & mask_n[None, :]
    r_ptrs = r_ptr + rows[:, None] * stride_rm + offs_n[None, :] * stride_rd
    out = tl.load(r_ptrs, mask=mask_o, other=0.0).to(tl.float32) + acc
    o_ptrs = o_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask_o)


_kernel = LazyKernel(_mlp_out_kernel)


def mlp_out_residual(
    h: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor | None,
    resid: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int = 8,
    num_stages: int = 3,
    dot_precision: str = "ieee",
) -> torch.Tensor:
    """``resid + scale[:, None] * (h @ w_out + b_out)`` in one Triton kernel.

    Args:
        h: [M, F] hidden activations, float32 / bfloat16 / float16.
        w_out: [F, D] weight, same dtype as ``h``.
        b_out: [D] bias (any float dtype) or None.
        resid: [M, D] residual stream, same dtype as ``h``; not modified.
        scale: [M] per-row multiplier of the MLP output (any float dtype) or None (= 1), e.g. a
            0/1 keep mask or a gate. Rows with scale 0 return ``resid`` exactly, even where the
            MLP output is inf or NaN.
        block_m, block_n, block_k: tile sizes (powers of two >= 16); None = GPU defaults
            (64, 128, 32; block_k 16 for float32, which keeps H100 registers spill-free).
        num_warps, num_stages: Triton launch settings.
        dot_precision: ``tl.dot`` input precision for float32 inputs: "ieee" (exact fp32,
            default), "tf32" or "tf32x3" (faster, ~1e-3 / ~1e-6 relative error).

    Returns:
        A new contiguous [M, D] tensor in ``h.dtype``; the sum is formed in fp32 and rounded once.
        Strided (non-contiguous) inputs are accepted.
    """
    check_2d(_OP, h=h, w_out=w_out, resid=resid)
    M, F = h.shape
    D = w_out.shape[1]
    check_shape(_OP, "w_out", w_out, (F, D))
    check_shape(_OP, "resid", resid, (M, D))
    if b_out is not None:
        check_shape(_OP, "b_out", b_out, (D,))
    if scale is not None:
        check_shape(_OP, "scale", scale, (M,))
        if not scale.is_floating_point():
            raise TypeError(f"{_OP}: scale must be a float tensor, got {scale.dtype}")
    check_dtype(_OP, h.dtype, w_out=w_out, resid=resid)
    check_precision(_OP, dot_precision)
    check_device(_OP, h, w_out=w_out, b_out=b_out, resid=resid, scale=scale)
    out = torch.empty((M, D), dtype=h.dtype, device=h.device)
    if M == 0 or D == 0:
        return out
    bm = pick_block(M, block_m, 64)
    bn = pick_block(D, block_n, 128)
    bk = pick_block(F, block_k, default_block_k(h.dtype))
    grid = (cdiv(M, bm) * cdiv(D, bn),)
    _kernel[grid](
        h, w_out, b_out if b_out is not None else resid, scale if scale is not None else resid,
        resid, out,
        M, F, D,
        h.stride(0), h.stride(1), w_out.stride(0), w_out.stride(1),
        b_out.stride(0) if b_out is not None else 0, scale.stride(0) if scale is not None else 0,
        resid.stride(0), resid.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=b_out is not None, HAS_SCALE=scale is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PRECISION=dot_precision,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
