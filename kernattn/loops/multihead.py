"""Explicit-loop twin of the projections of `kernattn.multi_head_attention`."""

from __future__ import annotations

import numpy as np

from kernattn.loops._fsum import fsum


def linear(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Return ``x @ w + bias`` (B, L, d_out) for x (B, L, d_in) and w (d_in, d_out).

    Each output entry is one `math.fsum`.
    """
    batch, length, d_in = x.shape
    d_out = w.shape[1]
    x_, w_ = x.tolist(), w.tolist()
    b_ = [0.0] * d_out if bias is None else bias.tolist()
    y = [
        [
            [fsum([x_[b][i][c] * w_[c][k] for c in range(d_in)] + [b_[k]])
             for k in range(d_out)]
            for i in range(length)
        ]
        for b in range(batch)
    ]
    return np.array(y, dtype=np.float64).reshape(batch, length, d_out)
