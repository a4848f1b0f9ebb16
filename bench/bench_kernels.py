"""Triton MLP kernels vs the plain torch code they replace (``fastskip.model.blocks``) at
GPT-2 small sizes (CUDA only).

Run: ``pytest bench/bench_kernels.py --benchmark-columns=mean,stddev,rounds``.
``benchmark.extra_info`` holds the achieved TFLOP/s (matmul FLOPs only) and the shapes.
The swiglu op reuses the same sizes (a Llama-shaped MLP of GPT-2 width).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fastskip import kernels as K
from fastskip.model import blocks
from fastskip.model.weights import BlockConfig, LayerWeights
from fastskip.reference.timing import synced

M, D, F = 4096, 768, 3072  # GPT-2 small: tokens, d_model, d_mlp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA device"),
]


def _inputs(op: str, dtype: torch.dtype) -> tuple[tuple, float]:
    """Arguments of ``op`` and its matmul FLOP count."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g, device="cuda")).to(dtype)

    if op == "ln_pre_gelu_mlp_in":
        return (rand(M, D), rand(D, F, scale=D**-0.5), rand(F, scale=0.1)), 2.0 * M * D * F
    if op == "rms_pre_swiglu_mlp_in":
        return (rand(M, D), rand(D, F, scale=D**-0.5), rand(D, F, scale=D**-0.5)), 4.0 * M * D * F
    scale = torch.rand(M, generator=g, device="cuda")
    args = (rand(M, F), rand(F, D, scale=F**-0.5), rand(D, scale=0.1), rand(M, D), scale)
    return args, 2.0 * M * F * D


def _plain(op: str) -> Callable[..., torch.Tensor]:
    """The ``blocks`` code the kernel ``op`` replaces, with the kernel's arguments."""
    none = dict.fromkeys(LayerWeights._fields)

    def cfg(norm: str, act: str) -> BlockConfig:
        return BlockConfig(1, 1, 1, norm, 1e-5, act, 1.0, 0)  # type: ignore[arg-type]

    if op == "ln_pre_gelu_mlp_in":
        return lambda x, w, b: blocks.mlp_hidden(
            x, LayerWeights(**{**none, "W_in": w, "b_in": b}), cfg("LNPre", "gelu_new"), True)
    if op == "rms_pre_swiglu_mlp_in":
        return lambda x, wg, wi: blocks.mlp_hidden(
            x, LayerWeights(**{**none, "W_in": wi, "b_in": torch.zeros_like(wi[0]),
                               "W_gate": wg}), cfg("RMSPre", "silu"), True)
    return lambda h, w, b, r, s: r + s[:, None] * blocks.mlp_out(
        h, LayerWeights(**{**none, "W_out": w, "b_out": b}))


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["ln_pre_gelu_mlp_in", "rms_pre_swiglu_mlp_in", "mlp_out_residual"])
def test_bench(benchmark, op: str, dtype: torch.dtype, impl: str) -> None:
    if K.triton_unavailable_reason() is not None:
        pytest.skip(K.triton_unavailable_reason())
    fn: Callable[..., torch.Tensor] = getattr(K, op) if impl == "triton" else _plain(op)
    args, flops = _inputs(op, dtype)
    fn(*args)  # compile / warm up outside the timed rounds

    out = benchmark.pedantic(synced(fn, "cuda"), args=args, rounds=20, iterations=3,
                             warmup_rounds=2)
    assert out.dtype == dtype and torch.isfinite(out).all()
    mean_s = benchmark.stats.stats.mean
    benchmark.extra_info.update(tflops=flops / mean_s / 1e12, M=M, D=D, F=F, dtype=str(dtype))
