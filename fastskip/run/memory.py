"""Memory sizing: how many bytes a run needs, how the budget is split between
matmul activations, logits and residual-stream states, and the one place that
refuses work that cannot fit (``MemoryBudgetError``).

Sizes are in bytes of ``element_bytes(dtype)`` per element.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from ..errors import FastskipError, MemoryBudgetError
from ..model import StackedWeights
from ..plans import PlanSet
from .tree import arena_sizes, build_tree, step_keys

MAX_BATCH_ROWS = 4096  # states per matmul batch or unembedding batch, at most


def element_bytes(dtype: torch.dtype) -> int:
    """Bytes of one element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def format_bytes(n: float) -> str:
    """A size for messages: 512 B, 40.0 KiB, 3.2 MiB, 1.50 GiB."""
    if n < 2**10:
        return f"{int(n)} B"
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    if n < 2**30:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**30:.2f} GiB"


def parse_memory(value: int | float | str | None) -> int | None:
    """Bytes from 2_000_000_000, 2e9, "2GB", "512MiB" (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise FastskipError(f"max_memory '{value}' is not a size like 2GB or 512MiB")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 1:
            what = "positive" if not value > 0 else "at least one byte"
            raise FastskipError(f"max_memory must be {what}, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?i?b?)\s*", value.lower())
    if not m:
        raise FastskipError(f"max_memory '{value}' is not a size like 2GB or 512MiB")
    unit = m.group(2).rstrip("b").rstrip("i")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit]
    return parse_memory(float(m.group(1)) * scale)


def default_memory(device: torch.device) -> int:
    """Half the free GPU memory on CUDA; on CPU a quarter of RAM, at most 4 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 * 2**30
    return int(min(ram // 4, 4 * 2**30))


def ensure_fits(need: int, budget: int, what: str, remedy: str) -> None:
    """Raise ``MemoryBudgetError`` when ``need`` bytes exceed ``budget``: the one
    place fastskip refuses work for memory. ``what`` says what needs the bytes."""
    if need > budget:
        raise MemoryBudgetError(f"{what} needs {format_bytes(need)} but max_memory leaves "
                                f"{format_bytes(budget)} for it; {remedy}")


class StateBytes(NamedTuple):
    """Bytes of one residual-stream state: at every position [B, T, d] and at the
    asked positions only [B, Q, d]."""

    full: int
    asked: int


def state_bytes(w: StackedWeights, B: int, T: int, Q: int) -> StateBytes:
    elem = element_bytes(w.dtype)
    return StateBytes(B * T * w.d_model * elem, B * Q * w.d_model * elem)


class MemorySizes(NamedTuple):
    """Bytes per state in a matmul batch (``per_row``), per final state in an
    unembedding batch (``per_final``), and of the residual-stream states one plan
    needs (``states``). Their sum is the smallest budget under which plans run."""

    per_row: int
    per_final: int
    states: int


def one_plan_states(plans: PlanSet, sb: StateBytes, free_skips: bool) -> int:
    """Bytes of residual-stream states one plan of this set can need: a chain
    through every layer (``all``), or through every MLP when no plan has attention."""
    L = plans.n_layers
    ones = np.ones((1, L), bool)
    attn = ones if plans.attn.any() else ~ones
    chain = PlanSet(attn, None, ones, ones, ones)
    sizes = arena_sizes(build_tree(step_keys(chain).keys), free_skips)
    return sizes.full * sb.full + sizes.asked * sb.asked


def memory_sizes_per_row(w: StackedWeights, B: int, T: int, Q: int) -> MemorySizes:
    """``MemorySizes`` without the states: bytes per state in a matmul batch and
    per final state in an unembedding batch (``states`` 0)."""
    elem = element_bytes(w.dtype)
    # activations of one state in a matmul batch: q/k/v, MLP hidden, scores, copies
    per_row = B * T * elem * (3 * w.n_heads * w.d_head + 2 * w.d_mlp + 6 * w.d_model) + \
        B * w.n_heads * T * T * 4 * 2
    # logits + fp32 copy + comparison mask for one final state
    per_final = B * Q * w.d_vocab_out * (elem + 4 + 1 + 4)
    return MemorySizes(per_row, per_final, 0)


def memory_sizes(w: StackedWeights, plans: PlanSet, B: int, T: int, Q: int, masked: bool,
                 zero_ablation: bool = True) -> MemorySizes:
    """``MemorySizes`` for B prompts of T tokens with Q asked positions; ``masked``:
    the masked executor (every plan one chain of three states)."""
    rows = memory_sizes_per_row(w, B, T, Q)
    sb = state_bytes(w, B, T, Q)
    states = 3 * sb.full if masked else one_plan_states(plans, sb, zero_ablation)
    return MemorySizes(rows.per_row, rows.per_final, states)


class Budget(NamedTuple):
    """How a run splits ``max_memory``: states per matmul batch, final states per
    unembedding batch, and the bytes left for the residual-stream arenas."""

    max_rows: int
    unembed_rows: int
    arena_bytes: int


def split_budget(sizes: MemorySizes, budget: int, B: int, T: int, Q: int) -> Budget:
    """A quarter of the budget for matmul batches, a quarter for unembedding
    batches, the rest for states; batches of one if that is what it takes for one
    plan's states to fit. Raises ``MemoryBudgetError`` before any work when one
    plan cannot fit at all."""
    max_rows = int(np.clip(budget // 4 // max(sizes.per_row, 1), 1, MAX_BATCH_ROWS))
    unembed_rows = int(np.clip(budget // 4 // max(sizes.per_final, 1), 1, MAX_BATCH_ROWS))
    arena = budget - max_rows * sizes.per_row - unembed_rows * sizes.per_final
    if arena < sizes.states:
        max_rows = unembed_rows = 1
        arena = budget - sizes.per_row - sizes.per_final
    need = sum(sizes)
    what = (f"one plan for {B} x {T} tokens (states {format_bytes(sizes.states)}, matmul "
            f"activations {format_bytes(sizes.per_row)}, logits {format_bytes(sizes.per_final)} "
            f"for {Q} asked positions)")
    ensure_fits(need, budget, what,
                f"raise max_memory to at least {need} bytes or use fewer/shorter prompts")
    return Budget(max_rows, unembed_rows, arena)


# -- measuring (Linux): what the budget is checked against in tests and benchmarks


def status_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def can_measure_peak() -> bool:
    """Whether ``peak_rss`` works here (Linux with a writable /proc/self/clear_refs)."""
    path = "/proc/self/clear_refs"
    return os.path.exists(path) and os.access(path, os.W_OK)


@contextlib.contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Yields a dict that gets 'before', 'peak' and 'increase' (peak RSS during the
    block minus the RSS before it), in bytes."""
    gc.collect()
    out = {"before": status_bytes("VmRSS")}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    yield out
    out["peak"] = status_bytes("VmHWM")
    out["increase"] = out["peak"] - out["before"]
