"""Exceptions and warnings raised by fastskip.

Every error names the culprit (plan text and item, layer, prompt, option) so
that a user never has to read a stack trace from deep inside torch.
"""

from __future__ import annotations


class FastskipError(Exception):
    """Base class of every error fastskip raises on purpose."""


class PlanError(FastskipError, ValueError):
    """A plan string or mask is malformed, or does not fit the model."""


class InputError(FastskipError, ValueError):
    """Prompts, answers or tokens cannot be used as given."""


class UnsupportedModelError(FastskipError, ValueError):
    """The model's architecture or options are not supported by the fast path."""


class CheckError(FastskipError, AssertionError):
    """The fast path disagrees with the TransformerLens reference."""


class MemoryBudgetError(FastskipError, MemoryError):
    """The work cannot fit in the memory budget, even in the smallest chunk."""


class OverflowWarning(UserWarning):
    """Some plans' logits overflowed (inf/NaN); their ranks are reported as -1."""
