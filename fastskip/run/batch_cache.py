"""The inputs of the last search call, kept for the next: a search calls
``Runner.logit_diff`` hundreds of times with the same prompts and ablation, and
tokenizing them (and computing the ablation's sources) each time would cost
more than evaluating a small batch of plans."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

from ..ablation import Ablation

T = TypeVar("T")


def content_key(value: Any) -> Hashable:
    """A hashable key equal for equal inputs: sequences as tuples, tensors by their
    bytes, an ``Ablation`` by its kind, prompts and tokens."""
    if isinstance(value, Ablation):
        return ("ablation", value.kind, value.prompts, content_key(value.tokens))
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return ("tensor", str(t.dtype), tuple(t.shape),
                hashlib.blake2b(t.view(torch.uint8).numpy().tobytes()).hexdigest())
    if isinstance(value, (list, tuple)):
        return tuple(content_key(v) for v in value)
    return value


class BatchCache:
    """Remembers what ``make`` built for the last key."""

    def __init__(self) -> None:
        self._key: Hashable = None
        self._value: Any = None

    def get(self, key: Any, make: Callable[[], T]) -> T:
        k = content_key(key)
        if self._value is None or self._key != k:
            self._key, self._value = k, make()
        return self._value
