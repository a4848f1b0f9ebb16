"""fastskip: evaluate thousands of transformer subnetworks in one batched, exact
pass over stacked weights, checked against TransformerLens.

    import fastskip as fs
    model = fs.load_model("gpt2-small-random")
    runner = fs.Runner(model)
    res = runner.run(["all", "0-7,9.mlp"], prompts=["1 2 3 4"], answers=[" 5"])

Importing fastskip loads neither TransformerLens nor a model.
"""

from . import grid, io, plot, search, sweep, tasks
from .ablation import Ablation
from .engine import OverflowWarning, Runner
from .errors import (
    CheckError,
    FastskipError,
    InputError,
    MemoryBudgetError,
    PlanError,
    UnsupportedModelError,
)
from .models import load_model
from .plan import Plan, PlanMask
from .planset import PlanSet
from .reference import check, plan_hooks, reference_logits
from .report import test_prompt
from .results import Results

__version__ = "0.1.0"

__all__ = [
    "Ablation", "CheckError", "FastskipError", "InputError", "MemoryBudgetError",
    "OverflowWarning", "Plan", "PlanError", "PlanMask", "PlanSet", "Results", "Runner",
    "UnsupportedModelError", "check", "grid", "io", "load_model", "plan_hooks", "plot",
    "reference_logits", "search", "sweep", "tasks", "test_prompt",
]
