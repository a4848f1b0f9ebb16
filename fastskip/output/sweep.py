"""Resumable sweeps: a large plan set in chunks, each saved as it completes,
in this process or on Ray workers.

    df = fs.sweep.sweep(runner, fs.grid.block_subsets(12), prompts, answers,
                        out="blocks.parquet", chunk_size=256)
    df = fs.sweep.sweep(..., workers=4)              # 4 Ray workers (GPUs where there are)

The chunks are shards along prefix subtrees (``fastskip.output.shards``:
ranges of ``chunk_size`` plans in lexicographic order of their step keys), so a
chunk keeps the prefix sharing of its plans. Each finished chunk is written
atomically to ``<out>.parts/part-00012.parquet`` next to a ``manifest.json``
holding a hash of everything that determines the result (model weights, plan
texts, prompts, answers, run options). Killed and restarted with the same
arguments, a sweep computes only the missing chunks and returns the same table
as an uninterrupted run, whether each run used workers or not (the chunks are
the same). A parts folder made with other arguments raises ``FastskipError``; a
corrupt or truncated part is recomputed. At the end ``out`` is written
atomically (rows in the plan set's order, with the plan set, model and prompts
in its metadata: ``fs.io.load_results``) and the parts folder is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import FastskipError, InputError
from ..files import write_json
from ..plans import PlanSet
from ..run import Runner
from ..run.progress import progress_bar
from . import tables
from .shards import LAYOUT, ShardJob, lexicographic_shards, table_order

MANIFEST = "manifest.json"
_weight_hashes: weakref.WeakKeyDictionary[Runner, str] = weakref.WeakKeyDictionary()


def weights_hash(runner: Runner) -> str:
    """BLAKE2b of the bytes (and dtypes, shapes) of every stacked weight of ``runner``
    and of its block configuration, cached per runner."""
    cached = _weight_hashes.get(runner)
    if cached is not None:
        return cached
    h = hashlib.blake2b(digest_size=16)
    w = runner.weights
    h.update(repr((w.arch, w.config, w.n_layers, w.d_model, w.d_mlp, w.d_vocab)).encode())
    for name, value in w.tensors().items():
        t = value.detach().contiguous().cpu().reshape(-1)
        h.update(f"{name}:{t.dtype}{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    _weight_hashes[runner] = digest
    return digest


def _digest(values: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(values)).encode()).hexdigest()[:32]


def sweep_key(runner: Runner, plan_texts: Sequence[str], prompts: Sequence[str],
              answers: Sequence[str], run_kwargs: dict[str, Any], device: str | None = None
              ) -> dict[str, Any]:
    """Everything that determines a sweep's table, hashed where large (``device``:
    the kind the chunks run on, default the runner's)."""
    return {
        "model_name": runner.model_name,
        "weights": weights_hash(runner),
        "device": device or runner.device.type,
        "shards": LAYOUT,
        "strategy": getattr(runner, "strategy", ""),
        "n_plans": len(plan_texts),
        "plans": _digest(plan_texts),
        "prompts": _digest(prompts),
        "answers": _digest(answers),
        "run_kwargs": json.dumps(run_kwargs, sort_keys=True, default=repr),
    }


def _describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    names = {"weights": "model weights", "model_name": "model", "plans": "plan set",
             "n_plans": "number of plans", "run_kwargs": "run options",
             "shards": "chunk layout (made by an older fastskip)"}
    diff = [names.get(k, k) for k in new if old.get(k) != new[k]]
    return ", ".join(dict.fromkeys(diff)) or "format"


def _open_parts(parts: Path, key: dict[str, Any], chunk_size: int, resume: bool,
                log: Callable[[str], None]) -> int:
    """Prepare the parts folder; returns the chunk size to use (a resumed sweep keeps
    the one it started with)."""
    manifest = parts / MANIFEST
    if parts.exists() and not resume:
        shutil.rmtree(parts)
    if parts.exists():
        try:
            old = json.loads(manifest.read_text())
        except FileNotFoundError:
            old = None
        except (OSError, ValueError) as e:
            raise FastskipError(f"{manifest} is unreadable ({e}); delete {parts} to start "
                                "the sweep again") from None
        if old is not None:
            if old.get("key") != key:
                raise FastskipError(
                    f"{parts} holds a sweep made with other arguments (different "
                    f"{_describe_difference(old.get('key', {}), key)}); delete it, write to "
                    "another file, or run without resume (--no-resume) to start over")
            for tmp in parts.glob("*.tmp-*"):  # left by a killed run
                tmp.unlink(missing_ok=True)
            done = len(list(parts.glob("part-*.parquet")))
            log(f"resuming the sweep in {parts}: {done} of "
                f"{math.ceil(key['n_plans'] / old['chunk_size'])} chunks on disk")
            return int(old["chunk_size"])
    parts.mkdir(parents=True, exist_ok=True)
    write_json(manifest, {"key": key, "chunk_size": chunk_size})
    return chunk_size


def _read_part(path: Path, key: dict[str, Any], index: int, texts: Sequence[str]) -> Any:
    """A part's DataFrame, or None when it is missing, corrupt or not this chunk's."""
    if not path.exists():
        return None
    try:
        df, meta = tables.read_parquet(path)
    except InputError:
        return None
    if meta.get("key") != key or meta.get("chunk") != index or meta.get("plans") != list(texts):
        return None
    rows = meta.get("rows_per_plan", -1)
    if len(df) != rows * len(texts) or (rows and df["plan"].iloc[::rows].tolist() != list(texts)):
        return None
    return df


def sweep(runner: Runner, plans: PlanSet | Sequence[Any], prompts: str | Sequence[str],
          answers: str | Sequence[str],
          out: str | os.PathLike, chunk_size: int = 256, resume: bool = True,
          progress: bool | None = None, log: Callable[[str], None] | None = None,
          meta: dict[str, Any] | None = None, workers: int | None = None,
          address: str | None = None, worker_device: str | None = None,
          worker_threads: int = 1, **run_kwargs: Any) -> Any:
    """Run ``plans`` in chunks of ``chunk_size`` with ``runner.run`` and return the
    table (``Results.to_pandas()`` of every chunk, rows in the order of ``plans``),
    saved to ``out`` (Parquet, or CSV for ``*.csv``).

    Completed chunks are kept in ``<out>.parts/`` so that a killed sweep restarted
    with the same arguments (``resume=True``) continues where it stopped;
    ``resume=False`` discards them. If ``out`` already holds this exact sweep it is
    returned without running. ``run_kwargs`` go to ``runner.run`` (``top_k``,
    ``wrong_answers``, ``kl``, ``prepend_bos``, ...). ``progress``: one bar over the
    whole sweep (default: on a terminal, for >= 256 plans). ``log``: receives
    one-line status messages (resuming, recomputed parts, workers). ``meta``: extra
    JSON metadata for the final file (e.g. the grid's name).

    ``workers=N`` computes the chunks on N Ray workers (``fastskip.output.cluster``;
    needs ``pip install 'fastskip[cluster]'``): of the cluster at ``address``, of
    the one this process has joined (``ray.init``), or of a local one started for
    the sweep. Each worker is a copy of ``runner`` on ``worker_device`` ("cpu" or
    "cuda", one GPU per worker; default: the runner's device type) with
    ``worker_threads`` torch threads on CPU. The chunks and the table are the same
    as without workers (bit for bit where workers and this process use the same
    device, number of torch threads and vocabulary-metrics path: by default each
    process compiles the metrics after 4,096 rows, whose log-sum-exp rounds
    differently in fp32; ``FASTSKIP_COMPILE_METRICS=0`` or ``=1`` everywhere makes
    the path the same), so either kind of run resumes the other.
    """
    log = log or (lambda msg: None)
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    spec = None
    if workers is not None:
        from .cluster import WorkerSpec, check_workers

        check_workers(workers)  # before any work: say how to install Ray
        spec = WorkerSpec.like(runner, worker_device, worker_threads)
    ps = runner.plan_set(plans)
    texts = ps.texts()
    prompts_l = [prompts] if isinstance(prompts, str) else list(prompts)
    answers_l = [answers] if isinstance(answers, str) else list(answers)
    run_kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in run_kwargs.items()}
    key = sweep_key(runner, texts, prompts_l, answers_l, run_kwargs,
                    spec.options["device"] if spec else None)
    out = Path(out)
    csv = out.suffix.lower() == ".csv"
    if resume and not csv and out.exists():
        with contextlib.suppress(InputError):
            df, done = tables.read_parquet(out)
            if done.get("key") == key:
                log(f"{out} already holds this sweep; not running it again")
                return df
    parts = out.with_name(out.name + ".parts")
    chunk_size = _open_parts(parts, key, chunk_size, resume, log)
    shards = lexicographic_shards(ps, chunk_size)
    frames: dict[int, Any] = {}
    todo: dict[int, PlanSet] = {}
    for c, shard in enumerate(shards):
        path = parts / f"part-{c:05d}.parquet"
        df = _read_part(path, key, c, [texts[i] for i in shard])
        if df is not None:
            frames[c] = df
            continue
        if path.exists():
            log(f"{path.name} is corrupt or incomplete; computing it again")
        todo[c] = ps.take(shard)
    bar = progress_bar(len(ps), progress, "sweep")
    if bar is not None:
        bar.update(len(ps) - sum(len(t) for t in todo.values()))

    def finished(c: int, df: Any) -> None:
        """Save chunk ``c`` as a part (in the driver, wherever it was computed)."""
        chunk_texts = [texts[i] for i in shards[c]]
        tables.write_parquet(df, parts / f"part-{c:05d}.parquet",
                             {"key": key, "chunk": c, "plans": chunk_texts,
                              "rows_per_plan": len(df) // len(chunk_texts)})
        frames[c] = df
        if bar is not None:
            bar.update(len(chunk_texts))

    job = ShardJob(prompts_l, answers_l, run_kwargs)
    try:
        if spec is not None and todo:
            from .cluster import run_shards

            run_shards(runner.model, spec, todo, job, workers or 1, address, finished, log)
        else:
            for c, chunk in todo.items():
                finished(c, job.run(runner, chunk))
    finally:
        if bar is not None:
            bar.close()
    import pandas as pd

    table = pd.concat([frames[c] for c in range(len(shards))], ignore_index=True)
    rows = table_order(shards, len(table) // len(ps))  # back to the plan set's order
    table = table.iloc[rows].reset_index(drop=True)
    info = {**(meta or {}), "key": key, "plans": texts, "model_name": runner.model_name,
            "n_layers": runner.n_layers, "n_heads": runner.n_heads, "prompts": prompts_l,
            "answers": answers_l, "run_kwargs": key["run_kwargs"]}
    tables.save_table(table, out, info)
    shutil.rmtree(parts, ignore_errors=True)
    return table
