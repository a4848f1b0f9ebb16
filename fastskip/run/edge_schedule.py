"""Scheduling edge plans: which distinct values a set of edge plans needs, and
how to compute each one once (numpy only; ``edge_executor`` runs the program).

Work is shared by *value numbering*. Walking the stages in model order, every
needed receiver input gets an id from its *signature*: for each sender before
it, the id of that sender's value if the edge is kept, else "ablated" (-1).
Equal signatures are equal inputs, computed once, whichever plans and receivers
they belong to; a head's value is keyed by (head, its q, k and v input ids), an
MLP's by its input id. So plans that agree on every edge into receivers up to
layer L share everything up to L, and a plan that differs from another by a few
edges gets new values only downstream of the edges it changes.

Dead code is skipped: a sender none of whose kept out-edges reaches a needed
receiver contributes only its ablation value, so it is never computed
(``liveness``); a circuit of 20 nodes costs 20 nodes, not the model.

Each distinct input X is the stage's ablation baseline A (every sender ablated,
plus the attention output biases) plus, for each kept sender, D = its value
minus its ablation value, computed one of two ways:

* *terms*: ``X = A + sum D[row]`` or, as a correction, ``X = X_ref + sum
  +-D[row]`` where X_ref is the same receiver's input in the reference plan (the
  plan closest to the majority of the set: in leave-one-out, ACDC trials or path
  patching, the base circuit) and the terms are only the senders whose kept
  state or value differs from it;
* *dense*: one matrix product ``X = A + C @ block`` over the plan's *block*, its
  live senders' values laid out in contiguous rows: chosen for a plan's inputs
  of a stage when gathering their terms would read more rows than the product.

Values live in one arena of rows: each plan with a dense input has a block
(shared values are copied into it), other values get a row of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..plans import EdgeGraph
from ..plans.edge_graph import EMBED

GATHER_PASSES = 3  # memory passes of one term (gather, add) against one row of a product


@dataclass
class DenseGroup:
    """Inputs ``first .. first+count-1`` of a stage, computed as
    ``A + coef @ arena[start:start + k]`` (k = coef's columns)."""

    first: int
    count: int
    start: int  # first arena row of the owner plan's block
    coef: np.ndarray  # [count, k] bool over the block's first k rows


@dataclass
class Mixing:
    """How a stage computes its ``n`` distinct receiver inputs, laid out as
    [dense groups][direct: A + terms][corrected: another input + terms]."""

    n: int
    dense: list[DenseGroup]
    direct: tuple[int, int]  # input range
    corrected: tuple[int, int]  # input range
    base: np.ndarray  # [corrected count] the (direct or dense) input each starts from
    term_input: np.ndarray  # [t] the input a term adds to
    term_row: np.ndarray  # [t] the arena row it adds
    term_sign: np.ndarray  # [t] +1 or -1


@dataclass
class Projections:
    """Queries (or keys, or values) to compute: pair i projects input ``inputs[i]``
    with head ``heads[i]`` (sorted by head)."""

    inputs: np.ndarray
    heads: np.ndarray


@dataclass
class AttentionWork:
    """New head values of an attention stage, sorted by head: value ``values[i]``
    of head ``heads[i]`` from projection pairs q[i], k[i], v[i]."""

    values: np.ndarray
    heads: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    queries: Projections
    keys: Projections
    vals: Projections


@dataclass
class StageProgram:
    """One stage: its inputs, the values it makes from them, where they go."""

    stage: int
    kind: str  # "attn", "mlp", "logits"
    layer: int
    mixing: Mixing
    attention: AttentionWork | None = None
    mlp_values: np.ndarray | None = None  # [n] MLP stage: value i from input i
    scatter_value: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scatter_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class EdgeProgram:
    """Everything the executor does for one chunk of plans."""

    n_rows: int  # arena rows
    embed_rows: np.ndarray  # rows that hold the embedding's value
    stages: list[StageProgram]
    final_of_plan: np.ndarray  # [P] logits-stage input of each plan
    n_final: int
    max_inputs: int  # the most inputs one stage holds at once
    n_values: int


def liveness(kept: np.ndarray, g: EdgeGraph) -> tuple[np.ndarray, np.ndarray]:
    """Needed receivers [P, R] and live senders [P, S] of plans with kept edges
    kept [P, R, S]: the logits are needed; a sender is live when a kept edge
    takes it to a needed receiver; a live head needs its q input and its
    key/value head's k and v inputs, a live MLP its input."""
    P = kept.shape[0]
    H, K = g.n_heads, g.n_kv_heads
    need = np.zeros((P, g.n_receivers), dtype=bool)
    live = np.zeros((P, g.n_senders), dtype=bool)
    need[:, g.logits_receiver] = True
    used = kept[:, g.logits_receiver].copy()  # [P, S]: a kept edge into a needed receiver
    for L in reversed(range(g.n_layers)):
        m = g.mlp_sender(L)
        live[:, m] = used[:, m]
        r = g.mlp_receiver(L)
        need[:, r] = live[:, m]
        used |= kept[:, r] & need[:, r, None]
        heads = slice(g.head_sender(L, 0), g.head_sender(L, 0) + H)
        live[:, heads] = used[:, heads]
        q = g.q_receiver(L, 0)
        need[:, q:q + H] = live[:, heads]
        group = live[:, heads].reshape(P, K, H // K).any(axis=2)
        k, v = g.k_receiver(L, 0), g.v_receiver(L, 0)
        need[:, k:k + K] = group
        need[:, v:v + K] = group
        rs = slice(q, q + H + 2 * K)
        used |= (kept[:, rs] & need[:, rs, None]).any(axis=1)
    live[:, EMBED] = used[:, EMBED]
    return need, live


def reference_plan(masks: np.ndarray) -> int:
    """The plan closest (in edges) to the set's majority: the one other plans'
    inputs are written as corrections of."""
    majority = masks.mean(axis=0) > 0.5
    return int((masks != majority).sum(axis=1).argmin())


def stage_receivers(g: EdgeGraph, stage: int) -> np.ndarray:
    return np.flatnonzero(g.receiver_stage == stage)


class _Numbering:
    """Value numbering of a chunk (see the module docstring)."""

    def __init__(self, masks: np.ndarray, g: EdgeGraph):
        self.g = g
        self.kept = g.dense(masks)
        self.P = masks.shape[0]
        self.need, self.live = liveness(self.kept, g)
        self.ref = reference_plan(masks)
        self.val = np.full((self.P, g.n_senders), -1, dtype=np.int64)
        self.val[self.live[:, EMBED], EMBED] = 0  # one embedding value for all
        self.n_values = 1
        self.value_sender = [EMBED]

    def inputs(self, stage: int) -> dict[str, np.ndarray]:
        """Distinct inputs of a stage's needed receivers: per (plan, receiver) pair
        its input id, per input its signature and representative pair."""
        g = self.g
        rs = stage_receivers(g, stage)
        nb = g.senders_before(stage)
        pp, rr = np.nonzero(self.need[:, rs])
        r_abs = rs[rr]
        if len(pp) == 0:
            empty = np.zeros(0, dtype=np.int64)
            return {"pp": empty, "r": empty, "id": empty, "sig": np.zeros((0, nb), np.int64),
                    "rep": empty}
        sig = np.where(self.kept[pp, r_abs, :nb], self.val[pp, :nb], -1)
        uniq, first, inv = np.unique(sig, axis=0, return_index=True, return_inverse=True)
        return {"pp": pp, "r": r_abs, "id": inv.reshape(-1), "sig": uniq, "rep": first}

    def new_values(self, keys: np.ndarray, sender_of_key: np.ndarray) -> np.ndarray:
        """Value ids for rows of ``keys`` (equal keys, equal value): [len(keys)], and
        the distinct keys' (first index, ids) for the work lists."""
        uniq, first, inv = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        ids = self.n_values + np.arange(len(uniq))
        self.n_values += len(uniq)
        self.value_sender += [int(s) for s in sender_of_key[first]]
        return ids[inv.reshape(-1)]


def _formulas(num: _Numbering, info: dict[str, np.ndarray], stage: int) -> dict[str, np.ndarray]:
    """Per distinct input of a stage: its term count, whether it is a correction
    of the reference plan's input of the same receiver (and of which), its owner
    plan; per owner whether one matrix product over its block beats its terms."""
    g = num.g
    sig, rep = info["sig"], info["rep"]
    n = len(sig)
    direct_terms = (sig >= 0).sum(axis=1)
    ref_input = np.full(g.n_receivers, -1, dtype=np.int64)
    is_ref = info["pp"] == num.ref
    ref_input[info["r"][is_ref]] = info["id"][is_ref]
    base = ref_input[info["r"][rep]] if n else np.zeros(0, np.int64)
    own = np.zeros(n, dtype=bool)
    own[info["id"][is_ref]] = True  # the reference's own inputs are never corrections
    can = (base >= 0) & ~own
    ref_sig = sig[np.maximum(base, 0)]
    diff = (sig != ref_sig) & can[:, None]
    corr_terms = (diff & (sig >= 0)).sum(axis=1) + (diff & (ref_sig >= 0)).sum(axis=1)
    use_corr = can & (corr_terms < direct_terms)
    terms = np.where(use_corr, corr_terms, direct_terms)
    owner = info["pp"][rep] if n else np.zeros(0, np.int64)
    # a block product reads the owner's k live senders once; a term gathers a row
    # and adds it (about three passes over it): the product wins past k / 3 terms
    k = num.live[:, :g.senders_before(stage)].sum(axis=1)  # [P]
    per_owner = np.bincount(owner, weights=terms, minlength=num.P)
    dense_owner = GATHER_PASSES * per_owner > np.maximum(k, 2)
    return {"terms": terms, "use_corr": use_corr, "base": base, "diff": diff,
            "ref_sig": ref_sig, "owner": owner, "dense": dense_owner[owner]}


def _mixing(num: _Numbering, info: dict[str, np.ndarray], f: dict[str, np.ndarray],
            stage: int, block_of: dict[int, tuple[int, np.ndarray]], row_of_value: np.ndarray
            ) -> tuple[Mixing, np.ndarray]:
    """A stage's mixing, and ``new_id`` [n]: where each input goes in its layout."""
    sig = info["sig"]
    n = len(sig)
    dense = f["dense"] & np.isin(f["owner"], list(block_of))
    use_corr = f["use_corr"] & ~dense
    direct = ~dense & ~use_corr
    owners = f["owner"]
    order = np.concatenate([np.flatnonzero(dense)[np.argsort(owners[dense], kind="stable")],
                            np.flatnonzero(direct), np.flatnonzero(use_corr)]).astype(np.int64)
    new_id = np.empty(n, dtype=np.int64)
    new_id[order] = np.arange(n)
    groups = []
    at = 0
    for p in np.unique(owners[dense]):
        us = order[at:at + int((owners[dense] == p).sum())]
        start, block_senders = block_of[int(p)]
        k = int(np.searchsorted(block_senders, num.g.senders_before(stage)))
        groups.append(DenseGroup(at, len(us), start, sig[us][:, block_senders[:k]] >= 0))
        at += len(us)
    n_direct = int(direct.sum())
    diff, ref_sig = f["diff"], f["ref_sig"]
    d_in, d_s = np.nonzero((sig >= 0) & direct[:, None])
    c_new_in, c_new_s = np.nonzero(diff & (sig >= 0) & use_corr[:, None])
    c_old_in, c_old_s = np.nonzero(diff & (ref_sig >= 0) & use_corr[:, None])
    term_input = new_id[np.concatenate([d_in, c_new_in, c_old_in])]
    term_value = np.concatenate([sig[d_in, d_s], sig[c_new_in, c_new_s],
                                 ref_sig[c_old_in, c_old_s]])
    term_sign = np.concatenate([np.ones(len(d_in) + len(c_new_in)), -np.ones(len(c_old_in))])
    corrected = np.flatnonzero(use_corr)
    mix = Mixing(n, groups, (at, at + n_direct), (at + n_direct, n),
                 new_id[f["base"][corrected]] if len(corrected) else np.zeros(0, np.int64),
                 term_input.astype(np.int64), row_of_value[term_value].astype(np.int64),
                 term_sign)
    return mix, new_id


def _attention_work(keys: np.ndarray, ids: np.ndarray, new_id: np.ndarray, group: int
                    ) -> tuple[AttentionWork, np.ndarray]:
    """Work of an attention stage from its head values' keys (head, q, k, v inputs)."""
    made, first = np.unique(ids, return_index=True)
    k = keys[first]
    order = np.lexsort((made, k[:, 0]))  # by head, then value id
    made, k = made[order], k[order]
    heads = k[:, 0]

    def pairs(inputs: np.ndarray, of_head: np.ndarray) -> tuple[Projections, np.ndarray]:
        both = np.stack([of_head, new_id[inputs]], axis=1)
        uniq, inv = np.unique(both, axis=0, return_inverse=True)  # sorted by head
        return Projections(uniq[:, 1], uniq[:, 0]), inv.reshape(-1)

    queries, q_at = pairs(k[:, 1], heads)
    keys_, k_at = pairs(k[:, 2], heads // group)
    vals, v_at = pairs(k[:, 3], heads // group)
    return AttentionWork(made, heads, q_at, k_at, v_at, queries, keys_, vals), made


def build_program(masks: np.ndarray, g: EdgeGraph) -> EdgeProgram:
    """The program of edge plans masks [P, n_edges] (see the module docstring)."""
    num = _Numbering(masks, g)
    P, H, K = num.P, g.n_heads, g.n_kv_heads
    n_stages = 2 * g.n_layers + 1
    infos, formulas, made_keys = [], [], []
    needs_block = np.zeros(P, dtype=bool)
    input_of = np.full((P, g.n_receivers), -1, dtype=np.int64)
    # pass 1: number every value, stage by stage
    for stage in range(n_stages):
        info = num.inputs(stage)
        f = _formulas(num, info, stage)
        infos.append(info)
        formulas.append(f)
        input_of[info["pp"], info["r"]] = info["id"]
        needs_block[f["owner"][f["dense"]]] = True
        layer = stage // 2
        if stage == 2 * g.n_layers:
            break
        if stage % 2 == 0:  # attention: a head's value is keyed by its q, k, v inputs
            senders = g.head_sender(layer, 0) + np.arange(H)
            pp, hh = np.nonzero(num.live[:, senders])
            gg = hh // (H // K)
            keys = np.stack([hh, input_of[pp, g.q_receiver(layer, 0) + hh],
                             input_of[pp, g.k_receiver(layer, 0) + gg],
                             input_of[pp, g.v_receiver(layer, 0) + gg]], axis=1)
            ids = num.new_values(keys, senders[hh]) if len(pp) else np.zeros(0, np.int64)
            num.val[pp, senders[hh]] = ids
        else:  # MLP: its value is keyed by its input
            s = g.mlp_sender(layer)
            pp = np.flatnonzero(num.live[:, s])
            keys = input_of[pp, g.mlp_receiver(layer)][:, None]
            ids = num.new_values(keys, np.full(len(pp), s)) if len(pp) else np.zeros(0, np.int64)
            num.val[pp, s] = ids
        made_keys.append((keys, ids))
    # arena rows: a block per plan with a dense input (its live senders in order),
    # then a row for every value that is in no block
    block_of: dict[int, tuple[int, np.ndarray]] = {}
    rows_v, rows_r = [], []
    start = 0
    for p in np.flatnonzero(needs_block):
        senders = np.flatnonzero(num.live[p])
        block_of[int(p)] = (start, senders)
        rows_v.append(num.val[p, senders])
        rows_r.append(start + np.arange(len(senders)))
        start += len(senders)
    in_block = np.zeros(num.n_values, dtype=bool)
    if rows_v:
        in_block[np.concatenate(rows_v)] = True
    loose = np.flatnonzero(~in_block)
    rows_v.append(loose)
    rows_r.append(start + np.arange(len(loose)))
    value_of_row = np.concatenate(rows_v).astype(np.int64)
    row_list = np.concatenate(rows_r).astype(np.int64)
    _, first_row = np.unique(value_of_row, return_index=True)  # values 0..n-1, all present
    row_of_value = row_list[first_row]
    # pass 2: the formulas and work lists, now that the rows are known
    stages = []
    final = np.zeros(P, dtype=np.int64)
    for stage in range(n_stages):
        mix, new_id = _mixing(num, infos[stage], formulas[stage], stage, block_of, row_of_value)
        layer = stage // 2
        if stage == 2 * g.n_layers:
            stages.append(StageProgram(stage, "logits", layer, mix))
            final = new_id[input_of[:, g.logits_receiver]]
            continue
        keys, ids = made_keys[stage]
        if stage % 2 == 0:
            work, made = _attention_work(keys, ids, new_id, H // K)
            program = StageProgram(stage, "attn", layer, mix, attention=work)
        else:
            made = np.empty(mix.n, dtype=np.int64)
            made[new_id[keys[:, 0]]] = ids  # one MLP value per input
            program = StageProgram(stage, "mlp", layer, mix, mlp_values=made)
        sel = np.isin(value_of_row, made)
        program.scatter_value, program.scatter_row = value_of_row[sel], row_list[sel]
        stages.append(program)
    return EdgeProgram(n_rows=start + len(loose), embed_rows=row_list[value_of_row == 0],
                       stages=stages, final_of_plan=final, n_final=len(infos[-1]["sig"]),
                       max_inputs=max(len(i["sig"]) for i in infos), n_values=num.n_values)
