"""Search tools over plans: circuit search by node pruning, greedy and
exhaustive layer pruning, pairwise interactions, their scores, and the tasks
they run on (``fs.tasks``).

    import fastskip as fs
    task = fs.tasks.make_task("numerals", n=32)
    res = fs.search.prune_nodes(runner, task, threshold=0.8)
    print(res.plan, res.kept_heads, res.kept_mlps)
"""

from .interactions import InteractionResult, interactions
from .layers import ExhaustiveResult, LayerPruneResult, exhaustive, prune_layers
from .nodes import PruneResult, Step, prune_nodes, prune_nodes_sequential
from .scores import accuracy, mean_kl, mean_logit_diff, percent, score

__all__ = [
    "ExhaustiveResult", "InteractionResult", "LayerPruneResult", "PruneResult", "Step",
    "accuracy", "exhaustive", "interactions", "mean_kl", "mean_logit_diff", "percent",
    "prune_layers", "prune_nodes", "prune_nodes_sequential", "score",
]
