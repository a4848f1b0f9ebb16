"""What the edge searches share: node circuits in the forms users have them,
the ablation a search patches from, and per-plan metrics of edge plans.

A node circuit is given as kept heads and MLPs: ``{"heads": [[L, h], ...],
"mlps": [L, ...]}`` (the published format), a pair ``(heads, mlps)``, a result of
``prune_nodes`` (``kept_heads``/``kept_mlps``), or a node ``Plan`` (its kept
heads and MLPs; attention output biases stay on in edge plans).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..ablation import Ablation
from ..errors import InputError
from ..plans import EdgeGraph, EdgePlanSet, Plan
from ..plans.edge_set import EdgePlansLike
from ..run import Runner
from .common import AblationArg, Inputs, TaskArg, check_full

CircuitArg = Mapping[str, Any] | tuple[Sequence[Any], Sequence[int]] | Plan | str | Any


@dataclass(frozen=True)
class NodeCircuit:
    """Kept heads ``(L, h)`` and kept MLP layers of a node circuit."""

    heads: tuple[tuple[int, int], ...]
    mlps: tuple[int, ...]

    def senders(self, g: EdgeGraph, embed: bool = True) -> np.ndarray:
        """[n_senders] bool: the circuit's nodes as senders (and the embedding)."""
        out = np.zeros(g.n_senders, dtype=bool)
        out[0] = embed
        for L, h in self.heads:
            out[g.head_sender(L, h)] = True
        for L in self.mlps:
            out[g.mlp_sender(L)] = True
        return out

    def receivers(self, g: EdgeGraph) -> np.ndarray:
        """[n_receivers] bool: the inputs of the circuit's nodes (q of its heads, k
        and v of their key/value heads, its MLPs' inputs) and the logits."""
        out = np.zeros(g.n_receivers, dtype=bool)
        out[g.logits_receiver] = True
        for L, h in self.heads:
            kv = h // g.group_size
            out[[g.q_receiver(L, h), g.k_receiver(L, kv), g.v_receiver(L, kv)]] = True
        for L in self.mlps:
            out[g.mlp_receiver(L)] = True
        return out

    def as_dict(self) -> dict[str, list[Any]]:
        """The published format."""
        return {"heads": [list(h) for h in self.heads], "mlps": list(self.mlps)}


def node_circuit(circuit: CircuitArg, g: EdgeGraph) -> NodeCircuit:
    """A ``NodeCircuit`` from any of the forms in the module docstring, checked
    against the graph (``InputError`` naming a bad head or layer)."""
    if isinstance(circuit, (Plan, str)):
        m = (Plan.parse(circuit) if isinstance(circuit, str) else circuit).bind(
            g.n_layers, g.n_heads).mask
        heads = [(int(L), int(h)) for L, h in zip(*np.nonzero(m.heads & m.attn[:, None]),
                                                  strict=True)]
        mlps = [int(L) for L in np.flatnonzero(m.mlp)]
    elif isinstance(circuit, Mapping):
        if "heads" not in circuit or "mlps" not in circuit:
            raise InputError(f"a circuit mapping needs 'heads' and 'mlps', got keys "
                             f"{sorted(circuit)}")
        heads, mlps = list(circuit["heads"]), list(circuit["mlps"])
    elif isinstance(circuit, tuple) and len(circuit) == 2:
        heads, mlps = list(circuit[0]), list(circuit[1])
    else:
        kept = getattr(circuit, "kept_heads", None), getattr(circuit, "kept_mlps", None)
        if kept[0] is None or kept[1] is None:
            raise InputError("a circuit is {'heads': [[L, h], ...], 'mlps': [L, ...]}, (heads, "
                             f"mlps), a prune_nodes result or a node Plan; got "
                             f"{type(circuit).__name__}")
        heads, mlps = list(kept[0]), list(kept[1])
    out_heads = []
    for item in heads:
        try:
            L, h = (int(v) for v in item)
        except (TypeError, ValueError):
            raise InputError(f"circuit head {item!r} is not a pair [layer, head]") from None
        if not (0 <= L < g.n_layers and 0 <= h < g.n_heads):
            raise InputError(f"circuit head [{L}, {h}] does not exist; the model has layers "
                             f"0-{g.n_layers - 1} and heads 0-{g.n_heads - 1}")
        out_heads.append((L, h))
    out_mlps = []
    for L in mlps:
        if not 0 <= int(L) < g.n_layers:
            raise InputError(f"circuit MLP {L} does not exist; the model has layers "
                             f"0-{g.n_layers - 1}")
        out_mlps.append(int(L))
    return NodeCircuit(tuple(sorted(set(out_heads))), tuple(sorted(set(out_mlps))))


def resolve_edge_ablation(ablation: AblationArg, task: TaskArg) -> Ablation | str | None:
    """``ablation`` as given, except "mean" (the task's ``mean_prompts``, or its
    ``corrupted`` prompts where it has none) and "resample" (its ``corrupted``)."""
    if not isinstance(ablation, str) or ablation not in ("mean", "resample"):
        return ablation
    source = getattr(task, "mean_prompts", None) if ablation == "mean" else None
    source = source or getattr(task, "corrupted", None)
    if not source:
        raise InputError(f"ablation='{ablation}' takes its source prompts from the task "
                         f"(mean_prompts or corrupted); pass a Task or "
                         f"fs.Ablation.{ablation}(prompts)")
    make = Ablation.mean if ablation == "mean" else Ablation.resample
    return make(list(source))


class EdgeMetrics:
    """Mean logit difference (as a fraction of the full model's) and mean KL of
    edge plans, counting runner calls and plans."""

    def __init__(self, runner: Runner, inputs: Inputs, ablation: Ablation | str | None,
                 prepend_bos: bool | None = None):
        self.runner = runner
        self.inputs = inputs
        self.ablation = ablation
        self.prepend_bos = prepend_bos
        self.calls = 0
        self.plans = 0
        self._full: float | None = None

    def mean_logit_diff(self, plans: EdgePlansLike) -> np.ndarray:
        """[P] mean logit difference (two vocabulary columns per prompt)."""
        inp = self.inputs
        diff = self.runner.logit_diff(plans, inp.prompts, inp.answers, inp.wrong_answers,
                                      prepend_bos=self.prepend_bos, ablation=self.ablation)
        self.calls += 1
        self.plans += diff.shape[0]
        return diff.mean(dim=1).double().cpu().numpy()

    @property
    def full(self) -> float:
        """The full model's mean logit difference (> 0, else ``InputError``)."""
        if self._full is None:
            self._full = check_full(float(self.mean_logit_diff(
                EdgePlanSet(np.ones((1, self.runner.edges.n_edges), bool),
                            self.runner.edges))[0]))
        return self._full

    def score(self, plans: EdgePlansLike) -> np.ndarray:
        """[P] mean logit difference as a fraction of the full model's."""
        return self.mean_logit_diff(plans) / self.full

    def kl(self, plans: EdgePlansLike) -> np.ndarray:
        """[P] mean KL(full model || plan) at the first answer position."""
        inp = self.inputs
        res = self.runner.run(plans, inp.prompts, inp.answers, prepend_bos=self.prepend_bos,
                              top_k=0, kl=True, progress=False, ablation=self.ablation)
        self.calls += 1
        self.plans += res.n_plans
        assert res.kl is not None
        return res.kl.float().mean(dim=1).double().cpu().numpy()
