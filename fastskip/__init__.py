"""fastskip: evaluate thousands of transformer subnetworks in one batched, exact
pass over stacked weights, checked against TransformerLens.

    import fastskip as fs
    model = fs.load_model("gpt2-small-random")
    runner = fs.Runner(model)
    res = runner.run(["all", "0-7,9.mlp"], prompts=["1 2 3 4"], answers=[" 5"])

Importing fastskip loads neither TransformerLens nor a model.

Layout (each folder imports only from those listed before it):
``plans/`` (what is kept) -> ``model/`` (weights and block math) ->
``reference/`` (TransformerLens hooks, check, timing) -> ``run/`` (the Runner) ->
``output/`` (tables, sweeps, plots) -> ``search/`` (tasks, circuit search) ->
``cli/``; ``errors``, ``inputs``, ``results``, ``ablation``, ``prompt_files`` and
``files`` at the top are the user-facing pieces every folder may use.
"""

from . import search
from .ablation import Ablation
from .cli.report import test_prompt
from .errors import (
    CheckError,
    FastskipError,
    InputError,
    MemoryBudgetError,
    OverflowWarning,
    PlanError,
    UnsupportedModelError,
)
from .model import load_model
from .output import plot, sweep, tables
from .plans import EdgeGraph, EdgePlan, EdgePlanSet, Plan, PlanMask, PlanSet, grid
from .reference import check, plan_hooks, reference_logits
from .results import Results
from .run import Runner
from .search import tasks

io = tables  # the old name of fastskip.output.tables (fs.io.load_results, fs.io.summarize)

__version__ = "0.1.0"

__all__ = [
    "Ablation", "CheckError", "EdgeGraph", "EdgePlan", "EdgePlanSet", "FastskipError",
    "InputError", "MemoryBudgetError",
    "OverflowWarning", "Plan", "PlanError", "PlanMask", "PlanSet", "Results", "Runner",
    "UnsupportedModelError", "check", "grid", "io", "load_model", "plan_hooks", "plot",
    "reference_logits", "search", "sweep", "tables", "tasks", "test_prompt",
]
