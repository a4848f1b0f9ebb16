"""Sweeps on Ray workers (``fastskip.output.cluster``) on a local cluster of 2 CPU
workers and the small random model: the same table as one process, bit for bit;
a worker killed mid-sweep (its pid from the actor) loses nothing; a sweep
interrupted on workers resumes in one process and the other way round; other
arguments are refused; errors inside a worker arrive as themselves."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import fastskip as fs
from fastskip.output import tables
from fastskip.output.sweep import sweep
from helpers import ANSWERS, EAGER_METRICS, PROMPTS, Interrupted, StopAfter

pytestmark = pytest.mark.slow  # each test starts Ray workers (a few seconds)

TESTS = Path(__file__).parents[1]
CHUNK = 20
PLANS = fs.grid.concat(fs.grid.random_plans(272, 3, 4, seed=3),  # every item kind
                       fs.grid.block_subsets(3, 4), fs.grid.block_subsets(3, 4),  # duplicates
                       fs.grid.leave_one_out(3, 4, units="head"))  # 300 plans, 15 shards
N_SHARDS = 15
OPTIONS = dict(top_k=3, wrong_answers=[" x"] * len(PROMPTS), kl=True)


@pytest.fixture(scope="module", autouse=True)
def eager_metrics_here():
    """This process computes the vocabulary metrics eagerly, as the workers of
    ``ray_cluster`` do (conftest: otherwise a process switches to the compiled
    log-sum-exp after 4,096 rows and its later tables round differently)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in EAGER_METRICS.items():
            mp.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def reference(tiny_runner, tmp_path_factory, eager_metrics_here):
    """The one-process sweep, with one torch thread as each worker has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sweep(tiny_runner, PLANS, PROMPTS, ANSWERS, chunk_size=CHUNK,
                     out=tmp_path_factory.mktemp("ref") / "one.parquet", **OPTIONS)
    finally:
        torch.set_num_threads(threads)


class Bar:
    """Records what a sweep's progress bar is told."""

    made: list[Bar] = []

    def __init__(self, total):
        self.total, self.updates, self.closed = total, [], False
        Bar.made.append(self)

    def update(self, n):
        self.updates.append(n)

    def close(self):
        self.closed = True


@pytest.fixture
def bars(monkeypatch):
    import fastskip.output.sweep as sweep_module

    Bar.made = []
    monkeypatch.setattr(sweep_module, "progress_bar", lambda total, show, desc: Bar(total))
    return Bar.made


def part_files(out: Path) -> list[Path]:
    return sorted(out.with_name(out.name + ".parts").glob("part-*.parquet"))


def test_workers_give_the_one_process_table_bit_for_bit(ray_cluster, tiny_runner, reference,
                                                        tmp_path, bars):
    out = tmp_path / "workers.parquet"
    messages: list[str] = []
    got = sweep(tiny_runner, PLANS, PROMPTS, ANSWERS, out=out, chunk_size=CHUNK, workers=2,
                log=messages.append, **OPTIONS)
    pd.testing.assert_frame_equal(got, reference, check_exact=True)
    saved = tables.load_results(out)
    pd.testing.assert_frame_equal(saved.df, reference, check_exact=True)
    rows = len(got) // len(PLANS)
    assert got["plan"].iloc[::rows].tolist() == PLANS.texts() == saved.plans  # input order
    assert any(f"{N_SHARDS} shards on 2 workers" in m for m in messages), messages
    assert any(re.match(r"workers ready after \d+\.\d s: worker \d pid \d+ on .+ \(cpu\), "
                        r"worker \d pid \d+", m) for m in messages), messages
    done = [int(k) for m in messages for k in re.findall(r"worker \d: (\d+) shards in", m)]
    assert len(done) == 2 and sum(done) == N_SHARDS, messages  # both workers took shards
    assert not out.with_name("workers.parquet.parts").exists()
    (bar,) = bars  # one bar over all workers, advanced by every shard
    assert bar.total == len(PLANS) and bar.closed
    assert bar.updates == [0] + [CHUNK] * N_SHARDS


def test_a_worker_killed_mid_sweep_loses_nothing(ray_cluster, tiny_runner, reference,
                                                 tmp_path):
    out = tmp_path / "killed.parquet"
    pids: list[int] = []
    messages: list[str] = []

    def log(msg):
        messages.append(msg)
        pids.extend(int(p) for p in re.findall(r"pid (\d+)", msg))

    killed: list[int] = []

    def kill_a_worker_after_the_first_part():
        deadline = time.time() + 120
        while not (pids and part_files(out)) and time.time() < deadline:
            time.sleep(0.002)
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(len(part_files(out)))

    killer = threading.Thread(target=kill_a_worker_after_the_first_part, daemon=True)
    killer.start()
    got = sweep(tiny_runner, PLANS, PROMPTS, ANSWERS, out=out, chunk_size=CHUNK, workers=2,
                log=log, **OPTIONS)
    killer.join(timeout=10)
    assert killed and killed[0] < N_SHARDS, "the worker was not killed mid-sweep"
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # that process is gone
    assert any("worker 0 died" in m and "goes back to the queue" in m for m in messages), messages
    assert any("1 rerun after a worker died" in m for m in messages), messages
    pd.testing.assert_frame_equal(got, reference, check_exact=True)


DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    import fastskip as fs
    from fastskip.output.sweep import sweep
    from helpers import ANSWERS, PROMPTS, small_model
    sys.path.insert(0, {here!r})
    from test_cluster import CHUNK, OPTIONS, PLANS

    sweep(fs.Runner(small_model()), PLANS, PROMPTS, ANSWERS, out=sys.argv[2], chunk_size=CHUNK,
          workers=2, address=sys.argv[1], log=print, **OPTIONS)
    print("finished", flush=True)
""")


def test_a_sweep_killed_on_workers_resumes_in_one_process(ray_cluster, tiny_runner, reference,
                                                          one_thread, tmp_path):
    """The driver, joined to the cluster by its address, is killed with SIGKILL; the
    same sweep run again without workers computes only the missing shards."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(TESTS), here=str(Path(__file__).parent)))
    out = tmp_path / "cut.parquet"
    proc = subprocess.Popen([sys.executable, str(script), ray_cluster, str(out)],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not part_files(out) and time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    done = len(part_files(out))
    assert 1 <= done < N_SHARDS
    runner = StopAfter(tiny_runner, N_SHARDS)
    messages: list[str] = []
    got = sweep(runner, PLANS, PROMPTS, ANSWERS, out=out, chunk_size=CHUNK,
                log=messages.append, **OPTIONS)
    assert any(f"{done} of {N_SHARDS} chunks on disk" in m for m in messages), messages
    assert runner.calls == N_SHARDS - done
    pd.testing.assert_frame_equal(got, reference, check_exact=True)


def test_a_one_process_sweep_resumes_on_workers_and_other_arguments_are_refused(
        ray_cluster, tiny_runner, reference, one_thread, tmp_path, bars):
    out = tmp_path / "half.parquet"
    with pytest.raises(Interrupted):
        sweep(StopAfter(tiny_runner, 6), PLANS, PROMPTS, ANSWERS, out=out, chunk_size=CHUNK,
              **OPTIONS)
    assert len(part_files(out)) == 6
    with pytest.raises(fs.FastskipError, match="other arguments.*run options"):
        sweep(tiny_runner, PLANS, PROMPTS, ANSWERS, out=out, chunk_size=CHUNK, workers=2,
              **{**OPTIONS, "top_k": 4})
    with pytest.raises(fs.FastskipError, match="other arguments.*plan set"):
        sweep(tiny_runner, PLANS[:299], PROMPTS, ANSWERS, out=out, chunk_size=CHUNK, workers=2,
              **OPTIONS)
    messages: list[str] = []
    got = sweep(tiny_runner, PLANS, PROMPTS, ANSWERS, out=out, chunk_size=CHUNK, workers=2,
                log=messages.append, **OPTIONS)
    assert any(f"6 of {N_SHARDS} chunks on disk" in m for m in messages), messages
    assert any(f"{N_SHARDS - 6} shards on 2 workers" in m for m in messages), messages
    pd.testing.assert_frame_equal(got, reference, check_exact=True)
    bar = bars[-1]  # starts at the shards on disk
    assert bar.updates == [6 * CHUNK] + [CHUNK] * (N_SHARDS - 6)


def test_an_error_inside_a_worker_arrives_as_itself(ray_cluster, tiny_runner, tmp_path):
    with pytest.raises(fs.InputError, match="answer 0 .* is empty") as caught:
        sweep(tiny_runner, PLANS[:50], PROMPTS, [""] * len(PROMPTS), out=tmp_path / "e.parquet",
              chunk_size=CHUNK, workers=1)  # one worker: starts in half the time
    assert type(caught.value) is fs.InputError  # not Ray's wrapper around it
