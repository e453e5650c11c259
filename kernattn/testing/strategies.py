"""Hypothesis strategies for attention inputs.

Shape legend: B batch, Hq query heads, Hkv key/value heads, N queries, S keys, D query/key
head dimension, M value head dimension. Sizes are drawn first, then bounded arrays from
``hypothesis.extra.numpy``, so failing examples shrink towards few, small positions
filled with zeros.

Examples
--------
>>> from hypothesis import given, settings
>>> import kernattn
>>> from kernattn.testing import strategies as kst
>>> @settings(max_examples=5, deadline=None)
... @given(kst.attention_inputs())
... def test_rows_are_finite(case):
...     out = kernattn.softmax_attention(case["q"], case["k"], case["v"], **case["options"])
...     assert out.shape[:3] == case["q"].shape[:3]
>>> test_rows_are_finite()
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

FLOAT_DTYPES = ("float64", "float32", "float16")


class AttentionShape(NamedTuple):
    """Sizes of one attention problem."""

    batch: int
    q_heads: int
    kv_heads: int
    queries: int
    keys: int
    head_dim: int
    value_dim: int


@st.composite
def shapes(
    draw,
    *,
    max_batch: int = 2,
    max_kv_heads: int = 2,
    max_group: int = 3,
    max_len: int = 8,
    max_dim: int = 4,
    allow_empty: bool = True,
) -> AttentionShape:
    """Draw sizes: GQA head counts (Hq a multiple of Hkv), N != S, empty axes if allowed.

    Shrinks towards B = Hq = Hkv = D = M = 1 and N = S = 0 (or 1 without empty axes).
    """
    low = 0 if allow_empty else 1
    kv_heads = draw(st.integers(1, max_kv_heads))
    return AttentionShape(
        batch=draw(st.integers(1, max_batch)),
        q_heads=kv_heads * draw(st.integers(1, max_group)),
        kv_heads=kv_heads,
        queries=draw(st.integers(low, max_len)),
        keys=draw(st.integers(low, max_len)),
        head_dim=draw(st.integers(1, max_dim)),
        value_dim=draw(st.integers(1, max_dim)),
    )


def dtypes() -> st.SearchStrategy[str]:
    """Draw a floating dtype name, shrinking towards float64."""
    return st.sampled_from(FLOAT_DTYPES)


def values(shape: tuple[int, ...], *, dtype: str = "float64", bound: float = 4.0,
           huge: bool = False) -> st.SearchStrategy[np.ndarray]:
    """Draw a finite array in [-bound, bound], with exact zeros likely.

    With ``huge=True`` the bound grows to 1e3, which gives logits near 1e6 and tests the
    max-shift of a softmax. Shrinks towards all zeros.
    """
    limit = 1e3 if huge else bound
    width = {"float64": 64, "float32": 32, "float16": 16}[dtype]
    elements = st.floats(-limit, limit, allow_nan=False, allow_infinity=False, width=width)
    return hnp.arrays(np.dtype(dtype), shape, elements=elements)


@st.composite
def keep_options(draw, shape: AttentionShape) -> dict:
    """Draw structural and mask options for `kernattn.softmax_attention`.

    Covers random boolean masks, fully masked rows, causal masks in both alignments,
    windows, and per-row kv/q lengths. Shrinks towards no option at all.
    """
    b, hq, n, s = shape.batch, shape.q_heads, shape.queries, shape.keys
    options: dict = {}
    causal = draw(st.sampled_from([None, "top_left", "bottom_right"]))
    alignment = causal or draw(st.sampled_from(["top_left", "bottom_right"]))
    if causal:
        options["causal"] = causal
    if draw(st.booleans()):
        left = draw(st.one_of(st.none(), st.integers(0, max(n, s))))
        right = draw(st.one_of(st.none(), st.integers(0, max(n, s))))
        options["window"] = (left, right)
    if draw(st.booleans()):
        mask = draw(hnp.arrays(np.bool_, (b, hq, n, s)))
        if n and draw(st.booleans()):
            mask[..., draw(st.integers(0, n - 1)), :] = False  # one fully masked row
        options["mask"] = mask
    if draw(st.booleans()):
        options["kv_lengths"] = np.array(draw(st.lists(st.integers(0, s), min_size=b, max_size=b)))
    if draw(st.booleans()):
        options["q_lengths"] = np.array(draw(st.lists(st.integers(0, n), min_size=b, max_size=b)))
    if not causal and any(key in options for key in ("window", "kv_lengths", "q_lengths")):
        options["alignment"] = alignment
    return options


@st.composite
def attention_inputs(
    draw,
    *,
    shape: AttentionShape | None = None,
    dtype: str | None = None,
    nan_where_masked: bool = True,
    **shape_bounds,
) -> dict:
    """Draw a whole softmax-attention problem.

    Returns a dict with "q" (B, Hq, N, D), "k" (B, Hkv, S, D), "v" (B, Hkv, S, M) and
    "options" (keyword arguments for `kernattn.softmax_attention`: masks, causal,
    windows, lengths, bias, softcap). With `nan_where_masked`, NaN may be stored in k
    and v beyond the kv_lengths and in the bias where the mask excludes a key, places
    that a correct implementation never reads.
    """
    shape = shape or draw(shapes(**shape_bounds))
    dtype = dtype or draw(dtypes())
    huge = draw(st.booleans())
    b, hq, hkv, n, s, d, m = shape
    q = draw(values((b, hq, n, d), dtype=dtype, huge=huge))
    k = draw(values((b, hkv, s, d), dtype=dtype, huge=huge))
    v = draw(values((b, hkv, s, m), dtype=dtype))
    options = draw(keep_options(shape))
    if draw(st.booleans()):
        options["bias"] = draw(values((b, hq, n, s), dtype="float64"))
    if draw(st.booleans()):
        options["softcap"] = draw(st.sampled_from([1.0, 30.0]))
    if nan_where_masked and draw(st.booleans()):
        if "kv_lengths" in options:
            k, v = k.copy(), v.copy()
            for row, length in enumerate(options["kv_lengths"]):
                k[row, :, length:] = np.nan
                v[row, :, length:] = np.nan
        if "mask" in options and "bias" in options:
            options["bias"] = np.where(options["mask"], options["bias"], np.nan)
    return {"q": q, "k": k, "v": v, "options": options}
