"""The model: loading TransformerLens models, checking their architecture,
stacking their weights, and the block math over stacked weights."""

from .load import load_model
from .weights import BlockConfig, LayerWeights, StackedWeights, stack_weights

__all__ = ["BlockConfig", "LayerWeights", "StackedWeights", "load_model", "stack_weights"]
