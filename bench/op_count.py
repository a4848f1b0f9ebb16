"""Operators one grid (a) run issues per plan: the launch overhead the tree
executor pays, counted with the torch profiler (on CPU too; on CUDA every
counted operator is one or more kernel launches).

    .venv/bin/python bench/op_count.py [--plans 4096] [--device cpu]

Counts the aten operators of one ``runner.run`` of the 4,096 block subsets of
random GPT-2 small with the notebook's 6 prompts (see ``count_ops``) and divides
by the plans. Measured on the 2-core CPU (default budget, 16 unembedding batches):

| executor | top-level ops / plan | launching ops / plan | uploads | syncs |
| --- | --- | --- | --- | --- |
| per-batch index uploads (before issue 16) | 0.820 | 0.334 | 220 | 22 |
| one planned upload per tree (schedule.py) | 0.662 | 0.340 | 38 | 22 |

The uploads left are per call, not per plan or batch (38 for 1,024 plans as for
4,096): the walk makes none but the schedule's two buffers
(tests/run/test_launches.py). The syncs are one per unembedding batch (the
overflow check) and the call's bookkeeping.
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

# aten operators that only make a new view or tensor header, or allocate: no kernel launch
NO_LAUNCH = {
    "aten::view", "aten::_reshape_alias", "aten::reshape", "aten::as_strided", "aten::select",
    "aten::slice", "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::expand",
    "aten::transpose", "aten::t", "aten::alias", "aten::detach", "aten::lift_fresh",
    "aten::resolve_conj", "aten::resolve_neg", "aten::empty", "aten::empty_strided",
    "aten::_unsafe_view", "aten::unbind", "aten::split", "aten::narrow", "aten::chunk",
    "aten::expand_as", "aten::view_as", "aten::result_type", "aten::empty_like",
    "aten::unflatten", "aten::flatten", "aten::contiguous", "aten::to", "aten::_to_copy",
    "aten::matmul", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense",
    "aten::numpy_T", "aten::lift", "aten::set_", "aten::_has_compatible_shallow_copy_type",
}
SYNC = {"aten::_local_scalar_dense"}  # a device value read by the host: waits for the GPU
UPLOAD = {"aten::lift_fresh"}  # a tensor made from host data (numpy, lists): on CUDA a copy


def count_ops(fn) -> dict:
    """Operators of one call of ``fn``: ``top_level`` (aten operators called from Python,
    not nested in another), ``launches`` (innermost operators that do device work: on
    CUDA, kernels), ``uploads`` (tensors from host data) and ``syncs`` (device values
    read by the host), and the top-level ones by name."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [ev for ev in prof.events() if ev.name.startswith("aten::")]
    has_aten_child = set()
    top: collections.Counter = collections.Counter()
    for ev in events:
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            top[ev.name] += 1
        else:
            has_aten_child.add(parent.id)
    leaves = [ev for ev in events if ev.id not in has_aten_child]
    launching = collections.Counter(ev.name for ev in leaves if ev.name not in NO_LAUNCH)
    return {"top_level": sum(top.values()),
            "launches": sum(ev.name not in NO_LAUNCH for ev in leaves),
            "uploads": sum(ev.name in UPLOAD for ev in events),
            "syncs": sum(ev.name in SYNC for ev in events),
            "all": len(events), "by_name": top, "launches_by_name": launching}


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
    counts = count_ops(lambda: runner.run(plans, prompts, answers, progress=False))
    P = len(plans)
    by_name, launching = counts.pop("by_name"), counts.pop("launches_by_name")
    out = {"plans": P, **counts, **{f"{k}_per_plan": v / P for k, v in counts.items()},
           "by_name": dict(by_name.most_common(25)),
           "launches_by_name": dict(launching.most_common(25))}
    print(f"{P} plans, one runner.run on {args.device}: " + ", ".join(
        f"{k} {v} ({v / P:.3f} per plan)" for k, v in counts.items()))
    print("top-level operators:")
    for name, n in by_name.most_common(15):
        print(f"  {n:8d}  {name}")
    print("launching operators:")
    for name, n in launching.most_common(15):
        print(f"  {n:8d}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
