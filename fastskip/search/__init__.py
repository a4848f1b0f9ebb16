"""Search tools over plans: circuit search by node pruning, greedy and
exhaustive layer pruning, pairwise interactions, their scores, and the tasks
they run on (``fs.tasks``); on edges: path patching inside a node circuit,
faithfulness curves and ACDC's edge pruning.

    import fastskip as fs
    task = fs.tasks.make_task("numerals", n=32)
    res = fs.search.prune_nodes(runner, task, threshold=0.8)
    print(res.plan, res.kept_heads, res.kept_mlps)
    edges = fs.search.path_patch(runner, task, res)      # the edges inside that circuit

    # the paper's search on the paper's prompts, as its code runs it
    task = fs.tasks.load_seqcont("numerals", n_per_template=512, model=runner)
    res = fs.search.prune_nodes(runner, task, threshold=0.8, algorithm="seqcont")
"""

from .autocircuit import from_prune_scores, to_prune_scores
from .faithfulness import FaithfulnessCurve, faithfulness_curve
from .interactions import InteractionResult, interactions
from .layers import ExhaustiveResult, LayerPruneResult, exhaustive, prune_layers
from .node_search import ALGORITHMS, prune_nodes
from .nodes import PruneResult, Step, prune_nodes_sequential
from .path_patch import PathPatchResult, path_patch, path_patch_sequential
from .prune_edges import EdgePruneResult, EdgeStep, prune_edges, prune_edges_sequential
from .scores import accuracy, mean_kl, mean_logit_diff, percent, score
from .seqcont import prune_nodes_seqcont
from .seqcont_reference import prune_nodes_seqcont_reference

__all__ = [
    "ALGORITHMS", "EdgePruneResult", "EdgeStep", "ExhaustiveResult",
    "FaithfulnessCurve", "InteractionResult", "LayerPruneResult", "PathPatchResult",
    "PruneResult", "Step", "accuracy", "exhaustive", "faithfulness_curve",
    "from_prune_scores", "interactions", "mean_kl", "mean_logit_diff", "path_patch",
    "path_patch_sequential", "percent", "prune_edges", "prune_edges_sequential",
    "prune_layers", "prune_nodes", "prune_nodes_seqcont",
    "prune_nodes_seqcont_reference", "prune_nodes_sequential", "score",
    "to_prune_scores",
]
