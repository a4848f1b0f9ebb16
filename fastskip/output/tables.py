"""Results as files: Parquet tables that carry the plan set, the model and the
prompts in their metadata, so that a sweep can be analysed later.

    fs.io.save_results(res, "sweep.parquet")
    saved = fs.io.load_results("sweep.parquet")
    saved.df, saved.plans, saved.model_name, saved.prompts, saved.answers

Also ``summarize`` (one row per plan: mean answer probability, top-1 accuracy, ...).
``fs.io`` is this module (its old name), with ``read_prompts`` beside it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..files import atomic_path
from ..prompt_files import PromptFile, read_prompts  # noqa: F401  (fs.io.read_prompts, as before)

if TYPE_CHECKING:
    from ..results import Results

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


def write_parquet(df: Any, path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``df`` with ``meta`` (JSON) in the file metadata, atomically: a temporary
    file in the same folder, fsync, then ``os.replace``. Page checksums are on."""
    pa, pq = _pa()
    path = Path(path)
    table = pa.Table.from_pandas(df, preserve_index=False)
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[META_KEY] = json.dumps({"format": FORMAT_VERSION, **meta}).encode()
    table = table.replace_schema_metadata(schema_meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp), write_page_checksum=True)
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


def results_meta(results: Results) -> dict[str, Any]:
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
    with atomic_path(path) as tmp:
        _csv_ready(df).to_csv(tmp, index=False)
    return path


def save_results(results: Results, path: str | os.PathLike, top_k: int | None = None) -> Path:
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


# -- summaries -----------------------------------------------------------------------

SUMMARY_METRICS = ("prob", "accuracy", "rank", "logit_diff", "kl")


def summarize(df: Any, sort_by: str | None = "prob") -> Any:
    """One row per plan of a results DataFrame: ``prob`` (mean over prompts of the
    whole answer's probability), ``accuracy`` (fraction of prompts whose first
    answer token is top-1), ``rank`` (mean rank of the first answer token) and,
    when present, mean ``logit_diff`` and ``kl``. Sorted best first by
    ``sort_by`` (lower is better for rank and kl; None keeps the plan order)."""
    import pandas as pd

    if sort_by is not None and sort_by not in SUMMARY_METRICS:
        raise InputError(f"unknown metric '{sort_by}'; expected one of "
                         f"{', '.join(SUMMARY_METRICS)}")
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

