"""The Runner: the one orchestrator of the pipeline.

    model -> stack weights -> plans -> schedule -> execute -> metrics -> Results

It binds plans to the model, tokenizes inputs, sizes the work to the memory
budget, hands plan sets to an executor, unembeds the final states and turns
them into metrics; with reduced precision it adds the fp32 rank check, with
``verify=k`` the check against TransformerLens.
"""

from __future__ import annotations

import dataclasses
import math
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
from . import precision as reduced
from .answer_metrics import MetricTables, warn_nonfinite
from .batch_cache import BatchCache
from .circuit_inputs import circuit_inputs
from .edge_executor import EdgeExecutor, edge_memory_sizes
from .masked_executor import MaskedExecutor
from .mean_circuits import MeanAblatedCircuits
from .memory import (
    MemorySizes,
    default_memory,
    element_bytes,
    ensure_fits,
    format_bytes,
    memory_sizes,
    parse_memory,
    split_budget,
)
from .mixed_unembed import MixedStats, Precision, mixed_unembedding
from .progress import with_progress
from .sources import Sources, sources_for_batch, sources_for_tokens
from .tree_executor import FinalStates, TreeExecutor
from .verify import verify_logit_diff, verify_logits, verify_run
from .vocab_reductions import fused_logit_reductions
from .workspace import Workspace

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
            whose rank the reduced precision leaves ambiguous (``fastskip.run.precision``;
            the error bound is measured, an empirical guarantee).
        precision: ``"mixed"``: blocks in fp32, the unembedding product in bf16 with
            fp32 wherever a proven bound on its error could change a rank or a top-k id
            (``fastskip.run.mixed_unembed``): ranks and top-k ids of an fp32 run,
            probabilities within ``Results.info["logprob_error_bound"]``. Default
            (None): everything in ``dtype``.
        verify: re-check this many random plans of every call against the
            TransformerLens reference and raise ``CheckError`` on disagreement
            (``fastskip.run.verify``).
    """

    def __init__(self, model: HookedTransformer, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, max_memory: int | str | None = None,
                 strategy: Strategy = "tree", compile: bool | None = None,
                 kernels: bool | None = None, verbose: bool = True, exact_ranks: bool = True,
                 verify: int = 0, precision: Precision | None = None):
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
        self.exact_ranks = exact_ranks and self.dtype in reduced.REDUCED
        self.verify = verify
        self.precision = precision
        self.mixed = mixed_unembedding(precision, self.weights)  # None unless "mixed"
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
                     sources: Sources | None = None, reserved: int = 0
                     ) -> Iterator[FinalStates]:
        """Final residual streams of every plan at positions ``q_pos`` [B, Q],
        in batches sized to the memory budget; ``sources`` = what skipped
        components contribute (None: zero ablation); ``reserved``: bytes of the
        budget already taken by the call's output. Raises ``MemoryBudgetError``
        before any work when one plan cannot fit in what is left of ``max_memory``.
        Edge plans go to the edge executor (their final state is the logits
        receiver's input)."""
        B, T = tokens.shape
        Q = q_pos.shape[1]
        sizes = self.memory_sizes(plans, B, T, Q, sources is None)
        budget = split_budget(sizes, self.max_memory - reserved, B, T, Q)
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
                    sources: Sources | None, progress: bool | None = False, desc: str = "plans",
                    reserved: int = 0
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per batch of final states: (states [m, B, Q, d], plan indices [k], the
        row of each of those plans in states [k]), indices on the device."""
        as_dev = lambda a: torch.as_tensor(a, device=self.device)  # noqa: E731
        for fs in with_progress(self.final_states(ps, tokens, q_pos, sources, reserved),
                                len(ps), progress, desc):
            yield fs.states, as_dev(fs.plans), as_dev(fs.row_of)
        self.ops.report_compile()

    def _gather_logits(self, ps: AnyPlanSet, tokens: torch.Tensor, q_pos: torch.Tensor,
                       sources: Sources | None, progress: bool | None = False,
                       desc: str = "logits") -> torch.Tensor:
        """Logits [P, B, Q, V] of every plan at positions ``q_pos``. The returned
        tensor counts against ``max_memory``: a call whose logits do not fit beside
        one plan's work raises ``MemoryBudgetError`` before any work."""
        shape = (len(ps), *q_pos.shape, self.weights.d_vocab_out)
        out_bytes = math.prod(shape) * element_bytes(self.dtype)
        B, T = tokens.shape
        need = out_bytes + sum(self.memory_sizes(ps, B, T, q_pos.shape[1], sources is None))
        ensure_fits(need, self.max_memory, f"the logits of {len(ps)} plans x {B} prompts x "
                    f"{q_pos.shape[1]} positions x {shape[-1]} ({format_bytes(out_bytes)}, "
                    "returned) with one plan's work",
                    "ask for fewer plans per call, last_only=True, or raise max_memory")
        out = torch.empty(shape, dtype=self.dtype, device=self.device)
        for states, plans, rows in self._each_final(ps, tokens, q_pos, sources, progress, desc,
                                                    reserved=out_bytes):
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
        ablation sources) of the previous call with the same inputs. It goes
        through the same checks as ``run``: ``verify=k`` re-checks k plans of every
        call against TransformerLens, and a reduced-precision runner with
        ``exact_ranks`` (the default) computes the differences in fp32, since a
        search decides by comparing them with a threshold (``exact_ranks=False``:
        reduced-precision values, approximate).
        """
        ps = self.plan_set(plans)
        abl = as_ablation(ablation)
        self._check_verifiable(abl)
        exact = self.exact_runner() if self.exact_ranks else self

        def prepare() -> tuple[PromptBatch, torch.Tensor, Sources | None]:
            batch = self._batch(prompts, answers, prepend_bos, prepend_space_to_answer)
            wrong = self._batch(prompts, wrong_answers, prepend_bos, prepend_space_to_answer,
                                what="wrong_answers").answer_ids[:, 0]
            cols = torch.stack([batch.answer_ids[:, 0], wrong], dim=1)  # [N, 2]
            return batch, cols, exact.sources(abl, batch)

        batch, cols, sources = self._batches.get(
            (prompts, answers, wrong_answers, prepend_bos, prepend_space_to_answer, abl), prepare)
        out = exact._two_column_diff(ps, batch, cols, sources, progress)
        if self.verify:
            self._calls += 1
            verify_logit_diff(self, ps, batch, cols[:, 1], out, self.verify, self._calls, abl)
        return out

    def mean_ablated_circuits(self, prompts: Sequence[str], answers: Sequence[str],
                              wrong_answers: Sequence[str], mean_prompts: Sequence[str],
                              prepend_bos: bool = False) -> MeanAblatedCircuits:
        """Scores of head/MLP circuits under the mean ablation of Lan & Barez's
        circuit search (heads outside the circuit at their full-model mean z, MLPs
        at their mean output under the circuit's own head ablation; per position,
        over ``mean_prompts``), for the searches that call it trial after trial:
        it keeps the current circuit's states and shares them
        (``fastskip.run.mean_circuits``). Prompts must share one token length
        (without BOS by default, as the paper tokenizes); the last position is scored.
        """
        tokens, cols, mean_tokens = circuit_inputs(self.model, prompts, answers, wrong_answers,
                                                   mean_prompts, prepend_bos, self.device)
        return MeanAblatedCircuits(self.weights, tokens, cols, mean_tokens, self.max_memory)

    # -- internals -------------------------------------------------------------
    def asked_logits(self, ps: AnyPlanSet, batch: PromptBatch, ablation: Ablation | None = None
                     ) -> torch.Tensor:
        """Logits [P, N, A, V] at the answer positions of ``batch``."""
        return self._gather_logits(ps, batch.tokens, batch.q_pos, self.sources(ablation, batch))

    def _two_column_diff(self, ps: AnyPlanSet, batch: PromptBatch, cols: torch.Tensor,
                         sources: Sources | None, progress: bool | None) -> torch.Tensor:
        """logit[cols[:, 0]] - logit[cols[:, 1]] at the first answer position: [P, N].
        Only those two vocabulary columns of each prompt are unembedded."""
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

    def _full_logprobs(self, batch: PromptBatch) -> torch.Tensor:
        """Log-probabilities [N, V] of the full model at the first answer positions."""
        full = self.plan_set(["all"])
        fs = next(iter(self.final_states(full, batch.tokens, batch.q_pos[:, :1])))
        return blocks.unembed(fs.states[0, :, 0], self.weights).float().log_softmax(-1)

    def _run_batch(self, ps: AnyPlanSet, batch: PromptBatch, top_k: int,
                   wrong: torch.Tensor | None = None, kl: bool = False,
                   progress: bool | None = None, record_gap: bool = False,
                   ablation: Ablation | None = None) -> Results:
        """Metrics of every plan in this runner's precision; ``record_gap`` keeps what
        whole reduced precision decides by (``MetricTables``)."""
        k = min(top_k, self.weights.d_vocab_out)
        tables = MetricTables(len(ps), batch.answer_ids, k, wrong,
                              self._full_logprobs(batch) if kl else None, record_gap)
        sources = self.sources(ablation, batch)
        if self.mixed is not None:
            self.mixed.stats = MixedStats()
        logits = Workspace(self.weights.dtype, self.device)
        for states, plans, rows in self._each_final(ps, batch.tokens, batch.q_pos, sources,
                                                    progress):
            self._unembed_metrics(tables, states, plans, rows, logits)
        tables.mask_padding(batch.answer_mask)
        warn_nonfinite(tables.nonfinite, ps)
        info = {"compile_seconds": self.compile_seconds, "nonfinite": tables.nonfinite,
                "metrics_compile_seconds": fused_logit_reductions.compile_seconds}
        if self.mixed is not None:
            info.update(precision="mixed", guarantee="proven",
                        logprob_error_bound=tables.logprob_bound,
                        mixed=dataclasses.asdict(self.mixed.stats))
        if record_gap:
            info.update(gap=tables.gap, state_rms=tables.state_rms)
        return tables.results(ps.lazy_texts(), batch, self.model_name, info)

    def _unembed_metrics(self, tables: MetricTables, states: torch.Tensor,
                         plans: torch.Tensor, rows: torch.Tensor, logits: Workspace) -> None:
        """Unembed one batch of final states [m, N, A, d] into ``tables``."""
        if self.mixed is None:
            out = logits.take(states[..., 0].numel(), self.weights.d_vocab_out)
            tables.add(blocks.unembed(states, self.weights, out), plans, rows)
            tables.add_states(states, plans, rows)
            return
        # mixed precision: the vocabulary product in bf16 (~4x the fp32 rate on CPUs with
        # AVX512-BF16/AMX, more on GPUs), fp32 only where its proven bound leaves a rank or
        # a top-k id open (fastskip.run.mixed_unembed)
        m, N, A, d = states.shape
        met, bound = self.mixed.metrics(states.reshape(-1, d),
                                        tables.answer_ids.reshape(-1).repeat(m), tables.k,
                                        logits)
        tables.add_metrics(met, plans, rows, m, bound)
        first = states[:, :, 0].reshape(-1, d)  # [m * N, d] at the first answer position
        if tables.wrong is not None:  # the wrong answer's logit in fp32 (one column)
            wrong = self.mixed.logits_at(first, tables.wrong.repeat(m))
            tables.add_wrong(wrong.view(m, N), plans, rows)
        if tables.full_lp is not None:  # KL needs the whole distribution: fp32
            tables.add_kl(blocks.unembed(states[:, :, 0], self.weights), plans, rows)

    def _run_with_exact_ranks(self, ps: AnyPlanSet, batch: PromptBatch, top_k: int,
                              wrong: torch.Tensor | None, kl: bool, progress: bool | None,
                              ablation: Ablation | None) -> Results:
        """``_run_batch`` in reduced precision with fp32 ranks, the error bound checked
        per plan against its growth (``fastskip.run.precision``: an empirical guarantee)."""
        exact = self.exact_runner()
        with warnings.catch_warnings():  # overflow is warned about once, as fp32 has it
            warnings.simplefilter("ignore", OverflowWarning)
            res = self._run_batch(ps, batch, top_k, wrong, kl, progress, record_gap=True,
                                  ablation=ablation)
            growth = reduced.plan_growth(res.info.pop("state_rms"))
            gap = res.info.pop("gap")
            sampled = reduced.sample_plans(growth)
            measured = reduced.measure_error(
                self.asked_logits(ps.take(sampled), batch, ablation),
                exact.asked_logits(ps.take(sampled), batch, ablation), batch.answer_mask,
                sampled, growth)
            redo, bounds = reduced.plans_to_redo(res, gap, growth, sampled, measured)
            if len(redo):
                fixed = exact._run_batch(ps.take(redo), batch, top_k, wrong, kl, progress,
                                         ablation=ablation)
                reduced.splice(res, fixed, redo)
        warn_nonfinite(res.info["nonfinite"], ps)
        reduced.report(res, measured, bounds, redo, sampled, self.dtype)
        return res
