"""Numba twin of linear attention: a state carried across query chunks, in parallel over heads.

Shape legend: B batch, Hq query heads, Hkv key/value heads, N queries, S keys, F feature
dimension, M value head dimension, C chunk size, R query rows of one chunk, W keys of
one chunk's quadratic block.

The wrapper `kernattn.linear.linear_attention` evaluates and checks φ(q), φ(k) with
NumPy; this module receives those features. Each (batch row, query head) is one item of a
``numba.prange`` loop, and query head h reads key/value head ``h // (Hq / Hkv)`` in place
(no copy of K or V per query head). An item walks its queries in chunks of C rows:

1. keys every query of the chunk may see are added to the state
   ``S = Σ φ(k_j) v_jᵀ`` (F, M) and ``z = Σ φ(k_j)`` (F), C keys per BLAS product;
2. the chunk's rows read the state, ``num = φ(Q_c) S`` and ``den = φ(Q_c) z``;
3. keys that only some rows of the chunk may see form a small quadratic block
   ``A = φ(Q_c) φ(K_w)ᵀ``, then ``num += A V_w`` and ``den += A 1``. There are at most C
   such keys, because a causal keep-set grows by one key per query. Excluded entries of
   A are set to 0 by a select, so NaN stored there cannot leak.

Without a causal rule every query sees every valid key, so step 1 absorbs them all before
the first chunk and step 3 is empty: the two passes of non-causal linear attention. Every
`form` runs this kernel; the form changes only the chunk size (the caller's `chunk_size`
for ``form="chunked"``, `CHUNK` otherwise), so memory is O(threads · C (C + F + M)) beyond
the wrapper's arrays for every form, the quadratic one included.

Each item is computed by one thread in a fixed order with single-threaded BLAS, so results
do not depend on the number of threads. With grouped-query attention, each query head of a
group builds the group's state itself: a factor Hq / Hkv more state updates, in exchange
for Hq-way parallelism even when Hkv = 1.

The kernel returns the numerator and denominator; the zero-denominator policy is applied
afterwards by `kernattn.similarity.resolve_denominators`, the helper the other twins use.

Precision: the kernel computes in the dtype of the features it receives: float32 when
φ(q), φ(k), v and the state are all float32, float64 otherwise. The public wrapper passes
float64 features, so ``backend="numba"`` computes in float64.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from kernattn._numba import jit, single_threaded_blas
from kernattn._numba.softmax import all_finite, as_kernel_array, compute_dtype
from kernattn.linear import key_counts
from kernattn.similarity import resolve_denominators

# Chunk size of every form except "chunked" (which uses the caller's chunk_size). At
# F = M = 64, 64 rows balance the quadratic block (2 C² (F + M) operations per chunk)
# against the state products (4 C F M). 128 and 256 were not faster in a float64 trial
# at N = 4096, Hq = 8 on a shared 2-core AVX-512 machine (timings there are noisy).
CHUNK = 64

# Rows per call of `resolve_denominators` when applying the policy in place, so its
# temporaries stay a few MiB whatever N is.
POLICY_ROWS = 8192


def linear_attention(
    q, k, v, *, phi_q, phi_k, feature_map, exact_inputs, structure, form, chunk_size,
    initial_state, zero_denominator, rtol,
):
    """Return (out (B, Hq, N, M), S (B, Hkv, F, M), z (B, Hkv, F)).

    Takes the arguments `kernattn.linear.linear_attention` passes to every backend.
    `q`, `k`, `feature_map` and `exact_inputs` are unused: the kernel reads the features
    `phi_q` (B, Hq, N, F) and `phi_k` (B, Hkv, S, F) and the values `v`.
    """
    b, hq, n, _ = q.shape
    hkv, m = v.shape[1], v.shape[3]
    f = phi_q.shape[-1]
    has_state = initial_state is not None
    state_arrays = tuple(initial_state) if has_state else ()
    dtype = compute_dtype(phi_q, phi_k, v, *state_arrays)
    phi_q = as_kernel_array(phi_q, dtype)
    phi_k = as_kernel_array(phi_k, dtype)
    v = as_kernel_array(v, dtype)
    if not has_state:
        state_arrays = (np.zeros((1, hkv, f, m)), np.zeros((1, hkv, f)))
    s0, z0 = (as_kernel_array(x, dtype) for x in state_arrays)
    # 1. Keys each query may see, as prefix lengths (a causal keep-set is a prefix).
    counts = np.empty((b, n), dtype=np.int64)
    for bi in range(b):
        counts[bi] = key_counts(structure, bi, n)
    kv_lengths = np.array(structure.kv_lengths, dtype=np.int64)
    chunk = int(chunk_size) if form == "chunked" else CHUNK
    # A chunk never needs more rows than there are queries; the cap keeps the (C, C)
    # scratch block bounded whatever chunk_size the caller passes.
    chunk = max(1, min(chunk, n))
    # 2. Numerators (written where the output goes), denominators and the cancellation
    #    reference sum_f |φ_f(q_i)| (sum_{j < c_i} |φ_f(k_j)| + |z0_f|), per query row.
    num = np.zeros((b, hq, n, m), dtype=dtype)
    den = np.zeros((b, hq, n), dtype=dtype)
    reference = np.zeros((b, hq, n), dtype=dtype)
    final_s = np.zeros((b, hkv, f, m), dtype=dtype)
    final_z = np.zeros((b, hkv, f), dtype=dtype)
    with single_threaded_blas():
        _linear_forward(
            phi_q, phi_k, v, s0, z0, counts, kv_lengths, chunk,
            num, den, reference, final_s, final_z,
        )
    # 3. Rows with no key and no initial state are empty: 0 under every policy.
    if not has_state:
        empty = np.broadcast_to((counts == 0)[:, None, :], (b, hq, n))
    else:
        empty = np.zeros((b, hq, n), dtype=bool)
    apply_policy(num, den, reference, empty, zero_denominator, rtol)
    return num, final_s, final_z


def apply_policy(num, den, reference, empty, policy, rtol) -> None:
    """Divide `num` (B, Hq, N, M) by `den` in place under the zero-denominator policy.

    A first call of `resolve_denominators` on zero-width rows raises under "raise" (or
    when den + eps is 0) with the (batch, head, query) index of every flagged row. The division then
    runs in blocks of `POLICY_ROWS` rows, so the helper's temporaries never reach the
    size of `num`.
    """
    b, hq, n, m = num.shape
    resolve_denominators(num[..., :0], den, reference, empty, policy, rtol)
    rows = b * hq * n
    flat_num = num.reshape(rows, m)
    flat_den, flat_ref = den.reshape(rows), reference.reshape(rows)
    flat_empty = np.ascontiguousarray(empty).reshape(rows)
    for r0 in range(0, rows, POLICY_ROWS):
        r1 = min(r0 + POLICY_ROWS, rows)
        flat_num[r0:r1] = resolve_denominators(
            flat_num[r0:r1], flat_den[r0:r1], flat_ref[r0:r1], flat_empty[r0:r1], policy, rtol
        )


# ---- Kernels -------------------------------------------------------------------------------


@jit()
def matmul(a, b, out):
    """Write ``a @ b`` into `out`; BLAS when no dimension is 0 (BLAS rejects empty ones)."""
    if a.shape[0] == 0 or a.shape[1] == 0 or b.shape[1] == 0:
        out[:, :] = 0
    else:
        np.dot(a, b, out)


@jit()
def absorb_keys(pk, vv, start, stop, chunk, state_s, state_z, abs_z, product):
    """Add keys start .. stop - 1 to the state, `chunk` keys per BLAS product.

    state_s (F, M) += φ(K)ᵀ V, state_z (F) += Σ φ(k_j), abs_z (F) += Σ |φ(k_j)|;
    `product` is (F, M) scratch space.
    """
    f = pk.shape[1]
    for a in range(start, stop, chunk):
        e = min(a + chunk, stop)
        matmul(pk[a:e].T, vv[a:e], product)
        state_s += product
        for j in range(a, e):
            for t in range(f):
                x = pk[j, t]
                state_z[t] += x
                abs_z[t] += abs(x)


@jit()
def _chunk_rows(
    pq_c, pk, vv, lo, hi, counts_c, state_s, state_z, abs_z,
    num_c, den_c, ref_c, a_buf, o_buf, running,
):
    """Numerator, denominator and reference of the R rows of one query chunk.

    Every row sees the state (keys before `lo`); row r also sees keys lo .. counts_c[r] - 1
    of the block lo .. hi - 1. a_buf (>= R·W), o_buf (>= R·M) and running (F) are scratch.
    """
    r, f = pq_c.shape
    m = vv.shape[1]
    w = hi - lo
    # 1. The state part: num = φ(Q_c) S, den = φ(Q_c) z.
    matmul(pq_c, state_s, num_c)
    if r > 0 and f > 0:
        np.dot(pq_c, state_z, den_c)
    else:
        den_c[:] = 0
    # 2. The quadratic block A (R, W), excluded pairs set to 0 by a select.
    if w > 0:
        zero = den_c.dtype.type(0.0)
        a = a_buf[: r * w].reshape((r, w))
        matmul(pq_c, pk[lo:hi].T, a)
        for i in range(r):
            seen = counts_c[i] - lo
            total = den_c.dtype.type(0.0)
            for jj in range(w):
                x = a[i, jj] if jj < seen else zero
                a[i, jj] = x
                total += x
            den_c[i] += total
        # BLAS multiplies every entry, and 0 * NaN is NaN, so a block whose values are
        # not all finite is summed over each row's visible keys only.
        if all_finite(vv[lo:hi]):
            o = o_buf[: r * m].reshape((r, m))
            matmul(a, vv[lo:hi], o)
            num_c += o
        else:
            for i in range(r):
                for jj in range(counts_c[i] - lo):
                    for c in range(m):
                        num_c[i, c] += a[i, jj] * vv[lo + jj, c]
    # 3. Reference: |φ(q_i)| . (|z| + Σ_{lo <= j < c_i} |φ(k_j)|), keys added row by row.
    running[:] = abs_z
    j = lo
    for i in range(r):
        while j < counts_c[i]:
            for t in range(f):
                running[t] += abs(pk[j, t])
            j += 1
        total = ref_c.dtype.type(0.0)
        for t in range(f):
            total += abs(pq_c[i, t]) * running[t]
        ref_c[i] = total


@jit()
def _head(
    item, phi_q, phi_k, v, s0, z0, counts, kv_lengths, chunk,
    num, den, reference, final_s, final_z,
):
    """Compute one (batch row, query head) item of `_linear_forward`."""
    _, hq, n, f = phi_q.shape
    hkv, m = v.shape[1], v.shape[3]
    group = hq // hkv
    b, h = item // hq, item % hq
    g = h // group  # contiguous groups: query head h reads key/value head g
    pq = phi_q[b, h]
    pk = phi_k[b if phi_k.shape[0] > 1 else 0, g]
    vv = v[b if v.shape[0] > 1 else 0, g]
    sb = b if s0.shape[0] > 1 else 0
    dt = phi_q.dtype

    state_s = s0[sb, g].copy()
    state_z = z0[sb, g].copy()
    abs_z = np.abs(state_z)
    product = np.empty((f, m), dtype=dt)
    a_buf = np.empty(chunk * chunk, dtype=dt)
    o_buf = np.empty(chunk * m, dtype=dt)
    running = np.empty(f, dtype=dt)
    absorbed = 0

    for i0 in range(0, n, chunk):
        i1 = min(i0 + chunk, n)
        # Counts do not decrease and grow by at most one per query, so the chunk's
        # block lo .. hi - 1 has at most R keys.
        lo, hi = counts[b, i0], counts[b, i1 - 1]
        absorb_keys(pk, vv, absorbed, lo, chunk, state_s, state_z, abs_z, product)
        absorbed = max(absorbed, lo)
        _chunk_rows(
            pq[i0:i1], pk, vv, lo, hi, counts[b, i0:i1], state_s, state_z, abs_z,
            num[b, h, i0:i1], den[b, h, i0:i1], reference[b, h, i0:i1],
            a_buf, o_buf, running,
        )

    # The state after every valid key, written once per key/value head.
    if h % group == 0:
        absorb_keys(pk, vv, absorbed, kv_lengths[b], chunk, state_s, state_z, abs_z, product)
        final_s[b, g] = state_s
        final_z[b, g] = state_z


@jit(parallel=True)
def _linear_forward(
    phi_q, phi_k, v, s0, z0, counts, kv_lengths, chunk,
    num, den, reference, final_s, final_z,
):
    """Run `_head` for every (batch row, query head), in parallel."""
    b, hq = phi_q.shape[0], phi_q.shape[1]
    for item in prange(b * hq):
        _head(
            item, phi_q, phi_k, v, s0, z0, counts, kv_lengths, chunk,
            num, den, reference, final_s, final_z,
        )
