"""The Runner: the public entry point that ties the pipeline together.

    model -> stack weights -> plans -> schedule -> execute -> metrics -> Results
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from . import blocks
from .errors import FastskipError, InputError
from .execute import FinalStates, TreeExecutor
from .inputs import PromptBatch, check_tokens, make_batch
from .masked import MaskedExecutor
from .metrics import answer_metrics
from .ops import StepOps, want_kernels
from .plan import PlanLike
from .planset import PlanSet
from .results import Results
from .weights import stack_weights

PlansLike = PlanLike | Sequence[PlanLike] | PlanSet
STRATEGIES = ("tree", "masked")


def parse_memory(value: int | float | str | None) -> int | None:
    """Bytes from 2_000_000_000, 2e9, "2GB", "512MiB" (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        if value <= 0:
            raise FastskipError(f"max_memory must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?i?b?)\s*", str(value).lower())
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
    """

    def __init__(self, model: Any, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, max_memory: int | str | None = None,
                 strategy: str = "tree", compile: bool | None = None,
                 kernels: bool | None = None, verbose: bool = True):
        if strategy not in STRATEGIES:
            raise FastskipError(f"strategy must be one of {STRATEGIES}, got '{strategy}'")
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
    def final_states(self, plans: PlanSet, tokens: torch.Tensor, q_pos: torch.Tensor
                     ) -> Iterator[FinalStates]:
        """Final residual streams of every plan at positions ``q_pos`` [B, Q],
        in batches sized to the memory budget."""
        w = self.weights
        B, T = tokens.shape
        Q = q_pos.shape[1]
        elem = torch.finfo(self.dtype).bits // 8
        budget = self.max_memory
        # activations of one state in a matmul batch: q/k/v, MLP hidden, scores, copies
        per_row = B * T * elem * (3 * w.n_heads * w.d_head + 2 * w.d_mlp + 6 * w.d_model) + \
            B * w.n_heads * T * T * 4 * 2
        max_rows = int(np.clip(budget // 4 // max(per_row, 1), 1, 4096))
        # logits + fp32 copy + comparison mask for one final state
        per_final = B * Q * w.d_vocab_out * (elem + 4 + 1 + 4)
        unembed_rows = int(np.clip(budget // 4 // max(per_final, 1), 1, 4096))
        if self.strategy == "masked":
            return MaskedExecutor(w, chunk=max_rows, ops=self.ops).run(plans, tokens, q_pos,
                                                                      unembed_rows)
        return TreeExecutor(w, max_rows=max_rows, ops=self.ops).run(
            plans, tokens, q_pos, unembed_rows, arena_bytes=budget // 2)

    @torch.no_grad()
    def logits(self, plans: PlansLike, tokens: torch.Tensor, last_only: bool = False,
               progress: bool | None = None) -> torch.Tensor:
        """Logits of every plan: [P, B, T, d_vocab] (``last_only``: [P, B, d_vocab]).

        tokens: LongTensor [B, T] (or [T]); all positions are real tokens.
        """
        ps = self.plan_set(plans)
        tokens = check_tokens(tokens, self.weights.d_vocab, self.weights.n_ctx, self.device)
        B, T = tokens.shape
        pos = torch.arange(T, device=self.device)
        q_pos = (pos[-1:] if last_only else pos)[None].expand(B, -1).contiguous()
        out = torch.empty((len(ps), B, q_pos.shape[1], self.weights.d_vocab_out),
                          dtype=self.dtype, device=self.device)
        for fs in with_progress(self.final_states(ps, tokens, q_pos), len(ps), progress,
                                "logits"):
            logits = blocks.unembed(fs.states, self.weights)
            out[torch.as_tensor(fs.plans, device=self.device)] = logits[
                torch.as_tensor(fs.row_of, device=self.device)]
        self.ops.report_compile()
        return out[:, :, 0] if last_only else out

    @torch.no_grad()
    def run(self, plans: PlansLike, prompts: str | Sequence[str], answers: str | Sequence[str],
            prepend_bos: bool | None = None, top_k: int = 10,
            prepend_space_to_answer: bool = False,
            wrong_answers: str | Sequence[str] | None = None, kl: bool = False,
            progress: bool | None = None) -> Results:
        """Rank / logit / probability / top-k of every answer token, for every plan.

        Multi-token answers are teacher-forced (each answer token is predicted
        from the prompt and the answer tokens before it). ``prepend_bos``
        defaults to the model's setting.

        ``wrong_answers`` (one per prompt) adds ``Results.logit_diff`` [P, N]:
        logit of the answer's first token minus that of the wrong answer's first
        token, at the first answer position. ``kl=True`` adds ``Results.kl``
        [P, N]: KL(full model || plan) of the next-token distributions there.
        ``progress``: a progress bar (default: on a terminal, for >= 256 plans).
        """
        ps = self.plan_set(plans)
        batch = make_batch(self.model, prompts, answers, prepend_bos=prepend_bos,
                           prepend_space_to_answer=prepend_space_to_answer, device=self.device)
        if top_k < 0:
            raise InputError(f"top_k must be >= 0, got {top_k}")
        wrong = None
        if wrong_answers is not None:
            wrong = make_batch(self.model, prompts, wrong_answers, prepend_bos=prepend_bos,
                               prepend_space_to_answer=prepend_space_to_answer,
                               device=self.device).answer_ids[:, 0]
        return self._run_batch(ps, batch, top_k, wrong, kl, progress)

    def _full_logprobs(self, batch: PromptBatch) -> torch.Tensor:
        """Log-probabilities [N, V] of the full model at the first answer positions."""
        full = self.plan_set(["all"])
        fs = next(iter(self.final_states(full, batch.tokens, batch.q_pos[:, :1])))
        return blocks.unembed(fs.states[0, :, 0], self.weights).float().log_softmax(-1)

    def _run_batch(self, ps: PlanSet, batch: PromptBatch, top_k: int,
                   wrong: torch.Tensor | None = None, kl: bool = False,
                   progress: bool | None = None) -> Results:
        P, (N, A) = len(ps), batch.answer_ids.shape
        k = min(top_k, self.weights.d_vocab_out)
        dev = self.device
        rank = torch.full((P, N, A), -1, dtype=torch.long, device=dev)
        logit = torch.full((P, N, A), float("nan"), device=dev)
        logprob = torch.full((P, N, A), float("nan"), device=dev)
        topk_ids = torch.full((P, N, A, k), -1, dtype=torch.long, device=dev)
        topk_logits = torch.full((P, N, A, k), float("nan"), device=dev)
        topk_logprobs = torch.full((P, N, A, k), float("nan"), device=dev)
        extra: dict[str, torch.Tensor] = {}
        if wrong is not None:
            extra["wrong_logit"] = torch.full((P, N), float("nan"), device=dev)
        if kl:
            extra["kl"] = torch.full((P, N), float("nan"), device=dev)
            full_lp = self._full_logprobs(batch)
        for fs in with_progress(self.final_states(ps, batch.tokens, batch.q_pos), P, progress,
                                "plans"):
            m = fs.states.shape[0]
            logits = blocks.unembed(fs.states, self.weights).reshape(m * N * A, -1)
            met = answer_metrics(logits, batch.answer_ids.reshape(-1).repeat(m), k)
            plans_t = torch.as_tensor(fs.plans, device=dev)
            rows_t = torch.as_tensor(fs.row_of, device=dev)
            first = logits.view(m, N, A, -1)[:, :, 0]  # [m, N, V] at the first answer position
            if wrong is not None:
                wl = first.gather(2, wrong[None, :, None].expand(m, N, 1))[..., 0].float()
                extra["wrong_logit"][plans_t] = wl[rows_t]
            if kl:
                lp = first.float().log_softmax(-1)
                div = (full_lp.exp()[None] * (full_lp[None] - lp)).sum(-1)
                extra["kl"][plans_t] = div[rows_t]
            rank[plans_t] = met.rank.view(m, N, A)[rows_t]
            logit[plans_t] = met.logit.view(m, N, A)[rows_t]
            logprob[plans_t] = met.logprob.view(m, N, A)[rows_t]
            topk_ids[plans_t] = met.topk_ids.view(m, N, A, k)[rows_t]
            topk_logits[plans_t] = met.topk_logits.view(m, N, A, k)[rows_t]
            topk_logprobs[plans_t] = met.topk_logprobs.view(m, N, A, k)[rows_t]
        self.ops.report_compile()
        pad = ~batch.answer_mask
        rank[:, pad] = -1
        for t in (logit, logprob):
            t[:, pad] = float("nan")
        topk_ids[:, pad] = -1
        return Results(
            plans=ps.texts(), prompts=batch.prompts, answers=batch.answers,
            answer_str_tokens=batch.answer_str_tokens, prompt_str_tokens=batch.prompt_str_tokens,
            answer_ids=batch.answer_ids, answer_mask=batch.answer_mask, rank=rank, logit=logit,
            prob=logprob.exp(), topk_ids=topk_ids, topk_logits=topk_logits,
            topk_probs=topk_logprobs.exp(), model_name=self.model_name,
            logit_diff=(logit[:, :, 0] - extra["wrong_logit"]) if wrong is not None else None,
            kl=extra.get("kl"), info={"compile_seconds": self.compile_seconds},
        )
