"""Step operations: the per-state block updates the executors call, eager,
``torch.compile``d, or with the Triton MLP kernels.

Compiled functions take the layer's weights as arguments (one graph for every
layer) and mark the state count as dynamic, so a run compiles each function
once per flag combination and never recompiles for new plan counts. The first
compile's time is measured and reported on stderr, not hidden.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import FastskipError
from . import blocks
from .weights import BlockConfig, LayerWeights, StackedWeights


def _mlp_update(x: torch.Tensor, lw: LayerWeights, cfg: BlockConfig, apply_ln: bool
                ) -> torch.Tensor:
    return x + blocks.mlp(x, lw, cfg, apply_ln)


def _attn_update(resid: torch.Tensor, z: torch.Tensor, lw: LayerWeights,
                 head_mask: torch.Tensor | None) -> torch.Tensor:
    return resid + blocks.attention_out(z, lw, head_mask)


def kernels_supported(w: StackedWeights) -> str | None:
    """Why the Triton MLP kernels cannot serve this model (None if they can)."""
    if w.norm == "LNPre" and not w.gated and w.act_fn in ("gelu_new", "gelu_pytorch_tanh"):
        return None
    if w.norm == "RMSPre" and w.gated and w.act_fn == "silu":
        return None
    return (f"the fused kernels cover weightless LayerNormPre + gelu_new and RMSNormPre + "
            f"SwiGLU MLPs; this model has {w.norm} + {w.act_fn}"
            f"{' (gated)' if w.gated else ''}")


class StepOps:
    """Block updates for one set of stacked weights.

    ``compile``: wrap attention and MLP in ``torch.compile`` (dynamic shapes).
    ``kernels``: run the MLP with the fused Triton kernels (GPU, or CPU under
    ``TRITON_INTERPRET=1`` for tests).
    """

    def __init__(self, w: StackedWeights, compile: bool = False, kernels: bool = False,
                 verbose: bool = True):
        self.w = w
        self.cfg = w.config
        self.compile = compile
        self.kernels = kernels
        self.verbose = verbose
        self.compile_seconds = 0.0
        self._seen: set[tuple[Any, ...]] = set()
        if compile:
            self._mlp = torch.compile(_mlp_update, dynamic=True)
            self._z = torch.compile(blocks.attention_z, dynamic=True)
            self._attn = torch.compile(_attn_update, dynamic=True)
        else:
            self._mlp, self._z, self._attn = _mlp_update, blocks.attention_z, _attn_update

    def _timed(self, key: tuple[Any, ...], fn: Callable[..., torch.Tensor], *args: Any
               ) -> torch.Tensor:
        """Call ``fn``; the first call per graph variant is timed as compile time."""
        if not self.compile or key in self._seen:
            return fn(*args)
        if self.verbose and not self._seen:
            print("fastskip: compiling the forward with torch.compile (first call)...",
                  file=sys.stderr, flush=True)
        start = time.perf_counter()
        out = fn(*args)
        self._seen.add(key)
        self.compile_seconds += time.perf_counter() - start
        return out

    def report_compile(self) -> None:
        if self.compile and self.verbose and self.compile_seconds and not getattr(
                self, "_reported", False):
            self._reported = True
            print(f"fastskip: compiled in {self.compile_seconds:.1f} s (first call only)",
                  file=sys.stderr, flush=True)

    # -- the three updates ---------------------------------------------------
    def mlp_update(self, x: torch.Tensor, layer: int, apply_ln: bool,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
        """x + MLP(norm(x)); ``scale`` [n] multiplies the MLP output per state, and a
        state with scale 0 gets exactly x (even where its MLP output is inf or NaN)."""
        lw = self.w.layer(layer)
        if self.kernels:
            return self._mlp_kernels(x, lw, apply_ln, scale)
        if scale is not None:
            s = scale.to(x.dtype).view(-1, *[1] * (x.ndim - 1))
            return x + blocks.where_kept(s, blocks.mlp(x, lw, self.cfg, apply_ln) * s)
        return self._timed(("mlp", apply_ln, x.ndim), self._mlp, x, lw, self.cfg, apply_ln)

    def attention_z(self, x: torch.Tensor, layer: int, apply_ln: bool,
                    q_pos: torch.Tensor | None) -> torch.Tensor:
        lw = self.w.layer(layer)
        return self._timed(("z", apply_ln, q_pos is None), self._z, x, lw, self.cfg, apply_ln,
                           q_pos, self.w.rotary)

    def attention_update(self, resid: torch.Tensor, z: torch.Tensor, layer: int,
                         head_mask: torch.Tensor | None) -> torch.Tensor:
        lw = self.w.layer(layer)
        return self._timed(("attn", head_mask is None), self._attn, resid, z, lw, head_mask)

    def _mlp_kernels(self, x: torch.Tensor, lw: LayerWeights, apply_ln: bool,
                     scale: torch.Tensor | None) -> torch.Tensor:
        from .. import kernels as K

        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        rows_scale = None
        if scale is not None:  # one scale per state -> one per row of x2
            rows_scale = scale.to(torch.float32).repeat_interleave(x2.shape[0] // shape[0])
        if lw.W_gate is not None:
            h = K.rms_pre_swiglu_mlp_in(x2, lw.W_gate, lw.W_in, lw.b_in, normalize=apply_ln,
                                        eps=self.cfg.eps)
        else:
            h = K.ln_pre_gelu_mlp_in(x2, lw.W_in, lw.b_in, normalize=apply_ln, eps=self.cfg.eps)
        return K.mlp_out_residual(h, lw.W_out, lw.b_out, x2, rows_scale).view(shape)


def want_kernels(w: StackedWeights, requested: bool | None) -> bool:
    """Use the Triton kernels: on CUDA when supported (default), or when asked
    (then they must be available: CUDA, or TRITON_INTERPRET=1 on CPU)."""
    from ..kernels import triton_unavailable_reason

    if requested is False:
        return False
    why_not = kernels_supported(w)
    if requested is None:
        return w.device.type == "cuda" and why_not is None and triton_unavailable_reason() is None
    if why_not:
        raise FastskipError(f"kernels=True: {why_not}")
    reason = triton_unavailable_reason()
    if reason:
        raise FastskipError(f"kernels=True but Triton cannot run here: {reason}")
    if w.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise FastskipError("kernels=True on CPU needs TRITON_INTERPRET=1 (tests only)")
    return True
