"""auto-circuit's ``PruneScores`` and fastskip's edge scores, both ways.

auto-circuit (1.0.1) keys edge scores by the module of the receiver: for a
TransformerLens model made patchable with ``factorized=True, separate_qkv=True``,

* ``blocks.L.hook_q_input`` / ``hook_k_input`` / ``hook_v_input``: [heads, senders
  before layer L] (k and v: key/value heads, as TransformerLens's split inputs);
* ``blocks.L.hook_mlp_in``: [senders before layer L's MLP];
* ``blocks.{n-1}.hook_resid_post`` (the logits' input): [every sender].

Its senders are numbered as fastskip's (embedding, then per layer its heads and
its MLP), and the senders before a receiver are a prefix of that order, so the
conversion is a reshape per receiver. (auto-circuit itself numbers k/v
receivers by query head and does not run on grouped-query models.)

    scores = fs.search.from_prune_scores(prune_scores, runner.edges)   # [n_edges]
    prune_scores = fs.search.to_prune_scores(scores, runner.edges)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..errors import InputError
from ..plans import EdgeGraph

PruneScores = dict[str, torch.Tensor]


def receiver_blocks(g: EdgeGraph) -> list[tuple[str, np.ndarray]]:
    """(auto-circuit module name, receivers [rows]) of every ``PruneScores`` entry."""
    out = []
    for L in range(g.n_layers):
        out.append((f"blocks.{L}.hook_q_input", np.array([g.q_receiver(L, h)
                                                           for h in range(g.n_heads)])))
        out.append((f"blocks.{L}.hook_k_input", np.array([g.k_receiver(L, h)
                                                           for h in range(g.n_kv_heads)])))
        out.append((f"blocks.{L}.hook_v_input", np.array([g.v_receiver(L, h)
                                                           for h in range(g.n_kv_heads)])))
        out.append((f"blocks.{L}.hook_mlp_in", np.array([g.mlp_receiver(L)])))
    out.append((f"blocks.{g.n_layers - 1}.hook_resid_post", np.array([g.logits_receiver])))
    return out


def _edges_of(g: EdgeGraph, receivers: np.ndarray) -> np.ndarray:
    """Edge indices [rows, senders] of receivers that share one in-degree."""
    width = int(g.in_degree[receivers[0]])
    return g.edge_offset[receivers][:, None] + np.arange(width)[None, :]


def to_prune_scores(scores: np.ndarray | torch.Tensor, g: EdgeGraph,
                    device: torch.device | str = "cpu") -> PruneScores:
    """Edge scores [n_edges] (graph order) as auto-circuit ``PruneScores``."""
    s = torch.as_tensor(np.asarray(scores, dtype=np.float32) if not isinstance(
        scores, torch.Tensor) else scores.detach().float().cpu()).reshape(-1)
    if s.shape[0] != g.n_edges:
        raise InputError(f"scores must have one value per edge ({g.n_edges}), got {s.shape[0]}")
    out = {}
    for name, rows in receiver_blocks(g):
        block = s[torch.as_tensor(_edges_of(g, rows))]
        out[name] = (block[0] if name.endswith(("mlp_in", "resid_post")) else block).to(device)
    return out


def from_prune_scores(prune_scores: Mapping[str, torch.Tensor], g: EdgeGraph) -> np.ndarray:
    """auto-circuit ``PruneScores`` as edge scores [n_edges] in graph order
    (float64); ``InputError`` when an entry is missing or has the wrong shape."""
    out = np.full(g.n_edges, np.nan)
    for name, rows in receiver_blocks(g):
        if name not in prune_scores:
            raise InputError(f"PruneScores has no entry '{name}'; expected auto-circuit's "
                             "factorized graph with separate q/k/v inputs")
        t = torch.as_tensor(prune_scores[name]).detach().double().cpu()
        want = (len(rows), int(g.in_degree[rows[0]]))
        t = t.reshape(1, -1) if name.endswith(("mlp_in", "resid_post")) else t
        if tuple(t.shape) != want:
            raise InputError(f"PruneScores['{name}'] has shape {tuple(t.shape)}; this model "
                             f"needs {want}")
        out[_edges_of(g, rows)] = t.numpy()
    return out


def is_prune_scores(value: object) -> bool:
    """Whether ``value`` looks like auto-circuit ``PruneScores`` (module name -> tensor)."""
    return isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
