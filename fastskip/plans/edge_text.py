"""Canonical edge plan text: the shorter of two spellings of a set of kept
edges, so that equal sets print equally and the text parses back to the same set.

* positive: the kept edges as a union of items;
* removal: ``all`` followed by the removed edges as ``-`` items.

Either way the edges are written as (1) senders whose every out-edge is in the
set, ``S>*`` (runs merged: ``8.0-3>*``), then (2) per receiver the rest:
``*>R`` when every in-edge of R is in the set, else one ``S>R`` per run of
senders (``embed``, ``0-3.0-11`` = heads 0-11 of layers 0-3, ``0-2.mlp``).
Receivers with the same senders merge into runs: heads (``9.0-11.q``), letters
of one head (``9.3.qkv``), layers (``3-5.mlp``, ``1-2.0-3.k``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

import numpy as np

from .edge_graph import EMBED, EdgeGraph
from .text import range_text

Spec = tuple[str, ...]  # sender items of one receiver ("*" = every in-edge)
V = TypeVar("V", bound=Hashable)


def _runs(flags: Sequence[bool] | np.ndarray) -> list[tuple[int, int]]:
    """Inclusive (start, end) of the runs of True."""
    out: list[tuple[int, int]] = []
    for i, f in enumerate(flags):
        if not f:
            continue
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def _value_runs(values: Sequence[V]) -> list[tuple[int, int, V]]:
    """Inclusive (start, end, value) of runs of equal consecutive values."""
    out: list[tuple[int, int, V]] = []
    for i, v in enumerate(values):
        if out and out[-1][2] == v:
            out[-1] = (out[-1][0], i, v)
        else:
            out.append((i, i, v))
    return out


def sender_items(senders: np.ndarray, g: EdgeGraph) -> list[str]:
    """A set of senders [n_senders] bool as sender items: ``embed``, head runs
    (layers with the same heads merged: ``0-3.0-11``), MLP runs (``0-2.mlp``)."""
    items: list[tuple[int, int, str]] = []
    if senders[EMBED]:
        items.append((-1, 0, "embed"))
    heads = senders[1:].reshape(g.n_layers, g.n_heads + 1)
    head_runs = [tuple(_runs(heads[L, :g.n_heads])) for L in range(g.n_layers)]
    for lo, hi, runs in _value_runs(head_runs):
        for a, b in runs:
            items.append((lo, 0, f"{range_text((lo, hi))}.{range_text((a, b))}"))
    for lo, hi in _runs(heads[:, g.n_heads]):
        items.append((lo, 1, f"{range_text((lo, hi))}.mlp"))
    return [text for _, _, text in sorted(items)]


def _receiver_specs(edges: np.ndarray, g: EdgeGraph) -> tuple[list[str], list[Spec]]:
    """Items ``S>*`` for senders with every out-edge in ``edges``, and per
    receiver the sender items of its other edges: ``("*",)`` when every in-edge
    of the receiver is in ``edges`` (and not all come from those senders). A
    sender all of whose out-edges go to ``*`` receivers gets no item."""
    out_degree = np.bincount(g.edge_sender, minlength=g.n_senders)
    full = np.bincount(g.edge_sender[edges], minlength=g.n_senders) == out_degree
    rest = edges & ~full[g.edge_sender]
    complete = np.bincount(g.edge_receiver[edges], minlength=g.n_receivers) == g.in_degree
    star = complete & (np.bincount(g.edge_receiver[rest], minlength=g.n_receivers) > 0)
    to_plain = np.bincount(g.edge_sender[~star[g.edge_receiver]], minlength=g.n_senders)
    full &= to_plain > 0  # every out-edge of the others is covered by a * receiver
    specs: list[Spec] = []
    for r in range(g.n_receivers):
        a, b = g.edge_offset[r], g.edge_offset[r + 1]
        if star[r]:
            specs.append(("*",))
        elif rest[a:b].any():
            senders = np.zeros(g.n_senders, dtype=bool)
            senders[:b - a] = rest[a:b]
            specs.append(tuple(sender_items(senders, g)))
        else:
            specs.append(())
    return sender_items(full, g), specs


def _head_groups(specs: Sequence[Sequence[Spec]], letters: str, prefix: str
                 ) -> list[tuple[str, Spec]]:
    """Receivers of one layer's heads (``specs[letter][head]``) as (receiver text, spec):
    letters of one head with equal specs merge (``3.qkv``), then runs of heads."""
    n = len(specs[0])
    per_head: list[tuple[tuple[Spec, str], ...]] = []
    for h in range(n):
        by_spec: dict[Spec, str] = {}
        for i, letter in enumerate(letters):
            if specs[i][h]:
                by_spec[specs[i][h]] = by_spec.get(specs[i][h], "") + letter
        per_head.append(tuple(sorted(by_spec.items(), key=lambda kv: "qkv".index(kv[1][0]))))
    out = []
    for lo, hi, head_groups in _value_runs(per_head):
        for spec, lets in head_groups:
            out.append((f"{prefix}{range_text((lo, hi))}.{lets}", spec))
    return out


def _layer_groups(specs: list[Spec], g: EdgeGraph) -> list[tuple[int, str, Spec]]:
    """Receiver groups (first layer, receiver text without the layer, spec), with
    consecutive layers of equal groups merged (their text gets a layer range)."""
    H, K = g.n_heads, g.n_kv_heads
    attn: list[tuple[tuple[str, Spec], ...]] = []
    mlp: list[Spec] = []
    for L in range(g.n_layers):
        q = [specs[g.q_receiver(L, h)] for h in range(H)]
        k = [specs[g.k_receiver(L, h)] for h in range(K)]
        v = [specs[g.v_receiver(L, h)] for h in range(K)]
        if g.grouped:
            groups = _head_groups([q], "q", "") + _head_groups([k, v], "kv", "kv")
        else:
            groups = _head_groups([q, k, v], "qkv", "")
        attn.append(tuple(groups))
        mlp.append(specs[g.mlp_receiver(L)])
    out: list[tuple[int, str, Spec]] = []
    for lo, hi, layer_groups in _value_runs(attn):
        for text, spec in layer_groups:
            out.append((2 * lo, f"{range_text((lo, hi))}.{text}", spec))
    for lo, hi, spec in _value_runs(mlp):
        if spec:
            out.append((2 * lo + 1, f"{range_text((lo, hi))}.mlp", spec))
    return sorted(out, key=lambda t: t[0])


def edge_items_text(edges: np.ndarray, g: EdgeGraph, sign: str = "") -> list[str]:
    """The edges [n_edges] bool as items (``sign`` "-" for removals)."""
    full, specs = _receiver_specs(edges, g)
    items = [f"{sign}{s}>*" for s in full]
    groups = _layer_groups(specs, g)
    if specs[g.logits_receiver]:
        groups.append((2 * g.n_layers, "logits", specs[g.logits_receiver]))
    for _, receiver, spec in groups:
        items += [f"{sign}{s}>{receiver}" for s in spec]
    return items


def canonical_edge_text(mask: np.ndarray, g: EdgeGraph) -> str:
    """The shorter of the positive and the removal spelling (ties: positive)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.all():
        return "all"
    if not mask.any():
        return "none"
    positive = ",".join(edge_items_text(mask, g))
    removal = ",".join(["all"] + edge_items_text(~mask, g, "-"))
    return positive if len(positive) <= len(removal) else removal
