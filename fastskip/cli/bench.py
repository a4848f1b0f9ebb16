"""``fastskip bench``: the benchmark suite in short form. Each plan set is timed
with one ``runner.run`` and against one TransformerLens ``run_with_hooks`` per
plan on a sample of the set, in the same run, so only ratios are reported.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable
from typing import Any

from ..plans import PlanSet, grid
from ..reference.timing import best_of, hook_loop_per_plan
from ..run import Runner
from . import notebook


def plan_sets(n_layers: int, n_heads: int, quick: bool
              ) -> list[tuple[str, PlanSet | list[str]]]:
    """The timed plan sets for a model of this size."""
    n_random = 64 if quick else 256
    sets: list[tuple[str, PlanSet | list[str]]] = [(f"{n_random} random block plans",
             grid.random_plans(n_random, n_layers, n_heads, seed=0, kinds=("block",))),
            ("heads left out", grid.leave_one_out(n_layers, n_heads, units="head"))]
    if n_layers == 12:
        sets.append(("the notebook's plans", [p for p, _ in notebook.PLANS]))
    else:
        sets.append(("attn/MLP left out", grid.leave_one_out(n_layers, n_heads, "component")))
    return sets


def bench(runner: Runner, quick: bool = False, log: Callable[[str], None] | None = None
          ) -> list[dict[str, Any]]:
    """Time every plan set of ``plan_sets``; one row per set: plans, fastskip ms per
    plan, run_with_hooks ms per plan, ratio."""
    log = log or (lambda msg: None)
    prompts = [p for p, _ in notebook.PROMPTS]
    answers = [a for _, a in notebook.PROMPTS]
    model = runner.model
    tokens = model.to_tokens(prompts)
    runner.run(["all", "none"], prompts, answers, progress=False)  # warm-up
    rows = []
    for name, plans in plan_sets(runner.n_layers, runner.n_heads, quick):
        ps = runner.plan_set(plans)
        log(f"timing {name} ({len(ps)} plans)")
        def run(ps: PlanSet = ps) -> object:
            return runner.run(ps, prompts, answers, progress=False)
        fast = best_of(run, 1 if quick else 3, runner.device) / len(ps)
        slow = hook_loop_per_plan(model, ps, tokens, sample=3 if quick else 8,
                                  rounds=1 if quick else 2)
        rows.append({"plan set": name, "plans": len(ps), "fastskip ms/plan": fast * 1e3,
                     "TL ms/plan": slow * 1e3, "ratio": slow / fast})
    return rows


def device_text(runner: Runner) -> str:
    """The device in words: GPU name, or CPU and threads."""
    import torch

    if runner.device.type == "cuda":
        return f"{torch.cuda.get_device_name(runner.device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def format_table(rows: list[dict[str, Any]], runner: Runner) -> str:
    """The ratio table, with the model, prompts and device it was measured on."""
    import pandas as pd

    df = pd.DataFrame(rows)
    table = df.to_string(index=False, formatters={
        "fastskip ms/plan": "{:.1f}".format, "TL ms/plan": "{:.1f}".format,
        "ratio": "{:.1f}x".format})
    return (f"fastskip vs one TransformerLens run_with_hooks per plan "
            f"({runner.model_name or 'model'}, {len(notebook.PROMPTS)} prompts, "
            f"{str(runner.dtype).replace('torch.', '')})\n{table}\n"
            f"device: {runner.device.type} ({device_text(runner)}); ratios measured in this run")
