"""Where a ``runner.run`` spends its time, for the grid benchmarks: the block steps
(the tree executor's ``_step``), the unembedding product (``blocks.unembed``; in mixed
precision the bf16 tier-1 product and the fp32 rows it routes), the vocabulary
metrics (softmax, rank, top-k: ``MetricTables.add``, the rest of mixed precision's
``metrics``) and what is left: scheduling, Python and copies. Each piece is timed by
wrapping the function that does it with ``fastskip.reference.timing.timed`` (which
waits for the device), inside one extra, untimed-by-the-benchmark run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fastskip.model import blocks
from fastskip.reference.timing import timed
from fastskip.run import answer_metrics, mixed_unembed, tree_executor


@contextlib.contextmanager
def wrapped(owner: object, name: str, totals: dict[str, float], key: str,
            only_inside: str | None = None) -> Iterator[None]:
    """``owner.name`` replaced by itself timed, seconds added to ``totals[key]``
    (only while the call timed as ``only_inside`` runs, if given); ``totals["in " +
    key]`` is 1 while it runs."""
    original = getattr(owner, name)

    def call(*args, **kwargs):
        if only_inside is not None and not totals.get("in " + only_inside):
            return original(*args, **kwargs)
        totals["in " + key] = 1
        try:
            value, seconds = timed(lambda: original(*args, **kwargs))
        finally:
            totals["in " + key] = 0
        totals[key] = totals.get(key, 0.0) + seconds
        return value
    setattr(owner, name, call)
    try:
        yield
    finally:
        setattr(owner, name, original)


def breakdown(runner, plans, prompts, answers, top_k: int = 10) -> dict[str, float]:
    """Seconds per part of one ``runner.run(plans, prompts, answers)``: blocks,
    unembedding, vocabulary metrics, scheduling and Python (the rest), total."""
    t: dict[str, float] = {}
    M = mixed_unembed.MixedUnembedding
    with contextlib.ExitStack() as stack:
        stack.enter_context(wrapped(tree_executor.TreeExecutor, "_step", t, "blocks"))
        stack.enter_context(wrapped(blocks, "unembed", t, "unembedding"))
        stack.enter_context(wrapped(answer_metrics.MetricTables, "add", t, "metrics"))
        stack.enter_context(wrapped(M, "metrics", t, "mixed_all"))
        stack.enter_context(wrapped(M, "tier1", t, "unembedding"))
        # the fp32 rows and the routing sample of mixed precision: products, not metrics
        stack.enter_context(wrapped(torch, "addmm", t, "addmm", only_inside="mixed_all"))
        _, total = timed(lambda: runner.run(plans, prompts, answers, top_k=top_k,
                                            progress=False), runner.device)
    if "mixed_all" in t:  # mixed: tier 1 + the fp32 rows' and samples' products, rest metrics
        products = t.get("unembedding", 0.0) + t.get("addmm", 0.0)
        t["unembedding"] = products
        t["metrics"] = t.pop("mixed_all") - products
    t = {k: v for k, v in t.items() if not k.startswith("in ") and k != "addmm"}
    t.setdefault("metrics", 0.0)
    t.setdefault("blocks", 0.0)
    t.setdefault("unembedding", 0.0)
    t["scheduling_python"] = total - t["blocks"] - t["unembedding"] - t["metrics"]
    t["total"] = total
    return t
