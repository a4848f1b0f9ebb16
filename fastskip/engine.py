"""The Runner: the public entry point that ties the pipeline together.

    model -> stack weights -> plans -> schedule -> execute -> metrics -> Results
"""

from __future__ import annotations

import math
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from . import blocks
from .ablation import (
    Ablation,
    Sources,
    as_ablation,
    sources_for_batch,
    sources_for_tokens,
)
from .errors import FastskipError, InputError, MemoryBudgetError
from .execute import FinalStates, TreeExecutor, format_bytes, one_plan_arena
from .inputs import PromptBatch, check_tokens, make_batch
from .masked import MaskedExecutor
from .metrics import MetricTables
from .ops import StepOps, want_kernels
from .plan import PlanLike
from .planset import PlanSet
from .precision import REDUCED, run_with_exact_ranks
from .results import Results
from .verify import verify_logits, verify_run
from .weights import stack_weights

PlansLike = PlanLike | Sequence[PlanLike] | PlanSet
STRATEGIES = ("tree", "masked")


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


def with_progress(batches: Iterable[FinalStates], total: int, show: bool | None, desc: str
                  ) -> Iterator[FinalStates]:
    """Pass batches through, with a tqdm bar (plans/s) when ``show`` is True, or
    when None and stderr is a terminal and the set is large."""
    if show is None:
        show = total >= 256 and sys.stderr.isatty()
    if not show:
        yield from batches
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="plan", leave=False) as bar:
        for fs in batches:
            yield fs
            bar.update(len(fs.plans))


def _as_list(values: str | Sequence[str]) -> list[str]:
    return [values] if isinstance(values, str) else list(values)


class OverflowWarning(UserWarning):
    """Some plans' logits overflowed (inf/NaN); their ranks are reported as -1."""


def warn_nonfinite(nonfinite: torch.Tensor, ps: PlanSet) -> None:
    """Warn, naming a plan, when some rows overflowed (their ranks are -1)."""
    bad = nonfinite.flatten(1).any(dim=1).nonzero().flatten().tolist()
    if bad:
        warnings.warn(
            f"{len(bad)} of {len(ps)} plans overflow (inf/NaN logits), e.g. plan {bad[0]} "
            f"'{ps.text(bad[0])}'; their ranks are -1 and logits/probabilities NaN "
            "(Results.info['nonfinite'] marks the rows). Many /noln components can let the "
            "residual stream grow without bound.", OverflowWarning, stacklevel=4)


class Runner:
    """Evaluates many plans of one model in batched passes over stacked weights.

    Args:
        model: a TransformerLens ``HookedTransformer`` of a supported architecture
            (``fs.load_model`` gives one).
        device, dtype: where and in which precision to run (default: the model's).
        max_memory: budget for activations ("2GB", bytes); work is chunked to fit.
            Default: a quarter of RAM (at most 4 GiB) on CPU, half the free GPU memory.
        strategy: "tree" (prefix sharing, the default) or "masked" (every plan
            computes every component and masks it: the naive baseline).
        compile: ``torch.compile`` the block updates (default: on CUDA only; on
            CPU it is optional and the first call pays the compile time, reported
            on stderr and in ``runner.compile_seconds``).
        kernels: use the fused Triton MLP kernels (default: on CUDA when the
            model's MLP is covered; see ``fastskip.kernels``).
        exact_ranks: with dtype bfloat16/float16, recompute in fp32 every plan
            whose rank the reduced precision leaves ambiguous (``fastskip.precision``).
        verify: re-check this many random plans of every call against the
            TransformerLens reference and raise ``CheckError`` on disagreement
            (``fastskip.verify``).
    """

    def __init__(self, model: Any, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, max_memory: int | str | None = None,
                 strategy: str = "tree", compile: bool | None = None,
                 kernels: bool | None = None, verbose: bool = True, exact_ranks: bool = True,
                 verify: int = 0):
        if strategy not in STRATEGIES:
            raise FastskipError(f"strategy must be one of {STRATEGIES}, got '{strategy}'")
        if not (hasattr(model, "cfg") and hasattr(model, "blocks")):  # a HookedTransformer
            hint = f" (load it first: fs.load_model({model!r}))" if isinstance(model, str) else ""
            raise FastskipError(f"Runner needs a TransformerLens HookedTransformer, got "
                                f"{type(model).__name__}{hint}")
        if device is not None and torch.device(device).type == "meta":
            raise FastskipError("device 'meta' holds no values; use 'cpu' or 'cuda'")
        self.model = model
        self.weights = stack_weights(model, device=device, dtype=dtype)
        self.device = self.weights.device
        self.dtype = self.weights.dtype
        self.strategy = strategy
        self.max_memory = parse_memory(max_memory) or default_memory(self.device)
        if compile is None:
            compile = self.device.type == "cuda"
        self.ops = StepOps(self.weights, compile=bool(compile),
                           kernels=want_kernels(self.weights, kernels), verbose=verbose)
        self.exact_ranks = exact_ranks and self.dtype in REDUCED
        self._options = dict(max_memory=self.max_memory, strategy=strategy, compile=compile,
                             kernels=kernels, verbose=verbose)
        self._exact: Runner | None = None
        self._diff_cache: tuple[Any, ...] | None = None
        if not isinstance(verify, int) or verify < 0:
            raise FastskipError(f"verify must be a number of plans >= 0, got {verify!r}")
        self.verify = verify
        self._calls = 0

    def exact_runner(self) -> Runner:
        """An fp32 runner over the same model and device (made once, on demand)."""
        if self.dtype == torch.float32:
            return self
        if self._exact is None:
            self._exact = Runner(self.model, device=self.device, dtype=torch.float32,
                                 **self._options)  # type: ignore[arg-type]
        return self._exact

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling so far (0 when not compiled)."""
        return self.ops.compile_seconds

    # -- sizes ---------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.weights.n_layers

    @property
    def n_heads(self) -> int:
        return self.weights.n_heads

    @property
    def model_name(self) -> str:
        return str(getattr(self.model.cfg, "model_name", ""))

    def plan_set(self, plans: PlansLike) -> PlanSet:
        """Bind plans to this model: a ``PlanSet`` (raises ``PlanError`` on bad plans)."""
        return PlanSet.from_plans(plans, self.n_layers, self.n_heads)

    # -- core ----------------------------------------------------------------
    def memory_sizes(self, plans: PlanSet, B: int, T: int, Q: int, zero_ablation: bool = True
                     ) -> tuple[int, int, int]:
        """Bytes per state in a matmul batch, per final state in an unembedding
        batch, and of the residual-stream states one plan of ``plans`` needs,
        for B prompts of T tokens with Q asked positions. Their sum is the
        smallest ``max_memory`` under which the plans run."""
        w = self.weights
        elem = torch.finfo(self.dtype).bits // 8
        # activations of one state in a matmul batch: q/k/v, MLP hidden, scores, copies
        per_row = B * T * elem * (3 * w.n_heads * w.d_head + 2 * w.d_mlp + 6 * w.d_model) + \
            B * w.n_heads * T * T * 4 * 2
        # logits + fp32 copy + comparison mask for one final state
        per_final = B * Q * w.d_vocab_out * (elem + 4 + 1 + 4)
        full_bytes, small_bytes = B * T * w.d_model * elem, B * Q * w.d_model * elem
        if self.strategy == "masked":
            states = 3 * full_bytes  # x, its normalised copy and the block output
        else:
            states = one_plan_arena(plans, full_bytes, small_bytes, zero_ablation)
        return per_row, per_final, states

    def final_states(self, plans: PlanSet, tokens: torch.Tensor, q_pos: torch.Tensor,
                     sources: Sources | None = None) -> Iterator[FinalStates]:
        """Final residual streams of every plan at positions ``q_pos`` [B, Q],
        in batches sized to the memory budget; ``sources`` = what skipped
        components contribute (None: zero ablation). Raises ``MemoryBudgetError``
        before any work when one plan cannot fit in ``max_memory``."""
        w = self.weights
        B, T = tokens.shape
        Q = q_pos.shape[1]
        budget = self.max_memory
        per_row, per_final, states = self.memory_sizes(plans, B, T, Q, sources is None)
        max_rows = int(np.clip(budget // 4 // max(per_row, 1), 1, 4096))
        unembed_rows = int(np.clip(budget // 4 // max(per_final, 1), 1, 4096))
        # what is left holds the residual-stream states; one plan must fit (with
        # batches of one if need be)
        arena_bytes = budget - max_rows * per_row - unembed_rows * per_final
        if arena_bytes < states:
            max_rows = unembed_rows = 1
            arena_bytes = budget - per_row - per_final
        if arena_bytes < states:
            need = states + per_row + per_final
            raise MemoryBudgetError(
                f"one plan needs {format_bytes(need)} for {B} x {T} tokens (states "
                f"{format_bytes(states)}, matmul activations {format_bytes(per_row)}, logits "
                f"{format_bytes(per_final)} for {Q} asked positions) but max_memory is "
                f"{format_bytes(budget)}; raise max_memory to at least {need} bytes or use "
                "fewer/shorter prompts"
            )
        if self.strategy == "masked":
            return MaskedExecutor(w, chunk=max_rows, ops=self.ops).run(
                plans, tokens, q_pos, unembed_rows, sources)
        return TreeExecutor(w, max_rows=max_rows, ops=self.ops).run(
            plans, tokens, q_pos, unembed_rows, arena_bytes=arena_bytes, sources=sources)

    def sources(self, ablation: Ablation | None, batch: PromptBatch) -> Sources | None:
        """What skipped components contribute for this batch (None: zero)."""
        if ablation is None:
            return None
        return sources_for_batch(ablation, self.model, self.weights, batch)

    def _check_verifiable(self, ablation: Ablation | None) -> None:
        """``verify`` rebuilds the ablation with hooks, which needs its tokens."""
        if self.verify and ablation is not None and ablation.tokens is None:
            raise InputError("verify needs the ablation as tokens (fs.Ablation.mean(tokens=...) "
                             "or fs.Ablation.resample(tokens=...)) to rebuild it with hooks; "
                             "tokenize the ablation prompts with model.to_tokens")

    @torch.no_grad()
    def logits(self, plans: PlansLike, tokens: torch.Tensor, last_only: bool = False,
               progress: bool | None = None, ablation: Ablation | str | None = None
               ) -> torch.Tensor:
        """Logits of every plan: [P, B, T, d_vocab] (``last_only``: [P, B, d_vocab]).

        tokens: LongTensor [B, T] (or [T]); all positions are real tokens.
        ``ablation``: "zero" (default) or an ``fs.Ablation`` given as tokens.
        """
        ps = self.plan_set(plans)
        tokens = check_tokens(tokens, self.weights.d_vocab, self.weights.n_ctx, self.device)
        abl = as_ablation(ablation)
        sources = None if abl is None else sources_for_tokens(abl, self.weights, tokens)
        B, T = tokens.shape
        pos = torch.arange(T, device=self.device)
        q_pos = (pos[-1:] if last_only else pos)[None].expand(B, -1).contiguous()
        out = torch.empty((len(ps), B, q_pos.shape[1], self.weights.d_vocab_out),
                          dtype=self.dtype, device=self.device)
        for fs in with_progress(self.final_states(ps, tokens, q_pos, sources), len(ps),
                                progress, "logits"):
            logits = blocks.unembed(fs.states, self.weights)
            out[torch.as_tensor(fs.plans, device=self.device)] = logits[
                torch.as_tensor(fs.row_of, device=self.device)]
        self.ops.report_compile()
        if self.verify:
            self._calls += 1
            verify_logits(self, ps, tokens, out, self.verify, self._calls, abl)
        return out[:, :, 0] if last_only else out

    @torch.no_grad()
    def run(self, plans: PlansLike, prompts: str | Sequence[str], answers: str | Sequence[str],
            prepend_bos: bool | None = None, top_k: int = 10,
            prepend_space_to_answer: bool = False,
            wrong_answers: str | Sequence[str] | None = None, kl: bool = False,
            progress: bool | None = None, ablation: Ablation | str | None = None) -> Results:
        """Rank / logit / probability / top-k of every answer token, for every plan.

        Multi-token answers are teacher-forced (each answer token is predicted
        from the prompt and the answer tokens before it). ``prepend_bos``
        defaults to the model's setting.

        ``wrong_answers`` (one per prompt) adds ``Results.logit_diff`` [P, N]:
        logit of the answer's first token minus that of the wrong answer's first
        token, at the first answer position. ``kl=True`` adds ``Results.kl``
        [P, N]: KL(full model || plan) of the next-token distributions there.
        ``progress``: a progress bar (default: on a terminal, for >= 256 plans).
        ``ablation``: what skipped components contribute: "zero" (default) or
        ``fs.Ablation.mean(prompts)`` / ``fs.Ablation.resample(corrupted_prompts)``.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
            raise InputError(f"top_k must be a whole number >= 0, got {top_k!r}")
        if top_k < 0:
            raise InputError(f"top_k must be >= 0, got {top_k}")
        top_k = int(top_k)
        ps = self.plan_set(plans)
        batch = make_batch(self.model, prompts, answers, prepend_bos=prepend_bos,
                           prepend_space_to_answer=prepend_space_to_answer, device=self.device)
        wrong = None
        if wrong_answers is not None:
            wrong = make_batch(self.model, prompts, wrong_answers, prepend_bos=prepend_bos,
                               prepend_space_to_answer=prepend_space_to_answer,
                               device=self.device, what="wrong_answers").answer_ids[:, 0]
        abl = as_ablation(ablation)
        self._check_verifiable(abl)
        if self.exact_ranks:
            res = run_with_exact_ranks(self, ps, batch, top_k, wrong, kl, progress, abl)
        else:
            res = self._run_batch(ps, batch, top_k, wrong, kl, progress, ablation=abl)
        if self.verify:
            self._calls += 1
            verify_run(self, ps, batch, res, self.verify, self._calls, abl)
        return res

    def asked_logits(self, ps: PlanSet, batch: PromptBatch, ablation: Ablation | None = None
                     ) -> torch.Tensor:
        """Logits [P, N, A, V] at the answer positions of ``batch``."""
        out = torch.empty((len(ps), *batch.answer_ids.shape, self.weights.d_vocab_out),
                          dtype=self.dtype, device=self.device)
        sources = self.sources(ablation, batch)
        for fs in self.final_states(ps, batch.tokens, batch.q_pos, sources):
            out[torch.as_tensor(fs.plans, device=self.device)] = blocks.unembed(
                fs.states, self.weights)[torch.as_tensor(fs.row_of, device=self.device)]
        return out

    @torch.no_grad()
    def logit_diff(self, plans: PlansLike, prompts: str | Sequence[str],
                   answers: str | Sequence[str], wrong_answers: str | Sequence[str],
                   prepend_bos: bool | None = None, prepend_space_to_answer: bool = False,
                   ablation: Ablation | str | None = None, progress: bool | None = False
                   ) -> torch.Tensor:
        """Logit of each answer's first token minus the wrong answer's first token,
        at the first answer position: [P, N] (fp32 values).

        The fast path for searches: it unembeds two vocabulary columns per prompt
        instead of the whole vocabulary, and reuses the tokenized prompts (and
        ablation sources) of the previous call with the same inputs.
        """
        ps = self.plan_set(plans)
        key = (tuple(_as_list(prompts)), tuple(_as_list(answers)),
               tuple(_as_list(wrong_answers)), prepend_bos, prepend_space_to_answer,
               id(ablation) if ablation is not None else None)
        if self._diff_cache is None or self._diff_cache[0] != key:
            batch = make_batch(self.model, prompts, answers, prepend_bos=prepend_bos,
                               prepend_space_to_answer=prepend_space_to_answer,
                               device=self.device)
            wrong = make_batch(self.model, prompts, wrong_answers, prepend_bos=prepend_bos,
                               what="wrong_answers",
                               prepend_space_to_answer=prepend_space_to_answer,
                               device=self.device).answer_ids[:, 0]
            cols = torch.stack([batch.answer_ids[:, 0], wrong], dim=1)  # [N, 2]
            sources = self.sources(as_ablation(ablation), batch)
            # the ablation object is kept alive so that its id cannot be reused
            self._diff_cache = (key, batch, cols, sources, ablation)
        _, batch, cols, sources, _ = self._diff_cache
        w = self.weights
        W = w.W_U.T[cols].transpose(1, 2)  # [N, d, 2]: the two columns of each prompt
        b = w.b_U[cols]  # [N, 2]
        out = torch.empty((len(ps), len(batch.prompts)), dtype=torch.float32, device=self.device)
        q_pos = batch.q_pos[:, :1]
        for fs in with_progress(self.final_states(ps, batch.tokens, q_pos, sources), len(ps),
                                progress, "plans"):
            x = blocks.normalize(fs.states[:, :, 0], w.lnf_w, w.lnf_b, w.config, True)
            two = torch.einsum("mnd,ndk->mnk", x, W) + b  # [m, N, 2]
            diff = (two[..., 0] - two[..., 1]).float()
            out[torch.as_tensor(fs.plans, device=self.device)] = diff[
                torch.as_tensor(fs.row_of, device=self.device)]
        self.ops.report_compile()
        return out

    def _full_logprobs(self, batch: PromptBatch) -> torch.Tensor:
        """Log-probabilities [N, V] of the full model at the first answer positions."""
        full = self.plan_set(["all"])
        fs = next(iter(self.final_states(full, batch.tokens, batch.q_pos[:, :1])))
        return blocks.unembed(fs.states[0, :, 0], self.weights).float().log_softmax(-1)

    def _run_batch(self, ps: PlanSet, batch: PromptBatch, top_k: int,
                   wrong: torch.Tensor | None = None, kl: bool = False,
                   progress: bool | None = None, window: float = 0.0,
                   ablation: Ablation | None = None) -> Results:
        k = min(top_k, self.weights.d_vocab_out)
        N, A = batch.answer_ids.shape
        tables = MetricTables(len(ps), batch.answer_ids, k, wrong,
                              self._full_logprobs(batch) if kl else None, window)
        sources = self.sources(ablation, batch)
        for fs in with_progress(self.final_states(ps, batch.tokens, batch.q_pos, sources),
                                len(ps), progress, "plans"):
            logits = blocks.unembed(fs.states, self.weights)
            tables.add(logits, torch.as_tensor(fs.plans, device=self.device),
                       torch.as_tensor(fs.row_of, device=self.device))
        self.ops.report_compile()
        tables.mask_padding(batch.answer_mask)
        warn_nonfinite(tables.nonfinite, ps)
        logit_diff = None
        if tables.wrong_logit is not None:
            logit_diff = tables.logit[:, :, 0] - tables.wrong_logit
        return Results(
            plans=ps.lazy_texts(), prompts=batch.prompts, answers=batch.answers,
            answer_str_tokens=batch.answer_str_tokens, prompt_str_tokens=batch.prompt_str_tokens,
            answer_ids=batch.answer_ids, answer_mask=batch.answer_mask, rank=tables.rank,
            logit=tables.logit, prob=tables.logprob.exp(), topk_ids=tables.topk_ids,
            topk_logits=tables.topk_logits, topk_probs=tables.topk_logprobs.exp(),
            model_name=self.model_name, logit_diff=logit_diff, kl=tables.kl,
            info={"compile_seconds": self.compile_seconds, "ambiguous": tables.ambiguous,
                  "nonfinite": tables.nonfinite},
        )
