"""Edge plan items: the syntax of one item of an edge plan, and what it selects
in an ``EdgeGraph``.

    all, none        every edge / no edge
    S>R              the edges from the senders S to the receivers R
    S>*, *>R         every out-edge of S / every in-edge of R (``*>*`` = all)
    -X               remove X from what is kept so far

Senders: ``embed``, ``L.h`` (heads; ``0-3.0-11``: heads 0-11 of layers 0-3),
``L.mlp``. Receivers: ``L.h.q`` / ``L.h.k`` / ``L.h.v`` (several letters at
once: ``L.h.qkv``), ``L.kvg.k`` / ``L.kvg.v`` (key/value head g: the only
spelling of key and value inputs in grouped-query models), ``L.mlp``,
``logits``. Layers and heads take ranges (``0-7``). An explicit ``S>R`` must
name real edges only: every receiver in R after every sender in S.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import PlanError
from .edge_graph import EMBED, EdgeGraph
from .text import range_text

Range = tuple[int, int]  # inclusive


@dataclass(frozen=True)
class SenderSpec:
    """``embed``, heads ``L.h`` or MLPs ``L.mlp`` (ranges of layers and heads)."""

    kind: str  # "embed", "heads", "mlp"
    layers: Range | None = None
    heads: Range | None = None

    def __str__(self) -> str:
        if self.kind == "embed":
            return "embed"
        body = range_text(self.layers)
        return body + (".mlp" if self.kind == "mlp" else "." + range_text(self.heads))


@dataclass(frozen=True)
class ReceiverSpec:
    """``logits``, MLP inputs ``L.mlp`` or head inputs ``L.h.qkv`` / ``L.kvg.kv``."""

    kind: str  # "logits", "mlp", "heads"
    layers: Range | None = None
    heads: Range | None = None
    letters: str = ""  # a subset of "qkv" in that order (kind "heads")
    kv: bool = False  # written with the key/value head prefix: L.kvg.k

    def __str__(self) -> str:
        if self.kind == "logits":
            return "logits"
        body = range_text(self.layers)
        if self.kind == "mlp":
            return body + ".mlp"
        return f"{body}.{'kv' if self.kv else ''}{range_text(self.heads)}.{self.letters}"


@dataclass(frozen=True)
class EdgeItem:
    """One parsed edge plan item, e.g. ``-8.6>9.1.q``. ``sender``/``receiver``
    None is the wildcard ``*``; target "all"/"none" has neither."""

    remove: bool
    target: str  # "all", "none", "edges"
    sender: SenderSpec | None
    receiver: ReceiverSpec | None
    text: str  # as the user wrote it (stripped)
    index: int  # 1-based position in the plan
    offset: int  # character offset in the plan text

    def __str__(self) -> str:
        if self.target in ("all", "none"):
            body = self.target
        else:
            body = f"{self.sender or '*'}>{self.receiver or '*'}"
        return ("-" if self.remove else "") + body


class _Syntax(Exception):
    pass


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _range(text: str, what: str) -> Range:
    m = _RANGE.match(text)
    if not m:
        raise _Syntax(f"'{text}' is not a {what} number or range like 0-7")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if hi < lo:
        raise _Syntax(f"the {what} range '{text}' runs backwards; write {hi}-{lo}")
    return lo, hi


def _sender(text: str) -> SenderSpec | None:
    low = text.lower()
    if low == "*":
        return None
    if low == "embed":
        return SenderSpec("embed")
    layer, dot, part = low.partition(".")
    if not dot or not part:
        raise _Syntax(f"sender '{text}' is not embed, L.h (a head) or L.mlp")
    layers = _range(layer, "layer")
    if part == "mlp":
        return SenderSpec("mlp", layers)
    if "." in part:
        raise _Syntax(f"sender '{text}': a sender is a head (L.h) or an MLP (L.mlp); q/k/v "
                      "inputs are receivers (write them after '>')")
    return SenderSpec("heads", layers, _range(part, "head"))


def _receiver(text: str) -> ReceiverSpec | None:
    low = text.lower()
    if low == "*":
        return None
    if low == "logits":
        return ReceiverSpec("logits")
    parts = low.split(".")
    layers = _range(parts[0], "layer")
    if len(parts) == 2 and parts[1] == "mlp":
        return ReceiverSpec("mlp", layers)
    if len(parts) != 3:
        raise _Syntax(f"receiver '{text}' is not L.h.q, L.h.k, L.h.v, L.kvg.k, L.mlp or logits")
    head, letters = parts[1], parts[2]
    kv = head.startswith("kv")
    heads = _range(head[2:] if kv else head, "key/value head" if kv else "head")
    if not letters or any(c not in "qkv" for c in letters) or len(set(letters)) != len(letters):
        raise _Syntax(f"receiver '{text}': '{letters}' is not a head input; write q, k, v "
                      "or several of them (qkv)")
    if kv and "q" in letters:
        raise _Syntax(f"receiver '{text}': a key/value head has no query input; queries "
                      "belong to query heads (L.h.q)")
    return ReceiverSpec("heads", layers, heads, "".join(c for c in "qkv" if c in letters), kv)


def _item(text: str, index: int, offset: int) -> EdgeItem:
    remove = text.startswith("-")
    body = text[1:] if remove else text
    if not body:
        raise _Syntax("empty item")
    if re.search(r"\s", body):
        raise _Syntax("spaces inside an item; separate items with commas")
    low = body.lower()
    if low in ("all", "none"):
        if low == "none" and remove:
            raise _Syntax("'none' cannot be removed")
        return EdgeItem(remove, low, None, None, text, index, offset)
    if ">" not in body:
        raise _Syntax("an edge item is S>R (sender > receiver, e.g. 8.6>9.1.q), S>*, *>R, "
                      "all or none")
    left, _, right = body.partition(">")
    if ">" in right:
        raise _Syntax("one '>' per item")
    if not left or not right:
        raise _Syntax("an edge needs a sender before '>' and a receiver after it")
    if left == "*" and right == "*":
        return EdgeItem(remove, "all", None, None, text, index, offset)
    return EdgeItem(remove, "edges", _sender(left), _receiver(right), text, index, offset)


def parse_edge_items(text: str) -> tuple[EdgeItem, ...]:
    """Parse edge plan text into items (syntax only; no model needed)."""
    if not isinstance(text, str):
        raise PlanError(f"an edge plan must be a string, got {type(text).__name__}: {text!r}")
    if not text.strip():
        raise PlanError("empty edge plan text; write 'all' (every edge) or 'none' (no edge)")
    items = []
    offset = 0
    for index, raw in enumerate(text.split(","), start=1):
        stripped = raw.strip()
        at = offset + (len(raw) - len(raw.lstrip()))
        try:
            items.append(_item(stripped, index, at))
        except _Syntax as e:
            shown = stripped if stripped else "(empty)"
            raise PlanError(f"edge plan '{text}': item {index} '{shown}' at character {at}: "
                            f"{e}") from None
        offset += len(raw) + 1
    return tuple(items)


# -- what an item selects ----------------------------------------------------------------


def _check(r: Range | None, n: int, what: str, where: str) -> slice:
    assert r is not None
    if r[1] >= n:
        bad = r[0] if r[0] >= n else r[1]
        raise PlanError(f"{where}: {what} {bad} does not exist; the model has {what}s 0-{n - 1}")
    return slice(r[0], r[1] + 1)


def sender_selection(spec: SenderSpec, g: EdgeGraph, where: str) -> np.ndarray:
    """[n_senders] bool: the senders ``spec`` names."""
    sel = np.zeros(g.n_senders, dtype=bool)
    if spec.kind == "embed":
        sel[EMBED] = True
        return sel
    layers = _check(spec.layers, g.n_layers, "layer", where)
    for L in range(layers.start, layers.stop):
        if spec.kind == "mlp":
            sel[g.mlp_sender(L)] = True
        else:
            hs = _check(spec.heads, g.n_heads, "head", where)
            sel[g.head_sender(L, hs.start):g.head_sender(L, hs.stop - 1) + 1] = True
    return sel


def receiver_selection(spec: ReceiverSpec, g: EdgeGraph, where: str) -> np.ndarray:
    """[n_receivers] bool: the receivers ``spec`` names."""
    sel = np.zeros(g.n_receivers, dtype=bool)
    if spec.kind == "logits":
        sel[g.logits_receiver] = True
        return sel
    layers = _check(spec.layers, g.n_layers, "layer", where)
    if spec.kind == "heads":
        kv_letters = spec.letters.replace("q", "")
        if g.grouped and kv_letters and not spec.kv:
            raise PlanError(
                f"{where}: in this model {g.n_kv_heads} key/value heads serve {g.n_heads} query "
                f"heads, so key and value inputs belong to key/value heads: write "
                f"L.kvG.{kv_letters} (query head h reads key/value head h // {g.group_size})")
        if spec.kv:
            kv_heads = _check(spec.heads, g.n_kv_heads, "key/value head", where)
        else:
            q_heads = _check(spec.heads, g.n_heads, "head", where)
            kv_heads = q_heads
    for L in range(layers.start, layers.stop):
        if spec.kind == "mlp":
            sel[g.mlp_receiver(L)] = True
            continue
        for letter in spec.letters:
            if letter == "q":
                sel[[g.q_receiver(L, h) for h in range(q_heads.start, q_heads.stop)]] = True
            else:
                make = g.k_receiver if letter == "k" else g.v_receiver
                sel[[make(L, h) for h in range(kv_heads.start, kv_heads.stop)]] = True
    return sel


def item_edges(item: EdgeItem, g: EdgeGraph, plan_text: str) -> np.ndarray:
    """[n_edges] bool: the edges one item selects (``PlanError`` naming the item)."""
    where = f"edge plan '{plan_text}': item {item.index} '{item.text}'"
    if item.target == "all":
        return np.ones(g.n_edges, dtype=bool)
    if item.target == "none":
        return np.zeros(g.n_edges, dtype=bool)
    senders = (np.ones(g.n_senders, dtype=bool) if item.sender is None
               else sender_selection(item.sender, g, where))
    receivers = (np.ones(g.n_receivers, dtype=bool) if item.receiver is None
                 else receiver_selection(item.receiver, g, where))
    if item.sender is not None and item.receiver is not None:
        last = int(np.flatnonzero(senders)[-1])
        bad = np.flatnonzero(receivers & (g.in_degree <= last))
        if len(bad):
            r = int(bad[0])
            s = int(np.flatnonzero(senders & (np.arange(g.n_senders) >= g.in_degree[r]))[0])
            raise PlanError(f"{where}: receiver {g.receiver_name(r)} comes before sender "
                            f"{g.sender_name(s)}; an edge runs from a sender to a receiver "
                            "after it in the model's order")
    return senders[g.edge_sender] & receivers[g.edge_receiver]


def apply_edge_items(items: tuple[EdgeItem, ...], g: EdgeGraph, plan_text: str) -> np.ndarray:
    """The kept edges [n_edges] of items applied left to right to the empty set."""
    mask = np.zeros(g.n_edges, dtype=bool)
    for item in items:
        if item.target == "none":
            mask[:] = False
            continue
        mask[item_edges(item, g, plan_text)] = not item.remove
    return mask
