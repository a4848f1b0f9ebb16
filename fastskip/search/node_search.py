"""``fs.search.prune_nodes``: the two node-pruning algorithms by name.

* ``algorithm="backward"`` (default): fastskip's one- or two-pass walk with any
  ablation (``fastskip.search.nodes``);
* ``algorithm="seqcont"``: the paper's search exactly as its code runs it
  (``fastskip.search.seqcont``): heads first to last, strictly above the
  threshold, passes alternating until nothing changes, MLP means under each
  trial's head ablation, last position without BOS.

    task = fs.tasks.load_seqcont("numerals", n_per_template=64, model=runner)
    res = fs.search.prune_nodes(runner, task, threshold=0.8, algorithm="seqcont")
"""

from __future__ import annotations

from typing import Any, Literal

from ..errors import InputError
from ..run import Runner
from . import nodes, seqcont
from .common import TaskArg
from .nodes import PruneResult

Algorithm = Literal["backward", "seqcont"]
ALGORITHMS: tuple[Algorithm, ...] = ("backward", "seqcont")
# options only the backward walk takes
_BACKWARD_ONLY = ("ablation", "second_pass")


def prune_nodes(runner: Runner, task: TaskArg = None, *, threshold: float = 0.8,
                algorithm: Algorithm = "backward", **options: Any) -> PruneResult:
    """Iterative node pruning of heads and MLPs (see the module docstring).

    ``options`` go to the algorithm: for both ``prompts``, ``answers``,
    ``wrong_answers``, ``batch``, ``speculate``, ``prepend_bos``, ``progress``;
    "backward" also ``ablation``, ``second_pass``
    (``fastskip.search.nodes.prune_nodes``); "seqcont" also ``mean_prompts``,
    ``max_passes`` (``fastskip.search.seqcont.prune_nodes_seqcont``).
    """
    if algorithm == "backward":
        return nodes.prune_nodes(runner, task, threshold=threshold, **options)
    if algorithm == "seqcont":
        given = [k for k in _BACKWARD_ONLY if options.get(k) not in (None, False)]
        if given and not (given == ["ablation"] and options["ablation"] == "mean"):
            raise InputError(f"algorithm='seqcont' takes no {', '.join(given)}: it always "
                             "mean-ablates (the paper's way) and alternates passes until "
                             "nothing changes")
        for k in _BACKWARD_ONLY:
            options.pop(k, None)
        if options.get("prepend_bos") is None:
            options.pop("prepend_bos", None)
        return seqcont.prune_nodes_seqcont(runner, task, threshold=threshold, **options)
    raise InputError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
