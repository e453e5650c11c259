"""Exact summation shared by the explicit-loop twins."""

from __future__ import annotations

import math


def fsum(terms) -> float:
    """Return the correctly rounded sum of `terms`, with IEEE results for inf and NaN.

    `math.fsum` raises on inf + (-inf) and on overflow of a partial sum; IEEE addition
    gives NaN and inf there, which is what the fast paths produce.
    """
    terms = list(terms)
    try:
        return math.fsum(terms)
    except ValueError:  # inf and -inf among the terms
        return math.nan
    except OverflowError:  # finite terms whose exact sum exceeds the float range
        return sum(terms)
