"""The main job: the notebook's plans on the notebook's prompts, in one call,
checked against TransformerLens and timed against the hook-per-plan loop.

    python -m fastskip.demo [--model gpt2-small-random|gpt2-small|smollm2-135m|FOLDER]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from . import notebook
from .engine import Runner
from .models import load_model
from .reference import check, plan_hooks
from .report import format_test_prompt


def rank_table(res, labels: Sequence[str]) -> str:
    """Plans x prompts: 'rank (prob)' of the first answer token."""
    import pandas as pd

    cells = {}
    for n, prompt in enumerate(res.prompts):
        head = prompt if len(prompt) <= 14 else prompt[:12] + ".."
        cells[head] = [f"{int(res.rank[p, n, 0])} ({float(res.answer_prob()[p, n]):.0%})"
                       for p in range(res.n_plans)]
    df = pd.DataFrame(cells, index=[f"{plan:<18} {label}" for plan, label in
                                    zip(res.plans, labels, strict=True)])
    return df.to_string()


def time_hook_loop(model, plans, tokens, repeat: int = 1) -> float:
    """Seconds per plan for one TransformerLens run_with_hooks per plan."""
    start = time.perf_counter()
    for _ in range(repeat):
        for plan in plans:
            model.run_with_hooks(tokens, fwd_hooks=plan_hooks(plan))
    return (time.perf_counter() - start) / (repeat * len(plans))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastskip demo", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-small-random")
    ap.add_argument("--no-check", action="store_true", help="skip the TransformerLens check")
    args = ap.parse_args(argv)

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model = load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    if args.model == "gpt2-small-random":
        print("NOTE: gpt2-small-random has random weights: its predictions are meaningless.\n"
              "      It shows the machinery (and its speed) offline; use --model gpt2-small\n"
              "      (needs the Hugging Face hub) or --model smollm2-135m for a real model.")
    runner = Runner(model)
    plans = [p for p, _ in notebook.PLANS]
    labels = [d for _, d in notebook.PLANS]
    if runner.n_layers != 12:  # the notebook's plans are for 12 layers: scale the block ranges
        plans, labels = ["all"], ["the full model"]
    prompts = [p for p, _ in notebook.PROMPTS]
    answers = [a for _, a in notebook.PROMPTS]

    runner.run(plans[:2], prompts, answers)  # warm-up
    t0 = time.perf_counter()
    res = runner.run(plans, prompts, answers, top_k=10)
    fast = (time.perf_counter() - t0) / len(plans)
    print(f"\nRank (probability) of the answer, {len(plans)} plans x {len(prompts)} prompts "
          f"in one call:\n")
    print(rank_table(res, labels))

    print("\nThe notebook's test_prompt report, for plan '0-7,9.mlp' on '1 2 3 4':\n")
    one = runner.run(["0-7,9.mlp" if runner.n_layers == 12 else "all"], prompts[:1],
                     answers[:1], top_k=10)
    print(format_test_prompt(one, 0, 0, model, 10))

    tokens = model.to_tokens(prompts)
    if not args.no_check:
        err = check(runner, plans, tokens, atol=1e-4)
        print(f"\nChecked against TransformerLens hooks: max |logit error| = {err:.1e} "
              f"over {len(plans)} plans (tolerance 1e-4)")
    bound = list(runner.plan_set(plans))
    slow = time_hook_loop(model, bound[:4], tokens)
    print(f"\nTime per plan: fastskip {fast * 1e3:.1f} ms, one TransformerLens run_with_hooks "
          f"per plan {slow * 1e3:.1f} ms ({slow / fast:.0f}x), measured in this run on "
          f"{runner.device.type}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
