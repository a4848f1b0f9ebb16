"""Fused weightless norm -> MLP input projection -> activation (the first half of an MLP).

One kernel, two MLPs (constexpr flags pick the variant at compile time):

- ``ln_pre_gelu_mlp_in``: ``gelu_new(LNPre(x) @ W_in + b_in)``              (GPT-2 style)
- ``rms_pre_swiglu_mlp_in``: ``silu(RMSPre(x) @ W_gate) * (RMSPre(x) @ W_in) + b_in``
  (Llama style; the bias after the product, as TransformerLens' gated MLP adds it)

Each replaces ``fastskip.model.blocks.mlp_hidden`` of its MLP on GPUs; the tests compare them
with that function. Arguments both take:

    x: [M, D] activations (rows = tokens), float32 / bfloat16 / float16; weights [D, F] in
        the same dtype; b_in [F] in any float dtype (added in fp32).
    normalize: apply the weightless norm (TransformerLens LayerNormPre / RMSNormPre) first.
    eps: the norm's epsilon.
    block_m, block_n, block_k: tile sizes (powers of two >= 16); None = GPU defaults
        (64, 128, 32; block_k 16 for float32, which keeps H100 registers spill-free).
    num_warps, num_stages: Triton launch settings.
    dot_precision: ``tl.dot`` input precision for float32 inputs: "ieee" (exact fp32,
        default), "tf32" or "tf32x3" (faster, ~1e-3 / ~1e-6 relative error).

Both return h [M, F] in ``x.dtype`` (a new contiguous tensor), accumulated in fp32; strided
(non-contiguous) inputs are accepted.
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


def _mlp_in_kernel(
    x_ptr, wi_ptr, wg_ptr, b_ptr, h_ptr,
    M, D, F,
    stride_xm, stride_xd, stride_id, stride_if, stride_gd, stride_gf, stride_b,
    stride_hm, stride_hf,
    eps,
    NORMALIZE: tl.constexpr, CENTER: tl.constexpr, GATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # CENTER: LayerNorm (subtract the row mean) rather than RMSNorm. GATED: silu(x W_gate) *
    # (x W_in) + b_in; otherwise gelu_new(x W_in + b_in). (wg_ptr is unused when not GATED.)
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
        # Prologue: row statistics in passes over D, like TransformerLens LayerNormPre /
        # RMSNormPre (centre first, then the mean square of the centred values; not
        # E[x^2] - E[x]^2).
        if CENTER:
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

    # Gated MLPs: two accumulators share each loaded (and normalised) x tile.
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        mask_k = (k0 + offs_k) < D
        mask_x = mask_m[:, None] & mask_k[None, :]
        mask_w = mask_k[:, None] & mask_n[None, :]
        xk = tl.load(x_rows + (k0 + offs_k)[None, :] * stride_xd, mask=mask_x, other=0.0)
        if NORMALIZE:
            # Normalise in fp32, then round to the weight dtype like TransformerLens does
            # before its matmul (a no-op for fp32). Padding lanes stay 0.
            xn = tl.where(mask_x, (xk.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            xk = xn.to(wi_ptr.dtype.element_ty)
        i_ptrs = wi_ptr + (k0 + offs_k)[:, None] * stride_id + offs_n[None, :] * stride_if
        wi = tl.load(i_ptrs, mask=mask_w, other=0.0)
        # "ieee" (default): true fp32 products for fp32 inputs, no TF32; 16-bit inputs ignore it.
        acc_u = tl.dot(xk, wi, acc_u, input_precision=DOT_PRECISION)
        if GATED:
            g_ptrs = wg_ptr + (k0 + offs_k)[:, None] * stride_gd + offs_n[None, :] * stride_gf
            wg = tl.load(g_ptrs, mask=mask_w, other=0.0)
            acc_g = tl.dot(xk, wg, acc_g, input_precision=DOT_PRECISION)

    bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(tl.float32)
    if GATED:
        # silu(g) = g * sigmoid(g) = g / (1 + exp(-g)); exp -> inf for very negative g gives -0.
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u + bias[None, :]
    else:
        u = acc_u + bias[None, :]
        # gelu_new(u) = 0.5 u (1 + tanh(z)), z = sqrt(2/pi) (u + 0.044715 u^3). Since
        # 0.5 (1 + tanh(z)) == sigmoid(2 z), this is u / (1 + exp(-2 z)): no tanh needed, and
        # it saturates cleanly (exp -> inf gives -0, exp -> 0 gives u).
        z = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        h = u / (1.0 + tl.exp(-2.0 * z))
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :] * stride_hf
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_kernel = LazyKernel(_mlp_in_kernel)


def _launch(op: str, x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None,
            w_gate: torch.Tensor | None, normalize: bool, center: bool, eps: float,
            block_m: int | None, block_n: int | None, block_k: int | None, num_warps: int,
            num_stages: int, dot_precision: str) -> torch.Tensor:
    """Check the arguments (errors name ``op``) and run the kernel."""
    gate = {} if w_gate is None else {"w_gate": w_gate}
    check_2d(op, x=x, w_in=w_in, **gate)
    M, D = x.shape
    F = w_in.shape[1]
    for name, w in (*gate.items(), ("w_in", w_in)):
        check_shape(op, name, w, (D, F))
    if b_in is not None:
        check_shape(op, "b_in", b_in, (F,))
    check_dtype(op, x.dtype, **gate, w_in=w_in)
    check_precision(op, dot_precision)
    check_device(op, x, **gate, w_in=w_in, b_in=b_in)
    h = torch.empty((M, F), dtype=x.dtype, device=x.device)
    if M == 0 or F == 0:
        return h
    bias = b_in if b_in is not None else torch.zeros(F, dtype=torch.float32, device=x.device)
    wg = w_gate if w_gate is not None else w_in  # a placeholder pointer, never read
    bm = pick_block(M, block_m, 64)
    bn = pick_block(F, block_n, 128)
    bk = pick_block(D, block_k, default_block_k(x.dtype))
    grid = (cdiv(M, bm) * cdiv(F, bn),)
    _kernel[grid](
        x, w_in, wg, bias, h,
        M, D, F,
        x.stride(0), x.stride(1), w_in.stride(0), w_in.stride(1), wg.stride(0), wg.stride(1),
        bias.stride(0), h.stride(0), h.stride(1),
        float(eps),
        NORMALIZE=bool(normalize), CENTER=bool(center), GATED=w_gate is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        DOT_PRECISION=dot_precision, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return h


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
    """``gelu_new(LNPre(x) @ w_in + b_in)`` in one Triton kernel (arguments: module docstring)."""
    return _launch("ln_pre_gelu_mlp_in", x, w_in, b_in, None, normalize, True, eps, block_m,
                   block_n, block_k, num_warps, num_stages, dot_precision)


def rms_pre_swiglu_mlp_in(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_in: torch.Tensor,
    b_in: torch.Tensor | None = None,
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
    """``silu(RMSPre(x) @ w_gate) * (RMSPre(x) @ w_in) + b_in`` in one Triton kernel (b_in None:
    no bias; arguments: module docstring)."""
    return _launch("rms_pre_swiglu_mlp_in", x, w_in, b_in, w_gate, normalize, False, eps,
                   block_m, block_n, block_k, num_warps, num_stages, dot_precision)
