"""Shared helpers for the Triton kernels: deferred ``triton.jit``, argument checks, block sizes.

Nothing here imports triton at module level, so importing the kernels never needs it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

# dtypes the Triton kernels accept (tl.dot has no float64 path worth using here).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_mode_mismatch() -> str | None:
    """Why Triton cannot run in the current mode because of import order, or None.

    Triton fixes compiled-vs-interpreted for its own standard library (``tl.zeros``,
    ``tl.sum``, ...) when ``triton.language`` is first imported, from ``TRITON_INTERPRET``.
    Toggling the variable afterwards breaks every kernel launch with an obscure error.
    """
    tl = sys.modules.get("triton.language")
    if tl is None:
        return None  # not imported yet: the current setting will apply
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tl.zeros, InterpretedFunction) == interpret_mode():
        return None
    return (
        "triton was imported while TRITON_INTERPRET was "
        f"{'unset' if interpret_mode() else '1'} and it is now "
        f"{'1' if interpret_mode() else 'unset'}; set the variable before the first "
        "`import triton` (for tests: at the top of conftest.py)"
    )


class LazyKernel:
    """A kernel body handed to ``triton.jit`` at its first launch instead of at import.

    This keeps ``import fastskip.kernels`` free of triton, and lets a test
    set ``TRITON_INTERPRET=1`` after importing the package, as long as triton itself was not
    imported yet (see :func:`triton_mode_mismatch`). The kernel body refers to the module
    global ``tl``, a placeholder bound here to ``triton.language`` before jitting.
    Launch it like a jitted kernel: ``kernel[grid](*args, **meta)``.
    """

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self._jitted: dict[bool, Any] = {}

    def jitted(self) -> Any:
        """The ``triton.jit`` function for the current mode (compiled or interpreted)."""
        mode = interpret_mode()
        if mode not in self._jitted:
            import triton
            import triton.language

            self.fn.__globals__["tl"] = triton.language
            self._jitted[mode] = triton.jit(self.fn)
        return self._jitted[mode]

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        return self.jitted()[grid]


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def default_block_k(dtype: torch.dtype) -> int:
    """Default K tile: 16 for float32 (its IEEE dot runs on FMA units and needs more registers),
    32 for 16-bit inputs. With BLOCK_M=64, BLOCK_N=128 and num_warps=8 neither spills on sm_90."""
    return 16 if dtype == torch.float32 else 32


def pick_block(n: int, requested: int | None, default: int) -> int:
    """Block size along a dimension of length ``n``.

    ``requested`` (or ``default``) must be a power of two >= 16 (``tl.dot`` needs tiles of at
    least 16 on NVIDIA GPUs); it is shrunk to the next power of two >= ``n`` for small dims so
    tiny problems do not waste a whole 128-wide tile.
    """
    block = default if requested is None else int(requested)
    if block < 16 or block & (block - 1):
        raise ValueError(f"block sizes must be powers of two >= 16, got {block}")
    return max(16, min(block, 1 << max(n - 1, 0).bit_length()))


def check_device(op: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Require every tensor on ``ref``'s device, and that device to be CUDA (or interpret mode).

    Non-contiguous tensors are fine: the kernels take explicit strides.
    """
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but the input is on {ref.device}")
    if ref.device.type != "cuda" and not interpret_mode():
        raise RuntimeError(
            f"{op}: Triton kernels need CUDA tensors (got {ref.device}); on CPU use the plain "
            "torch path (fastskip.model.blocks) or set TRITON_INTERPRET=1 before triton is "
            "imported"
        )
    reason = triton_mode_mismatch()
    if reason is not None:
        raise RuntimeError(f"{op}: {reason}")


def check_dtype(op: str, dtype: torch.dtype, **others: torch.Tensor) -> None:
    """Require ``dtype`` to be a kernel dtype and every tensor in ``others`` to have it."""
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: dtype {dtype} not supported (use float32, bfloat16 or float16)")
    for name, t in others.items():
        if t.dtype != dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")


DOT_PRECISIONS = ("ieee", "tf32", "tf32x3")


def check_precision(op: str, precision: str) -> None:
    """Require a ``tl.dot`` input precision the kernels support on NVIDIA GPUs."""
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"{op}: dot_precision must be one of {DOT_PRECISIONS}, got {precision!r}")


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Require ``t.shape == shape`` with a readable error."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_2d(op: str, **tensors: torch.Tensor) -> None:
    """Require each tensor to be a 2-D torch.Tensor (rows = tokens for activations)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
