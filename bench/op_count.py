"""Operators one grid (a) run issues per plan: the launch overhead the tree
executor pays, counted with the torch profiler (on CPU too; on CUDA every
counted operator is one or more kernel launches).

    .venv/bin/python bench/op_count.py [--plans 4096] [--device cpu]

Counts the aten operators called from Python (``top-level``: not nested inside
another aten operator) during one ``runner.run`` of the 4,096 block subsets of
random GPT-2 small with the notebook's 6 prompts, and divides by the plans.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import fastskip as fs
from fastskip.cli import notebook


def count_ops(fn) -> tuple[collections.Counter, int]:
    """(top-level aten operators by name, all aten operators) of one call of ``fn``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    top: collections.Counter = collections.Counter()
    total = 0
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        total += 1
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            top[ev.name] += 1
    return top, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", type=int, default=4096, help="first N block subsets")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="write the counts here")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    model = fs.load_model("gpt2-small-random")
    runner = fs.Runner(model, device=args.device, verbose=False)
    plans = runner.plan_set(list(fs.grid.block_subsets(12))[: args.plans])
    prompts = [p for p, _ in notebook.PROMPTS]
    answers = [a for _, a in notebook.PROMPTS]
    runner.run(plans.take(list(range(8))), prompts, answers, progress=False)  # warm-up
    top, total = count_ops(lambda: runner.run(plans, prompts, answers, progress=False))
    n_top = sum(top.values())
    out = {"plans": len(plans), "top_level_ops": n_top, "all_aten_ops": total,
           "top_level_ops_per_plan": n_top / len(plans),
           "all_aten_ops_per_plan": total / len(plans),
           "by_name": dict(top.most_common(25))}
    print(f"{len(plans)} plans: {n_top} top-level aten ops ({n_top / len(plans):.2f} per plan), "
          f"{total} in all ({total / len(plans):.2f} per plan)")
    for name, n in top.most_common(25):
        print(f"  {n:8d}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
