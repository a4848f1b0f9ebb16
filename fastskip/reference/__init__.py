"""The reference: plans as TransformerLens hooks, the check of the fast path
against them, and timing of the hook-per-plan way."""

from .check import CheckReport, check, check_report
from .hooks import plan_hooks, reference_logits, reference_sources

__all__ = ["CheckReport", "check", "check_report", "plan_hooks", "reference_logits",
           "reference_sources"]
