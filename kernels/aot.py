"""Ahead-of-time compilation of every Triton kernel of this package for real GPU targets,
without a GPU: Triton compiles a kernel for a given ``GPUTarget`` and ships the PTX assembler
(``ptxas``) that turns it into a cubin. Run in CI, a kernel that does not compile for sm_80 or
sm_90 fails there instead of on the first GPU machine.

    python -m fastskip.kernels.aot [--arch 80 90] [--json out.json]

Kernels and their variants are found generically: every ``LazyKernel`` in the modules of
``fastskip.kernels`` is compiled for every dtype of ``KERNEL_DTYPES`` and every combination of
its ``tl.constexpr`` flags (values from ``FLAG_VALUES``, by flag name), with the tile sizes and
launch settings the wrappers use by default. A new kernel slots in by itself; a new flag needs
its values in ``FLAG_VALUES`` (the run says so). Parameters are typed by name: ``*_ptr`` are
pointers to the kernel dtype (``POINTER_DTYPES`` lists exceptions), ``FLOAT_ARGS`` are fp32
scalars, everything else is an int32.

Registers, spills and shared memory come from ``ptxas -v`` on the PTX of each compile. Needs
triton imported in compiled mode (``TRITON_INTERPRET`` unset); the CLI compiles into a fresh
cache directory, so every kernel really compiles. Exit code 1 when any variant fails.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import _LAZY
from ._common import DOT_PRECISIONS, KERNEL_DTYPES, LazyKernel, default_block_k, interpret_mode

TARGETS = (80, 90)  # A100, H100/H200
LAUNCH = {"num_warps": 8, "num_stages": 3}  # the wrappers' defaults (tests/kernels/test_aot.py)
FLOAT_ARGS = {"eps"}
# the per-row scale of mlp_out_residual is fp32 whatever the kernel dtype (StepOps passes fp32)
POINTER_DTYPES: dict[str, torch.dtype] = {"s_ptr": torch.float32}
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _dot_precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """``tl.dot`` precisions that differ for this dtype (16-bit inputs ignore the setting)."""
    return DOT_PRECISIONS if dtype == torch.float32 else ("ieee",)


# values each constexpr flag takes, by name; a callable gets the kernel dtype
FLAG_VALUES: dict[str, tuple[Any, ...] | Callable[[torch.dtype], tuple[Any, ...]]] = {
    "NORMALIZE": (True, False),
    "CENTER": (True, False),  # LayerNorm vs RMSNorm statistics (a merged MLP-in kernel)
    "GATED": (True, False),  # SwiGLU vs GELU MLP (a merged MLP-in kernel)
    "HAS_BIAS": (True, False),
    "HAS_SCALE": (True, False),
    "DOT_PRECISION": _dot_precisions,
}


def default_tiles(dtype: torch.dtype) -> dict[str, int]:
    """The tiles the wrappers pick for full-size problems (``pick_block`` with no request)."""
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": default_block_k(dtype)}


@dataclass
class Variant:
    """One compile: a kernel for one target, dtype and set of constexprs, and what ptxas said."""

    kernel: str
    arch: int
    dtype: str
    constexprs: dict[str, Any]
    ok: bool = False
    error: str = ""
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared_bytes: int | None = None
    seconds: float = 0.0
    ptxas_log: list[str] = field(default_factory=list)


def package_kernels() -> list[tuple[str, LazyKernel]]:
    """Every ``LazyKernel`` defined in the package's kernel modules, by ``module.function``."""
    found: dict[str, LazyKernel] = {}
    for module_name in sorted(set(_LAZY.values())):
        module = importlib.import_module(f"{__package__}.{module_name}")
        for value in vars(module).values():
            if isinstance(value, LazyKernel):
                found[f"{module_name}.{value.fn.__name__}"] = value
    return sorted(found.items())


def parameters(fn: Callable[..., Any]) -> list[tuple[str, bool]]:
    """(name, is constexpr) of each kernel parameter."""
    out = []
    for p in inspect.signature(fn).parameters.values():
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__",
                                                                         str(p.annotation))
        out.append((p.name, "constexpr" in str(ann)))
    return out


def signature(fn: Callable[..., Any], dtype: torch.dtype) -> dict[str, str]:
    """Triton's signature of ``fn`` for kernel dtype ``dtype`` (see the module docstring)."""
    sig = {}
    for name, is_constexpr in parameters(fn):
        if is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + TRITON_TYPES[POINTER_DTYPES.get(name, dtype)]
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def variants(fn: Callable[..., Any], dtype: torch.dtype) -> Iterator[dict[str, Any]]:
    """Every combination of the constexprs of ``fn`` for this dtype."""
    tiles = default_tiles(dtype)
    names = [n for n, c in parameters(fn) if c]
    choices = []
    for name in names:
        if name in tiles:
            choices.append((tiles[name],))
        elif name in FLAG_VALUES:
            values = FLAG_VALUES[name]
            choices.append(values(dtype) if callable(values) else values)
        else:
            raise KeyError(f"constexpr {name} of kernel {fn.__name__} has no values in "
                           f"FLAG_VALUES ({__name__}); add the values the wrappers pass")
    for combo in itertools.product(*choices):
        yield dict(zip(names, combo, strict=True))


_PTXAS_INFO = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SHARED = re.compile(r"(\d+) bytes smem")


def ptxas_report(ptx: str, arch: int) -> tuple[int | None, int | None, int | None, int | None,
                                                 list[str]]:
    """Registers, spill stores, spill loads (bytes) and static shared memory of ``ptx``
    assembled for ``arch`` with ``ptxas -v`` (the assembler Triton ships), and the log."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o",
                              os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    log = [line.strip() for line in (res.stderr + res.stdout).splitlines() if line.strip()]
    text = "\n".join(log)
    regs, spills, smem = _PTXAS_INFO.search(text), _SPILLS.search(text), _SHARED.search(text)
    return (int(regs.group(1)) if regs else None,
            int(spills.group(1)) if spills else None, int(spills.group(2)) if spills else None,
            int(smem.group(1)) if smem else None, log)


def compile_variant(name: str, lazy: LazyKernel, dtype: torch.dtype, constexprs: dict[str, Any],
                    arch: int) -> Variant:
    """Compile one variant for ``sm_<arch>``; failures are recorded, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = Variant(name, arch, TRITON_TYPES[dtype], dict(constexprs))
    start = time.perf_counter()
    try:
        fn = lazy.jitted()
        src = ASTSource(fn=fn, signature=signature(lazy.fn, dtype),
                        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(LAUNCH))
        (out.registers, out.spill_stores, out.spill_loads, _smem,
         out.ptxas_log) = ptxas_report(compiled.asm["ptx"], arch)
        out.shared_bytes = int(compiled.metadata.shared)
        out.ok = True
    except Exception as e:  # a compile error is the result we report
        out.error = f"{type(e).__name__}: {e}"[-2000:]
    out.seconds = time.perf_counter() - start
    return out


def compile_all(archs: Sequence[int] = TARGETS, kernels: Sequence[str] | None = None,
                log: Callable[[Variant], None] | None = None, quick: bool = False
                ) -> list[Variant]:
    """Every kernel x dtype x flag combination x target (``kernels``: only these names;
    ``quick``: the first flag combination of each kernel and dtype only)."""
    if interpret_mode():
        raise RuntimeError("ahead-of-time compiles need TRITON_INTERPRET unset (triton imported "
                           "in compiled mode); run python -m fastskip.kernels.aot in a fresh "
                           "process")
    out = []
    for name, lazy in package_kernels():
        if kernels is not None and name not in kernels:
            continue
        for dtype in KERNEL_DTYPES:
            combos = list(variants(lazy.fn, dtype))
            for constexprs in combos[:1] if quick else combos:
                for arch in archs:
                    v = compile_variant(name, lazy, dtype, constexprs, arch)
                    out.append(v)
                    if log:
                        log(v)
    return out


def flags_text(constexprs: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in constexprs.items() if not k.startswith("BLOCK_"))


def table(results: Sequence[Variant]) -> str:
    """One markdown row per compile."""
    rows = ["| kernel | sm | dtype | flags | registers | spill stores/loads (B) | shared (B) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in results:
        regs = v.registers if v.ok else f"FAILED: {v.error.splitlines()[0][:80]}"
        rows.append(f"| {v.kernel} | {v.arch} | {v.dtype} | {flags_text(v.constexprs)} | {regs} "
                    f"| {v.spill_stores}/{v.spill_loads} | {v.shared_bytes} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compile every fastskip Triton kernel for GPU "
                                 "targets without a GPU; report registers and spills.")
    ap.add_argument("--arch", type=int, nargs="+", default=list(TARGETS),
                    help="compute capabilities (default: 80 90)")
    ap.add_argument("--kernel", action="append", help="only this kernel (module.function)")
    ap.add_argument("--quick", action="store_true",
                    help="the first flag combination of each kernel and dtype only")
    ap.add_argument("--json", help="write every result here")
    ap.add_argument("--keep-cache", action="store_true",
                    help="use Triton's usual cache (default: a fresh one, so all compile)")
    args = ap.parse_args(argv)
    if not args.keep_cache and "triton" not in sys.modules:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastskip-aot-")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # today's default, without a warning

    def progress(v: Variant) -> None:
        state = (f"{v.registers} registers, spills {v.spill_stores}/{v.spill_loads} B"
                 if v.ok else "FAILED")
        print(f"sm_{v.arch} {v.dtype} {v.kernel} {flags_text(v.constexprs)}: {state} "
              f"({v.seconds:.1f} s)", file=sys.stderr, flush=True)

    results = compile_all(args.arch, args.kernel, progress, args.quick)
    print(table(results))
    failed = [v for v in results if not v.ok]
    spilled = [v for v in results if v.ok and (v.spill_stores or v.spill_loads)]
    print(f"\n{len(results)} compiles, {len(failed)} failed, {len(spilled)} with spills")
    for v in failed:
        print(f"\nFAILED sm_{v.arch} {v.dtype} {v.kernel} {flags_text(v.constexprs)}:\n{v.error}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(v) for v in results], f, indent=1, default=str)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
