"""What each ``fastskip`` command does (the parser is in ``fastskip.cli.parser``).

Every command takes the parsed ``argparse.Namespace`` and returns an exit code;
errors are raised as ``FastskipError`` and turned into one line by ``cli.main``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FastskipError, InputError
from ..output import tables
from ..prompt_files import read_prompts
from . import edge_commands

if TYPE_CHECKING:
    from ..search.node_search import Algorithm

Args = argparse.Namespace


# -- shared pieces -------------------------------------------------------------------

def interactive() -> bool:
    """Whether stderr is a terminal (status lines and progress bars only then)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def chatty(args: Args) -> bool:
    """Whether status lines are wanted: not --quiet, and stderr is a terminal."""
    return not getattr(args, "quiet", False) and interactive()


def say(args: Args, message: str) -> None:
    """A one-line status message on stderr, unless --quiet or stderr is not a terminal."""
    if chatty(args):
        print(f"fastskip: {message}", file=sys.stderr, flush=True)


def progress(args: Args) -> bool | None:
    """``progress`` argument of ``Runner.run``: never with --quiet, else the default
    (a bar on a terminal for large plan sets)."""
    return False if args.quiet else None


@contextlib.contextmanager
def loading_output(args: Args) -> Iterator[None]:
    """While a model loads: its libraries' prints go to stderr (stdout stays the
    command's output), Hugging Face progress bars are off; with --quiet or
    without a terminal, prints and warnings are dropped."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(sys.stderr if chatty(args)
                                                       else io_null()))
        stack.enter_context(_no_hf_progress_bars())  # our status line says it instead
        if not chatty(args):
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _no_hf_progress_bars() -> Iterator[None]:
    """Hugging Face's progress bars off (and back as they were afterwards)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            hf_logging.enable_progress_bar()


def io_null() -> Any:
    """A writable sink."""
    import io

    return io.StringIO()


def load_runner(args: Args) -> Any:
    """The model of ``--model`` on ``--device`` in ``--dtype``, wrapped in a Runner."""
    import torch

    from ..model import load_model
    from ..run import Runner

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device '{args.device}' is not a torch device (cpu, cuda, cuda:1)"
                         ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: CUDA is not available on this machine")
    t0 = time.perf_counter()
    say(args, f"loading {args.model} on {device} ({args.dtype})")
    with loading_output(args):
        model = load_model(args.model, device=device, dtype=dtype)
        runner = Runner(model, device=device, dtype=dtype, verbose=chatty(args))
    say(args, f"{args.model}: {runner.n_layers} layers x {runner.n_heads} heads, ready in "
              f"{time.perf_counter() - t0:.1f} s")
    if args.model == "gpt2-small-random":
        say(args, "note: gpt2-small-random has random weights; its predictions are meaningless")
    return runner


def load_task(args: Args) -> Any:
    """The prompts of ``--task`` (fastskip.tasks) or ``--prompts FILE``, as an object
    with ``prompts``, ``answers``, ``wrong_answers`` and ``corrupted``."""
    if args.prompts:
        return read_prompts(args.prompts)
    from ..search import tasks

    if args.task not in tasks.TASKS:
        raise InputError(f"unknown task '{args.task}'; expected one of {', '.join(tasks.TASKS)}")
    if args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}")
    try:
        return tasks.make_task(args.task, n=args.n, seed=args.seed, templated=args.templated)
    except ValueError as e:
        raise InputError(f"task '{args.task}': {e}") from None


def grid_plans(name: str, n_layers: int, n_heads: int) -> Any:
    """The plan set of a ``--grid`` name for a model of this size."""
    from ..plans import grid

    if name == "blocks":
        return grid.block_subsets(n_layers)
    units = {"components": "component", "heads": "head", "leave-one-out": "block"}[name]
    return grid.leave_one_out(n_layers, n_heads, units=units, include_full=True)


def write_plot(kind: str, df: Any, path: str, n_layers: int | None, n_heads: int | None
               ) -> None:
    """Write the figure ``kind`` ("blocks", "pairs" or "leave-one-out") of a table."""
    from ..output import plot

    if kind == "blocks":
        plot.layer_heatmap(df, path, n_layers=n_layers)
    elif kind == "pairs":
        plot.layer_heatmap(df, path, kind="pairs", n_layers=n_layers)
    else:
        plot.leave_one_out(df, path, n_layers=n_layers, n_heads=n_heads)
    print(f"figure -> {path}")


# -- commands ------------------------------------------------------------------------

def cmd_run(args: Args) -> int:
    """``fastskip run``: the test_prompt report of every plan x prompt."""
    from .report import format_test_prompt

    if len(args.prompt) != len(args.answer):
        raise InputError(f"give one --answer per --prompt (got {len(args.prompt)} prompts and "
                         f"{len(args.answer)} answers)")
    if args.top_k < 0:
        raise InputError(f"--top-k must be >= 0, got {args.top_k}")
    plans = args.plan or ["all"]
    runner = load_runner(args)
    res = runner.run(plans, args.prompt, args.answer, prepend_bos=False if args.no_bos else None,
                     top_k=args.top_k, prepend_space_to_answer=args.prepend_space,
                     progress=progress(args))
    for p, (given, canonical) in enumerate(zip(plans, res.plans, strict=True)):
        shown = given if given == canonical else f"{given} (= {canonical})"
        for n, prompt in enumerate(res.prompts):
            print(f"=== plan {shown} | prompt {prompt!r}")
            print(format_test_prompt(res, p, n, runner.model, args.top_k))
            print()
    return 0


def sweep_workers(args: Args) -> dict[str, Any]:
    """``fs.sweep.sweep``'s worker arguments from ``--workers``, ``--ray-address`` and
    ``--worker-threads``. With ``--device cuda`` on a machine without CUDA (the head
    of a GPU cluster) the plans are prepared on CPU and only the workers use GPUs."""
    import torch

    if args.workers is None:
        if args.ray_address:
            raise InputError("--ray-address needs --workers N (how many workers to run there)")
        return {}
    if args.workers < 1 or args.worker_threads < 1:
        raise InputError(f"--workers and --worker-threads must be >= 1, got {args.workers} "
                         f"and {args.worker_threads}")
    from ..output.cluster import import_ray

    import_ray()  # says how to install Ray before the model is loaded
    out: dict[str, Any] = {"workers": args.workers, "address": args.ray_address,
                           "worker_threads": args.worker_threads}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        out["worker_device"] = "cuda"
    return out


def cmd_sweep(args: Args) -> int:
    """``fastskip sweep``: a grid on many prompts, saved (resumable), best plans printed."""
    from ..output.sweep import sweep

    task = load_task(args)
    cluster = sweep_workers(args)
    runner = load_runner(args if cluster.get("worker_device") is None
                         else argparse.Namespace(**{**vars(args), "device": "cpu"}))
    plans = grid_plans(args.grid, runner.n_layers, runner.n_heads)
    kwargs: dict[str, Any] = {"top_k": args.top_k}
    if getattr(task, "wrong_answers", None):
        kwargs["wrong_answers"] = list(task.wrong_answers)
    out = Path(args.out)
    say(args, f"sweep: {len(plans)} plans x {len(task.prompts)} prompts -> {out}")
    try:
        df = sweep(runner, plans, list(task.prompts), list(task.answers), out=out,
                   chunk_size=args.chunk_size, resume=args.resume, progress=progress(args),
                   log=lambda msg: say(args, msg), meta={"grid": args.grid}, **cluster,
                   **kwargs)
    except KeyboardInterrupt:
        print(f"fastskip: interrupted; the completed chunks are in {out}.parts: run the same "
              "command again to continue", file=sys.stderr)
        return 130
    written = [str(out)]
    if args.csv and out.suffix.lower() != ".csv":
        written.append(str(tables.save_table(df, out.with_suffix(".csv"))))
    print(f"{len(plans)} plans x {len(task.prompts)} prompts ({len(df)} rows) -> "
          f"{', '.join(written)}")
    print(f"\nBest {args.show} plans by {args.sort_by}:")
    print(tables.top_plans(df, args.show, args.sort_by))
    if args.plot:
        write_plot("blocks" if args.grid == "blocks" else "leave-one-out", df, args.plot,
                   runner.n_layers, runner.n_heads)
    return 0


def trace_pairs(result: Any) -> list[tuple[str, float]] | None:
    """A search result's score after each decision as (label, score) pairs: from
    ``removed``/``scores`` lists (greedy layer pruning), a ``trace`` of steps with
    ``candidate``/``circuit_score`` (node pruning), or a DataFrame with columns
    ``candidate``/``score``; None if it has none of these."""
    import pandas as pd

    removed, scores = getattr(result, "removed", None), getattr(result, "scores", None)
    if isinstance(removed, list) and isinstance(scores, list) and len(removed) == len(scores):
        return [("full model", 1.0)] + [(f"-{r}", float(v))
                                        for r, v in zip(removed, scores, strict=True)]
    trace = getattr(result, "trace", None)
    if isinstance(trace, pd.DataFrame) and {"candidate", "score"} <= set(trace.columns):
        return [(str(c), float(v)) for c, v in zip(trace["candidate"], trace["score"],
                                                   strict=True)]
    if isinstance(trace, list) and all(hasattr(t, "candidate") for t in trace):
        pairs = [("full model", 1.0)]
        for t in trace:
            if getattr(t, "removed", True):
                pairs.append((f"-{t.candidate}",
                              float(getattr(t, "circuit_score", getattr(t, "score", 0.0)))))
        return pairs
    return None


def load_search_task(args: Args, runner: Any) -> Any:
    """The task of ``fastskip search``: ``--data seqcont`` loads the paper's prompts
    (token lengths by the runner's tokenizer), else as ``load_task``."""
    if args.data != "seqcont":
        return load_task(args)
    from ..search import tasks

    try:
        task = tasks.load_seqcont(args.task, args.n_per_template, model=runner.model)
    except ValueError as e:
        raise InputError(str(e)) from None
    if args.n_mean is not None:
        if args.n_mean < 1:
            raise InputError(f"--n-mean must be >= 1, got {args.n_mean}")
        task.mean_prompts = (task.mean_prompts or [])[: args.n_mean]
    if task.dropped or task.dropped_mean:
        say(args, f"dropped {task.dropped} prompts and {task.dropped_mean} mean prompts of "
                  "another token length")
    return task


def check_search_args(args: Args) -> Algorithm:
    """Check the ``search`` options before loading a model; returns the algorithm."""
    if args.data == "seqcont":
        from ..search.seqcont_data import ALIASES, SEQCONT_TASKS

        if args.prompts:
            raise InputError("--data seqcont takes --task numerals, numwords or months, not "
                             "--prompts")
        if ALIASES.get(args.task, args.task) not in SEQCONT_TASKS:
            raise InputError(f"--data seqcont has tasks {', '.join(SEQCONT_TASKS)}, not "
                             f"'{args.task}'")
    algorithm: Algorithm = args.algorithm or ("seqcont" if args.data == "seqcont"
                                              else "backward")
    if args.method != "prune-nodes" and args.algorithm:
        raise InputError("--algorithm is an option of prune-nodes")
    if args.method == "prune-layers" and args.out:
        raise InputError("--out is an option of prune-nodes, path-patch, faithfulness and "
                         "prune-edges")
    return algorithm


def circuit_json(result: Any, args: Args, runner: Any, task: Any) -> dict[str, Any]:
    """A node circuit in the paper's format (``heads`` as [layer, head] pairs, ``mlps``
    as layers) plus its scores (percent of the full model's) and every trial."""
    return {
        "heads": [[int(a), int(b)] for a, b in result.kept_heads],
        "mlps": [int(m) for m in result.kept_mlps],
        "score_percent": 100 * result.score, "full_logit_diff": result.full_logit_diff,
        "threshold": result.threshold, "algorithm": result.algorithm, "passes": result.passes,
        "task": task_name(args), "data": args.data, "model": args.model,
        "prompts": len(task.prompts),
        "mean_prompts": len(getattr(task, "mean_prompts", None) or []),
        "trials": [{"candidate": s.candidate, "removed": s.removed,
                    "score_percent": 100 * s.score, "pass": s.pass_no} for s in result.trace],
    }


def cmd_search(args: Args) -> int:
    """``fastskip search``: prune nodes or layers with fastskip.search."""
    from ..files import write_json
    from ..search import LayerPruneResult, PruneResult, prune_layers, prune_nodes

    algorithm = check_search_args(args)
    task = load_task(args) if args.data != "seqcont" else None
    runner = load_runner(args)
    if task is None:
        task = load_search_task(args, runner)
    if args.method in edge_commands.EDGE_METHODS:
        return edge_commands.cmd_edge_search(args, runner, task)
    result: PruneResult | LayerPruneResult
    if args.method == "prune-nodes":
        bar = None if algorithm == "backward" else (not args.quiet and interactive())
        result = prune_nodes(runner, task, threshold=args.threshold, algorithm=algorithm,
                             progress=bar)
    else:
        result = prune_layers(runner, task, units=args.units, threshold=args.threshold)
    print(f"plan: {result.plan}")
    if isinstance(result, PruneResult) and result.algorithm == "seqcont":
        print(f"heads ({len(result.kept_heads)}): {[list(h) for h in result.kept_heads]}")
        print(f"mlps ({len(result.kept_mlps)}): {result.kept_mlps}")
        print(f"score: {100 * result.score:.2f}% of the full model's mean logit difference "
              f"({result.passes} passes, {len(result.trace)} trials)")
        close = result.stats.get("close_calls") or []
        if close:
            print(f"note: {len(close)} trial(s) scored within 1e-6 of the threshold; fp32 "
                  f"round-off may decide them either way: {', '.join(close)}")
    for name in ("score", "threshold", "full_logit_diff"):
        if isinstance(getattr(result, name, None), (int, float)):
            print(f"{name}: {getattr(result, name):.4g}")
    if args.out:
        write_json(args.out, circuit_json(result, args, runner, task))
        print(f"circuit -> {args.out}")
    pairs = trace_pairs(result)
    if pairs:
        print("\nscore (fraction of the full model's) after each removal:")
        for label, value in pairs:
            print(f"  {value:8.4f}  {label}")
    if args.plot:
        if not pairs:
            raise FastskipError("this search result has no score trace to plot")
        from ..output import plot

        plot.pruning_trace(pairs, args.plot, title=f"{args.method} ({task_name(args)})",
                           threshold=args.threshold, ylabel="score (fraction of full model)")
        print(f"figure -> {args.plot}")
    return 0


def task_name(args: Args) -> str:
    return args.task or Path(args.prompts).name


def cmd_check(args: Args) -> int:
    """``fastskip check``: plans against TransformerLens hooks; exit 1 on a mismatch."""
    from ..plans import grid
    from ..reference import check
    from . import notebook

    if args.n_random < 0:
        raise InputError(f"--n-random must be >= 0, got {args.n_random}")
    runner = load_runner(args)
    L, H = runner.n_layers, runner.n_heads
    sets = []
    if args.plan:
        sets.append(runner.plan_set(args.plan))
    if args.grid:
        sets.append(runner.plan_set(grid_plans(args.grid, L, H)))
    if args.n_random:
        sets.append(runner.plan_set(grid.random_plans(args.n_random, L, H, seed=args.seed)))
    if not sets:
        sets.append(runner.plan_set([p for p, _ in notebook.PLANS] if L == 12 else ["all"]))
    plans = grid.concat(*sets)
    prompts = [p for p, _ in notebook.PROMPTS]
    tokens = runner.model.to_tokens(prompts)
    say(args, f"checking {len(plans)} plans against TransformerLens hooks")
    err = check(runner, plans, tokens, atol=args.atol)
    print(f"OK: {len(plans)} plans x {len(prompts)} prompts match TransformerLens hooks: "
          f"max |logit error| = {err:.2e} (atol {args.atol:g})")
    return 0


def cmd_bench(args: Args) -> int:
    """``fastskip bench``: fastskip vs one run_with_hooks per plan, as ratios."""
    from .bench import bench, format_table

    runner = load_runner(args)
    rows = bench(runner, quick=args.quick, log=lambda msg: say(args, msg))
    print(format_table(rows, runner))
    return 0


def cmd_demo(args: Args) -> int:
    """``fastskip demo``: the README's main job."""
    from .demo import banner, demo

    print(banner(args.model), flush=True)
    runner = load_runner(args)
    demo(runner, args.model, check_reference=not args.no_check)
    return 0


def cmd_show(args: Args) -> int:
    """``fastskip show``: best plans of a saved table (and a figure)."""
    saved = tables.load_results(args.file)
    print(f"{args.file}: {len(saved.plans)} plans x {len(saved.prompts)} prompts, model "
          f"'{saved.model_name}'")
    print(tables.top_plans(saved.df, args.top, args.sort_by))
    if args.plot:
        kind = args.kind
        if kind == "auto":
            kind = "blocks" if saved.meta.get("grid") == "blocks" else "leave-one-out"
        write_plot(kind, saved.df, args.plot, saved.meta.get("n_layers"),
                   saved.meta.get("n_heads"))
    return 0


def _no_grad(fn: Callable[[Args], int]) -> Callable[[Args], int]:
    def wrapped(args: Args) -> int:
        import torch

        with torch.no_grad():
            return fn(args)
    wrapped.__doc__ = fn.__doc__
    return wrapped


COMMANDS: dict[str, Callable[[Args], int]] = {
    name: _no_grad(fn) for name, fn in (
        ("run", cmd_run), ("sweep", cmd_sweep), ("search", cmd_search), ("check", cmd_check),
        ("bench", cmd_bench), ("demo", cmd_demo), ("show", cmd_show))
}
