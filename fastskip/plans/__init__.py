"""Plans: which components of a model are kept, as text, masks and plan sets.

Pure numpy; nothing here knows of torch or of how plans are executed.
"""

from . import grid
from .mask import PlanMask
from .plan import Item, Plan, PlanLike, as_plans, parse_items
from .planset import PlanSet, PlansLike, PlanTexts

__all__ = ["Item", "Plan", "PlanLike", "PlanMask", "PlanSet", "PlanTexts", "PlansLike", "as_plans",
           "grid", "parse_items"]
