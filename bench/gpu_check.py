"""The GPU check: one script, one JSON and one markdown table, within 8 minutes on one GPU.

    python bench/gpu_check.py                       # on a GPU machine (device cuda)
    python bench/gpu_check.py --device cpu --quick  # the dry run CI does (tests/bench)

In order, each section timed and skipped (said so in the output) once the time budget
(``--budget``, 480 s) would be passed:

1. the device's matmul peak measured in this run (fp32 without TF32, TF32, bf16; one
   big square matmul, best of a few);
2. the Triton kernels against the code they replace (``fastskip.model.blocks``) over a
   table of shapes and dtypes, with their TFLOP/s;
3. grids (a) all 4,096 block subsets, (b) leave-one-out over 144 heads and 12 MLPs,
   (c) 1,024 random plans of every kind, on random GPT-2 small with the notebook's 6
   prompts: fastskip (the default GPU path: compiled steps + kernels) in fp32, in bf16
   (exact ranks and raw), and with ``precision="mixed"`` where the Runner has it,
   against one ``run_with_hooks`` per plan and one TransformerLens masked batch
   (bench/baselines.py) on the same device; useful-work TFLOP/s (the tree's matmul
   FLOPs, ``fastskip.run.flops``) against the measured peak; a few plans of each grid
   checked against the TransformerLens reference;
4. the ``gpu``-marked test suite (tests/test_gpu.py, tests/model/test_kernels.py) in a
   subprocess, with the time that is left.

On CPU (``--device cpu``) kernels run in Triton's interpreter on tiny shapes and the
gpu tests skip: the dry run exercises every line of the script, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run)")
    ap.add_argument("--quick", action="store_true", help="small grids and shapes")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for everything")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check"),
                    help="path stem of the .json and .md written")
    ap.add_argument("--no-tests", action="store_true", help="skip the gpu test suite")
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import tl_masked_batch  # noqa: E402

import fastskip as fs  # noqa: E402
from fastskip.cli import notebook  # noqa: E402
from fastskip.reference.timing import best_of, hook_loop_per_plan, synchronize, timed  # noqa: E402
from fastskip.run.flops import work_flops  # noqa: E402
from fastskip.run.tree import step_keys  # noqa: E402

PROMPTS = [p for p, _ in notebook.PROMPTS]
ANSWERS = [a for _, a in notebook.PROMPTS]


class Clock:
    """Seconds spent so far (sections are timed with the synchronizing timer)."""

    def __init__(self, budget: float, device: torch.device):
        self.budget, self.device, self.spent = budget, device, 0.0
        self.sections: dict[str, Any] = {}

    def left(self) -> float:
        return self.budget - self.spent

    def section(self, name: str, fn: Callable[[], Any], need: float) -> Any:
        """Run ``fn`` if about ``need`` seconds are left; record its time or why not."""
        if self.left() < need:
            self.sections[name] = {"skipped": f"out of time ({self.left():.0f} s left, needs "
                                              f"~{need:.0f} s)"}
            print(f"[{name}] skipped: out of time", flush=True)
            return None
        print(f"[{name}] ...", flush=True)
        try:
            value, seconds = timed(fn, self.device)
            self.sections[name] = {"seconds": round(seconds, 2)}
        except Exception as e:  # a failing section is a result; the others still run
            value, seconds = None, 0.0
            self.sections[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"[{name}] FAILED: {type(e).__name__}: {e}", flush=True)
        self.spent += seconds
        print(f"[{name}] {seconds:.1f} s ({self.left():.0f} s left)", flush=True)
        return value


# -- 1. the device ------------------------------------------------------------
def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                            "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory
                                   / 2**30, 1)
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def matmul_peak(device: torch.device, quick: bool) -> dict[str, float]:
    """TFLOP/s of one big square matmul: fp32 (no TF32), TF32, bf16; best of a few."""
    n = (1024 if device.type == "cpu" else 4096) if quick else \
        (2048 if device.type == "cpu" else 8192)
    out = {}
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bf16", torch.bfloat16, False)):
        if name == "tf32" and device.type != "cuda":
            continue
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            a @ b  # warm-up
            seconds = best_of(lambda a=a, b=b: a @ b, 3 if quick else 5, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        out[name] = 2 * n**3 / seconds / 1e12
    return out


# -- 2. kernels vs the code they replace ------------------------------------
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-3, 2e-3), torch.bfloat16: (1e-2, 1.6e-2)}


def kernel_cases(M: int, D: int, F: int, dtype: torch.dtype, device: torch.device,
                 g: torch.Generator) -> dict[str, tuple[Callable[[], torch.Tensor],
                                                         Callable[[], torch.Tensor], float]]:
    """op -> (the kernel, the ``blocks`` code it replaces in float64 for fp32 inputs and
    fp32 for 16-bit ones, matmul FLOPs) on random inputs of one shape and dtype."""
    from fastskip import kernels as K
    from fastskip.model import blocks
    from fastskip.model.weights import BlockConfig, LayerWeights

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    acc = torch.float64 if dtype == torch.float32 else torch.float32
    none = dict.fromkeys(LayerWeights._fields)
    x, s = rand(M, D, scale=2.0), torch.rand(M, generator=g).to(device)
    w_in, w_g = rand(D, F, scale=D**-0.5), rand(D, F, scale=D**-0.5)
    b_in, w_out, b_out, h = rand(F, scale=0.1), rand(F, D, scale=F**-0.5), rand(D, scale=0.1), \
        rand(M, F)

    def hidden(norm: str, act: str, gate: torch.Tensor | None) -> torch.Tensor:
        cfg = BlockConfig(1, 1, 1, norm, 1e-5, act, 1.0, 0)  # type: ignore[arg-type]
        xn = blocks.normalize(x, None, None, cfg, True).to(acc)
        b = b_in.to(acc) if gate is None else torch.zeros(F, dtype=acc, device=device)
        lw = LayerWeights(**{**none, "W_in": w_in.to(acc), "b_in": b,
                             "W_gate": None if gate is None else gate.to(acc)})
        return blocks.mlp_hidden(xn, lw, cfg, False)

    def out_ref() -> torch.Tensor:
        lw = LayerWeights(**{**none, "W_out": w_out.to(acc), "b_out": b_out.to(acc)})
        return x.to(acc) + s.to(acc)[:, None] * blocks.mlp_out(h.to(acc), lw)

    return {
        "ln_pre_gelu_mlp_in": (lambda: K.ln_pre_gelu_mlp_in(x, w_in, b_in),
                               lambda: hidden("LNPre", "gelu_new", None), 2.0 * M * D * F),
        "rms_pre_swiglu_mlp_in": (lambda: K.rms_pre_swiglu_mlp_in(x, w_g, w_in),
                                  lambda: hidden("RMSPre", "silu", w_g), 4.0 * M * D * F),
        "mlp_out_residual": (lambda: K.mlp_out_residual(h, w_out, b_out, x, s), out_ref,
                             2.0 * M * F * D),
    }


def kernel_table(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    """Each fused kernel against the code it replaces over shapes x dtypes (the
    tolerances of tests/model/test_kernels.py), and its speed on a GPU."""
    from fastskip import kernels as K

    if K.triton_unavailable_reason():
        return [{"skipped": K.triton_unavailable_reason()}]
    if device.type == "cpu":  # the interpreter: tiny shapes; bf16 tl.dot is unsupported there
        shapes, dtypes = [(37, 48, 80)], [torch.float32, torch.float16]
    else:
        shapes = [(64, 768, 3072), (4096, 768, 3072), (1000, 576, 1536)]
        shapes += [] if quick else [(16384, 768, 3072), (1, 768, 3072), (300, 100, 200)]
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for M, D, F in shapes:
        for dtype in dtypes:
            for op, (kernel, reference, flops) in kernel_cases(M, D, F, dtype, device, g).items():
                out, want = kernel(), reference()
                atol, rtol = TOL[dtype]
                err = (out.to(want.dtype) - want).abs()
                row = {"op": op, "M": M, "D": D, "F": F, "dtype": str(dtype).split(".")[-1],
                       "max_abs_error": float(err.max().cpu()),
                       "ok": bool((err <= atol + rtol * want.abs()).all().cpu())}
                if device.type == "cuda":
                    row["tflops"] = flops / best_of(kernel, 5, device) / 1e12
                rows.append(row)
    return rows


# -- 3. the grids -------------------------------------------------------------
def plan_sets(quick: bool) -> dict[str, fs.PlanSet]:
    a = fs.PlanSet.from_plans(fs.grid.block_subsets(12), 12, 12)
    c = fs.grid.random_plans(1024, 12, 12, seed=0, p_keep=0.7)
    if quick:
        a, c = a.take(range(0, 4096, 16)), c.take(range(128))
    return {"a_block_grid": a, "b_leave_one_out": fs.grid.leave_one_out(12, 12,
                                                                         units=("head", "mlp")),
            "c_random_mixed": c}


def sample(plans: fs.PlanSet, k: int) -> fs.PlanSet:
    import numpy as np

    return plans.take(np.unique(np.linspace(0, len(plans) - 1, k).round().astype(int)))


def precision_variants(model: Any, device: torch.device, quick: bool
                       ) -> dict[str, Callable[[], fs.Runner]]:
    """The ways fastskip runs a grid here: fp32 (the default path), bf16 raw and with
    exact ranks (not in the CPU dry run: it is fp32 again there, for random weights),
    and mixed precision when the Runner has it."""
    import inspect

    out: dict[str, Callable[[], fs.Runner]] = {
        "fp32": lambda: fs.Runner(model, device=device, verbose=False),
        "bf16 raw": lambda: fs.Runner(model, device=device, dtype=torch.bfloat16,
                                      exact_ranks=False, verbose=False),
        "bf16 exact ranks": lambda: fs.Runner(model, device=device, dtype=torch.bfloat16,
                                              verbose=False),
    }
    if quick and device.type == "cpu":
        del out["bf16 exact ranks"]
    if "precision" in inspect.signature(fs.Runner).parameters:
        out["mixed"] = lambda: fs.Runner(model, device=device, precision="mixed",  # type: ignore[call-arg]
                                         verbose=False)
    return out


def grids(clock: Clock, device: torch.device, quick: bool, peak: dict[str, float]
          ) -> list[dict[str, Any]]:
    model = fs.load_model("gpt2-small-random", device=device)
    tokens = model.to_tokens(PROMPTS)
    runners = {name: make() for name, make in precision_variants(model, device, quick).items()}
    rows = []
    for grid_name, plans in plan_sets(quick).items():
        def one_grid(grid_name: str = grid_name, plans: fs.PlanSet = plans) -> None:
            keys = step_keys(plans).keys
            work = work_flops(keys, runners["fp32"].weights, len(PROMPTS), tokens.shape[1], 1)
            hooks = hook_loop_per_plan(model, plans, tokens, sample=4 if quick else 8,
                                       rounds=1 if quick else 2)
            tl_sample = sample(plans, 8 if quick else 32)
            tl_masked = best_of(lambda: tl_masked_batch(model, tl_sample, tokens), 1,
                                device) / len(tl_sample)
            checked = sample(plans, 4 if quick else 8)
            err = fs.check(runners["fp32"], checked, tokens, atol=1e-4)
            for variant, runner in runners.items():
                runner.run(sample(plans, 8), PROMPTS, ANSWERS, progress=False)  # compile/warm
                seconds = best_of(lambda r=runner: r.run(plans, PROMPTS, ANSWERS,
                                                         progress=False), 1 if quick else 2,
                                  device)
                per = seconds / len(plans)
                tflops = work["tree"] / seconds / 1e12
                ref_peak = peak.get("fp32" if variant == "fp32" else "bf16")
                rows.append({
                    "grid": grid_name, "plans": len(plans), "variant": variant,
                    "ms_per_plan": per * 1e3, "run_with_hooks_ms_per_plan": hooks * 1e3,
                    "ratio_vs_run_with_hooks": hooks / per,
                    "tl_masked_batch_ms_per_plan": tl_masked * 1e3,
                    "ratio_vs_tl_masked_batch": tl_masked / per,
                    "useful_tflops": tflops, "useful_gflop": work["tree"] / 1e9,
                    "percent_of_peak": 100 * tflops / ref_peak if ref_peak else None,
                    "peak_used": "fp32" if variant == "fp32" else "bf16",
                    "max_logit_error_vs_reference": err if variant == "fp32" else None,
                    "compile_seconds": runner.compile_seconds,
                })
                print(f"  {grid_name} {variant}: {per * 1e3:.3f} ms/plan, "
                      f"{hooks / per:.0f}x vs run_with_hooks, {tl_masked / per:.1f}x vs TL "
                      f"masked batch, {tflops:.2f} TFLOP/s", flush=True)
        clock.section(f"grid {grid_name}", one_grid, need=10 if quick else 40)
    return rows


# -- 4. the gpu tests ------------------------------------------------------------
def gpu_tests(seconds: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           "tests/test_gpu.py", "tests/model/test_kernels.py", "-rs"]
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                             timeout=max(seconds, 10))
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"returncode": None, "summary": f"timed out after {seconds:.0f} s",
                "tail": tail[-3000:]}
    summary = ""
    for line in reversed(res.stdout.splitlines()):
        if re.search(r"\d+ (passed|failed|skipped|error)", line):
            summary = line.strip("= ")
            break
    return {"returncode": res.returncode, "summary": summary, "tail": res.stdout[-3000:]}


# -- report -----------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    info, peak = report["device"], report["peak_tflops"] or {}
    lines = [f"# fastskip GPU check: {info.get('gpu', info.get('cpu'))} ({info['device']}), "
             f"torch {info['torch']}, triton {info.get('triton')}", ""]
    lines.append("Peak measured in this run (one square matmul): " + ", ".join(
        f"{k} {v:.1f} TFLOP/s" for k, v in peak.items()))
    lines += ["", "| grid | plans | fastskip | ms/plan | vs run_with_hooks | "
              "vs TL masked batch | useful TFLOP/s | % of peak |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["grids"]:
        pct = f"{r['percent_of_peak']:.1f}% ({r['peak_used']})" if r["percent_of_peak"] else "-"
        lines.append(f"| {r['grid']} | {r['plans']} | {r['variant']} | {r['ms_per_plan']:.3f} "
                     f"| {r['ratio_vs_run_with_hooks']:.0f}x | "
                     f"{r['ratio_vs_tl_masked_batch']:.1f}x | {r['useful_tflops']:.2f} | {pct} |")
    kernels = [k for k in report["kernels"] or [] if "op" in k]
    if kernels:
        lines += ["", "| kernel | M x D x F | dtype | max abs error | ok | TFLOP/s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for k in kernels:
            tf = f"{k['tflops']:.1f}" if "tflops" in k else "-"
            lines.append(f"| {k['op']} | {k['M']} x {k['D']} x {k['F']} | {k['dtype']} | "
                         f"{k['max_abs_error']:.2e} | {'yes' if k['ok'] else 'NO'} | {tf} |")
    tests = report.get("gpu_tests") or {}
    lines += ["", f"gpu tests: {tests.get('summary', 'not run')}", "",
              "Sections: " + ", ".join(f"{k}: {v}" for k, v in report["sections"].items())]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --device cpu for the dry run)",
              file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    clock = Clock(args.budget, device)
    report: dict[str, Any] = {"device": device_info(device), "quick": args.quick}
    report["peak_tflops"] = clock.section("peak", lambda: matmul_peak(device, args.quick), 5)
    report["kernels"] = clock.section("kernels", lambda: kernel_table(device, args.quick), 10)
    report["grids"] = grids(clock, device, args.quick, report["peak_tflops"] or {})
    if args.no_tests:
        report["gpu_tests"] = {"summary": "not run (--no-tests)"}
    else:
        left = clock.left() - 5
        report["gpu_tests"] = clock.section("gpu tests", lambda: gpu_tests(left), 30)
    report["sections"] = clock.sections
    synchronize(device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"-> {out.with_suffix('.json')}, {out.with_suffix('.md')}")
    bad = [k for k, v in clock.sections.items() if "error" in v]
    bad += ["kernels"] if any(not k.get("ok", True) for k in report["kernels"] or []) else []
    tests = report["gpu_tests"] or {}
    bad += ["gpu tests"] if tests.get("returncode") not in (0, 5, None) else []
    if bad:
        print(f"gpu_check: FAILED: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
