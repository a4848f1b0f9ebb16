"""Prompt files: the prompts, answers and wrong answers of ``fastskip sweep
--prompts FILE`` (text with tabs, CSV or JSON)."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError


@dataclass
class PromptFile:
    """Prompts read from a file; usable wherever a ``fastskip.tasks.Task`` is
    (``wrong_answers`` is None unless the file has them; ``corrupted`` is None)."""

    name: str
    prompts: list[str]
    answers: list[str]
    wrong_answers: list[str] | None = None
    corrupted: list[str] | None = None

    def __len__(self) -> int:
        return len(self.prompts)


def read_prompts(path: str | os.PathLike) -> PromptFile:
    """Prompts and answers (and optionally wrong answers) from a file.

    * text (any suffix but .csv/.json): one ``prompt<TAB>answer`` per line, or
      ``prompt<TAB>answer<TAB>wrong answer``; blank lines and lines starting with
      ``#`` are ignored. Keep the answer's leading space: ``1 2 3 4<TAB> 5``;
    * ``.csv``: a header with columns ``prompt``, ``answer`` (and ``wrong_answer``);
    * ``.json``: a list of ``{"prompt", "answer"(, "wrong_answer")}`` objects, or an
      object with lists ``"prompts"``, ``"answers"`` (and ``"wrong_answers"``).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read prompts from {p}: {e}") from None
    suffix = p.suffix.lower()
    if suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or not {"prompt", "answer"} <= set(rows[0]):
            raise InputError(f"{p}: a CSV prompt file needs a header with columns 'prompt' "
                             "and 'answer'")
    elif suffix == ".json":
        rows = _json_rows(p, text)
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) not in (2, 3):
                raise InputError(f"{p} line {i}: expected 'prompt<TAB>answer' (or "
                                 f"'prompt<TAB>answer<TAB>wrong answer'), got {line[:60]!r}")
            rows.append(dict(zip(("prompt", "answer", "wrong_answer"), fields, strict=False)))
    if not rows:
        raise InputError(f"{p} has no prompts")
    wrong = [r.get("wrong_answer") for r in rows]
    if any(w is None for w in wrong) and not all(w is None for w in wrong):
        raise InputError(f"{p}: give a wrong answer for every prompt or for none")
    return PromptFile(name=p.stem, prompts=[str(r["prompt"]) for r in rows],
                      answers=[str(r["answer"]) for r in rows],
                      wrong_answers=None if wrong[0] is None else [str(w) for w in wrong])


def _json_rows(p: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{p} is not valid JSON: {e}") from None
    if isinstance(data, dict) and "prompts" in data and "answers" in data:
        if len(data["prompts"]) != len(data["answers"]):
            raise InputError(f"{p}: 'prompts' and 'answers' differ in length")
        wrong = data.get("wrong_answers") or [None] * len(data["prompts"])
        return [{"prompt": q, "answer": a, "wrong_answer": w}
                for q, a, w in zip(data["prompts"], data["answers"], wrong, strict=True)]
    if isinstance(data, list) and all(isinstance(r, dict) and "prompt" in r and "answer" in r
                                      for r in data):
        return [{"prompt": r["prompt"], "answer": r["answer"],
                 "wrong_answer": r.get("wrong_answer")} for r in data]
    raise InputError(f"{p}: expected a list of {{\"prompt\", \"answer\"}} objects or an "
                     "object with lists \"prompts\" and \"answers\"")
