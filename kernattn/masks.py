"""Keep-sets and position biases built from index arithmetic.

Shape legend: B batch, Hq query heads, N queries, S keys. These helpers give the boolean
mask (or ALiBi bias) that is equivalent to the structural options of
`softmax_attention`, for comparing with implementations that only take explicit masks.
"""

from __future__ import annotations

import numpy as np

from kernattn import _validate as V


def structural_mask(
    n: int,
    s: int,
    *,
    causal: bool | str | None = None,
    alignment: str | None = None,
    window: tuple[int | None, int | None] | None = None,
    q_lengths=None,
    kv_lengths=None,
) -> np.ndarray:
    """Build the boolean keep-set of the structural options.

    Parameters
    ----------
    n, s : int
        Number of queries N and keys S.
    causal, alignment, window, q_lengths, kv_lengths
        As in `kernattn.softmax_attention`, with the same validation.

    Returns
    -------
    ndarray of bool, shape (N, S), or (B, 1, N, S) when lengths are given
        True where query i may attend to key j.

    Notes
    -----
    Key j is allowed for query i when ``i < n_b``, ``j < s_b``, ``j <= i + off`` if
    causal, and ``i + off - left <= j <= i + off + right`` if windowed, with
    ``off = s_b - n_b`` under bottom-right alignment and 0 under top-left. O(N S).

    Examples
    --------
    >>> structural_mask(2, 3, causal="bottom_right").astype(int)
    array([[1, 1, 0],
           [1, 1, 1]])
    """
    for name, value in (("n", n), ("s", s)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise V.OptionError(f"{name} is {value!r}; expected a non-negative integer")
    lengths_given = q_lengths is not None or kv_lengths is not None
    batch = 1
    for lengths in (q_lengths, kv_lengths):
        if lengths is not None:
            batch = max(batch, np.size(lengths))
    structure = V.resolve_structure(
        causal, alignment, window, q_lengths, kv_lengths, batch, int(n), int(s)
    )
    keep = np.stack([structure.keep(b, int(n), int(s)) for b in range(batch)])
    return keep[:, None] if lengths_given else keep[0]


def alibi_bias(slopes, n: int, s: int, *, alignment: str | None = None) -> np.ndarray:
    """Build the ALiBi bias ``-slope_h * |i + off - j|`` for each query head.

    Parameters
    ----------
    slopes : array_like, shape (Hq,)
        One slope per query head.
    n, s : int
        Number of queries N and keys S.
    alignment : {None, "top_left", "bottom_right"}
        Places query i at key position ``i + off`` (off = 0 or S - N). Required when
        N != S.

    Returns
    -------
    ndarray of float64, shape (Hq, N, S)
        Pass it as `bias` to `softmax_attention`.

    Examples
    --------
    >>> alibi_bias([0.5], 2, 2)[0]
    array([[ 0. , -0.5],
           [-0.5,  0. ]])
    """
    slopes = V.as_float_array("slopes", slopes)
    if slopes.ndim != 1:
        raise V.ShapeError(f"slopes has shape {slopes.shape}; expected (Hq,), one per head")
    if alignment is not None and alignment not in V.ALIGNMENTS:
        raise V.OptionError(
            f"alignment is {alignment!r}; expected 'top_left', 'bottom_right' or None"
        )
    if alignment is None and n != s:
        raise V.OptionError(
            f"an ALiBi bias with N = {n} queries and S = {s} keys depends on the "
            f"alignment; pass alignment='top_left' or alignment='bottom_right'"
        )
    off = s - n if alignment == "bottom_right" else 0
    distance = np.abs(np.arange(n)[:, None] + off - np.arange(s)[None, :])
    return 0.0 - slopes[:, None, None] * distance[None]  # 0.0 - x keeps +0.0 on the diagonal
