"""Tools for using kernattn in other projects' tests.

`assert_attention_close` compares a result (NumPy, PyTorch or JAX) with the oracle using
dtype-aware tolerances. `kernattn.testing.strategies` holds Hypothesis strategies for
attention inputs; it imports Hypothesis only when used.
"""

from kernattn.testing._assert import DEFAULT_TOLERANCES, assert_attention_close

__all__ = ["DEFAULT_TOLERANCES", "assert_attention_close"]
