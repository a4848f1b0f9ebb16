"""A sweep's shards on Ray workers: one actor per worker (one per GPU where the
workers run on GPUs), each with its own ``Runner``, shards handed out as workers
free up.

    run_shards(runner.model, WorkerSpec.like(runner), shards, job, workers=4,
               address=None, on_done=write_part, log=print)

``fs.sweep.sweep(..., workers=N, address=...)`` calls this for the shards that
are not on disk yet and writes each returned table as a part, exactly as a
one-process sweep does (``fastskip.output.sweep``). The model travels once: it
is put in Ray's object store and every worker builds its Runner from that copy
(weights stacked once per worker, not per shard). A worker that dies (killed,
out of memory, its node lost) loses only the shard it held: that shard goes back
to the front of the queue for the next free worker and a new worker replaces
the dead one. A shard that kills its worker ``MAX_ATTEMPTS`` times stops the
sweep with a ``FastskipError``; the finished parts stay on disk for a rerun.

Ray is optional (``pip install 'fastskip[cluster]'``); it is imported only here
and only when a sweep asks for workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import FastskipError, InputError
from ..plans import PlanSet
from ..run import Runner
from .shards import ShardJob

INSTALL = "pip install 'fastskip[cluster]' (or: pip install ray)"
MAX_ATTEMPTS = 3  # a shard whose worker dies this many times stops the sweep


def import_ray() -> Any:
    """The ``ray`` module, or an ``InputError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError(f"sweeping with workers needs Ray, which is not installed: {INSTALL}"
                         ) from None
    return ray


def check_workers(workers: int) -> Any:
    """Raise ``InputError`` for a number of workers that is not a whole number >= 1,
    or when Ray is missing; returns the ``ray`` module."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers must be a whole number >= 1, got {workers!r}")
    return import_ray()


@dataclass
class WorkerSpec:
    """How every worker builds its Runner: ``Runner(model, **options)``, on one GPU
    of its own (``gpu``) or on ``threads`` CPU cores (torch threads)."""

    options: dict[str, Any]
    gpu: bool
    threads: int = 1

    @classmethod
    def like(cls, runner: Runner, device: str | None = None, threads: int = 1) -> WorkerSpec:
        """Workers that compute what ``runner`` computes (same dtype, strategy,
        memory budget, kernels, compile, rank checks), on ``device`` ("cpu" or
        "cuda"; default: the runner's device type)."""
        kind = device or runner.device.type
        if kind not in ("cpu", "cuda"):
            raise InputError(f"workers run on 'cpu' or 'cuda', got device {device!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InputError(f"threads per worker must be a whole number >= 1, got {threads!r}")
        same = kind == runner.device.type  # budget and compile defaults follow the device
        options = dict(device=kind, dtype=runner.dtype, strategy=runner.strategy,
                       max_memory=runner.max_memory if same else None,
                       compile=runner.compile if same else None, kernels=runner.kernels,
                       exact_ranks=runner.exact_ranks, verify=runner.verify, verbose=False)
        return cls(options, gpu=kind == "cuda", threads=threads)


class ShardWorker:
    """One worker (a Ray actor): a Runner of its own over the shared model."""

    def __init__(self, model: Any, spec: WorkerSpec):
        import torch

        if not spec.gpu:  # one worker per core (group): threads never compete
            torch.set_num_threads(spec.threads)
        self.runner = Runner(model, **spec.options)
        self.shards, self.seconds, self.cpu_seconds = 0, 0.0, 0.0

    def describe(self) -> tuple[int, str, str]:
        """(pid, host, device) of this worker's process."""
        return os.getpid(), socket.gethostname(), str(self.runner.device)

    def run(self, plans: PlanSet, job: ShardJob) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        table = job.run(self.runner, plans)
        self.seconds += time.perf_counter() - wall
        self.cpu_seconds += time.process_time() - cpu
        self.shards += 1
        return table

    def stats(self) -> tuple[int, float, float]:
        """Shards done, seconds spent on them, CPU seconds of this process in them
        (below the seconds times the threads: the machine's cores were shared)."""
        return self.shards, self.seconds, self.cpu_seconds


def _lost_worker_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """Ray's errors for work lost with its process or node (rerun elsewhere), as
    opposed to ``RayTaskError``: the shard itself raised."""
    ex = ray.exceptions
    names = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "OutOfMemoryError",
             "ObjectLostError")
    return tuple(getattr(ex, n) for n in names if hasattr(ex, n))


def _connect(ray: Any, address: str | None, need_cpus: int) -> bool:
    """Join the Ray cluster at ``address``, or the one this process already joined,
    or start a local one; True when this call started Ray (and should stop it)."""
    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.ERROR, log_to_driver=False)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:  # a local cluster with room for every CPU worker asked for
            ray.init(num_cpus=max(os.cpu_count() or 1, need_cpus), include_dashboard=False,
                     **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise FastskipError(f"cannot start or join {where}: {e}") from None
    return True


def _capacity(ray: Any, spec: WorkerSpec) -> int:
    """How many workers of ``spec`` the cluster holds at once."""
    res = ray.cluster_resources()
    return int(res.get("GPU", 0)) if spec.gpu else int(res.get("CPU", 0) // spec.threads)


@dataclass
class _Pool:
    """The live workers and the replacements of dead ones."""

    ray: Any
    actor_class: Any
    model_ref: Any
    spec: WorkerSpec
    idle: list[tuple[int, Any]] = field(default_factory=list)  # (worker number, handle)
    started: int = 0

    def start(self) -> tuple[int, Any]:
        handle = self.actor_class.remote(self.model_ref, self.spec)
        self.started += 1
        return self.started - 1, handle

    def stop(self, handle: Any) -> None:
        with contextlib.suppress(Exception):  # already dead
            self.ray.kill(handle)


def _log_stats(ray: Any, workers: list[tuple[int, Any]], lost_errors: tuple[type, ...],
               log: Callable[[str], None]) -> None:
    """One line per live worker: its shards and the time it spent on them."""
    try:
        stats = ray.get([h.stats.remote() for _, h in workers], timeout=30)
    except (*lost_errors, ray.exceptions.GetTimeoutError):
        return
    log("; ".join(f"worker {n}: {k} shards in {sec:.1f} s ({cpu:.1f} s of CPU)"
                  for (n, _), (k, sec, cpu) in zip(workers, stats, strict=True)))


def run_shards(model: Any, spec: WorkerSpec, shards: dict[int, PlanSet], job: ShardJob,
               workers: int, address: str | None,
               on_done: Callable[[int, Any], None], log: Callable[[str], None]) -> None:
    """Compute ``job`` on every shard (shard number -> plans) on ``workers`` Ray
    workers and call ``on_done(number, table)`` in the driver as each finishes
    (in completion order). Joins the cluster at ``address`` (or the one this
    process has joined, or starts a local one)."""
    ray = check_workers(workers)
    start = time.perf_counter()  # driver-side wall clock: the workers' start-up, in the log
    started_ray = _connect(ray, address, workers * spec.threads)
    pool: _Pool | None = None
    running: dict[Any, tuple[int, Any, int]] = {}  # task -> (worker number, handle, shard)
    try:
        fits = _capacity(ray, spec)
        if fits < 1:
            need = "a GPU" if spec.gpu else f"{spec.threads} CPUs"
            raise FastskipError(f"the Ray cluster has no room for one worker (each needs {need})")
        if fits < workers:
            log(f"the Ray cluster holds {fits} of the {workers} workers asked for; using {fits}")
            workers = fits
        actor = ray.remote(ShardWorker).options(
            num_cpus=1 if spec.gpu else spec.threads, num_gpus=1 if spec.gpu else 0,
            max_restarts=0, max_task_retries=0)
        # the model travels once, into the object store; workers build Runners from it
        pool = _Pool(ray, actor, ray.put(model), spec)
        pool.idle = [pool.start() for _ in range(min(workers, len(shards)))]
        lost_errors = _lost_worker_errors(ray)
        try:
            described = ray.get([h.describe.remote() for _, h in pool.idle])
        except lost_errors as e:
            raise FastskipError(f"a worker could not start: {e}") from None
        log(f"workers ready after {time.perf_counter() - start:.1f} s: " + ", ".join(
            f"worker {n} pid {pid} on {host} ({dev})"
            for (n, _), (pid, host, dev) in zip(pool.idle, described, strict=True)))
        job_ref = ray.put(job)
        queue = deque(sorted(shards))
        attempts = dict.fromkeys(shards, 0)
        reruns = 0
        while queue or running:
            while queue and pool.idle:  # hand out shards as workers free up
                n, handle = pool.idle.pop()
                s = queue.popleft()
                attempts[s] += 1
                running[handle.run.remote(shards[s], job_ref)] = (n, handle, s)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            n, handle, s = running.pop(ref)
            try:
                table = ray.get(ref)
            except lost_errors as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if attempts[s] >= MAX_ATTEMPTS:
                    raise FastskipError(
                        f"shard {s} lost its worker {attempts[s]} times (last: {reason}); "
                        "the finished shards are saved: fix the cause and run again") from None
                pool.stop(handle)
                replacement = pool.start()
                log(f"worker {n} died ({type(e).__name__}); shard {s} goes back to the queue "
                    f"and worker {replacement[0]} replaces worker {n}")
                queue.appendleft(s)
                pool.idle.append(replacement)
                reruns += 1
                continue
            except ray.exceptions.RayTaskError as e:  # the shard raised: show the cause
                cause = getattr(e, "cause", None)
                if isinstance(cause, FastskipError):
                    raise cause from None
                raise
            on_done(s, table)
            pool.idle.append((n, handle))
        log(f"{len(shards)} shards on {pool.started} worker{'s' * (pool.started > 1)}"
            + (f" ({reruns} rerun after a worker died)" if reruns else ""))
        _log_stats(ray, pool.idle, lost_errors, log)
    finally:
        if pool is not None:
            for _, handle, _ in running.values():
                pool.stop(handle)
            for _, handle in pool.idle:
                pool.stop(handle)
        if started_ray:
            ray.shutdown()
