"""Fused Triton kernels for the MLP sublayer (shipped as ``fastskip.kernels``).

- ``ln_pre_gelu_mlp_in``: gelu_new(LayerNormPre(x) @ W_in + b_in)        (GPT-2 style)
- ``rms_pre_swiglu_mlp_in``: silu(RMSPre(x) @ W_gate) * (RMSPre(x) @ W_in) + b_in (Llama)
- ``mlp_out_residual``: resid + scale[:, None] * (h @ W_out + b_out)

Each replaces a piece of ``fastskip.model.blocks`` (``mlp_hidden``, ``mlp_out``) on GPUs, and
is tested against it. Importing this package is cheap and never needs triton: submodules load
on first attribute access, and the kernels are handed to ``triton.jit`` on their first launch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .mlp_in import ln_pre_gelu_mlp_in, rms_pre_swiglu_mlp_in
    from .mlp_out import mlp_out_residual

_LAZY = {
    "ln_pre_gelu_mlp_in": "mlp_in",
    "rms_pre_swiglu_mlp_in": "mlp_in",
    "mlp_out_residual": "mlp_out",
}

__all__ = [
    "ln_pre_gelu_mlp_in",
    "mlp_out_residual",
    "rms_pre_swiglu_mlp_in",
    "triton_available",
    "triton_unavailable_reason",
]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first access (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def triton_unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run here, or None when they can.

    They can when triton is installed and either a CUDA device is present or
    ``TRITON_INTERPRET=1`` (Triton's CPU interpreter: correct but hundreds of times slower, for
    tests only), and triton was not imported under the other setting of that variable. This
    function does not import triton (importing it fixes the interpreter setting for good).
    """
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return "triton is not importable (not installed)"
    from ._common import interpret_mode, triton_mode_mismatch

    mismatch = triton_mode_mismatch()
    if mismatch is not None:
        return mismatch
    import torch

    if torch.cuda.is_available() or interpret_mode():
        return None
    return "no CUDA device, and TRITON_INTERPRET is not '1' (needed to run Triton on CPU)"


def triton_available() -> bool:
    """True when the Triton kernels can run here (see :func:`triton_unavailable_reason`)."""
    return triton_unavailable_reason() is None
