"""Explicit-loop twin of softmax attention: scalar loops in float64, `math.fsum` sums.

Written to be read beside the formula, not to be fast; use it on a few dozen positions.
It shares no arithmetic with the fast paths. The inputs arrive validated as float64
(B, H, N, D) arrays and a resolved structure (see `kernattn.softmax.softmax_attention`).
"""

from __future__ import annotations

import math

import numpy as np

from kernattn.loops._fsum import fsum


def is_allowed(structure, b: int, i: int, j: int) -> bool:
    """Return whether query i of batch row b may attend to key j (structural rules only)."""
    n_b = int(structure.q_lengths[b])
    s_b = int(structure.kv_lengths[b])
    if i >= n_b or j >= s_b:
        return False
    offset = s_b - n_b if structure.alignment == "bottom_right" else 0
    if structure.causal and j > i + offset:
        return False
    if structure.window is not None:
        left, right = structure.window
        if left is not None and j < i + offset - left:
            return False
        if right is not None and j > i + offset + right:
            return False
    return True


def softmax_attention(
    q, k, v, *, scale, mask, bias, softcap, structure, dropout_mask, dropout_scale
):
    """Return (out (B, Hq, N, M), lse (B, Hq, N)) computed one scalar at a time."""
    batch, hq, n, d = q.shape
    hkv, s, m = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    q_, k_, v_ = q.tolist(), k.tolist(), v.tolist()
    mask_ = None if mask is None else mask.tolist()
    bias_ = None if bias is None else bias.tolist()
    drop_ = None if dropout_mask is None else dropout_mask.tolist()
    out = [[[[0.0] * m for _ in range(n)] for _ in range(hq)] for _ in range(batch)]
    lse = [[[-math.inf] * n for _ in range(hq)] for _ in range(batch)]
    for b in range(batch):
        for h in range(hq):
            g = h // group
            for i in range(n):
                # 1. The keep-set: structure AND mask.
                allowed = [
                    j for j in range(s)
                    if is_allowed(structure, b, i, j) and (mask_ is None or mask_[b][h][i][j])
                ]
                # 2. Scores s_ij = scale * q_i . k_j, then soft-capping, then bias.
                scores = {}
                for j in allowed:
                    score = scale * fsum(q_[b][h][i][t] * k_[b][g][j][t] for t in range(d))
                    if softcap is not None:
                        score = softcap * math.tanh(score / softcap)
                    if bias_ is not None:
                        score = score + bias_[b][h][i][j]
                    scores[j] = score
                # 3. Keys whose score is -inf carry weight 0; none left means an empty row.
                live = [j for j in allowed if scores[j] != -math.inf]
                if not live:
                    continue
                values = [scores[j] for j in live]
                if any(math.isnan(x) for x in values):
                    row_max = math.nan
                else:
                    row_max = max(values)
                # 4. Softmax with the row maximum subtracted; inf - inf gives NaN (IEEE).
                weights = {}
                for j in live:
                    diff = scores[j] - row_max
                    weights[j] = math.nan if math.isnan(diff) else math.exp(diff)
                denom = fsum(weights.values())
                lse[b][h][i] = row_max + math.log(denom) if denom > 0 else (
                    math.nan if math.isnan(denom) else -math.inf
                )
                # 5. Probabilities, dropout after normalisation, weighted sum of values.
                probs = {}
                for j in live:
                    p = weights[j] / denom
                    if drop_ is not None:
                        p = p * dropout_scale if drop_[b][h][i][j] else 0.0
                    probs[j] = p
                for c in range(m):
                    out[b][h][i][c] = fsum(probs[j] * v_[b][g][j][c] for j in live)
    return np.array(out, dtype=np.float64).reshape(batch, hq, n, m), np.array(
        lse, dtype=np.float64
    ).reshape(batch, hq, n)
