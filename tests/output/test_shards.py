"""A sweep's shards (lexicographic ranges of the step keys: sharing stays inside a
shard), the table put back in plan order, the workers' Runner options, and the
error that says how to install Ray when it is missing. No Ray needed here."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch

import fastskip as fs
from fastskip.output.cluster import WorkerSpec
from fastskip.output.shards import lexicographic_shards, shard_evaluations, table_order
from fastskip.output.sweep import sweep
from fastskip.run.tree import lexicographic_order, step_keys
from helpers import ANSWERS, PROMPTS


def test_shards_are_ranges_of_the_lexicographic_order_covering_every_plan_once():
    plans = fs.grid.random_plans(103, 4, 3, seed=5)
    shards = lexicographic_shards(plans, 10)
    assert [len(s) for s in shards] == [10] * 10 + [3]
    order = lexicographic_order(step_keys(plans).keys)
    np.testing.assert_array_equal(np.concatenate(shards), order)
    assert sorted(np.concatenate(shards).tolist()) == list(range(103))


def test_lexicographic_shards_keep_the_sharing_plan_order_chunks_lose():
    """The 4,096-plan block grid: 8,190 block evaluations as one tree; cut into 16
    shards of 256 along the step keys it needs 34 more, in 16 chunks of the grid's own
    order three times as many."""
    plans = fs.grid.block_subsets(12)
    whole, cut = shard_evaluations(plans, lexicographic_shards(plans, 256))
    _, in_plan_order = shard_evaluations(plans, [np.arange(i, i + 256) for i in range(0, 4096,
                                                                                     256)])
    assert whole == 2 * 4095
    assert cut - whole <= 15 * 2 * 12  # at most one cut path of 2 x 12 steps per cut
    assert cut < 1.01 * whole and in_plan_order > 2.5 * whole


def test_table_order_puts_the_shards_rows_back_in_plan_order():
    shards = [np.array([3, 0]), np.array([4, 1]), np.array([2])]
    rows = 2
    in_shard_order = np.concatenate(shards).repeat(rows)  # the plan of each row
    np.testing.assert_array_equal(in_shard_order[table_order(shards, rows)],
                                  np.arange(5).repeat(rows))


def test_a_sweep_in_chunks_equals_one_call_in_the_plan_sets_order(tiny_runner, tmp_path):
    plans = fs.grid.random_plans(40, 3, 4, seed=2)
    plans = plans.take(lexicographic_order(step_keys(plans).keys)[::-1])  # worst order
    df = sweep(tiny_runner, plans, PROMPTS, ANSWERS, out=tmp_path / "s.parquet", chunk_size=7,
               top_k=2)
    whole = tiny_runner.run(plans, PROMPTS, ANSWERS, top_k=2).to_pandas()
    pd.testing.assert_frame_equal(df, whole, atol=1e-5, rtol=1e-5)


def test_workers_copy_the_runners_options(tiny):
    runner = fs.Runner(tiny, max_memory="64MB", strategy="masked", verify=2)
    spec = WorkerSpec.like(runner)
    assert not spec.gpu and spec.threads == 1
    assert spec.options == dict(device="cpu", dtype=torch.float32, strategy="masked",
                                max_memory=64 * 2**20, compile=False, kernels=None,
                                exact_ranks=False, verify=2, verbose=False)
    gpu = WorkerSpec.like(runner, device="cuda")  # prepared on a CPU head, run on GPUs
    assert gpu.gpu and gpu.options["device"] == "cuda" and gpu.options["max_memory"] is None
    with pytest.raises(fs.InputError, match="'cpu' or 'cuda'"):
        WorkerSpec.like(runner, device="tpu")
    with pytest.raises(fs.InputError, match="threads per worker"):
        WorkerSpec.like(runner, threads=0)


def test_without_ray_workers_say_how_to_install_it(tiny_runner, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(fs.InputError, match=r"needs Ray.*pip install 'fastskip\[cluster\]'"):
        sweep(tiny_runner, ["all"], PROMPTS, ANSWERS, out=tmp_path / "s.parquet", workers=2)
    assert not (tmp_path / "s.parquet.parts").exists()  # refused before any work
    with pytest.raises(fs.InputError, match="whole number >= 1"):
        sweep(tiny_runner, ["all"], PROMPTS, ANSWERS, out=tmp_path / "s.parquet", workers=0)
