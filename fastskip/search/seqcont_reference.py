"""The seqcont circuit search, sequentially, with TransformerLens hooks: the
reference that ``prune_nodes(..., algorithm="seqcont")`` is tested and timed
against. Written from the paper's code (apartresearch/seqcont_circuits,
``src/iter_node_pruning``: ``find_circuit_backw``, ``find_circuit_forw``,
``add_ablation_hook_MLP_head``), independently of fastskip's fast path:

* tokens: ``model.to_tokens(prompts, prepend_bos=False)``; answers are the first
  tokens of ``corr`` / ``incorr``; the score is the mean of logit(corr) -
  logit(incorr) at the last position, as a percentage of the full model's;
* per trial, one pass over the mean prompts with every head outside the trial's
  circuit set to its mean z (``hook_z``; means of the full model, computed once:
  they never change) gives the MLP means (``hook_mlp_out``, every MLP intact),
  then one ``run_with_hooks`` over the prompts with those heads and the MLPs
  outside the circuit at their means gives the logits (all positions, as the
  paper's ``model(dataset.toks)``);
* order and rule as the paper's loops (see ``fastskip.search.seqcont``).

Rows are run in chunks of ``chunk`` prompts (the paper runs them in one batch on
a GPU): the same numbers to fp32 round-off, in bounded memory on a CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import InputError
from .common import TaskArg, check_full, mean_prompts_of, resolve_inputs
from .nodes import PruneResult, Step, state_plan

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

Hook = tuple[str | Callable[..., Any], Callable[..., Any]]  # (hook name, function)


def _set_heads(removed: list[int], mean: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A ``hook_z`` hook: heads ``removed`` take their mean z [T, H, dh]."""
    def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z[:, :, removed] = mean[None, : z.shape[1], removed]
        return z
    return hook


def _set_output(mean: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A ``hook_mlp_out`` hook: the MLP outputs its mean [T, d]."""
    def hook(out: torch.Tensor, hook: Any) -> torch.Tensor:
        return mean[None, : out.shape[1]].expand_as(out).clone()
    return hook


class SeqcontReference:
    """Trials of the seqcont search with TransformerLens hooks, one at a time."""

    def __init__(self, model: HookedTransformer, prompts: list[str], answers: list[str],
                 wrong_answers: list[str], mean_prompts: list[str], chunk: int = 64):
        self.model, self.chunk = model, chunk
        self.L, self.H = model.cfg.n_layers, model.cfg.n_heads
        self.tokens = model.to_tokens(prompts, prepend_bos=False)
        lengths = {int(model.to_tokens(p, prepend_bos=False).shape[1]) for p in prompts}
        mean_lengths = {int(model.to_tokens(p, prepend_bos=False).shape[1])
                        for p in mean_prompts}
        if len(lengths) != 1 or min(mean_lengths) < self.tokens.shape[1]:
            raise InputError("the reference takes prompts of one token length and mean prompts "
                             "at least that long")
        T = self.tokens.shape[1]
        self.mean_tokens = torch.cat([model.to_tokens(p, prepend_bos=False)[:, :T]
                                      for p in mean_prompts])
        first = lambda xs: torch.tensor([int(model.to_tokens(a, prepend_bos=False)[0, 0])  # noqa: E731
                                         for a in xs], device=self.tokens.device)
        self.corr, self.incorr = first(answers), first(wrong_answers)
        self.timing = {"means_s": 0.0, "trials_s": 0.0}
        self.z_mean = self._means([], "attn.hook_z")  # the full model's, once

    def _means(self, hooks: list[Hook], name: str) -> dict[int, torch.Tensor]:
        """Per-position means over the mean prompts of every ``blocks.L.<name>``
        activation, under ``hooks``."""
        sums: dict[int, torch.Tensor] = {}

        def add(layer: int) -> Callable[..., None]:
            def hook(act: torch.Tensor, hook: Any) -> None:
                s = act.sum(0)
                sums[layer] = s if layer not in sums else sums[layer] + s
            return hook
        saving: list[Hook] = [(f"blocks.{layer}.{name}", add(layer)) for layer in range(self.L)]
        for a in range(0, len(self.mean_tokens), self.chunk):
            self.model.run_with_hooks(self.mean_tokens[a:a + self.chunk], return_type=None,
                                      fwd_hooks=hooks + saving)
        return {layer: s / len(self.mean_tokens) for layer, s in sums.items()}

    def head_hooks(self, heads: set[tuple[int, int]]) -> list[Hook]:
        hooks: list[Hook] = []
        for layer in range(self.L):
            removed = [h for h in range(self.H) if (layer, h) not in heads]
            if removed:
                hooks.append((f"blocks.{layer}.attn.hook_z",
                              _set_heads(removed, self.z_mean[layer])))
        return hooks

    @torch.no_grad()
    def mean_logit_diff(self, heads: set[tuple[int, int]], mlps: set[int]) -> float:
        """The circuit's mean logit difference (plain float)."""
        return float(self.logit_diffs(heads, mlps).mean())

    @torch.no_grad()
    def logit_diffs(self, heads: set[tuple[int, int]], mlps: set[int]) -> torch.Tensor:
        """logit(corr) - logit(incorr) at the last position per prompt [N] of the
        circuit keeping ``heads`` ((layer, head) pairs) and ``mlps`` (layers)."""
        start = time.perf_counter()
        z_hooks = self.head_hooks(heads)
        mlp_means = self._means(z_hooks, "hook_mlp_out")  # as the paper: every layer, every trial
        middle = time.perf_counter()
        hooks = z_hooks + [(f"blocks.{layer}.hook_mlp_out", _set_output(mlp_means[layer]))
                           for layer in range(self.L) if layer not in mlps]
        diffs = []
        for a in range(0, len(self.tokens), self.chunk):
            logits = self.model.run_with_hooks(self.tokens[a:a + self.chunk], fwd_hooks=hooks)
            rows = torch.arange(logits.shape[0])
            last = logits[:, -1].float()
            diffs.append(last[rows, self.corr[a:a + self.chunk]]
                         - last[rows, self.incorr[a:a + self.chunk]])
        self.timing["means_s"] += middle - start
        self.timing["trials_s"] += time.perf_counter() - middle
        return torch.cat(diffs)

    @torch.no_grad()
    def full_logit_diff(self) -> float:
        diffs = []
        for a in range(0, len(self.tokens), self.chunk):
            last = self.model(self.tokens[a:a + self.chunk])[:, -1].float()
            rows = torch.arange(last.shape[0])
            diffs.append(last[rows, self.corr[a:a + self.chunk]]
                         - last[rows, self.incorr[a:a + self.chunk]])
        return float(torch.cat(diffs).mean())


def prune_nodes_seqcont_reference(
        model: HookedTransformer, task: TaskArg = None, *, prompts: Sequence[str] | None = None,
        answers: Sequence[str] | None = None, wrong_answers: Sequence[str] | None = None,
        mean_prompts: Sequence[str] | None = None, threshold: float = 0.8,
        max_trials: int | None = None, max_passes: int | None = None, chunk: int = 64
) -> PruneResult:
    """The paper's iterative node pruning, one TransformerLens trial at a time.

    Arguments as ``prune_nodes(..., algorithm="seqcont")``; ``max_trials`` stops
    after that many trials (to time a prefix); ``stats`` holds the seconds spent
    in mean-prompt passes (``means_s``) and in the trials' forwards (``trials_s``).
    """
    inp = resolve_inputs(task, prompts, answers, wrong_answers)
    means = list(mean_prompts) if mean_prompts is not None else mean_prompts_of(task)
    if not means:
        raise InputError("the seqcont search needs mean prompts (task.mean_prompts, "
                         "task.corrupted or mean_prompts=)")
    ref = SeqcontReference(model, inp.prompts, inp.answers, inp.wrong_answers, means, chunk)
    L, H = ref.L, ref.H
    orig = check_full(ref.full_logit_diff())
    limit = round(100 * (1 - threshold), 9)  # the paper's integer threshold, e.g. 20
    heads = [(layer, h) for layer in range(L) for h in range(H)]
    mlps = list(range(L))
    trace: list[Step] = []
    circuit = [100.0]
    stop = False

    def trial(cand_heads: list[tuple[int, int]], cand_mlps: list[int], name: str,
              pass_no: int) -> bool:
        nonlocal stop
        if max_trials is not None and len(trace) >= max_trials:
            stop = True
            return False
        perc = 100 * ref.mean_logit_diff(set(cand_heads), set(cand_mlps)) / orig
        removed = (100 - perc) < limit
        if removed:
            circuit[0] = perc
        trace.append(Step(name, removed, perc / 100, circuit[0] / 100, pass_no))
        return removed

    def backward(pass_no: int) -> None:
        for layer in range(L - 1, -1, -1):
            if layer in mlps and trial(heads, [m for m in mlps if m != layer],
                                       f"{layer}.mlp", pass_no):
                mlps.remove(layer)
            for head in range(H):
                if (layer, head) in heads and trial([c for c in heads if c != (layer, head)],
                                                    mlps, f"{layer}.{head}", pass_no):
                    heads.remove((layer, head))

    def forward(pass_no: int) -> None:
        for layer in range(L):
            for head in range(H):
                if (layer, head) in heads and trial([c for c in heads if c != (layer, head)],
                                                    mlps, f"{layer}.{head}", pass_no):
                    heads.remove((layer, head))
            if layer in mlps and trial(heads, [m for m in mlps if m != layer],
                                       f"{layer}.mlp", pass_no):
                mlps.remove(layer)

    passes = 0
    while not stop and (max_passes is None or passes < max_passes):
        passes += 1
        before = (list(heads), list(mlps))
        (backward if passes % 2 else forward)(passes)
        if (heads, mlps) == before:
            break
    kept = np.zeros((L, H), dtype=bool)
    for layer, h in heads:
        kept[layer, h] = True
    kept_mlps = np.isin(np.arange(L), mlps)
    final = ref.mean_logit_diff(set(heads), set(mlps)) / orig
    return PruneResult(
        plan=state_plan((kept, kept_mlps)), kept_heads=list(heads), kept_mlps=list(mlps),
        score=final, trace=trace, threshold=threshold, full_logit_diff=orig,
        stats=dict(run_with_hooks_calls=2 * (len(trace) + 1) + 1, passes=passes,
                   means_s=ref.timing["means_s"], trials_s=ref.timing["trials_s"]),
        passes=passes, algorithm="seqcont")
