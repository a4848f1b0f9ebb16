"""The Triton kernels compile ahead of time for real GPU targets (sm_80, sm_90) without a GPU
(``fastskip.kernels.aot``), every dtype and flag combination; registers and spills reported.

The compiles run in a fresh interpreter with ``TRITON_INTERPRET`` unset: Triton fixes
compiled-vs-interpreted when it is first imported, and the rest of this test process may run
kernels in the interpreter.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastskip import kernels as K
from fastskip.kernels import aot

ROOT = Path(__file__).resolve().parents[2]


def run_aot(tmp_path: Path, *args: str) -> list[dict]:
    """``python -m fastskip.kernels.aot`` in compiled mode; its results (rc 0 asserted)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    res = subprocess.run([sys.executable, "-m", "fastskip.kernels.aot", "--json", str(out),
                          *args], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=900)
    print(res.stdout)  # the registers/spills table (pytest -s shows it)
    assert res.returncode == 0, f"kernels failed to compile:\n{res.stdout[-4000:]}\n" \
                                f"{res.stderr[-4000:]}"
    return json.loads(out.read_text())


def kernel_names() -> set[str]:
    return {name for name, _ in aot.package_kernels()}


def test_every_kernel_module_is_found():
    found = kernel_names()
    modules = set(K._LAZY.values())
    assert found and {name.split(".")[0] for name in found} == modules, (found, modules)


def test_variants_are_every_flag_combination():
    import torch

    for _, lazy in aot.package_kernels():
        flags = [n for n, c in aot.parameters(lazy.fn) if c and not n.startswith("BLOCK_")]
        assert flags, lazy.fn.__name__
        for dtype in (torch.float32, torch.bfloat16):
            got = list(aot.variants(lazy.fn, dtype))
            expected = 1
            for f in flags:
                values = aot.FLAG_VALUES[f]
                expected *= len(values(dtype) if callable(values) else values)
            assert len(got) == expected and len({json.dumps(v) for v in got}) == expected
            assert all(v["BLOCK_K"] == (16 if dtype == torch.float32 else 32) for v in got)


def test_an_unknown_flag_is_named():
    import torch

    def kernel(x_ptr, n, NEW_FLAG: tl.constexpr):  # noqa: F821
        pass

    assert aot.signature(kernel, torch.float32) == {
        "x_ptr": "*fp32", "n": "i32", "NEW_FLAG": "constexpr"}
    with pytest.raises(KeyError, match="NEW_FLAG.*FLAG_VALUES"):
        list(aot.variants(kernel, torch.float32))


def test_launch_settings_are_the_wrappers_defaults():
    for name in K._LAZY:
        params = inspect.signature(getattr(K, name)).parameters
        for key, value in aot.LAUNCH.items():
            assert params[key].default == value, (name, key)


def test_kernels_compile_for_sm80_and_sm90_quick(tmp_path):
    """One flag combination per kernel and dtype (the full table is the slow test below)."""
    results = run_aot(tmp_path, "--quick")
    assert {r["kernel"] for r in results} == kernel_names()
    assert {r["arch"] for r in results} == {80, 90}
    assert {r["dtype"] for r in results} == {"fp32", "bf16", "fp16"}
    assert all(r["ok"] and r["registers"] and r["registers"] <= 255 for r in results)


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm80_and_sm90(tmp_path):
    results = run_aot(tmp_path)
    expected = sum(len(list(aot.variants(lazy.fn, dtype))) for _, lazy in aot.package_kernels()
                   for dtype in K._common.KERNEL_DTYPES) * len(aot.TARGETS)
    assert len(results) == expected
    assert all(r["ok"] for r in results)
    for r in results:  # registers and spills were read from ptxas for every compile
        assert r["registers"] is not None and r["spill_stores"] is not None, r
    spilled = [f"{r['kernel']} sm_{r['arch']} {r['dtype']} {aot.flags_text(r['constexprs'])}: "
               f"{r['spill_stores']} B" for r in results if r["spill_stores"]]
    print("variants that spill registers:", spilled or "none")
