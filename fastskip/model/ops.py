"""Step operations: the per-state block updates the executors call, eager,
``torch.compile``d, or with the Triton MLP kernels.

Compiled, each of the three updates is one graph for the whole life of a
runner: everything that varies between calls is data, not something Dynamo
guards on.

* The layer's weights are arguments (every layer has the same shapes), passed
  as detached views (a view's base would be guarded too) that never start at
  storage offset 0 or 1 (``weights._from_slot_one``: Dynamo specialises those).
* The norm flag is a 0-d bool tensor; the head mask and the asked positions
  are always tensors (all heads / every position when the caller has none).
* States are flattened to rows (states x prompts for attention, x positions
  for the per-position parts), so that one symbolic size carries what varies,
  and a size of 1 is padded to 2 (``at_least_two``): Dynamo specialises 1.
* Duck sizing is off while a step is called (``_CompileSettings``): equal sizes
  in one call do not become a guard that the next call breaks.

A new plan count, prompt count or position count therefore compiles nothing
(``tests/model/test_ops.py`` checks Dynamo's counters) and never approaches
the recompile limit. ``compile_seconds`` counts the time of every call during
which Dynamo compiled a graph (first compiles and recompiles alike), and
``graphs_compiled`` how many.
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
from .weights import BlockConfig, LayerWeights, Rotary, StackedWeights


def _mlp_update(x: torch.Tensor, lw: LayerWeights, cfg: BlockConfig,
                apply_ln: bool | torch.Tensor) -> torch.Tensor:
    return x + blocks.mlp(x, lw, cfg, apply_ln)


def _attention_z(x: torch.Tensor, lw: LayerWeights, cfg: BlockConfig,
                 apply_ln: bool | torch.Tensor, q_pos: torch.Tensor | None,
                 rotary: Rotary | None) -> torch.Tensor:
    return blocks.attention_z(x, lw, cfg, apply_ln, q_pos, rotary)


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


def dynamo_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class _CompileSettings:
    """Dynamo settings around each compiled step call (they matter when it compiles):
    no *duck sizing* (two sizes that happen to be equal in one call, e.g. 6 prompts and
    6 positions, stay two symbols instead of a guard the next call breaks), and room for
    one graph per runner configuration (model shapes, dtype, device) in the process,
    above Dynamo's default limit of 8 per function. Plain attribute writes: Dynamo's
    ``config.patch`` costs ~50 us a call, these ~10."""

    def __init__(self) -> None:
        import torch._dynamo.config as dynamo_config
        import torch.fx.experimental._config as fx_config

        self.fx, self.dynamo = fx_config, dynamo_config
        self.saved: list[tuple[Any, Any]] = []

    def __enter__(self) -> None:
        self.saved.append((self.fx.use_duck_shape, self.dynamo.recompile_limit))
        self.fx.use_duck_shape = False
        self.dynamo.recompile_limit = max(64, self.saved[-1][1])

    def __exit__(self, *exc: object) -> None:
        self.fx.use_duck_shape, self.dynamo.recompile_limit = self.saved.pop()


def _plain_input(a: Any) -> Any:
    """A compiled step's tensor argument as Dynamo should see it: contiguous (strides
    that follow from the sizes, not from how the caller's view was cut), detached (a
    view's base is one more tensor it would guard on) and starting at storage offset 0
    (a slice of the state arena starts wherever its slots do, and Dynamo specialises
    an offset of 0). Any copy this makes is small next to the matmuls that read it.
    The layer weights come in a ``LayerWeights`` tuple, untouched here: they are
    contiguous and their offsets never reach 0 (``weights._from_slot_one``)."""
    if not isinstance(a, torch.Tensor):
        return a
    a = a.contiguous()
    return a.clone() if a.storage_offset() else a.detach()


def at_least_two(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``t`` with its entries along ``dim`` repeated once when it has only one: Dynamo
    specialises a size of 1 (one more graph), so the compiled steps never see one."""
    return torch.cat([t, t], dim) if t.shape[dim] == 1 else t


class StepOps:
    """Block updates for one set of stacked weights.

    ``compile``: wrap attention and MLP in ``torch.compile`` (one graph each, see
    the module docstring). ``kernels``: run the MLP with the fused Triton kernels
    (GPU, or CPU under ``TRITON_INTERPRET=1`` for tests).
    """

    def __init__(self, w: StackedWeights, compile: bool = False, kernels: bool = False,
                 verbose: bool = True):
        self.w = w
        self.cfg = w.config
        self.compile = compile
        self.kernels = kernels
        self.verbose = verbose
        self.compile_seconds = 0.0
        self.graphs_compiled = 0
        self._announced = False
        self._detached: list[LayerWeights] | None = None
        self._reported = False
        if compile:
            self._settings = _CompileSettings()
            self._mlp = torch.compile(_mlp_update, dynamic=True)
            self._z = torch.compile(_attention_z, dynamic=True)
            self._attn = torch.compile(_attn_update, dynamic=True)
            # the norm flag as data: two constant 0-d tensors made once (no upload per call)
            self._flag = {b: torch.tensor(b, device=w.device) for b in (False, True)}
        else:
            self._mlp, self._z, self._attn = _mlp_update, _attention_z, _attn_update

    def _call(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """Call a step function; with ``compile``, a call during which Dynamo
        compiled a graph counts as compile time."""
        if not self.compile:
            return fn(*args)
        before = dynamo_graphs()
        if self.verbose and not self._announced:
            self._announced = True
            print("fastskip: compiling the forward with torch.compile (first call)...",
                  file=sys.stderr, flush=True)
        args = tuple(_plain_input(a) for a in args)
        start = time.perf_counter()
        with self._settings:
            out = fn(*args)
        new = dynamo_graphs() - before
        if new:
            self.graphs_compiled += new
            self.compile_seconds += time.perf_counter() - start
        return out

    def report_compile(self) -> None:
        if self.compile and self.verbose and self.compile_seconds and not self._reported:
            self._reported = True
            print(f"fastskip: compiled {self.graphs_compiled} graphs in "
                  f"{self.compile_seconds:.1f} s (first call only)", file=sys.stderr, flush=True)

    # -- the three updates ---------------------------------------------------
    # Compiled, each update sees its states flattened to rows (one dynamic size, or
    # rows x positions for attention), at least two of each (``at_least_two``), its
    # flags as tensors: the same graph for every layer, flag, plan, prompt and
    # position count.
    def _layer(self, layer: int) -> LayerWeights:
        """Layer ``layer``'s weights; compiled, as tensors that are no views (a view's
        base is one more tensor Dynamo would guard on), made once."""
        if not self.compile:
            return self.w.layer(layer)
        if self._detached is None:
            self._detached = [LayerWeights._make(None if t is None else t.detach()
                                                 for t in self.w.layer(i))
                              for i in range(self.w.n_layers)]
        return self._detached[layer]

    def mlp_update(self, x: torch.Tensor, layer: int, apply_ln: bool,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
        """x + MLP(norm(x)); ``scale`` [n] multiplies the MLP output per state, and a
        state with scale 0 gets exactly x (even where its MLP output is inf or NaN).
        x: [n, B, T, d]."""
        lw = self._layer(layer)
        if self.kernels:
            return self._mlp_kernels(x, lw, apply_ln, scale)
        if scale is not None:
            s = scale.to(x.dtype).view(-1, *[1] * (x.ndim - 1))
            return x + blocks.where_kept(s, blocks.mlp(x, lw, self.cfg, apply_ln) * s)
        if not self.compile:
            return _mlp_update(x, lw, self.cfg, apply_ln)
        rows = x.reshape(-1, x.shape[-1])  # the MLP is per position: [n * B * T, d]
        out = self._call(self._mlp, at_least_two(rows), lw, self.cfg, self._flag[apply_ln])
        return out[:len(rows)].view(x.shape)

    def attention_z(self, x: torch.Tensor, layer: int, apply_ln: bool,
                    q_pos: torch.Tensor | None) -> torch.Tensor:
        """z [n, B, Q, H, dh] of states x [n, B, T, d] (Q = T without ``q_pos`` [B, Q])."""
        lw = self._layer(layer)
        if not self.compile:
            return _attention_z(x, lw, self.cfg, apply_ln, q_pos, self.w.rotary)
        n, B, T, d = x.shape
        if q_pos is None:  # every position, as data: the same graph as asked positions
            q_pos = torch.arange(T, device=x.device).expand(B, T)
        Q = q_pos.shape[1]
        rows = at_least_two(x.reshape(1, n * B, T, d), 1)  # one row per state x prompt
        rows = at_least_two(rows, 2)  # a copy of the last position: no query sees it
        pos = at_least_two(at_least_two(q_pos.repeat(n, 1)), 1)  # [rows, Q] contiguous
        z = self._call(self._z, rows, lw, self.cfg, self._flag[apply_ln], pos, self.w.rotary)
        return z[0, :n * B, :Q].reshape(n, B, Q, *z.shape[3:])

    def attention_update(self, resid: torch.Tensor, z: torch.Tensor, layer: int,
                         head_mask: torch.Tensor | None) -> torch.Tensor:
        """resid [n, B, Q, d] + attention output of z [n, B, Q, H, dh]; ``head_mask``
        [n, H] keeps heads per state (None: all)."""
        lw = self._layer(layer)
        if not self.compile:
            return _attn_update(resid, z, lw, head_mask)
        n, B, Q, H, dh = z.shape
        if head_mask is None:  # all heads, as data: the same graph as a head subset
            head_mask = torch.ones((n, H), dtype=torch.bool, device=z.device)
        M = n * B * Q  # the output projection is per position: one row each
        out = self._call(self._attn, at_least_two(resid.reshape(M, 1, 1, -1)),
                         at_least_two(z.reshape(M, 1, 1, H, dh)), lw,
                         at_least_two(head_mask.repeat_interleave(B * Q, 0)))
        return out[:M].view(resid.shape)

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
