"""The reductions over the vocabulary that every metric needs, fused into one pass.

Per row of logits x [m, V]: the log-sum-exp, the number of entries strictly above
a threshold (the answer's logit: its rank) and the minimum (an overflow check);
for mixed precision's bf16 output o [m, V] the same over scaled values plus the
number of entries inside the ambiguity band (``fastskip.run.mixed_unembed``).

In eager PyTorch each of these is its own pass over [m, V] (a temporary per
comparison and per exponential): on a 2-core CPU they cost about as much as the
unembedding product itself. ``torch.compile`` fuses them into a single read of the
logits (about 5x faster on CPU here). Compiling takes ~10 s once per process, so
it starts after ``COMPILE_AFTER_ROWS`` rows have gone through the eager version
(a large sweep pays it once; a small call never does); ``FASTSKIP_COMPILE_METRICS=0``
keeps everything eager, ``=1`` compiles from the first row. Compiled and eager
results are the same numbers up to the summation order of the log-sum-exp (fp32
round-off); counts and minima are exact either way.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

COMPILE_AFTER_ROWS = 4096


def logit_reductions(x: torch.Tensor, above: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [m, V] float logits, above [m, 1]: log-sum-exp [m] (fp32), the number of
    entries > above [m] (int32) and the row minimum [m]."""
    x = x.float()
    mx = x.amax(1, keepdim=True)
    lse = mx[:, 0] + (x - mx).exp().sum(1).log()
    return lse, (x > above).sum(1, dtype=torch.int32), x.amin(1)


def band_reductions(o: torch.Tensor, scale: torch.Tensor, theta: torch.Tensor
                    ) -> tuple[torch.Tensor, ...]:
    """o [m, V] bf16 (mixed precision's tier-1 output), scale [V] fp32 (z = o scale),
    theta [m, 1] bf16: the max of z [m], sum exp(z - max) [m], entries with o > theta
    and with |o| <= theta [m] (int32), and the min of z [m]."""
    z = o.float() * scale
    mx = z.amax(1, keepdim=True)
    total = (z - mx).exp().sum(1)
    above = (o > theta).sum(1, dtype=torch.int32)
    band = (o.abs() <= theta).sum(1, dtype=torch.int32)
    return mx[:, 0], total, above, band, z.amin(1)


class Fused:
    """One of the reductions above, eager until ``COMPILE_AFTER_ROWS`` rows have gone
    through it in this process, compiled after (falls back to eager, with one
    warning, where ``torch.compile`` cannot compile it)."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.rows = 0
        self.compiled: Callable[..., Any] | None = None
        self.failed = False
        self.compile_seconds = 0.0

    def policy(self) -> int:
        """Rows after which to compile (-1: never)."""
        env = os.environ.get("FASTSKIP_COMPILE_METRICS", "")
        return {"0": -1, "1": 0}.get(env, COMPILE_AFTER_ROWS)

    def __call__(self, *args: torch.Tensor) -> Any:
        after = self.policy()
        self.rows += args[0].shape[0]
        if self.failed or after < 0 or self.rows <= after or args[0].shape[0] == 0:
            return self.fn(*args)
        if self.compiled is None:
            start = time.perf_counter()
            try:
                compiled = torch.compile(self.fn, dynamic=True)
                out = compiled(*args)
            except Exception as err:  # no compiler, unsupported device, ...
                self.failed = True
                warnings.warn(f"fastskip: could not compile the vocabulary metrics ({err}); "
                              "they run eagerly (slower)", RuntimeWarning, stacklevel=3)
                return self.fn(*args)
            self.compiled = compiled
            self.compile_seconds = time.perf_counter() - start
            return out
        return self.compiled(*args)


fused_logit_reductions = Fused(logit_reductions)
fused_band_reductions = Fused(band_reductions)
