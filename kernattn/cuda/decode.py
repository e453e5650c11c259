"""Numba CUDA twin of KV-cache decoding: split-KV attention merged by log-sum-exp.

Shape legend: B batch, Hq query heads, Hkv key/value heads, T new tokens (queries), C cache
capacity (key positions), D query/key head dimension, M value head dimension,
G = Hq / Hkv query heads per key/value head, R = G·T rows of one key/value head,
P splits, Bk key rows per shared tile.

One block computes one (split, batch row, key/value head) and holds the R query rows that
read that head, so each cache entry is read from memory once per key/value head (a factor
G less traffic for grouped-query and multi-query attention). For each key tile of the
split the block

1. loads the keys and values into shared memory,
2. computes the R x Bk scores, one (row, key) pair per thread, with the rows' key
   intervals (`kernattn._tiles.row_interval`) deciding which pairs exist,
3. updates each row's running maximum and sum (`kernattn._tiles.online_rescale`),
4. adds the weighted values, one (row, value column) pair per thread.

Each split writes a normalised partial output and its lse; a second kernel merges the P
parts of every row in split order with `kernattn._tiles.merge_lse`. The number of splits
depends on the shapes only, so results do not depend on the device.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from kernattn import _tiles
from kernattn._numba.softmax import alignment_offsets, compute_dtype, window_bounds
from kernattn.cuda import (
    SHARED_BYTES,
    as_device,
    device_from_bhnd,
    device_lse_from_bhn,
    dim_cap,
    fit_rows,
    host_stand_in,
    is_device_array,
    require_cuda,
    tiles,
)
from kernattn.cuda.softmax import (
    _device_input,
    _to_device,
    cuda,
    device_dtype,
    finish_lse,
    online_rescale,
    row_interval,
    soft_cap,
)

merge_lse = cuda.jit(device=True)(_tiles.merge_lse)

# Threads per block of the merge kernel (one output row per thread).
MERGE_THREADS = 128


def decode_attention(q, k, v, *, scale, softcap, structure, num_splits=None):
    """Return (out (B, Hq, T, M), lse (B, Hq, T)) as NumPy arrays in the compute dtype.

    Takes the arguments of `kernattn._numba.decode.decode_attention`. `num_splits` (P)
    defaults to ``ceil(max kv_length / decode_split_keys)`` (`kernattn.cuda.TILES`).
    """
    require_cuda()
    dtype = compute_dtype(q, k, v)
    arrays = [_to_device(x, dtype) for x in (q, k, v)]
    out, lse = launch_decode(*arrays, dtype=dtype, scale=scale, softcap=softcap,
                             structure=structure, num_splits=num_splits)
    return out.copy_to_host(), lse.copy_to_host()


def decode_attention_device(q, k_cache, v_cache, *, kv_lengths, scale, softcap, num_splits,
                            layout, return_lse):
    """Run `decode_attention` on device arrays without copying them to the host.

    The checks run on host stand-ins, as in
    `kernattn.cuda.softmax.softmax_attention_device`; returns Numba device arrays.
    """
    from kernattn.softmax import prepare_softmax_inputs

    require_cuda()
    dtype = device_dtype(q, k_cache, v_cache)
    stand_ins = [host_stand_in(as_device(x)) if is_device_array(x) else x
                 for x in (q, k_cache, v_cache)]
    args = prepare_softmax_inputs(
        *stand_ins, scale=scale, mask=None, bias=None, causal="bottom_right",
        alignment=None, window=None, softcap=softcap, kv_lengths=kv_lengths,
        q_lengths=None, dropout_mask=None, dropout_p=0.0, layout=layout,
        precision="input",
    )
    arrays = [_device_input(x, name, dtype, layout)
              for x, name in ((q, "q"), (k_cache, "k"), (v_cache, "v"))]
    out, lse = launch_decode(*arrays, dtype=dtype, scale=args["scale"],
                             softcap=args["softcap"], structure=args["structure"],
                             num_splits=num_splits)
    out = device_from_bhnd(out, args["ndim"], layout)
    if return_lse:
        return out, device_lse_from_bhn(lse, args["ndim"])
    return out


def launch_decode(q, k, v, *, dtype, scale, softcap, structure, num_splits):
    """Launch the split and merge kernels on device arrays; return device (out, lse)."""
    b, hq, t, d = q.shape
    hkv, m = k.shape[1], v.shape[3]
    rows = (hq // hkv) * t
    sizes = tiles()
    kv_lengths = np.asarray(structure.kv_lengths, dtype=np.int64)
    max_length = int(kv_lengths.max()) if b else 0
    if num_splits is None:
        num_splits = max(1, math.ceil(max_length / sizes["decode_split_keys"]))
    split_keys = max(1, math.ceil(max_length / num_splits))
    out = cuda.to_device(np.zeros((b, hq, t, m), dtype=dtype))
    lse = cuda.to_device(np.full((b, hq, t), -np.inf, dtype=dtype))
    if b * hq * t == 0:
        return out, lse
    part_out = cuda.to_device(np.zeros((b, hkv, num_splits, rows, m), dtype=dtype))
    part_lse = cuda.to_device(np.full((b, hkv, num_splits, rows), -np.inf, dtype=dtype))
    threads = sizes["decode_threads"]
    kernel = decode_kernel(np.dtype(dtype).name, threads, sizes["block_k"], dim_cap(rows),
                           dim_cap(d), dim_cap(m))
    left, right = window_bounds(structure)
    kernel[(num_splits, b * hkv), threads](
        q, k, v, dtype.type(scale), dtype.type(0.0 if softcap is None else softcap),
        bool(structure.causal), cuda.to_device(alignment_offsets(structure)),
        cuda.to_device(np.asarray(structure.q_lengths, dtype=np.int64)),
        cuda.to_device(kv_lengths), left, right, split_keys, part_out, part_lse,
    )
    merge_threads = min(MERGE_THREADS, sizes["decode_threads"])
    merge = merge_kernel(np.dtype(dtype).name)
    merge[(b * hq * t + merge_threads - 1) // merge_threads, merge_threads](
        part_out, part_lse, out, lse
    )
    return out, lse


# ---- Kernels -------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def decode_kernel(dtype_name, threads, block_k, rows_cap, d_cap, m_cap):
    """Return the compiled split kernel for one dtype and size configuration."""
    return cuda.jit(make_decode_kernel(dtype_name, threads, block_k, rows_cap, d_cap, m_cap))


@functools.lru_cache(maxsize=None)
def merge_kernel(dtype_name):
    """Return the compiled merge kernel for one dtype."""
    return cuda.jit(make_merge_kernel(dtype_name))


def make_decode_kernel(dtype_name, threads, block_k, rows_cap, d_cap, m_cap):
    """Return the split kernel as a Python function (`compile_ptx` takes it).

    Shared memory holds the key and value tiles (Bk, Dc) and (Bk, Mc), the scores and
    weights (Rc, Bk) and the per-row state; Bk is lowered until they fit in
    `kernattn.cuda.SHARED_BYTES`. Each thread owns ``ceil(Rc·Mc / threads)`` (row,
    value column) accumulators in local memory.
    """
    dt = np.dtype(dtype_name)
    per_row = rows_cap * (3 * dt.itemsize + 16)
    bk = fit_rows(block_k, (d_cap + m_cap + 2 * rows_cap) * dt.itemsize,
                  SHARED_BYTES - per_row)
    rc, dc, mc, nt = rows_cap, d_cap, m_cap, threads
    slots = (rc * mc + nt - 1) // nt
    zero, one, neg_inf = dt.type(0.0), dt.type(1.0), dt.type(-np.inf)
    numba_dtype = dt.type

    def kernel(q, k, v, scale, softcap, causal, offsets, q_lengths, kv_lengths, left,
               right, split_keys, part_out, part_lse):
        k_tile = cuda.shared.array((bk, dc), numba_dtype)
        v_tile = cuda.shared.array((bk, mc), numba_dtype)
        s_tile = cuda.shared.array((rc, bk), numba_dtype)
        p_tile = cuda.shared.array((rc, bk), numba_dtype)
        row_max = cuda.shared.array(rc, numba_dtype)
        row_sum = cuda.shared.array(rc, numba_dtype)
        alpha = cuda.shared.array(rc, numba_dtype)
        row_lo = cuda.shared.array(rc, np.int64)
        row_hi = cuda.shared.array(rc, np.int64)
        acc = cuda.local.array(slots, numba_dtype)
        tid = cuda.threadIdx.x
        hq, t, d = q.shape[1], q.shape[2], q.shape[3]
        hkv, m = k.shape[1], v.shape[3]
        group = hq // hkv
        rows = group * t
        split = cuda.blockIdx.x
        b, g = cuda.blockIdx.y // hkv, cuda.blockIdx.y % hkv
        kb = b if k.shape[0] > 1 else 0
        n_b, s_b, off = q_lengths[b], kv_lengths[b], offsets[b]
        # A split past this row's valid keys is clamped to the empty interval [s_b, s_b),
        # so its tile loop below runs zero times.
        split_lo = min(split * split_keys, s_b)
        split_hi = min(split_lo + split_keys, s_b)
        # 1. Row r = hh * T + tt is token tt of query head g * G + hh; its keys are one
        #    interval, clipped here to the split. Every thread computes the union.
        first, last = split_hi, split_lo
        for r in range(rows):
            tt = r % t
            lo, hi = row_interval(tt, off, s_b, causal, left, right)
            lo, hi = max(lo, split_lo), min(hi, split_hi)
            if tt >= n_b:
                hi = lo
            if r % nt == tid:
                row_lo[r], row_hi[r] = lo, hi
                row_max[r], row_sum[r] = neg_inf, zero
            if lo < hi:
                first, last = min(first, lo), max(last, hi)
        for e in range(slots):
            acc[e] = zero
        cuda.syncthreads()
        # 2. Key tiles of the split in increasing order.
        for j0 in range(first, last, bk):
            nj = min(bk, last - j0)
            for e in range(tid, nj * d, nt):
                k_tile[e // d, e % d] = k[kb, g, j0 + e // d, e % d]
            for e in range(tid, nj * m, nt):
                v_tile[e // m, e % m] = v[kb, g, j0 + e // m, e % m]
            cuda.syncthreads()
            # 3. Scores of the (row, key) pairs; pairs outside the rows' intervals are -inf
            #    and their keys are never multiplied.
            for e in range(tid, rows * nj, nt):
                r, jj = e // nj, e % nj
                j = j0 + jj
                x = neg_inf
                if row_lo[r] <= j and j < row_hi[r]:
                    h = g * group + r // t
                    x = zero
                    for c in range(d):
                        x += (q[b, h, r % t, c] * scale) * k_tile[jj, c]
                    if softcap > 0:
                        x = soft_cap(x, softcap)
                s_tile[r, jj] = x
            cuda.syncthreads()
            # 4. Online softmax per row.
            for r in range(tid, rows, nt):
                tile_max = neg_inf
                for jj in range(nj):
                    if s_tile[r, jj] > tile_max:
                        tile_max = s_tile[r, jj]
                if tile_max != neg_inf:
                    new_max, a = online_rescale(row_max[r], tile_max)
                    total = zero
                    for jj in range(nj):
                        x = s_tile[r, jj]
                        w = math.exp(x - new_max) if x != neg_inf else zero
                        p_tile[r, jj] = w
                        total += w
                    row_sum[r] = row_sum[r] * a + total
                    row_max[r] = new_max
                    alpha[r] = a
                else:
                    alpha[r] = one
            cuda.syncthreads()
            # 5. Weighted values, one (row, value column) pair per accumulator; keys with
            #    score -inf are skipped, so NaN stored there is never multiplied.
            if m > 0:
                for e in range(slots):
                    pair = tid + e * nt
                    r, c = pair // m, pair % m
                    if r < rows:
                        a = acc[e] * alpha[r]
                        for jj in range(nj):
                            if s_tile[r, jj] != neg_inf:
                                a += p_tile[r, jj] * v_tile[jj, c]
                        acc[e] = a
            cuda.syncthreads()
        # 6. Normalised partial output and lse; rows with no key keep 0 and -inf.
        if m > 0:
            for e in range(slots):
                pair = tid + e * nt
                r, c = pair // m, pair % m
                if r < rows and row_sum[r] != zero:
                    part_out[b, g, split, r, c] = acc[e] / row_sum[r]
        for r in range(tid, rows, nt):
            if row_sum[r] != zero:
                part_lse[b, g, split, r] = finish_lse(row_max[r], row_sum[r])

    return kernel


def make_merge_kernel(dtype_name):
    """Return the merge kernel as a Python function: one output row per thread."""
    neg_inf = np.dtype(dtype_name).type(-np.inf)

    def kernel(part_out, part_lse, out, lse):
        hq, t, m = out.shape[1], out.shape[2], out.shape[3]
        hkv, num_splits = part_out.shape[1], part_out.shape[2]
        group = hq // hkv
        idx = cuda.grid(1)
        if idx >= out.shape[0] * hq * t:
            return
        b, h, tt = idx // (hq * t), (idx // t) % hq, idx % t
        g, row = h // group, (h % group) * t + tt
        total = neg_inf
        for p in range(num_splits):
            part = part_lse[b, g, p, row]
            if part == neg_inf:
                continue  # an empty part is never read
            total, w_acc, w_part = merge_lse(total, part)
            for c in range(m):
                out[b, h, tt, c] = out[b, h, tt, c] * w_acc + w_part * part_out[b, g, p, row, c]
        lse[b, h, tt] = total

    return kernel
