"""Seed-style reports: ``test_prompt`` prints what the notebook's
``test_prompt`` prints, for a plan instead of a hand-written class."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plans import PlanLike
from ..results import Results

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..run import Runner


def format_test_prompt(res: Results, plan_index: int = 0, prompt_index: int = 0,
                       tokenizer_model: HookedTransformer | None = None, top_k: int = 10,
                       print_details: bool = True) -> str:
    """The notebook's ``test_prompt`` text for one plan and prompt of ``res``.

    Ranks count the vocabulary entries with a strictly larger logit, so a tie
    shares a rank (the notebook's sort position may differ by one on ties).
    """
    res = res.cpu()  # read element by element below: one copy from the device first
    lines = []
    p, n = plan_index, prompt_index
    answer_tokens = res.answer_str_tokens[n]
    if print_details:
        lines.append(f"Tokenized prompt: {res.prompt_str_tokens[n]}")
        lines.append(f"Tokenized answer: {answer_tokens}")
    ranks = []
    k = min(top_k, res.topk_ids.shape[-1])
    for j, tok in enumerate(answer_tokens):
        rank = int(res.rank[p, n, j])
        ranks.append((tok, rank))
        if not print_details:
            continue
        logit, prob = float(res.logit[p, n, j]), float(res.prob[p, n, j])
        lines.append("Performance on answer token:")
        lines.append(f"[b]Rank: {rank: <8} Logit: {logit:5.2f} Prob: {prob:6.2%} "
                     f"Token: |{tok}|[/b]")
        for i in range(k):
            tid = int(res.topk_ids[p, n, j, i])
            text = str(tokenizer_model.to_string([tid])) if tokenizer_model is not None \
                else str(tid)
            lines.append(f"Top {i}th token. Logit: {float(res.topk_logits[p, n, j, i]):5.2f} "
                         f"Prob: {float(res.topk_probs[p, n, j, i]):6.2%} Token: |{text}|")
    lines.append(f"[b]Ranks of the answer tokens:[/b] {ranks}")
    return "\n".join(lines)


def test_prompt(prompt: str, answer: str, runner: Runner | HookedTransformer,
                plan: PlanLike = "all",
                prepend_space_to_answer: bool = True, print_details: bool = True,
                prepend_bos: bool = True, top_k: int = 10) -> list[tuple[str, int]]:
    """Print the notebook's ``test_prompt`` report for ``plan`` and return the
    ranks of the answer tokens as ``[(token, rank), ...]``.

    ``runner`` is a ``fs.Runner`` (a HookedTransformer is wrapped in one).
    """
    from ..run import Runner

    if not isinstance(runner, Runner):
        runner = Runner(runner)
    res = runner.run([plan], [prompt], [answer], prepend_bos=prepend_bos, top_k=top_k,
                     prepend_space_to_answer=prepend_space_to_answer).cpu()
    print(format_test_prompt(res, 0, 0, runner.model, top_k, print_details))
    return [(tok, int(res.rank[0, 0, j])) for j, tok in enumerate(res.answer_str_tokens[0])]


test_prompt.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
