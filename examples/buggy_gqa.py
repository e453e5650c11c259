"""A grouped-query attention with the wrong head mapping, caught by kernattn.

The bug tiles the key/value heads as [h0, h1, h0, h1] (np.tile) where grouped-query
attention repeats each one for a contiguous group of query heads, [h0, h0, h1, h1]
(np.repeat). Run it: the assertion message points at an element of query head 1, which
reads the wrong key/value head.
"""

import numpy as np

import kernattn
from kernattn.testing import assert_attention_close


def my_gqa_attention(q, k, v):
    """Return grouped-query attention, (B, Hq, N, D) x (B, Hkv, S, D) -> (B, Hq, N, M)."""
    group = q.shape[1] // k.shape[1]
    k = np.tile(k, (1, group, 1, 1))  # the bug: np.repeat(k, group, axis=1) is right
    v = np.tile(v, (1, group, 1, 1))
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True) @ v


def main() -> None:
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 4, 3, 8))
    k = rng.normal(size=(1, 2, 5, 8))
    v = rng.normal(size=(1, 2, 5, 8))
    try:
        assert_attention_close(my_gqa_attention(q, k, v), kernattn.softmax_attention(q, k, v))
    except AssertionError as failure:
        print(failure)
    else:
        print("no difference found")


if __name__ == "__main__":
    main()
