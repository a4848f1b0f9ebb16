"""Sequence-continuation tasks: the prompt families of the seed notebook and of
"Towards Interpretable Sequence Continuation: Analyzing Shared Circuits in Large
Language Models" (Lan & Barez).

    task = fs.tasks.make_task("numerals", n=32, seed=0)          # "7 8 9 10" -> " 11"
    task = fs.tasks.make_task("months", n=32, templated=True)
    # "Alice was born in March. Bob was born in April. ... Eve was born in" -> " July"

Families (``TASKS``) and their members:

* ``numerals``: 1 .. 100, no wrap-around (the answer is at most 100);
* ``number_words``: one .. twenty, no wrap-around;
* ``months``: January .. December, **wrapping** (``October November December
  January`` -> `` February``): the calendar is cyclic;
* ``days``: Sunday .. Saturday, **wrapping**, as for months;
* ``letters``: A .. Z (capitals), no wrap-around.

Every task has ``answers`` (the next member, with a leading space),
``wrong_answers`` (the prompt's last member repeated: the logit-difference
baseline) and ``corrupted`` prompts: the same template and names with the
members replaced by random members of the family, drawn so that no two
neighbours are consecutive (the corrupted prompt holds no sequence). They are
meant for mean or resample ablation.

Token lengths under the GPT-2 tokenizer: every member is one GPT-2 token after a
space, and every member but ``eleven`` .. ``twenty`` is one token without it.
Those number words begin a plain (untemplated) prompt without a space and are
2 tokens there (``seventeen``: 3), so a corrupted plain number-words prompt
draws its first member among members with the same token count: corrupted
prompt i always has as many GPT-2 tokens as prompt i. Other tokenizers may
split members differently; nothing here depends on one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import seqcont_data
from .seqcont_data import SEQCONT_TASKS, published_circuits

TASKS = ("numerals", "number_words", "months", "days", "letters")

_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
          "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
          "nineteen", "twenty"]
MEMBERS: dict[str, tuple[str, ...]] = {
    "numerals": tuple(str(i) for i in range(1, 101)),
    "number_words": tuple(_WORDS),
    "months": ("January", "February", "March", "April", "May", "June", "July", "August",
               "September", "October", "November", "December"),
    "days": ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"),
    "letters": tuple(chr(c) for c in range(ord("A"), ord("Z") + 1)),
}
CYCLIC = frozenset({"months", "days"})

# GPT-2 token count of a member that begins a prompt (no leading space), where it is not 1
_BARE_TOKENS = {"eleven": 2, "twelve": 2, "thirteen": 2, "fourteen": 2, "fifteen": 2,
                "sixteen": 2, "seventeen": 3, "eighteen": 2, "nineteen": 2, "twenty": 2}

# templates of the paper's kind: "{name} ... {member}." repeated, the last one cut
# before its member ({prep}: "on" for days, "in" otherwise); corrupted prompts keep
# the template and the names
TEMPLATES = (
    "{name} was born {prep} {member}.",
    "{name} lost {prep} {member}.",
    "{name} arrived {prep} {member}.",
    "{name} started {prep} {member}.",
)
NAMES = ("Alice", "Bob", "Carl", "Dan", "Eve", "Frank", "Grace", "Henry", "Ivy", "Jack",
         "Kate", "Leo", "Mary", "Nick", "Olivia", "Paul", "Rose", "Sam", "Tom", "Will")


@dataclass
class Task:
    """Prompts with their answers, wrong answers and corrupted twins (one each).

    ``mean_prompts``: the prompts whose per-position means mean-ablate (the
    paper's data sets them: every prompt of its ``random.json``); None means
    the corrupted prompts serve (``fastskip.search.common.resolve_ablation``).
    ``dropped`` / ``dropped_mean``: prompts / mean prompts left out when the
    task was loaded (``load_seqcont`` drops those whose token length differs
    from the majority's)."""

    name: str
    prompts: list[str]
    answers: list[str]  # the correct next member, with a leading space, e.g. " 5"
    wrong_answers: list[str]  # the last member of the prompt repeated, e.g. " 4"
    corrupted: list[str]  # same template/length, members replaced by random members
    mean_prompts: list[str] | None = None
    dropped: int = 0
    dropped_mean: int = 0

    def subset(self, index: Sequence[int] | Sequence[bool] | np.ndarray | slice) -> Task:
        """The prompts at ``index`` (integers, a boolean mask or a slice), in that order."""
        if isinstance(index, slice):
            idx = np.arange(len(self))[index]
        else:
            arr = np.asarray(index)
            if arr.dtype == bool:
                if arr.shape != (len(self),):
                    raise ValueError(f"a boolean mask must have {len(self)} entries, got "
                                     f"{arr.shape}")
                arr = np.flatnonzero(arr)
            idx = arr.astype(np.int64).reshape(-1)
        pick = lambda xs: [xs[int(i)] for i in idx]  # noqa: E731
        return Task(self.name, pick(self.prompts), pick(self.answers),
                    pick(self.wrong_answers), pick(self.corrupted), self.mean_prompts,
                    self.dropped, self.dropped_mean)

    def __len__(self) -> int:
        return len(self.prompts)


def _n_starts(name: str, length: int) -> int:
    size = len(MEMBERS[name])
    return size if name in CYCLIC else size - length


def _starts(rng: np.random.Generator, n_starts: int, n: int) -> np.ndarray:
    """``n`` start indices: a random order of all of them, repeated in fresh random
    orders when ``n`` exceeds them (sampling with replacement, balanced)."""
    rounds = -(-n // n_starts)
    return np.concatenate([rng.permutation(n_starts) for _ in range(rounds)])[:n]


def _corrupt(rng: np.random.Generator, name: str, length: int, first_bare: bool,
             original_first: str) -> list[int]:
    """Random member indices with no two neighbours consecutive; with
    ``first_bare`` the first has the original first member's bare token count."""
    members = MEMBERS[name]
    size = len(members)
    first_pool = np.arange(size)
    if first_bare:
        want = _BARE_TOKENS.get(original_first, 1)
        first_pool = np.array([i for i, m in enumerate(members)
                               if _BARE_TOKENS.get(m, 1) == want])
    while True:
        idx = [int(rng.choice(first_pool))] + [int(i) for i in rng.integers(0, size, length - 1)]
        nxt = [(a + 1) % size if name in CYCLIC else a + 1 for a in idx[:-1]]
        if all(b != s for b, s in zip(idx[1:], nxt, strict=True)):
            return idx


def _text(members: list[str], template: str | None, names: list[str], last_name: str,
          prep: str) -> str:
    if template is None:
        return " ".join(members)
    parts = [template.format(name=nm, member=m, prep=prep)
             for nm, m in zip(names, members, strict=True)]
    tail = template.split("{member}")[0].format(name=last_name, prep=prep).rstrip()
    return " ".join(parts + [tail])


def make_task(name: str, n: int = 32, seed: int = 0, templated: bool = False,
              length: int = 4) -> Task:
    """``n`` prompts of a task family (see ``TASKS``), deterministic for ``seed``.

    Plain prompts list ``length`` consecutive members ("1 2 3 4" -> " 5") from
    random starts; templated ones put each member in a sentence with a name
    ("Alice was born in 1. Bob was born in 2. ... Eve was born in" -> " 5"; days
    are born "on"),
    with a random template and random distinct names per prompt. Starts are
    drawn without replacement until every start was used, then again.
    """
    if name not in MEMBERS:
        raise ValueError(f"unknown task '{name}'; expected one of {', '.join(TASKS)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    members = MEMBERS[name]
    size = len(members)
    if not 1 <= length <= size - 1:
        raise ValueError(f"length must be between 1 and {size - 1} for '{name}', got {length}")
    if templated and length + 1 > len(NAMES):
        raise ValueError(f"templated prompts need length <= {len(NAMES) - 1}")
    rng = np.random.default_rng([seed, TASKS.index(name), int(templated), length])
    prep = "on" if name == "days" else "in"
    prompts, answers, wrong, corrupted = [], [], [], []
    for start in _starts(rng, _n_starts(name, length), n):
        seq = [members[(int(start) + k) % size] for k in range(length + 1)]
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))] if templated else None
        names = [NAMES[i] for i in rng.permutation(len(NAMES))[:length + 1]] if templated \
            else [""] * (length + 1)
        corrupt = [members[i] for i in _corrupt(rng, name, length, not templated, seq[0])]
        prompts.append(_text(seq[:length], template, names[:length], names[length], prep))
        corrupted.append(_text(corrupt, template, names[:length], names[length], prep))
        answers.append(" " + seq[length])
        wrong.append(" " + seq[length - 1])
    return Task(name, prompts, answers, wrong, corrupted)


def load_seqcont(task: str, n_per_template: int = 512, model: object = None) -> Task:
    """The paper's prompts for ``task`` (numerals, numwords or months), shipped
    with fastskip (``fastskip/search/data/seqcont``, from apartresearch/seqcont_circuits).

    The first ``n_per_template`` prompts (at most 1,024) of each template (done,
    lost, names), with their answers (``corr``) and wrong answers (``incorr``:
    the last member repeated); ``corrupted[i]`` is prompt i's twin in
    ``random.json`` (same names, random members; for the first 512 of a
    template, cycled beyond); ``mean_prompts`` is every prompt of
    ``random.json`` (the mean-ablation set). ``model``: a HookedTransformer
    (or a Runner) whose tokenizer measures token lengths (without BOS, as the
    paper tokenizes); None uses GPT-2's. Per-position means need one token
    length: prompts (with their twins) and mean prompts whose length differs
    from the majority of the prompts' are dropped; ``task.dropped`` and
    ``task.dropped_mean`` count them, and a warning says how many.
    """
    got = seqcont_data.load_prompts(task, n_per_template, model)
    return Task(**got)


def filter_correct(task: Task, runner: object, top: int = 0,
                   prepend_bos: bool | None = None) -> Task:
    """The prompts whose answer's first token has rank <= ``top`` under the full
    model (``runner.run(["all"], ...)``; rank 0 = top-1)."""
    res = runner.run(["all"], task.prompts, task.answers, top_k=0,  # type: ignore[attr-defined]
                     prepend_bos=prepend_bos)
    keep = (res.rank[0, :, 0] <= top).cpu().numpy()
    return task.subset(keep)


__all__ = ["TASKS", "Task", "make_task", "filter_correct", "MEMBERS", "TEMPLATES", "NAMES",
           "SEQCONT_TASKS", "load_seqcont", "published_circuits"]
