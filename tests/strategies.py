"""Hypothesis strategies shared by the property, invariance and bad-input tests:
small random models (GPT-2 and Llama style), plan sets of every item kind (from
boolean mask arrays and from plan text), token batches, prompts and ablations.

Plan text is generated together with what it must mean, computed by
``apply_items``: an independent, written-out reading of the README's plan
table, so parsing is checked against the documentation and not against itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastskip as fs
from fastskip.plans import PlanMask
from helpers import small_llama, small_model

N_CTX = 32
FULL_VOCAB = 50257  # the GPT-2 tokenizer's: needed for string prompts


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Spec:
    """A small random model, built (and cached) by ``build``."""

    arch: str  # "gpt2" or "llama"
    seed: int
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    norm: str  # LN / LNPre (gpt2), RMS / RMSPre (llama)
    act_fn: str
    d_vocab: int
    n_kv_heads: int = 0  # llama only
    rotary_dim: int = 0  # llama only

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kernels_cover(self) -> bool:
        """The fused Triton MLP kernels serve LNPre + gelu_new and RMSPre + SwiGLU."""
        return (self.norm, self.act_fn) in (("LNPre", "gelu_new"), ("RMSPre", "silu"))


@functools.cache
def tokenizer():
    from fastskip.model.load import gpt2_tokenizer

    return gpt2_tokenizer()


@functools.lru_cache(maxsize=24)
def build(spec: Spec):
    """The model of ``spec`` (cached: hypothesis re-draws specs while shrinking)."""
    if spec.arch == "gpt2":
        return small_model(
            seed=spec.seed, normalization_type=spec.norm, tokenizer=tokenizer(),
            n_layers=spec.n_layers, d_model=spec.d_model, n_heads=spec.n_heads,
            d_head=spec.d_head, d_mlp=spec.d_mlp, act_fn=spec.act_fn, d_vocab=spec.d_vocab,
            n_ctx=N_CTX)
    return small_llama(
        seed=spec.seed, normalization_type=spec.norm, n_layers=spec.n_layers,
        d_model=spec.d_model, n_heads=spec.n_heads, d_head=spec.d_head,
        n_key_value_heads=spec.n_kv_heads, d_mlp=spec.d_mlp, rotary_dim=spec.rotary_dim,
        d_vocab=spec.d_vocab, n_ctx=N_CTX)


SMALL_VOCABS = (97, 256, 500)


@st.composite
def gpt2_specs(draw, vocabs=SMALL_VOCABS, max_layers: int = 4, norms=("LN", "LNPre"),
               acts=("gelu_new", "relu", "gelu"), d_models=(32, 48, 64), d_mlps=None) -> Spec:
    d_model = draw(st.sampled_from(d_models))
    return Spec(
        arch="gpt2", seed=draw(st.integers(0, 2**16)),
        n_layers=draw(st.integers(1, max_layers)), d_model=d_model,
        n_heads=draw(st.sampled_from([1, 2, 4])),
        d_mlp=draw(st.sampled_from(d_mlps or [32, 64, 4 * d_model])),
        norm=draw(st.sampled_from(norms)), act_fn=draw(st.sampled_from(acts)),
        d_vocab=draw(st.sampled_from(vocabs)))


@st.composite
def llama_specs(draw, vocabs=SMALL_VOCABS, max_layers: int = 3, norms=("RMS", "RMSPre"),
                d_models=(32, 64), d_mlps=(32, 64, 128)) -> Spec:
    d_model = draw(st.sampled_from(d_models))
    n_heads = draw(st.sampled_from([2, 4]))
    d_head = d_model // n_heads
    return Spec(
        arch="llama", seed=draw(st.integers(0, 2**16)),
        n_layers=draw(st.integers(1, max_layers)), d_model=d_model, n_heads=n_heads,
        d_mlp=draw(st.sampled_from(d_mlps)), norm=draw(st.sampled_from(norms)),
        act_fn="silu", d_vocab=draw(st.sampled_from(vocabs)),
        n_kv_heads=draw(st.sampled_from([k for k in (1, 2, 4) if n_heads % k == 0])),
        rotary_dim=draw(st.sampled_from([d_head, d_head // 2])))


def specs(vocabs=SMALL_VOCABS) -> st.SearchStrategy[Spec]:
    """GPT-2 style three times as often as Llama style."""
    return st.one_of(gpt2_specs(vocabs), gpt2_specs(vocabs), gpt2_specs(vocabs),
                     llama_specs(vocabs))


# --------------------------------------------------------------------------- plans


@st.composite
def mask_plan_sets(draw, n_layers: int, n_heads: int, max_plans: int = 6) -> fs.PlanSet:
    """``fs.PlanSet(attn, heads, mlp, attn_ln, mlp_ln)`` from drawn boolean arrays.

    Per layer the head mask is drawn as all heads, no head (output bias only)
    or a random subset, so every item kind turns up; a norm is skipped (/noln)
    with probability 1/4."""
    P = draw(st.integers(1, max_plans))
    shape, shape_h = (P, n_layers), (P, n_layers, n_heads)
    attn = draw(hnp.arrays(bool, shape))
    mlp = draw(hnp.arrays(bool, shape))
    mode = draw(hnp.arrays(np.int8, shape, elements=st.integers(0, 2)))
    subset = draw(hnp.arrays(bool, shape_h))
    heads = np.where((mode == 0)[..., None], True, np.where((mode == 1)[..., None], False,
                                                            subset))
    noln = hnp.arrays(np.int8, shape, elements=st.integers(0, 3))
    attn_ln, mlp_ln = draw(noln) != 0, draw(noln) != 0
    return fs.PlanSet(attn, heads, mlp, attn_ln, mlp_ln)


@dataclass(frozen=True)
class ItemSpec:
    remove: bool
    target: str  # all, none, block, attn, mlp, heads
    layers: tuple[int, int] | None
    heads: tuple[int, int] | None
    noln: bool


def _range(r: tuple[int, int], long_form: bool) -> str:
    return f"{r[0]}-{r[1]}" if r[0] != r[1] or long_form else str(r[0])


def item_text(it: ItemSpec, upper: bool = False, long_form: bool = False) -> str:
    """One item as a user may write it (``upper``: ATTN/MLP/NOLN; ``long_form``:
    a one-layer range written 3-3)."""
    if it.target in ("all", "none"):
        body = it.target
    else:
        assert it.layers is not None
        body = _range(it.layers, long_form)
        if it.target in ("attn", "mlp"):
            body += "." + (it.target.upper() if upper else it.target)
        elif it.target == "heads":
            assert it.heads is not None
            body += "." + _range(it.heads, long_form)
    sfx = ("/NOLN" if upper else "/noln") if it.noln else ""
    return ("-" if it.remove else "") + body + sfx


def apply_items(items: list[ItemSpec], n_layers: int, n_heads: int) -> PlanMask:
    """The README's plan table, written out: items applied left to right to an
    empty set of kept components. Norms, as the table says: an item with /noln
    switches off the norm before each component it names; an item without it
    switches the norm on only where it keeps something not kept before (a
    component, or a head of the layer's attention: one norm serves all its heads)."""
    attn = np.zeros(n_layers, bool)
    heads = np.zeros((n_layers, n_heads), bool)
    mlp = np.zeros(n_layers, bool)
    attn_ln = np.ones(n_layers, bool)
    mlp_ln = np.ones(n_layers, bool)
    for it in items:
        if it.target == "none":
            attn[:], heads[:], mlp[:] = False, False, False
            continue
        if it.target == "all":
            layers = range(n_layers)
        else:
            assert it.layers is not None
            layers = range(it.layers[0], it.layers[1] + 1)
        for L in layers:
            if it.target in ("all", "block", "attn", "heads"):
                named = np.zeros(n_heads, bool)
                if it.target == "heads":
                    assert it.heads is not None
                    named[it.heads[0]: it.heads[1] + 1] = True
                else:
                    named[:] = True  # the whole attention: every head and the bias
                if it.remove and it.target == "heads":  # the attention (and its bias) stays
                    heads[L] &= ~named
                elif it.remove:
                    attn[L], heads[L] = False, False
                else:
                    new = not attn[L] or bool((named & ~heads[L]).any())
                    attn[L], heads[L] = True, heads[L] | named
                    if it.noln:
                        attn_ln[L] = False
                    elif new:
                        attn_ln[L] = True
            if it.target in ("all", "block", "mlp"):
                if it.remove:
                    mlp[L] = False
                else:
                    new = not mlp[L]
                    mlp[L] = True
                    if it.noln:
                        mlp_ln[L] = False
                    elif new:
                        mlp_ln[L] = True
    return PlanMask(attn, heads, mlp, attn_ln, mlp_ln).normalized()


def _ranges(n: int) -> st.SearchStrategy[tuple[int, int]]:
    return st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).map(
        lambda t: (min(t), max(t)))


@st.composite
def items(draw, n_layers: int, n_heads: int) -> ItemSpec:
    target = draw(st.sampled_from(["block", "attn", "mlp", "heads", "block", "heads", "all",
                                   "none"]))
    remove = target != "none" and draw(st.booleans())
    noln = not remove and target != "none" and draw(st.integers(0, 3)) == 0
    layers = None if target in ("all", "none") else draw(_ranges(n_layers))
    heads = draw(_ranges(n_heads)) if target == "heads" else None
    return ItemSpec(remove, target, layers, heads, noln)


@st.composite
def plan_texts(draw, n_layers: int, n_heads: int, max_items: int = 5
               ) -> tuple[str, PlanMask]:
    """Plan text of 1..max_items items (random spacing and case) and the masks it
    must resolve to."""
    its = draw(st.lists(items(n_layers, n_heads), min_size=1, max_size=max_items))
    if its[0].remove:  # a plan cannot start with a removal (it would keep nothing)
        its = [ItemSpec(False, "all", None, None, False), *its]
    upper, long_form = draw(st.booleans()), draw(st.booleans())
    sep = draw(st.sampled_from([",", ", ", " , "]))
    text = sep.join(item_text(it, upper, long_form) for it in its)
    if draw(st.booleans()):
        text = f" {text} "
    return text, apply_items(its, n_layers, n_heads)


@st.composite
def plan_sets(draw, n_layers: int, n_heads: int, max_masks: int = 6, max_texts: int = 3
              ) -> fs.PlanSet:
    """Plans built from mask arrays followed by plans parsed from text."""
    masks = draw(mask_plan_sets(n_layers, n_heads, max_masks))
    texts = draw(st.lists(plan_texts(n_layers, n_heads), max_size=max_texts))
    if not texts:
        return masks
    parsed = fs.PlanSet.from_plans([t for t, _ in texts], n_layers, n_heads)
    return fs.grid.concat(masks, parsed)


# --------------------------------------------------------------------------- inputs


@st.composite
def token_batches(draw, d_vocab: int, max_batch: int = 3, max_len: int = 10) -> torch.Tensor:
    """Token ids [B, T] (every position a real token, as ``runner.logits`` takes)."""
    B = draw(st.integers(1, max_batch))
    T = draw(st.integers(1, max_len))
    ids = draw(hnp.arrays(np.int64, (B, T), elements=st.integers(0, d_vocab - 1)))
    return torch.as_tensor(ids)


@st.composite
def ablations(draw, d_vocab: int, shape: tuple[int, int], kinds=("zero", "mean", "resample")):
    """None (zero ablation), or mean/resample ablation given as token ids."""
    kind = draw(st.sampled_from(kinds))
    B, T = shape
    if kind == "zero":
        return None
    if kind == "mean":
        R = draw(st.integers(1, 4))
        T_src = draw(st.integers(T, min(T + 3, N_CTX)))
        src = draw(hnp.arrays(np.int64, (R, T_src), elements=st.integers(0, d_vocab - 1)))
        return fs.Ablation.mean(tokens=torch.as_tensor(src))
    src = draw(hnp.arrays(np.int64, (B, T), elements=st.integers(0, d_vocab - 1)))
    return fs.Ablation.resample(tokens=torch.as_tensor(src))


WORDS = ["1", "2", "3", "10", "one", "two", "A", "B", "January", "Monday", "the", "cat", "sat",
         "on", "mat", "!", ",", "é", "日本", "ok?", "x"]


def words(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    """Text of a few words (numbers, names, punctuation, non-ASCII)."""
    return st.lists(st.sampled_from(WORDS), min_size=min_size, max_size=max_size).map(" ".join)


def prompts() -> st.SearchStrategy[str]:
    return st.one_of(words(1, 8), st.text(st.characters(codec="utf-8"), min_size=1, max_size=8))


def answers() -> st.SearchStrategy[str]:
    """Answers of one to a few tokens; most start with a space."""
    return st.one_of(words(1, 3).map(lambda s: " " + s), words(1, 2),
                     st.text(st.characters(codec="utf-8"), min_size=1, max_size=4))


# --------------------------------------------------------------------------- edge plans
# An independent, written-out reading of the README's edge-plan table: senders and
# receivers are listed by name with their place in the model's order, and an item
# means every (sender, receiver) pair it names with the receiver after the sender.


@dataclass(frozen=True)
class EdgeNames:
    """Sender and receiver names of a model size, with their model-order stage."""

    n_layers: int
    n_heads: int
    n_kv_heads: int

    @property
    def grouped(self) -> bool:
        return self.n_kv_heads != self.n_heads

    def senders(self) -> list[tuple[str, int]]:
        out = [("embed", -1)]
        for L in range(self.n_layers):
            out += [(f"{L}.{h}", 2 * L) for h in range(self.n_heads)] + [(f"{L}.mlp", 2 * L + 1)]
        return out

    def receivers(self) -> list[tuple[str, int]]:
        kv = "kv" if self.grouped else ""
        out = []
        for L in range(self.n_layers):
            out += [(f"{L}.{h}.q", 2 * L) for h in range(self.n_heads)]
            out += [(f"{L}.{kv}{g}.k", 2 * L) for g in range(self.n_kv_heads)]
            out += [(f"{L}.{kv}{g}.v", 2 * L) for g in range(self.n_kv_heads)]
            out.append((f"{L}.mlp", 2 * L + 1))
        return out + [("logits", 2 * self.n_layers)]

    def edges(self) -> list[str]:
        """Every edge's name in the documented order: by receiver, then sender."""
        return [f"{s}>{r}" for r, rs in self.receivers() for s, ss in self.senders() if ss < rs]


@st.composite
def edge_sizes(draw, max_layers: int = 4) -> EdgeNames:
    H = draw(st.sampled_from([1, 2, 3, 4]))
    K = draw(st.sampled_from([k for k in (1, 2, 4) if H % k == 0 and k <= H]))
    return EdgeNames(draw(st.integers(1, max_layers)), H, K)


def _edge_range(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


@st.composite
def edge_item_specs(draw, names: EdgeNames) -> tuple[str, set[str]]:
    """One item's text and the edges it names (all valid: explicit S>R items only
    pair receivers with senders before all of them)."""
    L, H, K = names.n_layers, names.n_heads, names.n_kv_heads
    kind = draw(st.sampled_from(["pair", "pair", "pair", "sender*", "*receiver", "all"]))
    stage = dict(names.senders())
    rstage = dict(names.receivers())

    def receivers() -> tuple[str, list[str]]:
        which = draw(st.sampled_from(["heads", "mlp", "logits"]))
        if which == "logits":
            return "logits", ["logits"]
        a, b = sorted(draw(st.tuples(st.integers(0, L - 1), st.integers(0, L - 1))))
        if which == "mlp":
            return f"{_edge_range(a, b)}.mlp", [f"{x}.mlp" for x in range(a, b + 1)]
        kv = names.grouped and draw(st.booleans())
        letters = draw(st.sampled_from(["k", "v", "kv"] if kv or names.grouped else
                                       ["q", "k", "v", "qk", "qv", "kv", "qkv"]))
        n = K if kv else H
        if names.grouped and not kv:
            letters = "q"
        c, d = sorted(draw(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1))))
        pre = "kv" if kv else ""
        text = f"{_edge_range(a, b)}.{pre}{_edge_range(c, d)}.{letters}"
        mark = "kv" if names.grouped else ""
        got = [f"{x}.{mark}{h}.{ch}" if ch != "q" else f"{x}.{h}.q"
               for x in range(a, b + 1) for h in range(c, d + 1) for ch in letters]
        return text, got

    def senders(before: int | None) -> tuple[str, list[str]] | None:
        """Senders, all before stage ``before`` (None: any)."""
        limit = 2 * L + 1 if before is None else before - 1  # the last allowed stage
        options = ["embed"] + (["heads"] if limit >= 0 else []) + (["mlp"] if limit >= 1 else [])
        which = draw(st.sampled_from(options))
        if which == "embed":
            return "embed", ["embed"]
        top = limit // 2 if which == "heads" else (limit - 1) // 2
        top = min(top, L - 1)
        a, b = sorted(draw(st.tuples(st.integers(0, top), st.integers(0, top))))
        if which == "mlp":
            return f"{_edge_range(a, b)}.mlp", [f"{x}.mlp" for x in range(a, b + 1)]
        c, d = sorted(draw(st.tuples(st.integers(0, H - 1), st.integers(0, H - 1))))
        return (f"{_edge_range(a, b)}.{_edge_range(c, d)}",
                [f"{x}.{h}" for x in range(a, b + 1) for h in range(c, d + 1)])

    if kind == "all":
        return draw(st.sampled_from(["all", "*>*"])), set(names.edges())
    if kind == "*receiver":
        rtext, rs = receivers()
        return f"*>{rtext}", {f"{s}>{r}" for r in rs for s, ss in stage.items()
                             if ss < rstage[r]}
    if kind == "sender*":
        stext, ss_ = senders(None)  # type: ignore[misc]
        return f"{stext}>*", {f"{s}>{r}" for s in ss_ for r, rs in rstage.items()
                             if stage[s] < rs}
    rtext, rs = receivers()
    first = min(rstage[r] for r in rs)
    stext, ss_ = senders(first)  # type: ignore[misc]
    return f"{stext}>{rtext}", {f"{s}>{r}" for s in ss_ for r in rs}


@st.composite
def edge_plan_texts(draw, names: EdgeNames, max_items: int = 5) -> tuple[str, set[str]]:
    """Edge plan text of 1..max_items items (random case and spacing) and the kept
    edges it must mean: items applied left to right to the empty set."""
    n = draw(st.integers(1, max_items))
    kept: set[str] = set()
    parts = []
    for _ in range(n):
        text, edges = draw(edge_item_specs(names))
        if draw(st.integers(0, 9)) == 0:
            parts.append("none")
            kept = set()
            continue
        remove = bool(kept) and draw(st.integers(0, 2)) == 0  # removals from a non-empty set
        parts.append(("-" if remove else "") + (text.upper() if draw(st.booleans()) else text))
        kept = kept - edges if remove else kept | edges
    sep = draw(st.sampled_from([",", ", ", " , "]))
    return sep.join(parts), kept


@st.composite
def edge_masks(draw, n_edges: int, max_plans: int = 4) -> np.ndarray:
    """Edge masks [P, n_edges]: random, nearly full, nearly empty or structured."""
    P = draw(st.integers(1, max_plans))
    rows = []
    for _ in range(P):
        density = draw(st.sampled_from([0.0, 0.02, 0.2, 0.5, 0.8, 0.98, 1.0]))
        seed = draw(st.integers(0, 2**31 - 1))
        rows.append(np.random.default_rng(seed).random(n_edges) < density)
    return np.stack(rows)
