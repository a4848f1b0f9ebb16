"""Sequence-continuation tasks: determinism, correct answers, wrong answers,
corrupted prompts of the same GPT-2 token length, subsets and filtering."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from fastskip.search import tasks
from fastskip.search.tasks import CYCLIC, MEMBERS, TASKS, make_task

CASES = [(name, templated) for name in TASKS for templated in (False, True)]
IDS = [f"{n}-{'templated' if t else 'plain'}" for n, t in CASES]


def members_of(name: str, prompt: str, templated: bool) -> list[str]:
    """The family members in a prompt, in order."""
    if not templated:
        return prompt.split(" ")
    return re.findall(r" (?:in|on) (\w+)\.", prompt)


@pytest.mark.parametrize(("name", "templated"), CASES, ids=IDS)
def test_deterministic_per_seed(name, templated):
    a = make_task(name, n=20, seed=3, templated=templated)
    b = make_task(name, n=20, seed=3, templated=templated)
    c = make_task(name, n=20, seed=4, templated=templated)
    assert a == b
    assert a.prompts != c.prompts
    assert len(a) == 20 and a.name == name


@pytest.mark.parametrize(("name", "templated"), CASES, ids=IDS)
def test_answers_continue_the_sequence_and_wrong_answer_repeats_the_last(name, templated):
    task = make_task(name, n=40, seed=1, templated=templated, length=4)
    members = MEMBERS[name]
    size = len(members)
    for prompt, answer, wrong in zip(task.prompts, task.answers, task.wrong_answers,
                                     strict=True):
        seq = members_of(name, prompt, templated)
        assert len(seq) == 4
        idx = [members.index(m) for m in seq]
        pairs = zip(idx[:-1], idx[1:], strict=True)
        step = [(b - a) % size if name in CYCLIC else b - a for a, b in pairs]
        assert step == [1, 1, 1]
        assert answer.startswith(" ") and wrong.startswith(" ")
        assert wrong == " " + seq[-1]
        nxt = (idx[-1] + 1) % size if name in CYCLIC else idx[-1] + 1
        assert answer == " " + members[nxt]


def test_months_and_days_wrap_others_stop_at_their_end():
    months = make_task("months", n=12, seed=0)  # 12 starts: every one appears
    assert "October November December January" in months.prompts
    at = months.prompts.index("October November December January")
    assert months.answers[at] == " February"
    days = make_task("days", n=7, seed=0)
    assert days.answers[days.prompts.index("Thursday Friday Saturday Sunday")] == " Monday"
    numerals = make_task("numerals", n=500, seed=0)
    assert max(int(a) for a in numerals.answers) == 100
    assert sorted({a for a in numerals.answers}) == sorted(f" {i}" for i in range(5, 101))
    letters = make_task("letters", n=100, seed=0)
    assert " Z" in letters.answers and " A" not in letters.answers


def test_more_prompts_than_starts_reuses_every_start_evenly():
    task = make_task("days", n=50, seed=2)  # 7 starts
    counts = Counter(p.split(" ")[0] for p in task.prompts)
    assert len(counts) == 7 and max(counts.values()) - min(counts.values()) <= 1
    few = make_task("numerals", n=30, seed=2)  # 96 starts: no repeat
    assert len(set(few.prompts)) == 30


@pytest.mark.parametrize(("name", "templated"), CASES, ids=IDS)
def test_corrupted_prompts_have_the_same_gpt2_token_length(tiny, name, templated):
    task = make_task(name, n=60, seed=5, templated=templated)
    for prompt, bad in zip(task.prompts, task.corrupted, strict=True):
        assert tiny.to_tokens(prompt).shape == tiny.to_tokens(bad).shape, (prompt, bad)
    for answer in task.answers + task.wrong_answers:
        assert tiny.to_tokens(answer, prepend_bos=False).shape[1] == 1


@pytest.mark.parametrize(("name", "templated"), CASES, ids=IDS)
def test_corrupted_prompts_hold_no_sequence_and_keep_the_template(name, templated):
    task = make_task(name, n=40, seed=6, templated=templated)
    members = MEMBERS[name]
    size = len(members)
    for prompt, bad in zip(task.prompts, task.corrupted, strict=True):
        seq = members_of(name, bad, templated)
        assert len(seq) == 4 and all(m in members for m in seq)
        idx = [members.index(m) for m in seq]
        for a, b in zip(idx[:-1], idx[1:], strict=True):
            assert b != ((a + 1) % size if name in CYCLIC else a + 1)
        if templated:  # same words except the members
            words, bad_words = prompt.split(" "), bad.split(" ")
            assert len(words) == len(bad_words)
            differ = [w for w, v in zip(words, bad_words, strict=True) if w != v]
            assert all(w.rstrip(".") in members for w in differ)
            assert prompt.rsplit(".", 1)[-1] == bad.rsplit(".", 1)[-1]


def test_plain_number_words_beyond_ten_start_prompts():
    task = make_task("number_words", n=17, seed=0)
    firsts = {p.split(" ")[0] for p in task.prompts}
    assert "seventeen" not in firsts  # 17 + 4 > 20
    assert {"eleven", "sixteen"} <= firsts


def test_subset_by_indices_mask_and_slice():
    task = make_task("letters", n=10, seed=0)
    sub = task.subset([3, 1])
    assert sub.prompts == [task.prompts[3], task.prompts[1]]
    assert sub.answers == [task.answers[3], task.answers[1]]
    assert sub.wrong_answers == [task.wrong_answers[3], task.wrong_answers[1]]
    assert sub.corrupted == [task.corrupted[3], task.corrupted[1]]
    mask = np.arange(10) % 3 == 0
    assert task.subset(mask).prompts == [task.prompts[i] for i in (0, 3, 6, 9)]
    assert task.subset(slice(2, 4)).prompts == task.prompts[2:4]
    assert len(task.subset([])) == 0
    with pytest.raises(ValueError, match="10 entries"):
        task.subset(np.ones(3, dtype=bool))


def test_filter_correct_keeps_prompts_whose_answer_ranks_high_enough(tiny_runner):
    task = make_task("numerals", n=24, seed=0)
    res = tiny_runner.run(["all"], task.prompts, task.answers, top_k=0)
    ranks = res.rank[0, :, 0].tolist()
    top = sorted(ranks)[len(ranks) // 2]  # keeps about half
    kept = tasks.filter_correct(task, tiny_runner, top=top)
    assert kept.prompts == [p for p, r in zip(task.prompts, ranks, strict=True) if r <= top]
    assert 0 < len(kept) < len(task)
    assert len(tasks.filter_correct(task, tiny_runner, top=10**6)) == len(task)
    assert kept.answers == [task.answers[task.prompts.index(p)] for p in kept.prompts]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown task 'weeks'"):
        make_task("weeks")
    with pytest.raises(ValueError, match="length"):
        make_task("days", length=7)
    with pytest.raises(ValueError, match="n must be"):
        make_task("letters", n=0)
    assert len(make_task("days", n=3, length=6).prompts[0].split(" ")) == 6
