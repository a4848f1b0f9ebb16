"""The seed notebook's experiments as data: its prompts and every hand-written
``ExtractedModel`` class as a plan string (see shared/seed/)."""

from __future__ import annotations

# (prompt, answer): the sequence-continuation prompts the notebook tries by hand
PROMPTS: list[tuple[str, str]] = [
    ("1 2 3 4", " 5"),
    ("January February March April", " May"),
    ("one two three four", " five"),
    ("Sunday Monday Tuesday Wednesday", " Thursday"),
    ("A B C D", " E"),
    ("5 6 7 8", " 9"),
]

# (plan, the notebook section that hand-writes it)
PLANS: list[tuple[str, str]] = [
    ("all", "the full model (ExtractedModel_full)"),
    ("0-9", "keep only L0 to L9"),
    ("0-8", "keep only L0 to L8"),
    ("0-7", "keep only L0 to L7"),
    ("0-7,9", "L0 to L7, skip 8, go only to 9"),
    ("0-4,6-9", "skip L5 only"),
    ("0-3,5-9", "skip L4 only (for L0 to 9)"),
    ("0-3,5-7,9", "skip L4, L8, L10 and L11"),
    ("0-2,5-7,9", "skip layers 3, 4, 8, 10, 11"),
    ("0,1,5-7,9", "skip 2, 3, 4, 8, 10, 11"),
    ("0-2,5,7,9", "skip 3, 4, 6, 8, 10, 11"),
    ("0-8,10-11", "skip L9 only"),
    ("0-7,9.mlp", "skip attention in L9, only use MLP9"),
    ("0-7,9.attn", "skip MLP9, only use attn9"),
    ("0-7,9.mlp/noln", "skip layer norms (MLP9 without its LayerNorm)"),
    ("0-7.attn,9.mlp", "use attn only for L0 to L7, then add MLP9"),
    ("0-7.mlp,9.mlp", "use MLPs only for L0 to L9"),
    ("0-7,8.attn,9.mlp", "skip MLP in L8, only use attn8"),
    ("0-7,8.mlp,9.mlp", "skip attn in L8, only use MLP8"),
    ("0-8.mlp,9", "skip all attn until attn 9"),
    ("0,9", "use only L0 and L9"),
]


def fits(plan: str, n_layers: int) -> bool:
    """Whether every layer ``plan`` names exists in a model of ``n_layers``."""
    from ..plans.plan import parse_items

    return all(it.layers is None or it.layers[1] < n_layers for it in parse_items(plan))
