"""The main job: the notebook's plans on the notebook's prompts, in one call,
checked against TransformerLens and timed against the hook-per-plan loop.

    fastskip demo [--model gpt2-small-random|gpt2-small|smollm2-135m|FOLDER]
    python -m fastskip.demo [...]     (the same; kept for scripts/demo.sh)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from . import notebook
from .reference import check, plan_hooks
from .report import format_test_prompt


def rank_table(res: Any, labels: Sequence[str]) -> str:
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


def time_hook_loop(model: Any, plans: Sequence[Any], tokens: Any, repeat: int = 1) -> float:
    """Seconds per plan for one TransformerLens run_with_hooks per plan."""
    start = time.perf_counter()
    for _ in range(repeat):
        for plan in plans:
            model.run_with_hooks(tokens, fwd_hooks=plan_hooks(plan))
    return (time.perf_counter() - start) / (repeat * len(plans))


def demo(runner: Any, model_name: str = "", check_reference: bool = True) -> None:
    """Print the demo: ranks of the notebook's plans on its prompts, one
    test_prompt report, a check against TransformerLens and the timing."""
    model = runner.model
    if model_name == "gpt2-small-random":
        print("NOTE: gpt2-small-random has random weights: its predictions are meaningless.\n"
              "      It shows the machinery (and its speed) offline; use --model gpt2-small\n"
              "      (needs the Hugging Face hub) or --model smollm2-135m for a real model.")
    plans = [p for p, _ in notebook.PLANS]
    labels = [d for _, d in notebook.PLANS]
    if runner.n_layers != 12:  # the notebook's plans are for 12 layers
        plans, labels = ["all"], ["the full model"]
    prompts = [p for p, _ in notebook.PROMPTS]
    answers = [a for _, a in notebook.PROMPTS]

    runner.run(plans[:2], prompts, answers, progress=False)  # warm-up
    t0 = time.perf_counter()
    res = runner.run(plans, prompts, answers, top_k=10, progress=False)
    fast = (time.perf_counter() - t0) / len(plans)
    print(f"\nRank (probability) of the answer, {len(plans)} plans x {len(prompts)} prompts "
          f"in one call:\n")
    print(rank_table(res, labels))

    shown = "0-7,9.mlp" if runner.n_layers == 12 else "all"
    print(f"\nThe notebook's test_prompt report, for plan '{shown}' on '{prompts[0]}':\n")
    one = runner.run([shown], prompts[:1], answers[:1], top_k=10, progress=False)
    print(format_test_prompt(one, 0, 0, model, 10))

    tokens = model.to_tokens(prompts)
    if check_reference:
        err = check(runner, plans, tokens, atol=1e-4)
        print(f"\nChecked against TransformerLens hooks: max |logit error| = {err:.1e} "
              f"over {len(plans)} plans (tolerance 1e-4)")
    bound = list(runner.plan_set(plans))
    slow = time_hook_loop(model, bound[:4], tokens)
    print(f"\nTime per plan: fastskip {fast * 1e3:.1f} ms, one TransformerLens run_with_hooks "
          f"per plan {slow * 1e3:.1f} ms ({slow / fast:.0f}x), measured in this run on "
          f"{runner.device.type}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastskip.demo [options]`` = ``fastskip demo [options]``."""
    from .cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
