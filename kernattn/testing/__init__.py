"""Tools for using kernattn in other projects' tests.

`assert_attention_close` compares a result (NumPy, PyTorch or JAX) with the oracle using
dtype-aware tolerances. `check_feature_map` reports on a user's feature map, and
`assert_feature_map` is its assert form. `kernattn.testing.strategies` holds Hypothesis
strategies for attention inputs; it imports Hypothesis only when used.
"""

from kernattn.testing._assert import DEFAULT_TOLERANCES, assert_attention_close
from kernattn.testing._feature_map import (
    Check,
    FeatureMapReport,
    assert_feature_map,
    check_feature_map,
)

__all__ = [
    "Check",
    "DEFAULT_TOLERANCES",
    "FeatureMapReport",
    "assert_attention_close",
    "assert_feature_map",
    "check_feature_map",
]
