"""Numba twin of softmax attention: a tiled online softmax (FlashAttention's algorithm).

Shape legend: B batch, Hq query heads, Hkv key/value heads, N queries, S keys, D query/key
head dimension, M value head dimension, R query rows of one tile.

Each (batch row, query head, query tile) is one item of a ``numba.prange`` loop. An item
walks its key tiles in a fixed order and keeps, per query row, the running maximum score
``m``, the running sum ``l`` of ``exp(s - m)`` and the running weighted sum of values. No (N, S)
matrix ever exists, so memory beyond inputs and outputs is O(threads · tile).
Key tiles outside the structural keep-set (causal rule, window, lengths) are never
visited, and tiles that an explicit mask excludes entirely are skipped before any product.
Every item is computed by one thread with single-threaded BLAS, so results do not depend
on the number of threads.

Precision: float32 inputs are computed in float32 (BLAS sgemm, float32 running sums),
anything else in float64. The exponential is `kernattn._numba._exp.fast_exp`, accurate to
about one ulp of the compute type.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from kernattn import _tiles
from kernattn._numba import BLOCK_K, BLOCK_Q, jit, single_threaded_blas
from kernattn._numba._exp import fast_exp
from kernattn._tiles import UNBOUNDED

# Scalar steps shared with the CUDA kernels: one source, compiled for each target.
row_interval = jit()(_tiles.row_interval)
soft_cap = jit()(_tiles.soft_cap)


def softmax_attention(
    q, k, v, *, scale, mask, bias, softcap, structure, dropout_mask, dropout_scale
):
    """Return (out (B, Hq, N, M), lse (B, Hq, N)) in the compute dtype of q, k, v.

    Takes the arguments that `kernattn.softmax.prepare_softmax_inputs` returns. Masks,
    biases and dropout patterns may be broadcast views with zero strides: they are read
    in place, never expanded to (B, Hq, N, S).
    """
    dtype = compute_dtype(q, k, v)
    q = as_kernel_array(q, dtype)
    k, v = as_kernel_array(k, dtype, True), as_kernel_array(v, dtype, True)
    b, hq, n, _ = q.shape
    m = v.shape[3]
    out = np.zeros((b, hq, n, m), dtype=dtype)
    lse = np.full((b, hq, n), -np.inf, dtype=dtype)
    mask_flat, mask_strides = flat_strided(mask, np.bool_)
    bias_flat, bias_strides = flat_strided(bias, dtype)
    drop_flat, drop_strides = flat_strided(dropout_mask, np.bool_)
    left, right = window_bounds(structure)
    with single_threaded_blas():
        _softmax_forward(
            q, k, v, dtype.type(scale), dtype.type(0.0 if softcap is None else softcap),
            bool(structure.causal), alignment_offsets(structure),
            np.array(structure.q_lengths, dtype=np.int64),  # writable copies: one
            np.array(structure.kv_lengths, dtype=np.int64),  # array type, one compilation
            left, right,
            mask is not None, mask_flat, mask_strides,
            bias is not None, bias_flat, bias_strides,
            dropout_mask is not None, drop_flat, drop_strides, dtype.type(dropout_scale),
            out, lse,
        )
    return out, lse


# ---- Argument preparation (plain Python) -------------------------------------------------


def compute_dtype(*arrays) -> np.dtype:
    """Return float32 when every array is float32 (or narrower float), else float64."""
    narrow = all(a.dtype.kind == "f" and a.dtype.itemsize <= 4 for a in arrays)
    return np.dtype(np.float32 if narrow else np.float64)


def as_kernel_array(x: np.ndarray, dtype: np.dtype, shared_batch: bool = False) -> np.ndarray:
    """Return `x` as a read-only C-contiguous (B or 1, H, L, D) array of `dtype`.

    With `shared_batch`, a batch axis broadcast with stride 0 (k and v shared by every
    batch row) is reduced to size 1 instead of being copied, and the kernels read batch
    row 0. Every call passes the same array type (read-only, C-contiguous), so Numba
    compiles one specialisation per dtype.
    """
    if shared_batch and x.size and x.shape[0] > 1 and x.strides[0] == 0:
        x = x[:1]
    x = np.ascontiguousarray(x, dtype=dtype).view()
    x.flags.writeable = False
    return x


def flat_strided(x: np.ndarray | None, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Return a 1-D array over the memory a 4-D view addresses, and its strides in elements.

    Element [b, h, i, j] of `x` is ``flat[b*st[0] + h*st[1] + i*st[2] + j*st[3]]``. A
    broadcast view keeps its zero strides, so a (N, S) mask broadcast to (B, Hq, N, S) costs
    N·S elements, not B·Hq·N·S. Negative or unaligned strides are copied first. None gives
    a one-element placeholder that the kernels never read.
    """
    if x is None or x.size == 0:
        flat = np.zeros(1, dtype=dtype)
        flat.flags.writeable = False
        return flat, np.zeros(4, dtype=np.int64)
    itemsize = x.dtype.itemsize
    if any(st < 0 or st % itemsize for st in x.strides):
        x = np.ascontiguousarray(x)
    strides = np.array([st // itemsize for st in x.strides], dtype=np.int64)
    extent = int(sum((size - 1) * st for size, st in zip(x.shape, strides))) + 1
    flat = np.lib.stride_tricks.as_strided(x, shape=(extent,), strides=(itemsize,))
    flat = np.array(flat, dtype=dtype)  # copies the addressed extent only
    flat.flags.writeable = False
    return flat, strides


def window_bounds(structure) -> tuple[int, int]:
    """Return the window (left, right) sizes with `UNBOUNDED` for a missing side."""
    if structure.window is None:
        return UNBOUNDED, UNBOUNDED
    left, right = structure.window
    return (UNBOUNDED if left is None else left), (UNBOUNDED if right is None else right)


def alignment_offsets(structure) -> np.ndarray:
    """Return off_b per batch row: s_b - n_b under bottom-right alignment, else 0."""
    b = len(structure.kv_lengths)
    if structure.alignment != "bottom_right":
        return np.zeros(b, dtype=np.int64)
    return (structure.kv_lengths - structure.q_lengths).astype(np.int64)


# ---- Kernels -------------------------------------------------------------------------------


@jit(fastmath={"reassoc"})
def all_finite(x):
    """Return whether every element of the 2-D array `x` is finite.

    ``x * 0`` is 0 for finite x and NaN for inf or NaN, so the sum is NaN exactly when
    some element is not finite. Reassociation lets LLVM vectorize the sum; it does not
    assume the absence of NaN, so the test stays exact.
    """
    zero = x.dtype.type(0.0)
    total = zero
    for a in range(x.shape[0]):
        for c in range(x.shape[1]):
            total += x[a, c] * zero
    return total == zero


@jit()
def update_tile(
    q_t, k_tile, v_tile, j0, row_lo, row_hi, full, softcap,
    has_mask, mask_flat, mask_row, mask_sj,
    has_bias, bias_flat, bias_row, bias_sj,
    has_drop, drop_flat, drop_row, drop_sj, dropout_scale,
    keep_buf, s_buf, p_buf, o_buf, new_max, shift, alpha, tile_sum,
    acc, row_max, row_sum,
):
    """Fold the keys j0 .. j0 + nj - 1 into the running softmax state of R query rows.

    q_t (D, R) contains the scaled queries transposed; k_tile (nj, D) and v_tile (nj, M) the
    keys and values. Row r may see key j when ``row_lo[r] <= j < row_hi[r]`` and the mask,
    if any, allows it; ``full`` states that every pair of the tile passes those rules.
    acc (R, M), row_max (R) and row_sum (R) are the running state; the *_buf arrays are
    scratch space of at least nj·R (keep, s, p) and R·M (o) elements.
    Scores are stored transposed, (nj, R), so every row-wise step (max, exp, sum) is an
    elementwise loop over R that LLVM vectorizes, and each row sums its keys in key order.
    """
    nj = k_tile.shape[0]
    d, r = q_t.shape
    m = v_tile.shape[1]
    neg_inf = -np.inf
    keep = keep_buf[: nj * r].reshape((nj, r))
    # 1. The keep-set of the tile: structure AND mask. A tile with no kept pair is skipped
    #    before any product.
    if not full:
        kept = 0
        for jj in range(nj):
            j = j0 + jj
            for i in range(r):
                ok = row_lo[i] <= j and j < row_hi[i]
                if has_mask and ok:
                    ok = mask_flat[mask_row[i] + j * mask_sj]
                keep[jj, i] = ok
                kept += ok
        if kept == 0:
            return
    # 2. Scores s_ji = k_j . (scale q_i), then soft-capping, then bias.
    s = s_buf[: nj * r].reshape((nj, r))
    if d > 0:
        np.dot(k_tile, q_t, s)
    else:
        s[:, :] = 0
    if softcap > 0:
        for jj in range(nj):
            for i in range(r):
                s[jj, i] = soft_cap(s[jj, i], softcap)
    if has_bias:
        for jj in range(nj):
            j = j0 + jj
            for i in range(r):
                s[jj, i] += bias_flat[bias_row[i] + j * bias_sj]
    # 3. Exclude before exp: excluded scores become -inf, so NaN stored there is dropped.
    if not full:
        for jj in range(nj):
            for i in range(r):
                s[jj, i] = s[jj, i] if keep[jj, i] else neg_inf
    # 4. Online softmax: new maximum, rescale factor exp(m_old - m_new), tile weights.
    #    A row whose scores are all -inf so far is shifted by 0, so exp(-inf) = 0, not NaN.
    for i in range(r):
        new_max[i] = row_max[i]
        tile_sum[i] = 0
    for jj in range(nj):
        for i in range(r):
            x = s[jj, i]
            cur = new_max[i]
            new_max[i] = x if x > cur else cur
    for i in range(r):
        shift[i] = new_max[i] if new_max[i] != neg_inf else 0
        alpha[i] = fast_exp(row_max[i] - shift[i])
        row_max[i] = new_max[i]
    p = p_buf[: nj * r].reshape((nj, r))
    for jj in range(nj):
        for i in range(r):
            w = fast_exp(s[jj, i] - shift[i])
            p[jj, i] = w
            tile_sum[i] += w
    for i in range(r):
        row_sum[i] = row_sum[i] * alpha[i] + tile_sum[i]
    # 5. Dropout after normalisation: the keep pattern scales the numerator only.
    if has_drop:
        for jj in range(nj):
            j = j0 + jj
            for i in range(r):
                dropped = not drop_flat[drop_row[i] + j * drop_sj]
                p[jj, i] = 0 if dropped else p[jj, i] * dropout_scale
    if m == 0:
        return
    # 6. Weighted sum of values. BLAS multiplies every weight, and 0 * NaN is NaN, so a
    #    tile whose values are not all finite takes a loop over the live keys instead.
    o = o_buf[: r * m].reshape((r, m))
    if all_finite(v_tile):
        np.dot(p.T, v_tile, o)
    else:
        for i in range(r):
            for c in range(m):
                total = o.dtype.type(0.0)
                for jj in range(nj):
                    if s[jj, i] != neg_inf:
                        total += p[jj, i] * v_tile[jj, c]
                o[i, c] = total
    for i in range(r):
        a = alpha[i]
        for c in range(m):
            acc[i, c] = acc[i, c] * a + o[i, c]


@jit()
def tile_state(like, block_k, r, m):
    """Allocate the scratch and running state of `update_tile` for R rows, dtype of `like`.

    Returns (keep_buf, s_buf, p_buf, o_buf, new_max, shift, alpha, tile_sum, acc,
    row_max, row_sum): scratch for tiles of up to `block_k` keys, and the running state
    of an empty row (acc 0, row_max -inf, row_sum 0).
    """
    dt = like.dtype
    keep_buf = np.empty(block_k * r, dtype=np.bool_)
    s_buf = np.empty(block_k * r, dtype=dt)
    p_buf = np.empty(block_k * r, dtype=dt)
    o_buf = np.empty(r * m, dtype=dt)
    new_max, shift = np.empty(r, dtype=dt), np.empty(r, dtype=dt)
    alpha, tile_sum = np.empty(r, dtype=dt), np.empty(r, dtype=dt)
    acc = np.zeros((r, m), dtype=dt)
    row_max = np.full(r, -np.inf, dtype=dt)
    row_sum = np.zeros(r, dtype=dt)
    return (keep_buf, s_buf, p_buf, o_buf, new_max, shift, alpha, tile_sum,
            acc, row_max, row_sum)


@jit()
def finish_rows(acc, row_max, row_sum, out_rows, lse_rows):
    """Write out = acc / l and lse = m + log(l); rows with l == 0 stay 0 with lse -inf."""
    for i in range(acc.shape[0]):
        total = row_sum[i]
        if total == 0:
            continue
        for c in range(acc.shape[1]):
            out_rows[i, c] = acc[i, c] / total
        lse_rows[i] = row_max[i] + np.log(total)


@jit()
def _query_tile(
    item, q, k, v, scale, softcap, causal, offsets, q_lengths, kv_lengths, left, right,
    has_mask, mask_flat, mask_strides, has_bias, bias_flat, bias_strides,
    has_drop, drop_flat, drop_strides, dropout_scale, out, lse,
):
    """Compute one (batch row, query head, query tile) item of `_softmax_forward`."""
    _, hq, n, d = q.shape
    hkv = k.shape[1]
    m = v.shape[3]
    group = hq // hkv
    n_tiles = (n + BLOCK_Q - 1) // BLOCK_Q
    bh, rank = item // n_tiles, item % n_tiles
    # Causal tiles get dearer with the tile index: interleaving cheap and dear tiles
    # (0, last, 1, last - 1, ...) balances the contiguous chunks that prange hands out.
    tile = rank // 2 if rank % 2 == 0 else n_tiles - 1 - rank // 2
    b, h = bh // hq, bh % hq
    g = h // group  # contiguous groups: query head h reads key/value head g
    kb = b if k.shape[0] > 1 else 0
    n_b, s_b, off = q_lengths[b], kv_lengths[b], offsets[b]
    i0 = tile * BLOCK_Q
    i1 = min(i0 + BLOCK_Q, n_b)
    if i1 <= i0:
        return  # padding queries: out stays 0, lse stays -inf
    r = i1 - i0
    # 1. Each row's allowed keys form one interval [lo, hi) from index arithmetic.
    row_lo = np.empty(r, dtype=np.int64)
    row_hi = np.empty(r, dtype=np.int64)
    first, last = s_b, 0
    for ii in range(r):
        lo, hi = row_interval(i0 + ii, off, s_b, causal, left, right)
        row_lo[ii], row_hi[ii] = lo, hi
        if lo < hi:
            first, last = min(first, lo), max(last, hi)
    if last <= first:
        return  # every row is empty
    # 2. Scaled queries, transposed: (D, R).
    q_t = np.empty((d, r), dtype=q.dtype)
    for ii in range(r):
        for t in range(d):
            q_t[t, ii] = q[b, h, i0 + ii, t] * scale
    mask_row = np.empty(r, dtype=np.int64)
    bias_row = np.empty(r, dtype=np.int64)
    drop_row = np.empty(r, dtype=np.int64)
    for ii in range(r):
        i = i0 + ii
        mask_row[ii] = b * mask_strides[0] + h * mask_strides[1] + i * mask_strides[2]
        bias_row[ii] = b * bias_strides[0] + h * bias_strides[1] + i * bias_strides[2]
        drop_row[ii] = b * drop_strides[0] + h * drop_strides[1] + i * drop_strides[2]
    (keep_buf, s_buf, p_buf, o_buf, new_max, shift, alpha, tile_sum,
     acc, row_max, row_sum) = tile_state(q, BLOCK_K, r, m)
    # 3. Key tiles in increasing order over the union of the row intervals.
    for j0 in range(first, last, BLOCK_K):
        j1 = min(j0 + BLOCK_K, last)
        full = not has_mask
        touched = False
        for ii in range(r):
            lo, hi = row_lo[ii], row_hi[ii]
            if lo > j0 or hi < j1:
                full = False
            if lo < hi and lo < j1 and hi > j0:
                touched = True
        if not touched:
            continue
        update_tile(
            q_t, k[kb, g, j0:j1], v[kb, g, j0:j1], j0, row_lo, row_hi, full, softcap,
            has_mask, mask_flat, mask_row, mask_strides[3],
            has_bias, bias_flat, bias_row, bias_strides[3],
            has_drop, drop_flat, drop_row, drop_strides[3], dropout_scale,
            keep_buf, s_buf, p_buf, o_buf, new_max, shift, alpha, tile_sum,
            acc, row_max, row_sum,
        )
    finish_rows(acc, row_max, row_sum, out[b, h, i0:i1], lse[b, h, i0:i1])


@jit(parallel=True)
def _softmax_forward(
    q, k, v, scale, softcap, causal, offsets, q_lengths, kv_lengths, left, right,
    has_mask, mask_flat, mask_strides, has_bias, bias_flat, bias_strides,
    has_drop, drop_flat, drop_strides, dropout_scale, out, lse,
):
    """Run `_query_tile` for every (batch row, query head, query tile), in parallel."""
    b, hq, n, _ = q.shape
    n_tiles = (n + BLOCK_Q - 1) // BLOCK_Q
    for item in prange(b * hq * n_tiles):
        _query_tile(
            item, q, k, v, scale, softcap, causal, offsets, q_lengths, kv_lengths,
            left, right, has_mask, mask_flat, mask_strides, has_bias, bias_flat,
            bias_strides, has_drop, drop_flat, drop_strides, dropout_scale, out, lse,
        )
