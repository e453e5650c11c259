"""Exact expected values for similarity and linear attention, straight from the formula.

``out_i = sum_j K(q_i, k_j) v_j / sum_j K(q_i, k_j)`` over the allowed keys, computed in
`fractions.Fraction` from integer inputs and a kernel K written out by hand here (not
through kernattn's feature maps), so the catalogue checks the oracle's exact route
against an independent computation. Also the tolerance scales shared by both variants.

Shape legend: B batch, Hq query heads, Hkv key/value heads, N queries, S keys, D
query/key head dimension, M value head dimension.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable

import numpy as np

ExactKernel = Callable[[list[Fraction], list[Fraction]], Fraction]


def dot(x: list[Fraction], y: list[Fraction]) -> Fraction:
    """Return the exact dot product of two rational vectors."""
    return sum((a * b for a, b in zip(x, y)), Fraction(0))


def polynomial_kernel(degree: int, c) -> ExactKernel:
    """Return ``K(x, y) = (x . y + c) ** degree`` in exact arithmetic."""
    return lambda x, y: (dot(x, y) + Fraction(c)) ** degree


def taylor_kernel(order: int, scale) -> ExactKernel:
    """Return ``K(x, y) = sum_{r <= order} s**r / r!`` with ``s = scale * x . y``."""

    def kernel(x, y):
        s = Fraction(scale) * dot(x, y)
        return sum((s**r / math.factorial(r) for r in range(order + 1)), Fraction(0))

    return kernel


def relu_kernel(x: list[Fraction], y: list[Fraction]) -> Fraction:
    """Return ``max(x, 0) . max(y, 0)``."""
    return dot([max(a, Fraction(0)) for a in x], [max(b, Fraction(0)) for b in y])


def exact_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    keep: np.ndarray,
    kernel: ExactKernel,
    policy: str | float = "raise",
) -> tuple[np.ndarray, tuple[tuple[int, int, int], ...]]:
    """Return (out (B, Hq, N, M), rows whose denominator is zero), exactly rounded.

    `q` (B, Hq, N, D), `k` (B, Hkv, S, D) and `v` (B, Hkv, S, M) hold integers; `keep`
    is the (B, Hq, N, S) keep-set. A row with no allowed key is 0. A zero denominator
    gives 0 under "zero" and "raise" (the row is also listed), NaN under "nan", and
    under a float eps every row is ``num / (den + eps)``. Cost O(B Hq N S (D + M)).
    """
    b, hq, n, _ = q.shape
    group = hq // k.shape[1]
    m = v.shape[3]
    out = np.zeros((b, hq, n, m))
    zero_rows = []
    for bi in range(b):
        for h in range(hq):
            g = h // group
            for i in range(n):
                allowed = np.flatnonzero(keep[bi, h, i])
                if allowed.size == 0:
                    continue
                qi = [Fraction(int(x)) for x in q[bi, h, i]]
                sims = {j: kernel(qi, [Fraction(int(x)) for x in k[bi, g, j]]) for j in allowed}
                den = sum(sims.values(), Fraction(0))
                num = [sum((sims[j] * int(v[bi, g, j, c]) for j in allowed), Fraction(0))
                       for c in range(m)]
                if isinstance(policy, float):
                    den += Fraction(policy)
                if den == 0:
                    zero_rows.append((bi, h, i))
                    out[bi, h, i] = math.nan if policy == "nan" else 0.0
                    continue
                out[bi, h, i] = [float(x / den) for x in num]
    return out, tuple(zero_rows)


def division_scales(
    den: np.ndarray,
    den_size: np.ndarray,
    num_size: np.ndarray,
    out: np.ndarray | None,
    policy: str | float,
) -> np.ndarray:
    """Return the error scale of ``out = num / den`` per entry, (B, Hq, N, M).

    `den` (B, Hq, N) is the denominator, `den_size` (B, Hq, N) the sum of the absolute
    values of its terms and `num_size` (B, Hq, N, M) the same for the numerator. An
    error of ``unit * size`` in each sum becomes, after dividing,
    ``unit * (num_size + |out| den_size) / |den|``; a cancelling denominator makes this
    large, as it should. Rows with ``den == 0`` (0 or NaN by policy) get scale 1.
    """
    if isinstance(policy, float):
        den = den + policy
    size = np.abs(np.nan_to_num(out, nan=0.0)) if out is not None else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = (num_size + size * den_size[..., None]) / np.abs(den)[..., None]
    scale = np.where(np.isfinite(scale), scale, 0.0)
    return scale + size + 1.0
