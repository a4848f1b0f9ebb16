"""What the search tools share: their inputs (a ``Task`` or explicit lists),
plan sets built from masks, and an evaluator that counts its runner calls."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..ablation import Ablation
from ..errors import InputError
from ..plans import PlanSet, PlansLike
from ..results import Results
from ..run import Runner


class TaskLike(Protocol):
    """What a search reads of a task: ``fs.tasks.Task``, a prompt file, or any
    object with these lists (``wrong_answers``/``corrupted`` may be None)."""

    prompts: Sequence[str]
    answers: Sequence[str]


TaskArg = TaskLike | Sequence[str] | str | None  # a task, or the prompts themselves
AblationArg = Ablation | str | None  # an Ablation, "zero", or "mean"/"resample" from the task


@dataclass
class Inputs:
    """Prompts with one answer and one wrong answer each."""

    prompts: list[str]
    answers: list[str]
    wrong_answers: list[str]


def resolve_inputs(task: TaskArg = None, prompts: Sequence[str] | None = None,
                   answers: Sequence[str] | None = None,
                   wrong_answers: Sequence[str] | None = None) -> Inputs:
    """Inputs from a ``Task`` (anything with prompts/answers/wrong_answers), or
    from explicit lists (given ones override the task's). A list of strings in
    place of the task is taken as the prompts."""
    if isinstance(task, str) or (isinstance(task, Sequence) and not hasattr(task, "prompts")):
        if prompts is not None:
            raise InputError("prompts given twice (as the task argument and as prompts=)")
        prompts = [task] if isinstance(task, str) else list(task)
        task = None
    got = {
        "prompts": prompts if prompts is not None else getattr(task, "prompts", None),
        "answers": answers if answers is not None else getattr(task, "answers", None),
        "wrong_answers": (wrong_answers if wrong_answers is not None
                          else getattr(task, "wrong_answers", None)),
    }
    missing = [k for k, v in got.items() if v is None]
    if missing:
        raise InputError(f"missing {', '.join(missing)}: pass a Task (fs.tasks.make_task) "
                         "or prompts=, answers= and wrong_answers=")
    lists = {k: [v] if isinstance(v, str) else list(v or []) for k, v in got.items()}
    n = len(lists["prompts"])
    if n == 0 or any(len(v) != n for v in lists.values()):
        raise InputError("prompts, answers and wrong_answers must be non-empty and of one "
                         f"length, got {[len(v) for v in lists.values()]}")
    return Inputs(**lists)


def mean_prompts_of(task: TaskArg) -> list[str] | None:
    """The prompts whose per-position means mean-ablate for ``task``: its
    ``mean_prompts`` when it has them (the paper's data), else its
    ``corrupted`` prompts; None when it has neither."""
    for name in ("mean_prompts", "corrupted"):
        prompts = getattr(task, name, None)
        if prompts:
            return list(prompts)
    return None


def resolve_ablation(ablation: AblationArg, task: TaskArg = None) -> Ablation | str | None:
    """``ablation`` as given, except "mean" / "resample" (strings), which take
    their source prompts from the task: "mean" its ``mean_prompts`` when present,
    else its ``corrupted`` prompts (``fs.Ablation.mean(task.mean_prompts or
    task.corrupted)``); "resample" its ``corrupted`` prompts
    (``fs.Ablation.resample(task.corrupted)``)."""
    if not isinstance(ablation, str) or ablation not in ("mean", "resample"):
        return ablation
    source = mean_prompts_of(task) if ablation == "mean" else getattr(task, "corrupted", None)
    if not source:
        raise InputError(f"ablation='{ablation}' takes its source prompts from the task's "
                         f"{'mean or ' if ablation == 'mean' else ''}corrupted prompts; pass a "
                         f"Task or fs.Ablation.{ablation}(prompts)")
    make = Ablation.mean if ablation == "mean" else Ablation.resample
    return make(list(source))


def mask_set(heads: np.ndarray, mlp: np.ndarray, attn: np.ndarray | None = None) -> PlanSet:
    """A PlanSet from kept heads [P, L, H] and MLPs [P, L]; attention (with its
    output bias) kept where ``attn`` [P, L] says (default: everywhere), all
    norms on."""
    attn = np.ones(mlp.shape, dtype=bool) if attn is None else attn
    ones = np.ones(mlp.shape, dtype=bool)
    return PlanSet(attn, heads, mlp, ones, ones.copy())


class Evaluator:
    """Mean logit difference and score of plans through ``runner.run``,
    counting calls and plans."""

    def __init__(self, runner: Runner, inputs: Inputs, ablation: Ablation | str | None = None,
                 prepend_bos: bool | None = None, progress: bool | None = None):
        self.runner = runner
        self.inputs = inputs
        self.ablation = ablation
        self.prepend_bos = prepend_bos
        self.progress = progress
        self.calls = 0
        self.plans = 0
        self._full: float | None = None

    def run(self, plans: PlansLike) -> Results:
        """``runner.run`` of ``plans`` on the inputs (top_k=0, with wrong answers)."""
        inp = self.inputs
        res = self.runner.run(plans, inp.prompts, inp.answers, wrong_answers=inp.wrong_answers,
                              prepend_bos=self.prepend_bos, top_k=0, progress=self.progress,
                              ablation=self.ablation)
        self.calls += 1
        self.plans += res.n_plans
        return res

    def mean_logit_diff(self, plans: PlansLike) -> np.ndarray:
        """Mean logit difference of every plan: float64 [P] (from fp32 values),
        through ``runner.logit_diff`` (two vocabulary columns, cached inputs)."""
        inp = self.inputs
        diff = self.runner.logit_diff(plans, inp.prompts, inp.answers, inp.wrong_answers,
                                      prepend_bos=self.prepend_bos, progress=self.progress,
                                      ablation=self.ablation)
        self.calls += 1
        self.plans += diff.shape[0]
        return diff.mean(dim=1).double().cpu().numpy()

    @property
    def full(self) -> float:
        """The full model's mean logit difference (> 0, else ``InputError``)."""
        if self._full is None:
            self._full = check_full(float(self.mean_logit_diff(["all"])[0]))
        return self._full

    def score(self, plans: PlansLike) -> np.ndarray:
        """Mean logit difference as a fraction of the full model's: [P]."""
        return self.mean_logit_diff(plans) / self.full


def check_full(full: float) -> float:
    """The full model's mean logit difference, checked to be positive."""
    if not full > 0:
        raise InputError(
            f"the full model's mean logit difference is {full:.4g} (<= 0): a score as a "
            "fraction of it is meaningless; keep prompts the model gets right "
            "(fs.tasks.filter_correct) or check answers/wrong_answers")
    return full

