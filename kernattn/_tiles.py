"""Scalar tile logic shared by the Numba CPU kernels and the Numba CUDA kernels.

The functions here are plain Python on scalars. Each backend compiles the same source:
``numba.njit`` in `kernattn._numba`, ``numba.cuda.jit(device=True)`` in `kernattn.cuda`.
A fix made here therefore lands in both. They use only what both targets compile:
integer and float arithmetic, comparisons and `math` functions. They hold no float
literal, so a float32 caller stays in float32 (a literal such as 0.0 is float64 and
would widen the result).

Nothing in this module imports Numba.
"""

from __future__ import annotations

import math

# A window side that is unbounded (None) travels to the kernels as this value.
UNBOUNDED = -1


def row_interval(i, off, s_b, causal, left, right):
    """Return the keys [lo, hi) that query i may see: window and causal rule, j < s_b.

    Query i sits at key position ``i + off`` (off = s_b - n_b under bottom-right
    alignment, else 0); `left` and `right` are window sizes or `UNBOUNDED`. The
    interval is empty when ``hi <= lo``.
    """
    lo, hi = 0, s_b
    if left != UNBOUNDED:
        lo = max(lo, i + off - left)
    if causal:
        hi = min(hi, i + off + 1)
    if right != UNBOUNDED:
        hi = min(hi, i + off + right + 1)
    return lo, hi


def soft_cap(s, cap):
    """Return ``cap * tanh(s / cap)``: soft-capping of a score (cap > 0)."""
    return cap * math.tanh(s / cap)


def online_rescale(row_max, tile_max):
    """Return (new_max, alpha) for folding a tile with maximum `tile_max` into a row.

    The running sums of the row were taken relative to `row_max`; multiplying them by
    ``alpha = exp(row_max - new_max)`` makes them relative to the new maximum. The
    caller skips tiles whose maximum is -inf (no allowed key with a finite score), so
    `new_max` is never -inf and ``exp(-inf - -inf)`` (NaN) never happens; a row that
    had no key yet (``row_max = -inf``) gets ``alpha = 0``. A NaN tile maximum does not
    win the comparison; NaN scores reach the output through their weights.
    """
    new_max = tile_max if tile_max > row_max else row_max
    return new_max, math.exp(row_max - new_max)


def finish_lse(row_max, row_sum):
    """Return the natural log-sum-exp ``row_max + log(row_sum)`` of a row (row_sum > 0)."""
    return row_max + math.log(row_sum)


def merge_lse(lse_acc, lse_part):
    """Merge one normalised part into a running one: return (lse, weight_acc, weight_part).

    With ``lse = log(exp(lse_acc) + exp(lse_part))``, the merged output is
    ``weight_acc * out_acc + weight_part * out_part``. The caller skips parts with
    ``lse_part = -inf`` (their output is never read); a running state with
    ``lse_acc = -inf`` (nothing merged yet) gets weight 0. Both exponents are taken
    relative to the larger lse, so neither overflows.
    """
    top = lse_part if lse_part > lse_acc else lse_acc
    a = math.exp(lse_acc - top)
    b = math.exp(lse_part - top)
    total = a + b
    return top + math.log(total), a / total, b / total
