"""Timing waits for the device: CUDA work is queued, so a clock read right after a call
measures the launches, not the work. Every timer of ``fastskip.reference.timing``
synchronizes before it starts and before it stops, on CUDA only; the benchmark suites
time through these timers (checked in their source)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fastskip as fs
from fastskip.reference import timing

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def events(monkeypatch):
    """CUDA made to look available; ``torch.cuda.synchronize`` records itself."""
    log: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    return log


def work(log):
    def fn(*args, **kwargs):
        log.append("work")
        return 7
    return fn


def test_timed_synchronizes_before_and_after(events):
    value, seconds = timing.timed(work(events), "cuda")
    assert value == 7 and seconds >= 0
    assert events == ["sync", "work", "sync"]


def test_best_of_and_wall_time_synchronize_every_round(events):
    timing.best_of(work(events), 3, torch.device("cuda", 0))
    assert events == ["sync", "work", "sync"] * 3
    events.clear()
    timing.wall_time(work(events), "cuda:0")
    assert events == ["sync", "work", "sync"]


def test_synced_waits_for_earlier_work_and_its_own(events):
    fn = timing.synced(work(events), "cuda")
    assert events == ["sync"]  # what ran before is not timed
    assert fn(1, x=2) == 7 and fn() == 7
    assert events == ["sync", "work", "sync", "work", "sync"]


def test_no_synchronize_for_the_cpu(events):
    timing.timed(work(events), "cpu")
    timing.synced(work(events), torch.device("cpu"))()
    assert events == ["work", "work"]


def test_hook_loop_times_on_the_tokens_device(events, tiny, monkeypatch):
    tokens = tiny.to_tokens(["1 2 3"])
    seen = []
    monkeypatch.setattr(timing, "best_of", lambda fn, rounds, device: seen.append(device) or 1.0)
    timing.hook_loop_per_plan(tiny, [fs.Plan.parse("all").bind(3, 4)],
                              tokens, sample=1, rounds=1)
    assert seen == [tokens.device]


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_time_through_synchronizing_timers(path):
    """No bare clock in the benchmark suites, and every pytest-benchmark call times a
    ``synced`` function (or runs outside pytest-benchmark)."""
    text = path.read_text()
    assert not re.search(r"time\.(perf_counter|time|monotonic)\(", text), path.name
    for call in re.findall(r"benchmark\.pedantic\(\s*([^,]+),", text):
        assert call.startswith("synced("), f"{path.name}: benchmark.pedantic({call}, ...)"
