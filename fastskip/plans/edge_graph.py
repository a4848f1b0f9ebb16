"""The edge graph of a model: senders, receivers and the edges between them.

The graph is the one auto-circuit's factorized model and ACDC use:

* **senders**, in model order: the embedding (token + position) ``embed``, then
  per layer L its heads ``L.0`` .. ``L.{H-1}`` (each head's output through
  ``W_O``, without the layer's output bias ``b_O``, which is always on) and its
  MLP ``L.mlp``;
* **receivers**, in model order: per layer L the query input of every head
  (``L.h.q``), the key and value inputs of every key/value head (``L.h.k``,
  ``L.h.v``; in grouped-query models, where K key/value heads serve H query
  heads, ``L.kvg.k`` / ``L.kvg.v`` for key/value head g), the MLP's input
  (``L.mlp``), and the logits (the final norm's input, ``logits``);
* an edge from every sender to every receiver after it in the model's order.

Model order is a stage number: the embedding is stage -1, layer L's attention
(its heads as senders, their q/k/v as receivers) stage 2L, its MLP stage 2L+1,
the logits stage 2 n_layers. The senders before a receiver are always a prefix
of the sender order, so edge (sender s, receiver r) has the flat index
``edge_offset[r] + s``: edges are ordered by receiver, then by sender (the order
of auto-circuit's ``PruneScores`` rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..errors import PlanError

EMBED = 0  # the embedding's sender index


@dataclass(frozen=True)
class EdgeGraph:
    """Senders, receivers and edges of a model with ``n_layers`` layers of
    ``n_heads`` query heads and ``n_kv_heads`` key/value heads."""

    n_layers: int
    n_heads: int
    n_kv_heads: int

    def __post_init__(self) -> None:
        L, H, K = self.n_layers, self.n_heads, self.n_kv_heads
        if L < 1 or H < 1 or K < 1 or H % K:
            raise PlanError(f"an edge graph needs n_layers, n_heads >= 1 and n_kv_heads "
                            f"dividing n_heads; got {L}, {H}, {K}")

    # -- sizes ---------------------------------------------------------------------
    @property
    def grouped(self) -> bool:
        """Key/value heads are shared by several query heads (grouped-query attention)."""
        return self.n_kv_heads != self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def n_senders(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def receivers_per_layer(self) -> int:
        """q of every head, k and v of every key/value head, the MLP input."""
        return self.n_heads + 2 * self.n_kv_heads + 1

    @property
    def n_receivers(self) -> int:
        return self.n_layers * self.receivers_per_layer + 1

    @property
    def n_edges(self) -> int:
        return int(self.edge_offset[-1])

    def __len__(self) -> int:
        return self.n_edges

    # -- senders -------------------------------------------------------------------
    def head_sender(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    @cached_property
    def sender_stage(self) -> np.ndarray:
        """[n_senders] the stage of each sender (embed -1, heads 2L, MLP 2L+1)."""
        per_layer = np.array([0] * self.n_heads + [1])
        stages = (2 * np.arange(self.n_layers)[:, None] + per_layer).reshape(-1)
        return np.concatenate([[-1], stages]).astype(np.int64)

    def senders_before(self, stage: int) -> int:
        """How many senders come before a receiver of ``stage`` (a prefix of the order)."""
        return int(np.searchsorted(self.sender_stage, stage, side="left"))

    def sender_name(self, s: int) -> str:
        if s == EMBED:
            return "embed"
        layer, k = divmod(s - 1, self.n_heads + 1)
        return f"{layer}.mlp" if k == self.n_heads else f"{layer}.{k}"

    # -- receivers -----------------------------------------------------------------
    def q_receiver(self, layer: int, head: int) -> int:
        return layer * self.receivers_per_layer + head

    def k_receiver(self, layer: int, kv_head: int) -> int:
        return layer * self.receivers_per_layer + self.n_heads + kv_head

    def v_receiver(self, layer: int, kv_head: int) -> int:
        return layer * self.receivers_per_layer + self.n_heads + self.n_kv_heads + kv_head

    def mlp_receiver(self, layer: int) -> int:
        return layer * self.receivers_per_layer + self.n_heads + 2 * self.n_kv_heads

    @property
    def logits_receiver(self) -> int:
        return self.n_receivers - 1

    def receiver_kind(self, r: int) -> tuple[int, str, int]:
        """(layer, kind, head) of receiver r: kind q/k/v (head: query head for q,
        key/value head for k and v), mlp or logits (head -1; layer n_layers for logits)."""
        if r == self.logits_receiver:
            return self.n_layers, "logits", -1
        layer, k = divmod(r, self.receivers_per_layer)
        H, K = self.n_heads, self.n_kv_heads
        if k < H:
            return layer, "q", k
        if k < H + K:
            return layer, "k", k - H
        if k < H + 2 * K:
            return layer, "v", k - H - K
        return layer, "mlp", -1

    @cached_property
    def receiver_stage(self) -> np.ndarray:
        """[n_receivers] the stage of each receiver (q/k/v 2L, MLP input 2L+1, logits 2n)."""
        per_layer = np.array([0] * (self.n_heads + 2 * self.n_kv_heads) + [1])
        stages = (2 * np.arange(self.n_layers)[:, None] + per_layer).reshape(-1)
        return np.concatenate([stages, [2 * self.n_layers]]).astype(np.int64)

    def receiver_name(self, r: int) -> str:
        layer, kind, head = self.receiver_kind(r)
        if kind == "logits":
            return "logits"
        if kind == "mlp":
            return f"{layer}.mlp"
        if kind == "q" or not self.grouped:
            return f"{layer}.{head}.{kind}"
        return f"{layer}.kv{head}.{kind}"

    # -- edges ---------------------------------------------------------------------
    @cached_property
    def in_degree(self) -> np.ndarray:
        """[n_receivers] senders before each receiver (its possible in-edges)."""
        return np.searchsorted(self.sender_stage, self.receiver_stage, side="left")

    @cached_property
    def edge_offset(self) -> np.ndarray:
        """[n_receivers + 1] the flat index of each receiver's first in-edge."""
        return np.concatenate([[0], np.cumsum(self.in_degree)]).astype(np.int64)

    @cached_property
    def edge_receiver(self) -> np.ndarray:
        """[n_edges] the receiver of each edge."""
        return np.repeat(np.arange(self.n_receivers), self.in_degree)

    @cached_property
    def edge_sender(self) -> np.ndarray:
        """[n_edges] the sender of each edge."""
        return np.arange(self.n_edges) - self.edge_offset[self.edge_receiver]

    def edge_index(self, sender: int, receiver: int) -> int:
        """Flat index of the edge sender -> receiver (``PlanError`` if there is none)."""
        if not 0 <= sender < self.in_degree[receiver]:
            raise PlanError(f"there is no edge {self.sender_name(sender)}>"
                            f"{self.receiver_name(receiver)}: the receiver does not come "
                            "after the sender")
        return int(self.edge_offset[receiver] + sender)

    def edge_name(self, e: int) -> str:
        return f"{self.sender_name(int(self.edge_sender[e]))}>" \
               f"{self.receiver_name(int(self.edge_receiver[e]))}"

    def edge_names(self) -> list[str]:
        """Every edge's name ``S>R``, in edge order."""
        senders = [self.sender_name(s) for s in range(self.n_senders)]
        receivers = [self.receiver_name(r) for r in range(self.n_receivers)]
        return [f"{senders[s]}>{receivers[r]}"
                for s, r in zip(self.edge_sender, self.edge_receiver, strict=True)]

    def dense(self, masks: np.ndarray) -> np.ndarray:
        """Edge masks [P, n_edges] as [P, n_receivers, n_senders] (False where no edge)."""
        masks = np.asarray(masks, dtype=bool)
        out = np.zeros((masks.shape[0], self.n_receivers, self.n_senders), dtype=bool)
        out[:, self.edge_receiver, self.edge_sender] = masks
        return out

    def flat(self, dense: np.ndarray) -> np.ndarray:
        """The inverse of ``dense``: [P, n_receivers, n_senders] -> [P, n_edges]."""
        return np.asarray(dense, dtype=bool)[:, self.edge_receiver, self.edge_sender]

    def __repr__(self) -> str:
        kv = f", {self.n_kv_heads} key/value heads" if self.grouped else ""
        return (f"EdgeGraph({self.n_layers} layers x {self.n_heads} heads{kv}: "
                f"{self.n_senders} senders, {self.n_receivers} receivers, {self.n_edges} edges)")
