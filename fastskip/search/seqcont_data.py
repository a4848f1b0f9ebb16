"""The data of "Towards Interpretable Sequence Continuation" (Lan & Barez),
shipped with fastskip: the prompts its circuit search ran on and the circuits
its repository (apartresearch/seqcont_circuits, MIT licence) publishes for GPT-2
small at threshold 0.8. ``fastskip/search/data/seqcont/README.md`` describes
the files; ``fs.tasks.load_seqcont`` turns them into a ``Task``.

Read with ``importlib.resources``, so an installed (non-editable) fastskip
finds them as well as a checkout does.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SEQCONT_TASKS = ("numerals", "numwords", "months")
TEMPLATES = ("done", "lost", "names")  # the three prompt files of a task, in the paper's order
TWINS_PER_TEMPLATE = 512  # random.json holds 512 twins per template, in TEMPLATES order
MAX_PER_TEMPLATE = 1024  # prompts per template file
ALIASES = {"number_words": "numwords"}  # fastskip.tasks' name of the family
PUBLISHED_FILE = "published_circuits_gpt2_small_thres_0.8.json"


def data_folder() -> Traversable:
    """The folder of the shipped data (``fastskip/search/data/seqcont``)."""
    return resources.files("fastskip.search").joinpath("data", "seqcont")


def task_name(task: str) -> str:
    """The paper's name of a task (``number_words`` -> ``numwords``), checked."""
    name = ALIASES.get(task, task)
    if name not in SEQCONT_TASKS:
        raise ValueError(f"unknown seqcont task '{task}'; expected one of "
                         f"{', '.join(SEQCONT_TASKS)}")
    return name


@lru_cache(maxsize=16)
def read_file(task: str, file: str) -> tuple[dict[str, str], ...]:
    """The records of ``<task>/<file>.json`` (``text``, ``S1``..``S4``, ``corr``, ``incorr``)."""
    text = data_folder().joinpath(task_name(task), f"{file}.json").read_text(encoding="utf-8")
    return tuple(json.loads(text))


def published_circuits() -> dict[str, dict[str, list[Any]]]:
    """The circuits the paper's repository publishes for GPT-2 small at threshold
    0.8: ``{task: {"heads": [(layer, head), ...], "mlps": [layer, ...]}}``."""
    raw = json.loads(data_folder().joinpath(PUBLISHED_FILE).read_text(encoding="utf-8"))
    return {task: {"heads": [(int(L), int(h)) for L, h in c["heads"]],
                   "mlps": [int(L) for L in c["mlps"]]} for task, c in raw.items()}


def token_lengths(texts: list[str], model: object = None) -> list[int]:
    """Token counts without BOS (the paper tokenizes the raw text): through
    ``model.to_tokens(text, prepend_bos=False)`` for a HookedTransformer (or a
    Runner's model), GPT-2's offline tokenizer when ``model`` is None."""
    model = getattr(model, "model", model)  # a Runner -> its model
    if model is None:
        from ..model.load import gpt2_tokenizer

        tok = gpt2_tokenizer()
        return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    if not hasattr(model, "to_tokens"):
        raise TypeError(f"model must be a HookedTransformer or a Runner, got "
                        f"{type(model).__name__}")
    return [int(model.to_tokens(t, prepend_bos=False, truncate=False).shape[1]) for t in texts]


def load_prompts(task: str, n_per_template: int = 512, model: object = None
                 ) -> dict[str, Any]:
    """The fields of ``fs.tasks.Task`` for a seqcont task (see ``fs.tasks.load_seqcont``)."""
    name = task_name(task)
    if isinstance(n_per_template, bool) or not isinstance(n_per_template, int) \
            or not 1 <= n_per_template <= MAX_PER_TEMPLATE:
        raise ValueError(f"n_per_template must be a whole number from 1 to {MAX_PER_TEMPLATE}, "
                         f"got {n_per_template!r}")
    rand = read_file(name, "random")
    records: list[dict[str, str]] = []
    twins: list[str] = []
    for k, template in enumerate(TEMPLATES):
        rows = read_file(name, template)[:n_per_template]
        records += rows
        twins += [rand[k * TWINS_PER_TEMPLATE + i % TWINS_PER_TEMPLATE]["text"]
                  for i in range(len(rows))]
    prompts = [r["text"] for r in records]
    mean_prompts = [r["text"] for r in rand]
    lengths = token_lengths(prompts + mean_prompts, model)
    p_len, m_len = lengths[:len(prompts)], lengths[len(prompts):]
    # the majority length of the prompts; ties go to the shorter length
    length = min(Counter(p_len).items(), key=lambda kv: (-kv[1], kv[0]))[0]
    keep = [i for i, n in enumerate(p_len) if n == length]
    keep_mean = [i for i, n in enumerate(m_len) if n == length]
    dropped, dropped_mean = len(prompts) - len(keep), len(mean_prompts) - len(keep_mean)
    if dropped or dropped_mean:
        warnings.warn(f"load_seqcont('{name}'): dropped {dropped} of {len(prompts)} prompts and "
                      f"{dropped_mean} of {len(mean_prompts)} mean prompts whose token length "
                      f"differs from the majority's ({length} tokens)", stacklevel=3)
    if not keep_mean:
        raise ValueError(f"load_seqcont('{name}'): no mean prompt has the prompts' token length "
                         f"({length}) under this tokenizer")
    return dict(name=name, prompts=[prompts[i] for i in keep],
                answers=[records[i]["corr"] for i in keep],
                wrong_answers=[records[i]["incorr"] for i in keep],
                corrupted=[twins[i] for i in keep],
                mean_prompts=[mean_prompts[i] for i in keep_mean],
                dropped=dropped, dropped_mean=dropped_mean)
