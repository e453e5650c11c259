"""Numba CUDA twin of linear attention: state prefixes per key piece, then the rows.

Shape legend: B batch, Hq query heads, Hkv key/value heads, N queries, S keys, F feature
dimension, M value head dimension, C keys per piece (the chunk size), P = ceil(S / C)
pieces, R query rows per block.

The wrapper `kernattn.linear.linear_attention` evaluates and checks φ(q), φ(k) with NumPy
on the host; this module receives those features. Query i sees the first ``c_i`` keys
(`kernattn.linear.key_counts`: a causal keep-set is a prefix). Three kernels:

1. pieces: for every (batch row, key/value head, piece p), the piece's contribution
   ``ΔS_p = Σ_j φ(k_j) v_jᵀ`` (F, M) and ``Δz_p = Σ_j φ(k_j)`` (F) over its valid keys,
   one (f, column) pair per thread;
2. prefix: ``S_0 = S0`` (the initial state, or 0) and ``S_{p+1} = S_p + ΔS_p``, one state
   element per thread; ``S_P`` is the final state;
3. rows: query i reads ``S_{p_i}`` with ``p_i = c_i // C`` and adds the at most C - 1 keys
   ``p_i C .. c_i - 1`` as a small quadratic block ``a_ij = φ(q_i) · φ(k_j)``, so
   ``num_i = φ(q_i) S_{p_i} + Σ_j a_ij v_j`` and ``den_i = φ(q_i) z_{p_i} + Σ_j a_ij``.
   Keys beyond ``c_i`` are never multiplied, so NaN stored there cannot leak.

Pieces are independent, so every kernel is parallel over the sequence; the price is
O(B Hkv P F M) memory for the prefixes. Query head h reads key/value head
``h // (Hq / Hkv)`` in place. The zero-denominator policy is applied on the host by
`kernattn.similarity.resolve_denominators` (through the Numba twin's `apply_policy`),
as for every twin. The kernels compute in the dtype of the features they receive: float32
when the wrapper passes float32 features (float32, float16 or bfloat16 inputs), else
float64.
"""

from __future__ import annotations

import functools

import numpy as np

from kernattn._numba.linear import apply_policy
from kernattn._numba.softmax import compute_dtype
from kernattn.cuda import SHARED_BYTES, fit_rows, import_cuda, require_cuda, tiles, unbroadcast
from kernattn.linear import key_counts

cuda = import_cuda()


def linear_attention(
    q, k, v, *, phi_q, phi_k, feature_map, exact_inputs, structure, form, chunk_size,
    initial_state, zero_denominator, rtol,
):
    """Return (out (B, Hq, N, M), S (B, Hkv, F, M), z (B, Hkv, F)) as NumPy arrays.

    Takes the arguments `kernattn.linear.linear_attention` passes to every backend;
    `q`, `k`, `feature_map` and `exact_inputs` are unused. The piece size is the
    caller's `chunk_size` for ``form="chunked"`` and ``linear_chunk`` otherwise, at most
    ``linear_max_chunk`` (`kernattn.cuda.TILES`); it changes only the rounding.
    """
    require_cuda()
    b, hq, n, f = phi_q.shape
    hkv, s, m = v.shape[1], v.shape[2], v.shape[3]
    has_state = initial_state is not None
    state_arrays = tuple(initial_state) if has_state else ()
    dtype = compute_dtype(phi_q, phi_k, v, *state_arrays)
    sizes = tiles()
    chunk = int(chunk_size) if form == "chunked" else sizes["linear_chunk"]
    chunk = max(1, min(chunk, sizes["linear_max_chunk"]))
    pieces = (s + chunk - 1) // chunk
    # 1. Keys each query may see, as prefix lengths.
    counts = np.empty((b, n), dtype=np.int64)
    for bi in range(b):
        counts[bi] = key_counts(structure, bi, n)
    kv_lengths = np.asarray(structure.kv_lengths, dtype=np.int64)
    d_pq, d_pk, d_v = (cuda.to_device(unbroadcast(np.asarray(x, dtype=dtype)))
                       for x in (phi_q, phi_k, v))
    prefix_s = np.zeros((b, hkv, pieces + 1, f, m), dtype=dtype)
    prefix_z = np.zeros((b, hkv, pieces + 1, f), dtype=dtype)
    if has_state:
        prefix_s[:, :, 0] = state_arrays[0]
        prefix_z[:, :, 0] = state_arrays[1]
    prefix_s, prefix_z = cuda.to_device(prefix_s), cuda.to_device(prefix_z)
    num = cuda.to_device(np.zeros((b, hq, n, m), dtype=dtype))
    den = cuda.to_device(np.zeros((b, hq, n), dtype=dtype))
    threads = sizes["linear_threads"]
    name = np.dtype(dtype).name
    # 2. Piece contributions, then their prefix sums.
    if b * hkv * pieces > 0 and f > 0:
        piece_kernel(name)[(pieces, b * hkv), threads](
            d_pk, d_v, cuda.to_device(kv_lengths), chunk, prefix_s, prefix_z
        )
    elements = b * hkv * (f * m + f)
    if elements > 0 and pieces > 0:
        prefix_kernel(name)[(elements + threads - 1) // threads, threads](prefix_s, prefix_z)
    # 3. Numerators and denominators of the rows.
    rows_kernel, rows = row_kernel(name, threads, sizes["linear_rows"], chunk)
    if b * hq * n > 0:
        rows_kernel[((n + rows - 1) // rows, b * hq), threads](
            d_pq, d_pk, d_v, cuda.to_device(counts), chunk, prefix_s, prefix_z, num, den
        )
    num, den = num.copy_to_host(), den.copy_to_host()
    final = prefix_s.copy_to_host()[:, :, pieces], prefix_z.copy_to_host()[:, :, pieces]
    # 4. The zero-denominator policy, on the host, as every twin applies it.
    reference = np.zeros((b, hq, n), dtype=dtype)
    if rtol > 0:
        reference = cancellation_reference(phi_q, phi_k, counts, state_arrays, hkv)
    if not has_state:
        empty = np.broadcast_to((counts == 0)[:, None, :], (b, hq, n))
    else:
        empty = np.zeros((b, hq, n), dtype=bool)
    apply_policy(num, den, reference, empty, zero_denominator, rtol)
    return num, final[0], final[1]


def cancellation_reference(phi_q, phi_k, counts, state_arrays, hkv) -> np.ndarray:
    """Return ``Σ_f |φ_f(q_i)| (Σ_{j < c_i} |φ_f(k_j)| + |z0_f|)`` (B, Hq, N), on the host."""
    b, hq, n, f = phi_q.shape
    group = hq // hkv
    reference = np.zeros((b, hq, n))
    for bi in range(b):
        for h in range(hq):
            g = h // group
            pk = np.abs(phi_k[bi if phi_k.shape[0] > 1 else 0, g])
            abs_prefix = np.concatenate([np.zeros((1, f)), np.cumsum(pk, axis=0)])
            z0 = np.abs(state_arrays[1][bi, g]) if state_arrays else 0.0
            reference[bi, h] = np.sum(np.abs(phi_q[bi, h]) * (abs_prefix[counts[bi]] + z0),
                                      axis=1)
    return reference


# ---- Kernels -------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def piece_kernel(dtype_name):
    """Return the compiled piece kernel for one dtype."""
    return cuda.jit(make_piece_kernel(dtype_name))


@functools.lru_cache(maxsize=None)
def prefix_kernel(dtype_name):
    """Return the compiled prefix kernel for one dtype."""
    return cuda.jit(make_prefix_kernel(dtype_name))


@functools.lru_cache(maxsize=None)
def row_kernel(dtype_name, threads, rows, chunk):
    """Return (compiled row kernel, rows per block) for one dtype and chunk size."""
    pyfunc, rows = make_row_kernel(dtype_name, threads, rows, chunk)
    return cuda.jit(pyfunc), rows


def make_piece_kernel(dtype_name):
    """Return the piece kernel as a Python function: ΔS_p and Δz_p into prefix[p + 1]."""
    zero = np.dtype(dtype_name).type(0.0)

    def kernel(phi_k, v, kv_lengths, chunk, prefix_s, prefix_z):
        hkv = prefix_s.shape[1]
        f, m = prefix_s.shape[3], prefix_s.shape[4]
        p = cuda.blockIdx.x
        b, g = cuda.blockIdx.y // hkv, cuda.blockIdx.y % hkv
        kb = b if phi_k.shape[0] > 1 else 0
        j0 = p * chunk
        j1 = min(j0 + chunk, kv_lengths[b])  # keys beyond the valid length are never read
        for e in range(cuda.threadIdx.x, f * m + f, cuda.blockDim.x):
            total = zero
            if e < f * m:
                t, c = e // m, e % m
                for j in range(j0, j1):
                    total += phi_k[kb, g, j, t] * v[kb, g, j, c]
                prefix_s[b, g, p + 1, t, c] = total
            else:
                t = e - f * m
                for j in range(j0, j1):
                    total += phi_k[kb, g, j, t]
                prefix_z[b, g, p + 1, t] = total

    return kernel


def make_prefix_kernel(dtype_name):
    """Return the prefix kernel: S_{p+1} = S_p + ΔS_p, one state element per thread."""

    def kernel(prefix_s, prefix_z):
        hkv, pieces = prefix_s.shape[1], prefix_s.shape[2] - 1
        f, m = prefix_s.shape[3], prefix_s.shape[4]
        per_head = f * m + f
        e = cuda.grid(1)
        if e >= prefix_s.shape[0] * hkv * per_head:
            return
        bg, e = e // per_head, e % per_head
        b, g = bg // hkv, bg % hkv
        if e < f * m:
            t, c = e // m, e % m
            for p in range(pieces):
                prefix_s[b, g, p + 1, t, c] += prefix_s[b, g, p, t, c]
        else:
            t = e - f * m
            for p in range(pieces):
                prefix_z[b, g, p + 1, t] += prefix_z[b, g, p, t]

    return kernel


def make_row_kernel(dtype_name, threads, rows, chunk):
    """Return (row kernel as a Python function, rows per block R).

    Shared memory holds the (R, C) block of ``a_ij`` values; R is lowered until it fits
    in `kernattn.cuda.SHARED_BYTES`.
    """
    dt = np.dtype(dtype_name)
    rows = fit_rows(rows, chunk * dt.itemsize, SHARED_BYTES)
    zero = dt.type(0.0)
    rc, cc, nt = rows, chunk, threads
    numba_dtype = dt.type

    def kernel(phi_q, phi_k, v, counts, chunk, prefix_s, prefix_z, num, den):
        a_tile = cuda.shared.array((rc, cc), numba_dtype)
        tid = cuda.threadIdx.x
        hq, n, f = phi_q.shape[1], phi_q.shape[2], phi_q.shape[3]
        hkv, m = v.shape[1], v.shape[3]
        group = hq // hkv
        b, h = cuda.blockIdx.y // hq, cuda.blockIdx.y % hq
        g = h // group  # contiguous groups: query head h reads key/value head g
        kb = b if phi_k.shape[0] > 1 else 0
        i0 = cuda.blockIdx.x * rc
        # 1. The block a_ij = φ(q_i) · φ(k_j) for the keys p_i C .. c_i - 1 of each row.
        for e in range(tid, rc * cc, nt):
            r, jj = e // cc, e % cc
            i = i0 + r
            if i < n:
                base = (counts[b, i] // chunk) * chunk
                if jj < counts[b, i] - base:
                    a = zero
                    for t in range(f):
                        a += phi_q[b, h, i, t] * phi_k[kb, g, base + jj, t]
                    a_tile[r, jj] = a
        cuda.syncthreads()
        # 2. num (one value column per pair) and den (the extra column m) of each row.
        for e in range(tid, rc * (m + 1), nt):
            r, c = e // (m + 1), e % (m + 1)
            i = i0 + r
            if i < n:
                p = counts[b, i] // chunk
                width = counts[b, i] - p * chunk
                total = zero
                if c < m:
                    for t in range(f):
                        total += phi_q[b, h, i, t] * prefix_s[b, g, p, t, c]
                    for jj in range(width):
                        total += a_tile[r, jj] * v[kb, g, p * chunk + jj, c]
                    num[b, h, i, c] = total
                else:
                    for t in range(f):
                        total += phi_q[b, h, i, t] * prefix_z[b, g, p, t]
                    for jj in range(width):
                        total += a_tile[r, jj]
                    den[b, h, i] = total

    return kernel, rows

