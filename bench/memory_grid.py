"""Peak memory and time of a large grid under a memory budget (not a pytest test:
it takes minutes; tests/test_memory.py has the scaled-down test).

    .venv/bin/python bench/memory_grid.py --budget 2GB            # 65,536 plans, GPT-2 small
    .venv/bin/python bench/memory_grid.py --budget 2GB --components 12

The grid removes every subset of the attention layers and MLPs of the last
layers (``--components 16``: layers 4-11, 2^16 = 65,536 plans) of
``gpt2-small-random``, run on the README's
two prompts. Peak resident memory is read from Linux's VmHWM after resetting it
(``/proc/self/clear_refs``) once the model and the runner are built, so the
increase is what the run itself took: activations, results and bookkeeping.
"""

from __future__ import annotations

import argparse
import gc

import fastskip as fs
from fastskip.reference.timing import timed
from fastskip.run.memory import parse_memory, status_bytes

MiB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="2GB", help="max_memory (default 2GB)")
    ap.add_argument("--components", type=int, default=16, help="grid over the last N "
                    "components of 0.attn, 0.mlp, ..., 11.mlp (2^N plans; default 16)")
    ap.add_argument("--top-k", type=int, default=10)
    args = ap.parse_args()
    model = fs.load_model("gpt2-small-random")
    runner = fs.Runner(model, max_memory=args.budget, verbose=False)
    comps = [f"{layer}.{part}" for layer in range(12) for part in ("attn", "mlp")]
    plans = fs.grid.component_subsets(comps[len(comps) - args.components:], 12, 12)
    prompts, answers = ["1 2 3 4", "January February March April"], [" 5", " May"]
    runner.run(plans.take(range(4)), prompts, answers, top_k=args.top_k)  # warm up
    gc.collect()
    before = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    res, seconds = timed(lambda: runner.run(plans, prompts, answers, top_k=args.top_k,
                                            progress=False), runner.device)
    peak = status_bytes("VmHWM")
    budget = parse_memory(args.budget) or 0
    increase = peak - before
    print(f"{len(plans)} plans x {len(prompts)} prompts on {runner.model_name}, "
          f"max_memory {args.budget}: {seconds:.1f} s ({seconds / len(plans) * 1e3:.2f} ms/plan)")
    print(f"RSS before the run {before / MiB:.0f} MiB (model + stacked weights), peak "
          f"{peak / MiB:.0f} MiB: the run took +{increase / MiB:.0f} MiB "
          f"({'within' if increase <= budget else 'OVER'} the {budget / MiB:.0f} MiB budget)")
    print(f"ranks >= 0 for {int((res.rank >= 0).sum())} of {res.rank.numel()} answers")


if __name__ == "__main__":
    main()
