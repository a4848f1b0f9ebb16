"""Plans: which components (node plans) or sender -> receiver edges (edge plans)
of a model are kept, as text, masks and plan sets.

Pure numpy; nothing here knows of torch or of how plans are executed.
"""

from . import grid
from .edge_graph import EdgeGraph
from .edge_set import EdgePlanSet, holds_edge_plans
from .edges import EdgePlan
from .mask import PlanMask
from .plan import Item, Plan, PlanLike, as_plans, parse_items
from .planset import PlanSet, PlansLike, PlanTexts

__all__ = ["EdgeGraph", "EdgePlan", "EdgePlanSet", "Item", "Plan", "PlanLike", "PlanMask",
           "PlanSet", "PlanTexts", "PlansLike", "as_plans", "grid", "holds_edge_plans",
           "parse_items"]
