"""Canonical plan text: the shortest of three spellings of a PlanMask, so that
equal masks print equally and the text parses back to the same masks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .mask import PlanMask


def range_text(r: tuple[int, int] | None) -> str:
    """'3' or '0-7' for an inclusive range."""
    assert r is not None
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def _runs(values: Sequence[object]) -> list[tuple[int, int, object]]:
    """Group equal consecutive values: [(start, end_inclusive, value)]."""
    out: list[tuple[int, int, object]] = []
    for i, v in enumerate(values):
        if out and out[-1][2] == v and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i, v)
        else:
            out.append((i, i, v))
    return out


def _head_runs(flags: np.ndarray) -> list[str]:
    return [range_text((a, b)) for a, b, v in _runs(list(flags)) if v]


def _layer_state(m: PlanMask, layer: int) -> tuple:
    heads = tuple(bool(h) for h in m.heads[layer])
    attn = (heads, bool(m.attn_ln[layer])) if m.attn[layer] else None
    mlp = bool(m.mlp_ln[layer]) if m.mlp[layer] else None
    return attn, mlp


def _sfx(ln: bool) -> str:
    return "" if ln else "/noln"


def _positive_items(r: str, state: tuple, n_heads: int) -> list[str]:
    attn, mlp = state
    all_heads = attn is not None and all(attn[0])
    if all_heads and mlp is not None and attn[1] == mlp:
        return [r + _sfx(mlp)]
    items = _attn_items(r, attn, n_heads) if attn is not None else []
    if mlp is not None:
        items.append(f"{r}.mlp{_sfx(mlp)}")
    return items


def _negative_items(r: str, state: tuple) -> list[str]:
    attn, mlp = state
    if attn is None and mlp is None:
        return [f"-{r}"]
    adds: list[str] = []
    removes: list[str] = []
    if attn is None:
        removes.append(f"-{r}.attn")
    else:
        heads, ln = attn
        if not ln and mlp is not None and not mlp:
            adds.append(f"{r}/noln")
        elif not ln:
            adds.append(f"{r}.attn/noln")
        removes += [f"-{r}.{h}" for h in _head_runs(~np.array(heads))]
    if mlp is None:
        removes.append(f"-{r}.mlp")
    elif not mlp and f"{r}/noln" not in adds:
        adds.append(f"{r}.mlp/noln")
    return adds + removes


def _attn_items(r: str, attn: tuple, n_heads: int) -> list[str]:
    heads, ln = attn
    if all(heads):
        return [f"{r}.attn{_sfx(ln)}"]
    if any(heads):
        return [f"{r}.{h}{_sfx(ln)}" for h in _head_runs(np.array(heads))]
    # attention output bias only: keep the attention, remove every head
    return [f"{r}.attn", f"-{r}.0-{n_heads - 1}" if n_heads > 1 else f"-{r}.0"]


def _stream_items(states: list[tuple], n_heads: int) -> list[str]:
    """Positive form built from runs of attention and of MLP states separately;
    an attention run and an MLP run over the same layers become one block item."""
    attn_runs = [r for r in _runs([s[0] for s in states]) if r[2] is not None]
    mlp_runs = [r for r in _runs([s[1] for s in states]) if r[2] is not None]
    entries: list[tuple[int, int, list[str]]] = []
    merged = set()
    for lo, hi, attn in attn_runs:
        twin = next((x for x in mlp_runs if x[:2] == (lo, hi)), None)
        r = range_text((lo, hi))
        if twin is not None and all(attn[0]) and attn[1] == twin[2]:  # type: ignore[index]
            entries.append((lo, 0, [r + _sfx(twin[2])]))  # type: ignore[arg-type]
            merged.add((lo, hi))
        else:
            entries.append((lo, 1, _attn_items(r, attn, n_heads)))  # type: ignore[arg-type]
    for lo, hi, ln in mlp_runs:
        if (lo, hi) not in merged:
            entries.append((lo, 2, [f"{range_text((lo, hi))}.mlp{_sfx(ln)}"]))  # type: ignore
    return [item for _, _, items in sorted(entries, key=lambda e: e[:2]) for item in items]


def canonical_text(m: PlanMask) -> str:
    """The shortest of three spellings (ties go to the earlier one): per-layer
    runs ('0-7,8.attn,9.mlp'), per-component runs ('0-11.mlp,5.attn') and the
    removal form ('all,-10.7'). Deterministic, so equal masks print equally."""
    full = ((tuple([True] * m.n_heads), True), True)  # all heads, both norms on
    states = [_layer_state(m, L) for L in range(m.n_layers)]
    if all(s == full for s in states):
        return "all"
    if all(s == (None, None) for s in states):
        return "none"
    if all(s == ((full[0][0], False), False) for s in states):
        return "all/noln"
    per_layer: list[str] = []
    negative: list[str] = ["all"]
    for lo, hi, state in _runs(states):
        r = range_text((lo, hi))
        if state != (None, None):
            per_layer += _positive_items(r, state, m.n_heads)  # type: ignore[arg-type]
        if state != full:
            negative += _negative_items(r, state)  # type: ignore[arg-type]
    candidates = [per_layer, _stream_items(states, m.n_heads), negative]
    texts = [",".join(c) for c in candidates]
    return min(texts, key=len)


