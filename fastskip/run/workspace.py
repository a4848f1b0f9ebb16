"""A reusable output buffer for the logits of successive batches of one call.

Each batch's logits are [rows, vocabulary] floats, hundreds of MB; on CPU a fresh
tensor of that size comes from the operating system every time (the allocator
hands large blocks back), and its first touch page-faults: about 15% of the
unembedding product here. One buffer per call, as large as its largest batch
(which the memory budget already counts), is written over instead.
"""

from __future__ import annotations

import math

import torch


class Workspace:
    """``take(shape)``: a tensor of that shape over one buffer that only grows."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.buf: torch.Tensor | None = None

    def take(self, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        if self.buf is None or self.buf.numel() < n:
            self.buf = None  # free the old buffer before making the larger one
            self.buf = torch.empty(n, dtype=self.dtype, device=self.device)
        return self.buf[:n].view(shape)
