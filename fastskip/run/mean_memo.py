"""MLP means of circuits, memoized: the mean at layer l over the mean prompts
depends only on the kept heads of layers 0..l (every MLP runs intact in a means
pass), so circuits that agree there share it, whatever their MLPs and their heads
above l."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

MemoKey = tuple[int, bytes]  # (layer, kept heads of layers 0..layer as bytes)


class MeanMemo:
    """Least recently used MLP means, ``capacity`` entries. An entry holds every
    position [T, d] or the last one [1, d] (circuits whose heads all sit below a
    layer need only the last position there)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._means: OrderedDict[MemoKey, torch.Tensor] = OrderedDict()

    @staticmethod
    def key(heads: np.ndarray, layer: int) -> MemoKey:
        """The key of the MLP mean at ``layer`` for kept heads [L, H]."""
        return layer, heads[: layer + 1].tobytes()

    def put(self, heads: np.ndarray, layer: int, mean: torch.Tensor) -> None:
        """Remember a mean; one at every position is never replaced by one at the
        last position."""
        key = self.key(heads, layer)
        old = self._means.get(key)
        if old is None or old.shape[0] <= mean.shape[0]:
            self._means[key] = mean
        self._means.move_to_end(key)
        while len(self._means) > self.capacity:
            self._means.popitem(last=False)

    def get(self, heads: np.ndarray, layer: int, width: int) -> torch.Tensor | None:
        """The mean at the last ``width`` positions (T: all, 1: the last), or None."""
        key = self.key(heads, layer)
        got = self._means.get(key)
        if got is None or got.shape[0] < width:
            return None
        self._means.move_to_end(key)
        return got[-width:]

    def __len__(self) -> int:
        return len(self._means)
