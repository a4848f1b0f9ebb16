"""Results files (Parquet round trip, prompt files, summaries) and resumable sweeps:
interrupted, killed with SIGKILL, corrupted, or resumed with other arguments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

import fastskip as fs
from fastskip.output import tables
from fastskip.output.sweep import sweep
from helpers import ANSWERS, PROMPTS, Interrupted, StopAfter

TESTS = Path(__file__).parents[1]  # helpers.py lives there


# -- files ---------------------------------------------------------------------------

def test_results_round_trip_through_parquet(tiny_runner, tmp_path):
    res = tiny_runner.run(["all", "0-1,2.mlp", "all,-1.3"], PROMPTS, ANSWERS, top_k=5,
                          wrong_answers=[" x"] * len(PROMPTS), kl=True)
    path = tables.save_results(res, tmp_path / "r.parquet")
    saved = tables.load_results(path)
    pd.testing.assert_frame_equal(saved.df, res.to_pandas(), check_exact=True)
    assert saved.df["topk_ids"].iloc[0].tolist() == res.topk_ids[0, 0, 0].tolist()
    assert saved.plans == res.plans and saved.prompts == PROMPTS and saved.answers == ANSWERS
    assert saved.model_name == res.model_name
    assert not list(tmp_path.glob("*.tmp-*"))


def test_results_to_csv_and_clear_errors(tiny_runner, tmp_path):
    res = tiny_runner.run(["all"], PROMPTS[:2], ANSWERS[:2], top_k=3)
    tables.save_results(res, tmp_path / "r.csv")
    df = pd.read_csv(tmp_path / "r.csv")
    assert len(df.loc[0, "topk_ids"].split()) == 3
    with pytest.raises(fs.InputError, match="CSV files keep no plan set"):
        tables.load_results(tmp_path / "r.csv")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(fs.InputError, match="not a readable Parquet file"):
        tables.load_results(tmp_path / "bad.parquet")


def test_prompt_files_text_csv_json(tmp_path):
    (tmp_path / "p.tsv").write_text("# comment\n1 2 3 4\t 5\n\nA B C D\t E\n")
    got = tables.read_prompts(tmp_path / "p.tsv")
    assert (got.prompts, got.answers, got.wrong_answers) == (["1 2 3 4", "A B C D"],
                                                             [" 5", " E"], None)
    (tmp_path / "p.csv").write_text('prompt,answer,wrong_answer\n"1 2 3 4"," 5"," 4"\n')
    got = tables.read_prompts(tmp_path / "p.csv")
    assert (got.prompts, got.answers, got.wrong_answers) == (["1 2 3 4"], [" 5"], [" 4"])
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "A B C D", "answer": " E"}]))
    assert tables.read_prompts(tmp_path / "p.json").answers == [" E"]
    (tmp_path / "q.json").write_text(json.dumps({"prompts": ["a"], "answers": [" b"]}))
    assert tables.read_prompts(tmp_path / "q.json").prompts == ["a"]
    (tmp_path / "bad.tsv").write_text("1 2 3 4 5\n")
    with pytest.raises(fs.InputError, match="line 1: expected 'prompt<TAB>answer'"):
        tables.read_prompts(tmp_path / "bad.tsv")


def test_summarize_one_row_per_plan(tiny_runner):
    res = tiny_runner.run(["all", "none", "0"], PROMPTS, [" 5", " May June", " five", " x",
                                                         " E", " 9"])
    table = tables.summarize(res.to_pandas(), sort_by=None)
    assert list(table["plan"]) == res.plans
    want = res.answer_prob().mean(1)
    assert table["prob"].to_numpy() == pytest.approx(want.numpy(), rel=1e-5)
    assert table["rank"].to_numpy() == pytest.approx(res.rank[:, :, 0].double().mean(1))
    best = tables.summarize(res.to_pandas(), sort_by="rank")
    assert best["rank"].is_monotonic_increasing


# -- sweeps --------------------------------------------------------------------------

def test_sweep_writes_parquet_that_loads_back_identically(tiny_runner, tmp_path):
    out = tmp_path / "s.parquet"
    plans = fs.grid.block_subsets(3)
    df = sweep(tiny_runner, plans, PROMPTS, ANSWERS, out=out, chunk_size=3, top_k=4)
    saved = tables.load_results(out)
    pd.testing.assert_frame_equal(saved.df, df, check_exact=True)
    assert saved.plans == plans.texts() and saved.meta["n_layers"] == 3
    whole = tiny_runner.run(plans, PROMPTS, ANSWERS, top_k=4).to_pandas()
    pd.testing.assert_frame_equal(df, whole)  # chunked == one call (to float tolerance)
    assert not out.with_name("s.parquet.parts").exists()
    # the same sweep again is read from the file, not run
    again = sweep(StopAfter(tiny_runner, 0), plans, PROMPTS, ANSWERS, out=out, chunk_size=3,
                  top_k=4)
    pd.testing.assert_frame_equal(again, df, check_exact=True)


def test_interrupted_sweep_resumes_and_detects_corruption_and_other_arguments(tiny_runner,
                                                                             tmp_path):
    out = tmp_path / "s.parquet"
    plans = fs.grid.leave_one_out(3, 4, units="head", include_full=True)  # 13 plans
    args = dict(out=out, chunk_size=4, top_k=3)
    want = sweep(tiny_runner, plans, PROMPTS, ANSWERS, out=tmp_path / "ref.parquet",
                 chunk_size=4, top_k=3)
    with pytest.raises(Interrupted):
        sweep(StopAfter(tiny_runner, 3), plans, PROMPTS, ANSWERS, **args)
    parts = tmp_path / "s.parquet.parts"
    assert sorted(p.name for p in parts.glob("part-*")) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert not out.exists()
    # other arguments: refused, never mixed
    with pytest.raises(fs.FastskipError, match="other arguments.*prompts"):
        sweep(tiny_runner, plans, PROMPTS[:2], ANSWERS[:2], **args)
    with pytest.raises(fs.FastskipError, match="run options"):
        sweep(tiny_runner, plans, PROMPTS, ANSWERS, out=out, chunk_size=4, top_k=5)
    # a truncated part is computed again; the others are not
    part = parts / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:300])
    messages = []
    runner = StopAfter(tiny_runner, 100)
    got = sweep(runner, plans, PROMPTS, ANSWERS, log=messages.append, **args)
    assert runner.calls == 2  # part 1 again and part 3
    assert any("part-00001.parquet is corrupt" in m for m in messages)
    assert any("resuming" in m for m in messages)
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert not parts.exists()


def test_resume_false_starts_over(tiny_runner, tmp_path):
    out = tmp_path / "s.parquet"
    with pytest.raises(Interrupted):
        sweep(StopAfter(tiny_runner, 1), ["all", "none", "0"], PROMPTS, ANSWERS, out=out,
              chunk_size=1)
    runner = StopAfter(tiny_runner, 100)
    sweep(runner, ["all", "none"], PROMPTS, ANSWERS, out=out, chunk_size=1, resume=False)
    assert runner.calls == 2 and out.exists()


KILLABLE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import fastskip as fs
    from fastskip.output.sweep import sweep
    from helpers import ANSWERS, PROMPTS, small_model

    runner = fs.Runner(small_model())
    delay = float(sys.argv[2])
    run = runner.run

    def slow_run(*args, **kwargs):
        time.sleep(delay)
        return run(*args, **kwargs)

    runner.run = slow_run
    df = sweep(runner, fs.grid.block_subsets(3), PROMPTS, ANSWERS, out=sys.argv[1],
               chunk_size=1, top_k=3, log=print)
    print("rows", len(df), flush=True)
""")


@pytest.mark.slow
def test_sweep_killed_with_sigkill_resumes_to_the_same_table(tiny, tmp_path, eager_metrics):
    """Bit for bit: every process computes the vocabulary metrics eagerly (``eager_metrics``;
    this process has usually passed the 4,096 rows after which they compile)."""
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE.format(tests=str(TESTS)))
    out = tmp_path / "killed.parquet"
    parts = tmp_path / "killed.parquet.parts"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # with the eager setting
    proc = subprocess.Popen([sys.executable, str(script), str(out), "0.5"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not list(parts.glob("part-*.parquet")) and time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        assert list(parts.glob("part-*.parquet")), "no part file appeared"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    done = len(list(parts.glob("part-*.parquet")))
    assert 1 <= done < 8
    resumed = subprocess.run([sys.executable, str(script), str(out), "0"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done} of 8 chunks on disk" in resumed.stdout and "rows 48" in resumed.stdout
    want = sweep(fs.Runner(tiny), fs.grid.block_subsets(3), PROMPTS, ANSWERS,
                 out=tmp_path / "whole.parquet", chunk_size=1, top_k=3)
    pd.testing.assert_frame_equal(tables.load_results(out).df, want, check_exact=True)
    assert not parts.exists()
