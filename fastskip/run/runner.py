"""The Runner: the one orchestrator of the pipeline.

    model -> stack weights -> plans -> schedule -> execute -> metrics -> Results

It binds plans to the model, tokenizes inputs, sizes the work to the memory
budget, hands plan sets to an executor, unembeds the final states and turns
them into metrics; with reduced precision it adds the fp32 rank check, with
``verify=k`` the check against TransformerLens.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal, overload

import numpy as np
import torch

from ..ablation import Ablation, as_ablation
from ..errors import FastskipError, InputError, OverflowWarning
from ..inputs import PromptBatch, check_tokens, make_batch
from ..model import blocks, stack_weights
from ..model.ops import StepOps, want_kernels
from ..plans import EdgeGraph, EdgePlan, EdgePlanSet, PlanSet, PlansLike, holds_edge_plans
from ..plans.edge_set import EdgePlansLike
from ..results import Results
from . import precision
from .answer_metrics import MetricTables, warn_nonfinite
from .batch_cache import BatchCache
from .edge_executor import EdgeExecutor, edge_memory_sizes
from .masked_executor import MaskedExecutor
from .memory import MemorySizes, default_memory, memory_sizes, parse_memory, split_budget
from .progress import with_progress
from .sources import Sources, sources_for_batch, sources_for_tokens
from .tree_executor import FinalStates, TreeExecutor
from .verify import verify_logits, verify_run

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

Strategy = Literal["tree", "masked"]
STRATEGIES: tuple[Strategy, ...] = ("tree", "masked")
AnyPlans = PlansLike | EdgePlansLike  # node plans, or edge plans (fastskip.plans.edges)
AnyPlanSet = PlanSet | EdgePlanSet


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
            whose rank the reduced precision leaves ambiguous (``fastskip.run.precision``).
        verify: re-check this many random plans of every call against the
            TransformerLens reference and raise ``CheckError`` on disagreement
            (``fastskip.run.verify``).
    """

    def __init__(self, model: HookedTransformer, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, max_memory: int | str | None = None,
                 strategy: Strategy = "tree", compile: bool | None = None,
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
        if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
            raise FastskipError(f"verify must be a number of plans >= 0, got {verify!r}")
        self.model = model
        self.weights = stack_weights(model, device=device, dtype=dtype)
        self.device = self.weights.device
        self.dtype = self.weights.dtype
        self.strategy: Strategy = strategy
        self.max_memory = parse_memory(max_memory) or default_memory(self.device)
        self.compile = self.device.type == "cuda" if compile is None else bool(compile)
        self.kernels = kernels
        self.verbose = verbose
        self.ops = StepOps(self.weights, compile=self.compile,
                           kernels=want_kernels(self.weights, kernels), verbose=verbose)
        self.exact_ranks = exact_ranks and self.dtype in precision.REDUCED
        self.verify = verify
        self._exact: Runner | None = None
        self._batches = BatchCache()
        self._calls = 0

    def exact_runner(self) -> Runner:
        """An fp32 runner over the same model and device (made once, on demand)."""
        if self.dtype == torch.float32:
            return self
        if self._exact is None:
            self._exact = Runner(self.model, device=self.device, dtype=torch.float32,
                                 max_memory=self.max_memory, strategy=self.strategy,
                                 compile=self.compile, kernels=self.kernels,
                                 verbose=self.verbose)
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

    @property
    def edges(self) -> EdgeGraph:
        """The model's edge graph: senders, receivers and the edge order that edge
        plans, edge masks and edge scores use (``fastskip.plans.edge_graph``)."""
        return EdgeGraph(self.n_layers, self.n_heads, self.weights.n_kv_heads)

    @overload
    def plan_set(self, plans: EdgePlan | EdgePlanSet | Sequence[EdgePlan]) -> EdgePlanSet: ...

    @overload
    def plan_set(self, plans: PlansLike) -> PlanSet: ...

    @overload
    def plan_set(self, plans: AnyPlans) -> AnyPlanSet: ...

    def plan_set(self, plans: AnyPlans) -> AnyPlanSet:
        """Bind plans to this model: a ``PlanSet``, or an ``EdgePlanSet`` for edge
        plans (``fs.EdgePlan`` objects or text with '>'; in a list with edge plans
        every text is edge text), raising ``PlanError`` on bad plans."""
        if holds_edge_plans(plans):
            return EdgePlanSet.from_plans(plans, self.edges)
        return PlanSet.from_plans(plans, self.n_layers, self.n_heads)  # type: ignore[arg-type]

    # -- execution -----------------------------------------------------------
    def memory_sizes(self, plans: AnyPlanSet, B: int, T: int, Q: int, zero_ablation: bool = True
                     ) -> MemorySizes:
        """Bytes per state in a matmul batch, per final state in an unembedding
        batch, and of the residual-stream states one plan of ``plans`` needs,
        for B prompts of T tokens with Q asked positions (``fastskip.run.memory``)."""
        if isinstance(plans, EdgePlanSet):
            return edge_memory_sizes(self.weights, plans.graph, B, T, Q)
        return memory_sizes(self.weights, plans, B, T, Q, self.strategy == "masked",
                            zero_ablation)

    def final_states(self, plans: AnyPlanSet, tokens: torch.Tensor, q_pos: torch.Tensor,
                     sources: Sources | None = None) -> Iterator[FinalStates]:
        """Final residual streams of every plan at positions ``q_pos`` [B, Q],
        in batches sized to the memory budget; ``sources`` = what skipped
        components contribute (None: zero ablation). Raises ``MemoryBudgetError``
        before any work when one plan cannot fit in ``max_memory``. Edge plans
        go to the edge executor (their final state is the logits receiver's input)."""
        B, T = tokens.shape
        Q = q_pos.shape[1]
        sizes = self.memory_sizes(plans, B, T, Q, sources is None)
        budget = split_budget(sizes, self.max_memory, B, T, Q)
        if isinstance(plans, EdgePlanSet):
            return EdgeExecutor(self.weights, max_rows=budget.max_rows, ops=self.ops).run(
                plans, tokens, q_pos, budget.unembed_rows, arena_bytes=budget.arena_bytes,
                sources=sources)
        if self.strategy == "masked":
            return MaskedExecutor(self.weights, chunk=budget.max_rows, ops=self.ops).run(
                plans, tokens, q_pos, budget.unembed_rows, sources)
        return TreeExecutor(self.weights, max_rows=budget.max_rows, ops=self.ops).run(
            plans, tokens, q_pos, budget.unembed_rows, arena_bytes=budget.arena_bytes,
            sources=sources)

    def _each_final(self, ps: AnyPlanSet, tokens: torch.Tensor, q_pos: torch.Tensor,
                    sources: Sources | None, progress: bool | None = False, desc: str = "plans"
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per batch of final states: (states [m, B, Q, d], plan indices [k], the
        row of each of those plans in states [k]), indices on the device."""
        as_dev = lambda a: torch.as_tensor(a, device=self.device)  # noqa: E731
        for fs in with_progress(self.final_states(ps, tokens, q_pos, sources), len(ps),
                                progress, desc):
            yield fs.states, as_dev(fs.plans), as_dev(fs.row_of)
        self.ops.report_compile()

    def _gather_logits(self, ps: AnyPlanSet, tokens: torch.Tensor, q_pos: torch.Tensor,
                       sources: Sources | None, progress: bool | None = False,
                       desc: str = "logits") -> torch.Tensor:
        """Logits [P, B, Q, V] of every plan at positions ``q_pos``."""
        out = torch.empty((len(ps), *q_pos.shape, self.weights.d_vocab_out), dtype=self.dtype,
                          device=self.device)
        for states, plans, rows in self._each_final(ps, tokens, q_pos, sources, progress, desc):
            out[plans] = blocks.unembed(states, self.weights)[rows]
        return out

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

    def _batch(self, prompts: str | Sequence[str], answers: str | Sequence[str],
               prepend_bos: bool | None, prepend_space_to_answer: bool,
               what: str = "answers") -> PromptBatch:
        return make_batch(self.model, prompts, answers, prepend_bos=prepend_bos,
                          prepend_space_to_answer=prepend_space_to_answer, device=self.device,
                          what=what)

    # -- public calls ----------------------------------------------------------
    @torch.no_grad()
    def logits(self, plans: AnyPlans, tokens: torch.Tensor, last_only: bool = False,
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
        out = self._gather_logits(ps, tokens, q_pos, sources, progress)
        if self.verify:
            self._calls += 1
            verify_logits(self, ps, tokens, out, self.verify, self._calls, abl)
        return out[:, :, 0] if last_only else out

    @torch.no_grad()
    def run(self, plans: AnyPlans, prompts: str | Sequence[str], answers: str | Sequence[str],
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
        batch = self._batch(prompts, answers, prepend_bos, prepend_space_to_answer)
        wrong = None
        if wrong_answers is not None:
            wrong = self._batch(prompts, wrong_answers, prepend_bos, prepend_space_to_answer,
                                what="wrong_answers").answer_ids[:, 0]
        abl = as_ablation(ablation)
        self._check_verifiable(abl)
        if self.exact_ranks:
            res = self._run_with_exact_ranks(ps, batch, top_k, wrong, kl, progress, abl)
        else:
            res = self._run_batch(ps, batch, top_k, wrong, kl, progress, ablation=abl)
        if self.verify:
            self._calls += 1
            verify_run(self, ps, batch, res, self.verify, self._calls, abl)
        return res

    @torch.no_grad()
    def logit_diff(self, plans: AnyPlans, prompts: str | Sequence[str],
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
        abl = as_ablation(ablation)

        def prepare() -> tuple[PromptBatch, torch.Tensor, Sources | None]:
            batch = self._batch(prompts, answers, prepend_bos, prepend_space_to_answer)
            wrong = self._batch(prompts, wrong_answers, prepend_bos, prepend_space_to_answer,
                                what="wrong_answers").answer_ids[:, 0]
            cols = torch.stack([batch.answer_ids[:, 0], wrong], dim=1)  # [N, 2]
            return batch, cols, self.sources(abl, batch)

        batch, cols, sources = self._batches.get(
            (prompts, answers, wrong_answers, prepend_bos, prepend_space_to_answer, abl), prepare)
        w = self.weights
        W = w.W_U.T[cols].transpose(1, 2)  # [N, d, 2]: the two columns of each prompt
        b = w.b_U[cols]  # [N, 2]
        out = torch.empty((len(ps), len(batch.prompts)), dtype=torch.float32, device=self.device)
        for states, plan_idx, rows in self._each_final(ps, batch.tokens, batch.q_pos[:, :1],
                                                       sources, progress):
            x = blocks.normalize(states[:, :, 0], w.lnf_w, w.lnf_b, w.config, True)
            two = torch.einsum("mnd,ndk->mnk", x, W) + b  # [m, N, 2]
            out[plan_idx] = (two[..., 0] - two[..., 1]).float()[rows]
        return out

    # -- internals -------------------------------------------------------------
    def asked_logits(self, ps: AnyPlanSet, batch: PromptBatch, ablation: Ablation | None = None
                     ) -> torch.Tensor:
        """Logits [P, N, A, V] at the answer positions of ``batch``."""
        return self._gather_logits(ps, batch.tokens, batch.q_pos, self.sources(ablation, batch))

    def _full_logprobs(self, batch: PromptBatch) -> torch.Tensor:
        """Log-probabilities [N, V] of the full model at the first answer positions."""
        full = self.plan_set(["all"])
        fs = next(iter(self.final_states(full, batch.tokens, batch.q_pos[:, :1])))
        return blocks.unembed(fs.states[0, :, 0], self.weights).float().log_softmax(-1)

    def _run_batch(self, ps: AnyPlanSet, batch: PromptBatch, top_k: int,
                   wrong: torch.Tensor | None = None, kl: bool = False,
                   progress: bool | None = None, window: float = 0.0,
                   ablation: Ablation | None = None) -> Results:
        """Metrics of every plan in this runner's precision; ``window`` > 0 flags
        rows whose rank an error of that size could change."""
        k = min(top_k, self.weights.d_vocab_out)
        tables = MetricTables(len(ps), batch.answer_ids, k, wrong,
                              self._full_logprobs(batch) if kl else None, window)
        sources = self.sources(ablation, batch)
        for states, plans, rows in self._each_final(ps, batch.tokens, batch.q_pos, sources,
                                                    progress):
            tables.add(blocks.unembed(states, self.weights), plans, rows)
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

    def _run_with_exact_ranks(self, ps: AnyPlanSet, batch: PromptBatch, top_k: int,
                              wrong: torch.Tensor | None, kl: bool, progress: bool | None,
                              ablation: Ablation | None) -> Results:
        """``_run_batch`` in reduced precision with fp32 ranks (``fastskip.run.precision``)."""
        exact = self.exact_runner()
        sampled = precision.sample_plans(len(ps))
        measured = precision.measure_error(
            self.asked_logits(ps.take(sampled), batch, ablation),
            exact.asked_logits(ps.take(sampled), batch, ablation), batch.answer_mask, sampled)
        if measured.error is None:  # no error to go by: fp32 throughout
            res = exact._run_batch(ps, batch, top_k, wrong, kl, progress, ablation=ablation)
            res.info.update(measured_error=float("nan"), error_bound=0.0,
                            recomputed_plans=len(ps), ambiguous_rows=0, dtype=str(self.dtype))
            return res
        bound = precision.error_bound(measured)
        with warnings.catch_warnings():  # overflow is warned about once, as fp32 has it
            warnings.simplefilter("ignore", OverflowWarning)
            res = self._run_batch(ps, batch, top_k, wrong, kl, progress, window=2 * bound,
                                  ablation=ablation)
            redo = precision.plans_to_redo(res, measured)
            if len(redo):
                fixed = exact._run_batch(ps.take(redo), batch, top_k, wrong, kl, progress,
                                         ablation=ablation)
                precision.splice(res, fixed, redo)
        warn_nonfinite(res.info["nonfinite"], ps)
        res.info.update(measured_error=measured.error, error_bound=bound,
                        recomputed_plans=int(len(redo)),
                        ambiguous_rows=int(res.info["ambiguous"].sum()), dtype=str(self.dtype))
        return res
