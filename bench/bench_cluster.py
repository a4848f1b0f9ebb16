"""Sweeps on Ray workers, on this machine: the 4,096-plan block grid of the random
GPT-2-small model and the notebook's 6 prompts (chunks of 256), swept by 1 and by
2 Ray workers of one torch thread each, and in one process with one and with two
torch threads; all in one run, so the figures are ratios of one machine at one
time. The worker runs include starting the workers and shipping the model to
them (reported apart as well, from the sweep's "workers ready after" log line).
How busy the machine was (all its cores, from /proc/stat, and the load average)
is printed with every figure: it is shared.

The vocabulary metrics are eager everywhere (``FASTSKIP_COMPILE_METRICS=0``, in
this process and, through the environment Ray starts in, in the workers): by
default each process compiles them after 4,096 rows (~10 s), which the worker
runs would pay once per worker and the one-process runs once for the whole file,
and the compiled log-sum-exp rounds differently, so the tables would not be
equal bit for bit. What keeping prefix subtrees together in a shard is worth is
counted, not timed: tests/output/test_shards.py.

    flock /tmp/fastskip-timing.lock .venv/bin/python -m pytest bench/bench_cluster.py -s \\
        --benchmark-json=bench/results/cluster.json
"""

from __future__ import annotations

import logging
import os
import re
import time

import pandas as pd
import pytest
import torch
from conftest import ANSWERS, PROMPTS, machine

import fastskip as fs
from fastskip.output.sweep import sweep
from fastskip.reference.timing import synced, timed, wall_time

ray = pytest.importorskip("ray", reason="needs the cluster extra: pip install 'fastskip[cluster]'")

CHUNK = 256
PLANS = fs.grid.block_subsets(12)
RESULTS: dict[str, dict] = {}
TABLES: dict[str, pd.DataFrame] = {}


def cpu_times() -> tuple[float, float, float]:
    """(busy, total, steal) jiffies of all cores since boot."""
    with open("/proc/stat") as f:
        values = [float(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    steal = values[7] if len(values) > 7 else 0.0
    return sum(values) - idle, sum(values), steal


class Quietness:
    """How many of the machine's cores were busy (by anyone) while it was open."""

    def __enter__(self):
        self.start, self.load = cpu_times(), os.getloadavg()[0]
        return self

    def __exit__(self, *exc):
        busy, total, steal = (b - a for a, b in zip(self.start, cpu_times(), strict=True))
        cores = os.cpu_count() or 1
        self.busy_cores = busy / total * cores if total else float("nan")
        self.steal = steal / total if total else float("nan")

    def describe(self) -> str:
        return (f"{self.busy_cores:.2f} of {os.cpu_count()} cores busy (ours and others'), "
                f"steal {self.steal:.0%}, load average {self.load:.1f} at the start")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs (its start-up is not part of any figure), and
    eager vocabulary metrics here and in its workers (see above)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTSKIP_COMPILE_METRICS", "0")  # Ray's processes inherit it
        started = 0.0
        if not ray.is_initialized():
            started = wall_time(lambda: ray.init(num_cpus=2, include_dashboard=False,
                                                 log_to_driver=False,
                                                 logging_level=logging.ERROR))
        with Quietness() as idle:  # the machine before any of our work
            time.sleep(5)
        print(f"\nRay started in {started:.1f} s; before the bench: {idle.describe()}")
        yield
        ray.shutdown()


MODES = {  # name: (torch threads of this process, workers)
    "workers_1": (1, 1),
    "workers_2": (1, 2),
    "process_1_thread": (1, None),
    "process_2_threads": (2, None),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_sweep(benchmark, cluster, gpt2, tmp_path, mode):
    threads, workers = MODES[mode]
    torch.set_num_threads(threads)
    runner = fs.Runner(gpt2, verbose=False)
    runner.run(PLANS[:4], PROMPTS, ANSWERS)  # warm-up of this process
    ready: list[float] = []  # seconds from asking for workers to all of them holding a Runner
    worker_stats: list[tuple[int, float, float]] = []  # per worker: shards, seconds, CPU s
    seconds: list[float] = []

    def log(msg: str) -> None:
        ready.extend(float(t) for t in re.findall(r"^workers ready after ([\d.]+) s", msg))
        worker_stats.extend((int(k), float(sec), float(cpu)) for k, sec, cpu in re.findall(
            r"worker \d+: (\d+) shards in ([\d.]+) s \(([\d.]+) s of CPU\)", msg))

    def run() -> pd.DataFrame:
        table, took = timed(lambda: sweep(
            runner, PLANS, PROMPTS, ANSWERS, out=tmp_path / f"{mode}.parquet",
            chunk_size=CHUNK, resume=False, progress=False, workers=workers, log=log, top_k=10))
        seconds.append(took)
        return table

    with Quietness() as before:  # others' load just before: we are idle here
        time.sleep(3)
    with Quietness() as q:
        cpu0 = time.process_time()  # this process's CPU seconds (its threads' share)
        TABLES[mode] = benchmark.pedantic(synced(run), rounds=1, iterations=1)
        cpu = time.process_time() - cpu0
    (total,) = seconds
    startup = ready[0] if ready else 0.0
    if workers:  # the share of a core each worker got while computing (1.0 = a quiet core)
        assert len(worker_stats) == workers, worker_stats
        share = sum(c for _, _, c in worker_stats) / sum(sec for _, sec, _ in worker_stats)
    else:
        share = cpu / total / threads
    RESULTS[mode] = {"seconds": total, "startup_seconds": startup, "core_share": share,
                     "worker_stats": worker_stats,
                     "ms_per_plan": total / len(PLANS) * 1e3, "busy_cores": q.busy_cores,
                     "others_busy_cores_before": before.busy_cores,
                     "steal": q.steal, "load_average": q.load, "machine": machine()}
    benchmark.extra_info.update(RESULTS[mode])
    print(f"\n{mode}: {total:.1f} s ({total / len(PLANS) * 1e3:.2f} ms/plan"
          + (f"; workers ready after {startup:.1f} s" if workers else "") + f") | our threads "
          f"got {share:.0%} of a core each | {q.describe()} | just before, others kept "
          f"{before.busy_cores:.2f} cores busy")


def test_speedup(benchmark, cluster):
    """The ratios of the runs above, and their tables: bit for bit equal where every
    run had one torch thread, within fp32 round-off otherwise."""
    assert set(RESULTS) == set(MODES), "run the whole file"
    one = TABLES["process_1_thread"]
    for mode in ("workers_1", "workers_2"):
        pd.testing.assert_frame_equal(TABLES[mode], one, check_exact=True)
    # two threads split the fp32 sums differently: near-ties may swap a rank or a
    # top-k entry, so compare the values
    cols = ["plan", "prompt", "token_id", "logit", "prob"]
    pd.testing.assert_frame_equal(TABLES["process_2_threads"][cols], one[cols], atol=1e-4,
                                  rtol=1e-4)
    s = {m: r["seconds"] for m, r in RESULTS.items()}
    w = {m: r["seconds"] - r["startup_seconds"] for m, r in RESULTS.items()}
    ratios = {
        "2_workers_vs_1_worker": s["workers_1"] / s["workers_2"],
        "2_workers_vs_1_worker_after_startup": w["workers_1"] / w["workers_2"],
        "2_workers_vs_process_2_threads": s["process_2_threads"] / s["workers_2"],
        "1_worker_vs_process_1_thread": s["process_1_thread"] / s["workers_1"],
        "process_2_threads_vs_1_thread": s["process_1_thread"] / s["process_2_threads"],
    }
    # CPU seconds per shard in the workers: equal for 1 and 2 workers means the two do
    # not slow each other down (memory bandwidth, caches) apart from sharing the cores
    cpu_per_shard = {m: sum(c for _, _, c in RESULTS[m]["worker_stats"])
                     / sum(k for k, _, _ in RESULTS[m]["worker_stats"])
                     for m in ("workers_1", "workers_2")}
    benchmark.extra_info.update({"ratios": ratios, "runs": RESULTS,
                                 "worker_cpu_seconds_per_shard": cpu_per_shard})
    benchmark.pedantic(synced(lambda: None), rounds=1, iterations=1)  # records extra_info
    print("\n" + "\n".join(f"{k}: {v:.2f}x" for k, v in ratios.items()))
    print("core share of our threads: " + ", ".join(
        f"{m} {r['core_share']:.0%}" for m, r in RESULTS.items()))
    print("worker CPU seconds per shard: " + ", ".join(
        f"{m} {v:.2f}" for m, v in cpu_per_shard.items()))
