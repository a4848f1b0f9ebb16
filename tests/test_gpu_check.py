"""``bench/gpu_check.py``, the prepared GPU check, in its CPU dry run: every section
runs (kernels in Triton's interpreter on tiny shapes, the gpu tests skipping), and it
writes its JSON and markdown table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu_check"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick",
                          "--budget", "3000", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=3000)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert all("seconds" in v for v in report["sections"].values()), report["sections"]
    assert report["peak_tflops"]["fp32"] > 0 and report["peak_tflops"]["bf16"] > 0
    kernels = report["kernels"]
    assert {k["op"] for k in kernels} == {"ln_pre_gelu_mlp_in", "rms_pre_swiglu_mlp_in",
                                          "mlp_out_residual"} and all(k["ok"] for k in kernels)
    rows = report["grids"]
    assert {r["grid"] for r in rows} == {"a_block_grid", "b_leave_one_out", "c_random_mixed"}
    assert {"fp32", "bf16 raw"} <= {r["variant"] for r in rows}
    for r in rows:
        assert r["ms_per_plan"] > 0 and r["ratio_vs_run_with_hooks"] > 0
        assert r["useful_tflops"] > 0 and r["percent_of_peak"] > 0
    assert all(r["max_logit_error_vs_reference"] <= 1e-4 for r in rows if r["variant"] == "fp32")
    assert "skipped" in report["gpu_tests"]["summary"]  # no CUDA here: the gpu suite skips
    table = out.with_suffix(".md").read_text()
    assert "| grid | plans | fastskip | ms/plan" in table and "a_block_grid" in table


def test_gpu_check_refuses_cuda_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run")
    res = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "no CUDA device" in res.stderr
