"""Running plans: the Runner (the one orchestrator), memory sizing, the prefix
tree and its executor, the masked baseline, ablation sources, answer metrics,
reduced precision and run-time verification."""

from .runner import Runner

__all__ = ["Runner"]
