"""The naive one-pass masked forward: every plan computes every component and
keeps its output where the plan's mask says so (a select, so a skipped
component's inf/NaN output never reaches the plan). No sharing, no skipping.

It is the baseline the prefix tree is measured against (``Runner(...,
strategy="masked")``) and an independent second implementation for tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..model import StackedWeights, blocks
from ..model.ops import StepOps
from ..plans import PlanSet
from .sources import Sources
from .tree_executor import FinalStates


class MaskedExecutor:
    """Runs ``chunk`` plans at a time as one batch of rows."""

    def __init__(self, weights: StackedWeights, chunk: int = 64, ops: StepOps | None = None):
        self.w = weights
        self.ops = ops or StepOps(weights)
        self.chunk = max(1, int(chunk))

    def run(self, plans: PlanSet, tokens: torch.Tensor, q_pos: torch.Tensor,
            unembed_rows: int = 64, sources: Sources | None = None) -> Iterator[FinalStates]:
        step = max(1, min(self.chunk, unembed_rows))
        for a in range(0, len(plans), step):
            idx = np.arange(a, min(a + step, len(plans)))
            states = self._forward(plans.take(idx), tokens, q_pos, sources)
            yield FinalStates(states, idx, np.arange(len(idx)))

    def _forward(self, plans: PlanSet, tokens: torch.Tensor, q_pos: torch.Tensor,
                 sources: Sources | None) -> torch.Tensor:
        w = self.w
        dev, dt = w.device, w.dtype
        P = len(plans)
        as_t = lambda a: torch.as_tensor(a, device=dev)  # noqa: E731
        x = blocks.embed(tokens, w)[None].repeat(P, 1, 1, 1)  # [P, B, T, d]
        for layer in range(w.n_layers):
            lw, cfg = w.layer(layer), w.config
            z = blocks.attention_z(x, lw, cfg, True, rotary=w.rotary)
            if not plans.attn_ln[:, layer].all():  # /noln plans: select per plan
                attn_ln = as_t(plans.attn_ln[:, layer])[:, None, None, None, None]
                z = torch.where(attn_ln, z, blocks.attention_z(x, lw, cfg, False,
                                                               rotary=w.rotary))
            heads = as_t(plans.heads[:, layer])
            on = as_t(plans.attn[:, layer])[:, None, None, None]  # bool
            # Skipped components are selected away (torch.where), never multiplied by 0:
            # a NaN/inf output of a component a plan skips must not reach that plan.
            if sources is None:
                x = x + blocks.where_kept(on, blocks.attention_out(z, lw, heads))
            else:  # removed heads take the source's z, a skipped layer the source's output
                z = torch.where(heads[:, None, None, :, None], z, sources.z[layer])
                x = x + torch.where(on, blocks.attention_out(z, lw), sources.attn[layer])
            keep = as_t(plans.mlp[:, layer])
            noln = as_t(~plans.mlp_ln[:, layer])
            x_in = x
            x = self.ops.mlp_update(x_in, layer, True, (keep & ~noln).to(dt))
            if noln.any():
                x = x + blocks.where_kept((keep & noln)[:, None, None, None],
                                          blocks.mlp(x_in, lw, cfg, False))
            if sources is not None:
                x = x + blocks.where_kept(~keep[:, None, None, None], sources.mlp[layer])
        n, B, _, d = x.shape
        return torch.gather(x, 2, q_pos[None, :, :, None].expand(n, B, q_pos.shape[1], d))
