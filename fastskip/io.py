"""Results as files: Parquet tables that carry the plan set, the model and the
prompts in their metadata, so that a sweep can be analysed later.

    fs.io.save_results(res, "sweep.parquet")
    saved = fs.io.load_results("sweep.parquet")
    saved.df, saved.plans, saved.model_name, saved.prompts, saved.answers

Also: ``read_prompts`` (the prompt files of ``fastskip sweep --prompts``) and
``summarize`` (one row per plan: mean answer probability, top-1 accuracy, ...).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

META_KEY = b"fastskip"
FORMAT_VERSION = 1


def _pa() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("Parquet files need the package pyarrow: pip install pyarrow "
                         "(or save CSV instead)") from None
    return pa, pq


@dataclass
class SavedResults:
    """A results table read back from a file: the DataFrame (as ``Results.to_pandas()``
    gave it) and what was stored with it."""

    df: Any
    plans: list[str]
    model_name: str = ""
    prompts: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_parquet(df: Any, path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``df`` with ``meta`` (JSON) in the file metadata, atomically: a temporary
    file in the same folder, fsync, then ``os.replace``. Page checksums are on."""
    pa, pq = _pa()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[META_KEY] = json.dumps({"format": FORMAT_VERSION, **meta}).encode()
    table = table.replace_schema_metadata(schema_meta)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, write_page_checksum=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def read_parquet(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """The DataFrame and the fastskip metadata of a Parquet file (checksums verified).
    Raises ``InputError`` for a file that is not a readable Parquet table."""
    pa, pq = _pa()
    try:
        table = pq.read_table(str(path), page_checksum_verification=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path} is not a readable Parquet file ({e})") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw) if raw else {}
    return table.to_pandas(), meta


def results_meta(results: Any) -> dict[str, Any]:
    """What ``save_results`` stores about a ``Results``: plans, model, prompts, answers."""
    return {"plans": list(results.plans), "model_name": results.model_name,
            "prompts": list(results.prompts), "answers": list(results.answers)}


def _csv_ready(df: Any) -> Any:
    """A copy whose list column (``topk_ids``) is written as space-separated ids."""
    out = df.copy()
    if "topk_ids" in out:
        out["topk_ids"] = [" ".join(str(int(v)) for v in ids) for ids in out["topk_ids"]]
    return out


def save_table(df: Any, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write a results DataFrame as Parquet (with ``meta``) or, for ``*.csv``, as CSV
    (top-k ids space-separated; CSV keeps no metadata). Atomic either way."""
    path = Path(path)
    if path.suffix.lower() != ".csv":
        return write_parquet(df, path, meta or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        _csv_ready(df).to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def save_results(results: Any, path: str | os.PathLike, top_k: int | None = None) -> Path:
    """Save ``Results`` as a Parquet file (``Results.to_pandas(top_k)`` plus the
    plan set, model name, prompts and answers in the file metadata), or as CSV
    when ``path`` ends with ``.csv``. ``load_results`` reads it back."""
    return save_table(results.to_pandas(top_k), path, results_meta(results))


def load_results(path: str | os.PathLike) -> SavedResults:
    """Read a file written by ``save_results`` or ``fs.sweep.sweep``: ``.df`` is the
    DataFrame (identical to ``Results.to_pandas()``, list column included), with
    ``.plans``, ``.model_name``, ``.prompts``, ``.answers`` and ``.meta``."""
    if Path(path).suffix.lower() == ".csv":
        raise InputError(f"{path}: CSV files keep no plan set or model; load the .parquet "
                         "file, or read the CSV with pandas.read_csv")
    df, meta = read_parquet(path)
    if not meta:
        raise InputError(f"{path} is a Parquet file but was not written by fastskip "
                         "(no fastskip metadata); read it with pandas.read_parquet")
    return SavedResults(df=df, plans=list(meta.get("plans", [])),
                        model_name=meta.get("model_name", ""),
                        prompts=list(meta.get("prompts", [])),
                        answers=list(meta.get("answers", [])), meta=meta)


# -- prompt files --------------------------------------------------------------------

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


# -- summaries -----------------------------------------------------------------------

METRICS = ("prob", "accuracy", "rank", "logit_diff", "kl")


def summarize(df: Any, sort_by: str | None = "prob") -> Any:
    """One row per plan of a results DataFrame: ``prob`` (mean over prompts of the
    whole answer's probability), ``accuracy`` (fraction of prompts whose first
    answer token is top-1), ``rank`` (mean rank of the first answer token) and,
    when present, mean ``logit_diff`` and ``kl``. Sorted best first by
    ``sort_by`` (lower is better for rank and kl; None keeps the plan order)."""
    import pandas as pd

    if sort_by is not None and sort_by not in METRICS:
        raise InputError(f"unknown metric '{sort_by}'; expected one of {', '.join(METRICS)}")
    plan_order = pd.unique(df["plan"])
    per_prompt = df.groupby(["plan", "prompt", "answer"], sort=False)
    whole = per_prompt["prob"].prod()
    first = df[df["answer_pos"] == 0].groupby(["plan", "prompt", "answer"], sort=False)
    cols = {"prob": whole.groupby(level=0, sort=False).mean(),
            "accuracy": (first["rank"].first() == 0).groupby(level=0, sort=False).mean(),
            "rank": first["rank"].first().groupby(level=0, sort=False).mean()}
    for extra in ("logit_diff", "kl"):
        if extra in df:
            cols[extra] = first[extra].first().groupby(level=0, sort=False).mean()
    out = pd.DataFrame(cols).reindex(plan_order)
    out.index.name = "plan"
    out = out.reset_index()
    if sort_by is not None:
        if sort_by not in out:
            raise InputError(f"metric '{sort_by}' is not in this table (columns: "
                             f"{', '.join(out.columns[1:])})")
        out = out.sort_values(sort_by, ascending=sort_by in ("rank", "kl"), kind="stable")
    return out.reset_index(drop=True)


def top_plans(df: Any, n: int = 10, sort_by: str = "prob") -> str:
    """The ``n`` best plans of a results DataFrame as a printable table."""
    table = summarize(df, sort_by).head(n)
    return table.to_string(index=False, float_format=lambda v: f"{v:.4g}")

