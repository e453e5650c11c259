"""Numba twin of KV-cache decoding: split-KV attention merged by log-sum-exp.

Shape legend: B batch, Hq query heads, Hkv key/value heads, T new tokens (queries), C cache
capacity (key positions), D query/key head dimension, M value head dimension,
G = Hq / Hkv query heads per key/value head, P splits.

Decoding reads a long cache with few queries, so the work is split along the keys: each
(batch row, key/value head, split) is one item of a ``numba.prange`` loop. An item contains
the G·T query rows that read its key/value head, so each cache entry is read once per
key/value head, not once per query head. This is where multi-query and grouped-query
attention save memory traffic (a factor G). Each item produces a normalised partial
output and its log-sum-exp; a second pass merges the P parts in split order:
``lse = log Σ_p exp(lse_p)``, ``out = Σ_p exp(lse_p - lse) out_p``.

The number of splits depends on the shapes only (`DECODE_SPLIT_KEYS`), never on the
thread count, so results do not change with the number of threads.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from kernattn._numba import DECODE_BLOCK_K, DECODE_SPLIT_KEYS, jit, single_threaded_blas
from kernattn._numba.softmax import (
    alignment_offsets,
    as_kernel_array,
    compute_dtype,
    finish_rows,
    row_interval,
    tile_state,
    update_tile,
    window_bounds,
)


def decode_attention(q, k, v, *, scale, softcap, structure, num_splits=None):
    """Return (out (B, Hq, T, M), lse (B, Hq, T)) in the compute dtype of q, k, v.

    Takes validated arrays and a resolved structure, as `softmax_attention`'s backends do
    The causal rule, window and lengths are honoured. Masks, biases and dropout are not
    part of decoding. `num_splits` (P) defaults to ``ceil(max kv_length /
    DECODE_SPLIT_KEYS)``.
    """
    dtype = compute_dtype(q, k, v)
    q = as_kernel_array(q, dtype)
    k, v = as_kernel_array(k, dtype, True), as_kernel_array(v, dtype, True)
    b, hq, t, _ = q.shape
    hkv, m = k.shape[1], v.shape[3]
    rows = (hq // hkv) * t
    kv_lengths = np.array(structure.kv_lengths, dtype=np.int64)
    max_length = int(kv_lengths.max()) if b else 0
    if num_splits is None:
        num_splits = max(1, math.ceil(max_length / DECODE_SPLIT_KEYS))
    split_keys = max(1, math.ceil(max_length / num_splits))
    part_out = np.zeros((b, hkv, num_splits, rows, m), dtype=dtype)
    part_lse = np.full((b, hkv, num_splits, rows), -np.inf, dtype=dtype)
    out = np.zeros((b, hq, t, m), dtype=dtype)
    lse = np.full((b, hq, t), -np.inf, dtype=dtype)
    left, right = window_bounds(structure)
    with single_threaded_blas():
        _decode_splits(
            q, k, v, dtype.type(scale), dtype.type(0.0 if softcap is None else softcap),
            bool(structure.causal), alignment_offsets(structure),
            np.array(structure.q_lengths, dtype=np.int64), kv_lengths, left, right,
            split_keys, part_out, part_lse,
        )
        _merge_splits(part_out, part_lse, out, lse)
    return out, lse


@jit()
def _decode_split(
    item, q, k, v, scale, softcap, causal, offsets, q_lengths, kv_lengths, left, right,
    split_keys, part_out, part_lse,
):
    """Attend the G·T query rows of one key/value head to the keys of one split."""
    _, hq, t, d = q.shape
    hkv = k.shape[1]
    m = v.shape[3]
    group = hq // hkv
    num_splits = part_out.shape[2]
    bg, split = item // num_splits, item % num_splits
    b, g = bg // hkv, bg % hkv
    kb = b if k.shape[0] > 1 else 0
    n_b, s_b, off = q_lengths[b], kv_lengths[b], offsets[b]
    r = group * t
    # 1. Row r = hh * T + tt is token tt of query head g * G + hh; its keys are one
    #    interval, clipped here to the split.
    split_lo = split * split_keys
    split_hi = min(split_lo + split_keys, s_b)
    row_lo = np.zeros(r, dtype=np.int64)
    row_hi = np.zeros(r, dtype=np.int64)
    first, last = split_hi, split_lo
    for hh in range(group):
        for tt in range(min(t, n_b)):
            lo, hi = row_interval(tt, off, s_b, causal, left, right)
            lo, hi = max(lo, split_lo), min(hi, split_hi)
            row_lo[hh * t + tt], row_hi[hh * t + tt] = lo, hi
            if lo < hi:
                first, last = min(first, lo), max(last, hi)
    if last <= first:
        return  # no row may read a key of this split, so the part keeps lse = -inf
    # 2. Scaled queries of the group, transposed: (D, G·T).
    dt = q.dtype
    q_t = np.empty((d, r), dtype=dt)
    for hh in range(group):
        for tt in range(t):
            for c in range(d):
                q_t[c, hh * t + tt] = q[b, g * group + hh, tt, c] * scale
    empty_flags = np.zeros(1, dtype=np.bool_)
    empty_values = np.zeros(1, dtype=dt)
    no_rows = np.zeros(r, dtype=np.int64)
    (keep_buf, s_buf, p_buf, o_buf, new_max, shift, alpha, tile_sum,
     acc, row_max, row_sum) = tile_state(q, DECODE_BLOCK_K, r, m)
    # 3. Key tiles of the split in increasing order.
    for j0 in range(first, last, DECODE_BLOCK_K):
        j1 = min(j0 + DECODE_BLOCK_K, last)
        full = True
        for i in range(r):
            if row_lo[i] > j0 or row_hi[i] < j1:
                full = False
        update_tile(
            q_t, k[kb, g, j0:j1], v[kb, g, j0:j1], j0, row_lo, row_hi, full, softcap,
            False, empty_flags, no_rows, 0,
            False, empty_values, no_rows, 0,
            False, empty_flags, no_rows, 0, dt.type(1.0),
            keep_buf, s_buf, p_buf, o_buf, new_max, shift, alpha, tile_sum,
            acc, row_max, row_sum,
        )
    finish_rows(acc, row_max, row_sum, part_out[b, g, split], part_lse[b, g, split])


@jit(parallel=True)
def _decode_splits(
    q, k, v, scale, softcap, causal, offsets, q_lengths, kv_lengths, left, right,
    split_keys, part_out, part_lse,
):
    """Run `_decode_split` for every (batch row, key/value head, split), in parallel."""
    b, hkv, num_splits = part_out.shape[0], part_out.shape[1], part_out.shape[2]
    for item in prange(b * hkv * num_splits):
        _decode_split(
            item, q, k, v, scale, softcap, causal, offsets, q_lengths, kv_lengths,
            left, right, split_keys, part_out, part_lse,
        )


@jit(parallel=True)
def _merge_splits(part_out, part_lse, out, lse):
    """Merge the P parts of every row in split order; parts with lse = -inf weigh 0."""
    b, hkv, num_splits, r, m = part_out.shape
    t = out.shape[2]
    for bg in prange(b * hkv):
        bi, g = bg // hkv, bg % hkv
        for row in range(r):
            h, tt = g * (r // t) + row // t, row % t
            top = -np.inf
            for p in range(num_splits):
                part = part_lse[bi, g, p, row]
                if part > top or part != part:  # a NaN part makes the row NaN
                    top = part
            if top == -np.inf:
                continue  # no key anywhere: out stays 0, lse stays -inf
            total = 0.0
            for p in range(num_splits):
                part = part_lse[bi, g, p, row]
                if part == -np.inf:
                    continue  # an empty part is never read
                weight = np.exp(part - top)
                total += weight
                for c in range(m):
                    out[bi, h, tt, c] += weight * part_out[bi, g, p, row, c]
            for c in range(m):
                out[bi, h, tt, c] /= total
            lse[bi, h, tt] = top + np.log(total)
