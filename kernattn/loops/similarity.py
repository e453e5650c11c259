"""Explicit-loop twin of similarity attention, with its own zero-denominator policy.

Sums are `math.fsum` in float64, or exact `fractions.Fraction` sums when the wrapper
hands over rational inputs and the similarity is rational. Inputs arrive validated (see
`kernattn.similarity.similarity_attention`).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from kernattn.loops._fsum import fsum
from kernattn.loops.softmax import is_allowed
from kernattn.similarity import ZeroDenominatorError, call_sim, sim_failure


def exact_sum(terms) -> Fraction:
    """Return the exact sum of rational terms."""
    return sum(terms, Fraction(0))


def divide_row(num, den, reference, policy, rtol, row, flagged: list) -> list:
    """Return one output row ``num / den`` under the policy, recording flagged rows.

    `num` is a list of M sums; `den` and `reference` are scalars of the same kind (float
    or Fraction). A flagged row is appended to `flagged` and gets 0 or NaN; "raise"
    is decided by the caller once every row has been seen.
    """
    if isinstance(policy, float):
        shifted = den + (Fraction(policy) if isinstance(den, Fraction) else policy)
        if shifted == 0:
            flagged.append(row)
            return [0.0] * len(num)
        return [float(x / shifted) for x in num]
    tol = Fraction(rtol) if isinstance(den, Fraction) else rtol
    if abs(den) <= tol * reference:  # False for NaN, which passes through
        flagged.append(row)
        return [math.nan if policy == "nan" else 0.0] * len(num)
    return [float(x / den) for x in num]


def raise_if_flagged(flagged: list, policy, rtol) -> None:
    """Apply the "raise" policy (and the eps rule) once all rows are known."""
    if not flagged:
        return
    if isinstance(policy, float):
        raise ZeroDenominatorError(flagged, detail=f"plus eps={policy} is zero")
    if policy == "raise":
        detail = "is zero" if rtol == 0 else f"cancels to within rtol={rtol}"
        raise ZeroDenominatorError(flagged, detail=detail)


def similarity_attention(q, k, v, *, sim, mask, structure, exact_inputs, zero_denominator, rtol):
    """Return out (B, Hq, N, M) computed one pair at a time."""
    batch, hq, n, _ = q.shape
    hkv, s, m = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    exact = exact_inputs is not None
    if exact:
        q_, k_, v_ = (x.tolist() for x in exact_inputs)
        total = exact_sum
    else:
        q_, k_, v_ = q, k, v
        total = fsum
    mask_ = None if mask is None else mask.tolist()
    out = [[[[0.0] * m for _ in range(n)] for _ in range(hq)] for _ in range(batch)]
    flagged: list = []
    for b in range(batch):
        for h in range(hq):
            g = h // group
            for i in range(n):
                # 1. The keep-set: structure AND mask. No allowed key: the row stays 0.
                allowed = [
                    j for j in range(s)
                    if is_allowed(structure, b, i, j) and (mask_ is None or mask_[b][h][i][j])
                ]
                if not allowed:
                    continue
                # 2. Similarities of the allowed pairs only.
                sims = {}
                for j in allowed:
                    if exact:
                        sims[j] = sim.exact(q_[b][h][i], k_[b][g][j])
                    else:
                        value = call_sim(sim, q[b, h, i], k[b, g, j], (b, h, i, g, j))
                        if not math.isfinite(value) and np.isfinite(q[b, h, i]).all() and (
                            np.isfinite(k[b, g, j]).all()
                        ):
                            raise sim_failure(sim, f"returned {value}", b, h, i, g, j)
                        sims[j] = value
                # 3. Numerator, denominator and the reference sum_j |sim_ij|.
                num = [
                    total(sims[j] * (v_[b][g][j][c] if exact else float(v_[b, g, j, c]))
                          for j in allowed)
                    for c in range(m)
                ]
                den = total(sims[j] for j in allowed)
                reference = total(abs(sims[j]) for j in allowed)
                # 4. Divide under the policy.
                out[b][h][i] = divide_row(
                    num, den, reference, zero_denominator, rtol, (b, h, i), flagged
                )
    raise_if_flagged(flagged, zero_denominator, rtol)
    return np.array(out, dtype=np.float64).reshape(batch, hq, n, m)
