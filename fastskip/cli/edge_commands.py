"""``fastskip search path-patch | faithfulness | prune-edges``: the edge searches
on the command line (the parser's other search methods live in ``commands``).

    fastskip search path-patch --task numerals --circuit circuit.json --out edges.json --plot g.png
    fastskip search faithfulness --task months --scores eap.npy --out curve.parquet --plot c.png
    fastskip search prune-edges --task letters --threshold 0.01 --metric kl --out acdc.json

``--out`` writes JSON (everything) or Parquet (the table: every scored edge, every
size, every decision); ``--plot`` the edge graph (faithfulness: the curve).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import InputError

EDGE_METHODS = ("path-patch", "faithfulness", "prune-edges")
ABLATIONS = ("zero", "mean", "resample")


def add_options(p: argparse.ArgumentParser) -> None:
    """The edge searches' options, on the ``search`` parser."""
    g = p.add_argument_group("edge searches (path-patch, faithfulness, prune-edges)")
    g.add_argument("--circuit", metavar="FILE",
                   help="path-patch: the node circuit, JSON {\"heads\": [[L, h], ...], "
                        "\"mlps\": [L, ...]} (the published format; prune-nodes writes it)")
    g.add_argument("--scores", metavar="FILE",
                   help="faithfulness: one score per edge of the model's edge graph: .npy, "
                        ".json (a list) or .pt (a tensor, or auto-circuit PruneScores)")
    g.add_argument("--sizes", metavar="N,N,...",
                   help="faithfulness: circuit sizes in edges (default: 32 sizes from 1 to "
                        "all, logarithmic)")
    g.add_argument("--metric", default="kl", choices=("kl", "logit_diff"),
                   help="prune-edges: ACDC's metric (default kl)")
    g.add_argument("--ablation", choices=ABLATIONS,
                   help="what a removed edge carries (default: mean for path-patch, "
                        "resample for faithfulness and prune-edges; the task's corrupted "
                        "prompts are the source)")
    if "--out" not in p._option_string_actions:  # another search method may define it
        g.add_argument("--out", "-o", metavar="FILE", help="the result: .json or .parquet")


def _scores(path: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise InputError(f"--scores {path}: no such file")
    suffix = file.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        return np.load(file)
    if suffix == ".json":
        return json.loads(file.read_text())
    if suffix in (".pt", ".pth"):
        import torch

        return torch.load(file, map_location="cpu", weights_only=True)
    raise InputError(f"--scores {path}: expected a .npy, .json or .pt file")


def _circuit(path: str | None) -> dict[str, Any]:
    if not path:
        raise InputError("path-patch needs --circuit FILE (JSON {\"heads\": [[L, h], ...], "
                         "\"mlps\": [...]})")
    try:
        return dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as e:
        raise InputError(f"--circuit {path}: {e}") from None


def _sizes(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--sizes '{text}' is not a comma-separated list of edge counts") from None


def _write(path: str | None, data: dict[str, Any], table: Any) -> None:
    if not path:
        return
    from ..files import write_json
    from ..output import tables

    if Path(path).suffix.lower() == ".json":
        write_json(path, data)
    else:
        tables.save_table(table, path, {"search": data.get("search", "")})
    print(f"result -> {path}")


def cmd_edge_search(args: argparse.Namespace, runner: Any, task: Any) -> int:
    """Run one edge search and print, write and plot its result."""
    from ..output import edge_plot
    from ..search import faithfulness_curve, path_patch, prune_edges

    default = {"path-patch": "mean"}.get(args.method, "resample")
    ablation = args.ablation or default
    if args.method == "path-patch":
        res = path_patch(runner, task, _circuit(args.circuit), args.threshold, ablation=ablation)
        table = res.to_pandas()
        print(f"node circuit score: {res.circuit_score:.4f}; {len(res.candidates)} edges "
              f"scored, {len(res.kept)} kept (patched score < {args.threshold:g})")
        for row in table.sort_values("score").head(20).itertuples():
            print(f"  {row.score:8.4f}  {row.edge}{'  (kept)' if row.kept else ''}")
        data = {"search": "path-patch", "circuit": res.circuit.as_dict(),
                "threshold": args.threshold, "circuit_score": res.circuit_score,
                "kept": res.kept, "plan": str(res.plan), "edges": table.to_dict("records")}
        _write(args.out, data, table)
        if args.plot:
            edge_plot.edge_graph(res, args.plot, title=f"path patching ({len(res.kept)} edges)")
            print(f"figure -> {args.plot}")
        return 0
    if args.method == "faithfulness":
        if not args.scores:
            raise InputError("faithfulness needs --scores FILE (one score per edge)")
        curve = faithfulness_curve(runner, task, _scores(args.scores), _sizes(args.sizes),
                                   ablation=ablation)
        table = curve.to_pandas()
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(f"area under faithfulness vs fraction of edges: {curve.area():.4f}")
        data = {"search": "faithfulness", "area": curve.area(), **{
            k: [float(v) for v in table[k]] for k in table.columns}}
        _write(args.out, data, table)
        if args.plot:
            edge_plot.faithfulness(curve, args.plot)
            print(f"figure -> {args.plot}")
        return 0
    acdc = prune_edges(runner, task, args.threshold, args.metric, ablation=ablation)
    table = acdc.to_pandas()
    print(f"kept {len(acdc.kept)} of {len(acdc.trace)} edges; {args.metric} {acdc.start_value:.4g} "
          f"-> {acdc.value:.4g}; {acdc.stats['runner_calls']} runner calls")
    print(f"plan: {acdc.plan}")
    data = {"search": "prune-edges", "metric": args.metric, "threshold": args.threshold,
            "value": acdc.value, "kept": acdc.kept, "plan": str(acdc.plan),
            "trace": table.to_dict("records")}
    _write(args.out, data, table)
    if args.plot and acdc.kept:
        edge_plot.edge_graph(acdc, args.plot, title=f"ACDC ({len(acdc.kept)} edges)")
        print(f"figure -> {args.plot}")
    return 0
