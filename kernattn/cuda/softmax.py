"""Numba CUDA twin of softmax attention: a tiled online softmax (FlashAttention's algorithm).

Shape legend: B batch, Hq query heads, Hkv key/value heads, N queries, S keys, D query/key
head dimension, M value head dimension; Dc and Mc are D and M rounded up to a power of
two (`kernattn.cuda.dim_cap`), Bq query rows and Bk key rows per tile.

One block of Bq threads computes one (query tile, batch row, query head); thread r owns
query row ``i0 + r`` and keeps its scaled query, running maximum ``m``, running sum ``l``
and weighted value sum in registers or local memory. The block walks the key tiles of
the union of its rows' key intervals in increasing order. For each tile:

1. each thread marks the keys its row may see (interval from index arithmetic, then the
   mask, read tile by tile); a tile that no row of the block keeps is skipped before it
   is loaded (``syncthreads_or``);
2. the block loads the tile's keys and values into shared memory, once for its Bq rows;
3. each thread computes its kept scores ``scale q_i . k_j``, soft-caps them and adds the
   bias; excluded keys get no score at all, so NaN stored there is never read;
4. online softmax: ``m_new = max(m, tile max)``, the old sums are rescaled by
   ``exp(m - m_new)``, and each kept key adds ``exp(s - m_new)`` to ``l``;
5. dropout scales the weight after it was added to ``l`` (after normalisation);
6. the weighted value sum skips keys whose score is -inf, so a key excluded by a -inf
   bias contributes nothing, not 0 * NaN.

Rows with ``l = 0`` (no allowed key) end as 0 with ``lse = -inf``. The scalar steps
(row interval, soft-capping, rescale, final lse) are the functions of `kernattn._tiles`,
compiled as device functions. Shapes of masks, biases and dropout patterns: each axis
is either full or 1 (broadcast), read at index 0 when 1.

Precision: float32 inputs compute in float32 (``expf``, float32 sums), everything else
in float64, as the Numba CPU twin.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from kernattn import _tiles
from kernattn import _validate as V
from kernattn._numba.softmax import alignment_offsets, compute_dtype, window_bounds
from kernattn.cuda import (
    SHARED_BYTES,
    as_device,
    device_bhnd,
    device_from_bhnd,
    device_lse_from_bhn,
    dim_cap,
    fit_rows,
    host_stand_in,
    import_cuda,
    is_device_array,
    require_cuda,
    strided_view,
    tiles,
    unbroadcast,
)

cuda = import_cuda()

# The scalar tile logic of the CPU kernels, compiled as device functions.
row_interval = cuda.jit(device=True)(_tiles.row_interval)
soft_cap = cuda.jit(device=True)(_tiles.soft_cap)
online_rescale = cuda.jit(device=True)(_tiles.online_rescale)
finish_lse = cuda.jit(device=True)(_tiles.finish_lse)

# Argument order of the kernel after q, k, v (the PTX tests build signatures from it).
KERNEL_ARGUMENTS = (
    "q", "k", "v", "scale", "softcap", "causal", "offsets", "q_lengths", "kv_lengths",
    "left", "right", "has_mask", "mask", "has_bias", "bias", "has_drop", "drop",
    "dropout_scale", "out", "lse",
)


def softmax_attention(
    q, k, v, *, scale, mask, bias, softcap, structure, dropout_mask, dropout_scale
):
    """Return (out (B, Hq, N, M), lse (B, Hq, N)) as NumPy arrays in the compute dtype.

    Takes the arguments that `kernattn.softmax.prepare_softmax_inputs` returns, as every
    softmax backend does: the arrays are copied to the device (broadcast axes of masks,
    biases, dropout patterns and shared-batch keys as size 1, never expanded), the kernel
    runs, and the results are copied back.
    """
    require_cuda()
    dtype = compute_dtype(q, k, v)
    arrays = [_to_device(x, dtype) for x in (q, k, v)]
    extras = [
        None if x is None else _to_device(x, x_dtype)
        for x, x_dtype in ((mask, np.bool_), (bias, dtype), (dropout_mask, np.bool_))
    ]
    out, lse = launch_softmax(
        *arrays, *extras, dtype=dtype, scale=scale, softcap=softcap, structure=structure,
        dropout_scale=dropout_scale,
    )
    return out.copy_to_host(), lse.copy_to_host()


def softmax_attention_device(q, k, v, *, layout, return_lse, **options):
    """Run `softmax_attention` on device arrays without copying them to the host.

    `options` are the keyword arguments of `kernattn.softmax_attention`. The checks run
    on host stand-ins (`kernattn.cuda.host_stand_in`) that have the shapes and dtypes of
    the device arrays and no data; then the kernel reads the device arrays through
    (B, H, N, D) views. Host arrays among the inputs are copied to the device. Returns
    Numba device arrays in the rank and layout of q.
    """
    require_cuda()
    dtype = device_dtype(q, k, v)
    names = ("mask", "bias", "dropout_mask")
    stand_ins = {name: _stand_in(options[name]) for name in names}
    args = _prepare(
        _stand_in(q), _stand_in(k), _stand_in(v), **{**options, **stand_ins},
        layout=layout,
    )
    ndim = args["ndim"]
    b, hq, n, _ = args["q"].shape
    s = args["k"].shape[2]
    full = (b, hq, n, s)
    arrays = [
        _device_input(x, name, dtype, layout) for x, name in ((q, "q"), (k, "k"), (v, "v"))
    ]
    extras = []
    for name, x_dtype in zip(names, (np.bool_, dtype, np.bool_)):
        x = options[name]
        if x is None:
            extras.append(None)
        elif is_device_array(x):
            check_device_dtype(name, x, x_dtype)
            extras.append(device_bhns(as_device(x), full))
        else:
            extras.append(_to_device(args[name], x_dtype))
    out, lse = launch_softmax(
        *arrays, *extras, dtype=dtype, scale=args["scale"], softcap=args["softcap"],
        structure=args["structure"], dropout_scale=args["dropout_scale"],
    )
    out = device_from_bhnd(out, ndim, layout)
    if return_lse:
        return out, device_lse_from_bhn(lse, ndim)
    return out


def launch_softmax(q, k, v, mask, bias, drop, *, dtype, scale, softcap, structure,
                   dropout_scale):
    """Launch the softmax kernel on device arrays; return device (out, lse).

    q (B, Hq, N, D), k (1 or B, Hkv, S, D), v (1 or B, Hkv, S, M); mask, bias and drop
    are None or 4-D device arrays whose axes are full or 1.
    """
    b, hq, n, d = q.shape
    m = v.shape[3]
    out = cuda.to_device(np.zeros((b, hq, n, m), dtype=dtype))
    lse = cuda.to_device(np.full((b, hq, n), -np.inf, dtype=dtype))
    if b * hq * n == 0:
        return out, lse
    sizes = tiles()
    kernel, block_q = softmax_kernel(np.dtype(dtype).name, sizes["block_q"],
                                     sizes["block_k"], dim_cap(d), dim_cap(m))
    no_flags = cuda.to_device(np.zeros((1, 1, 1, 1), dtype=np.bool_))  # never read
    no_values = cuda.to_device(np.zeros((1, 1, 1, 1), dtype=dtype))
    left, right = window_bounds(structure)
    grid = ((n + block_q - 1) // block_q, b * hq)
    kernel[grid, block_q](
        q, k, v, dtype.type(scale), dtype.type(0.0 if softcap is None else softcap),
        bool(structure.causal), cuda.to_device(alignment_offsets(structure)),
        cuda.to_device(np.asarray(structure.q_lengths, dtype=np.int64)),
        cuda.to_device(np.asarray(structure.kv_lengths, dtype=np.int64)),
        left, right,
        mask is not None, no_flags if mask is None else mask,
        bias is not None, no_values if bias is None else bias,
        drop is not None, no_flags if drop is None else drop,
        dtype.type(dropout_scale), out, lse,
    )
    return out, lse


# ---- Argument preparation (host) -----------------------------------------------------


def _prepare(q, k, v, **options):
    from kernattn.softmax import prepare_softmax_inputs

    return prepare_softmax_inputs(q, k, v, **options, precision="input")


def _stand_in(x):
    return host_stand_in(as_device(x)) if is_device_array(x) else x


def _to_device(x: np.ndarray, dtype):
    """Copy a validated host array to the device, broadcast axes kept at size 1."""
    return cuda.to_device(unbroadcast(np.asarray(x)).astype(dtype, copy=False))


def _device_input(x, name: str, dtype, layout: str):
    """Return q, k or v as a (B, H, L, D) device array (a view, or a copy of host data)."""
    if is_device_array(x):
        x = as_device(x)
        check_device_dtype(name, x, dtype)
        return device_bhnd(x, layout)
    host = V.as_float_array(name, x, dtype=dtype)
    return cuda.to_device(np.ascontiguousarray(V.to_bhnd(name, host, layout)))


def device_dtype(*arrays) -> np.dtype:
    """Return the compute dtype of q, k, v when some of them are device arrays."""
    return V.compute_dtype(
        "input", *(as_device(x) if is_device_array(x) else x for x in arrays)
    )


def check_device_dtype(name: str, x, dtype) -> None:
    """Raise DTypeError unless device array `x` already has `dtype` (no device casts)."""
    if np.dtype(x.dtype) != np.dtype(dtype):
        raise V.DTypeError(
            f"{name} is a device array of dtype {np.dtype(x.dtype)}, but this call "
            f"computes in {np.dtype(dtype)}; backend=\"cuda\" does not convert device "
            f"arrays, so pass {name} as {np.dtype(dtype)} (float32 when q, k and v are "
            f"all float32, else float64; masks bool)"
        )


def device_bhns(x, full):
    """Return a 4-D view of a device mask, bias or dropout pattern broadcastable to `full`.

    Leading axes are added with size 1; axes of size 1 stay size 1 (the kernel reads
    index 0 there). The wrapper checked that `x` broadcasts to (B, Hq, N, S).
    """
    pad = 4 - x.ndim
    shape = (1,) * pad + tuple(x.shape)
    strides = (0,) * pad + tuple(x.strides)
    return strided_view(x, shape, strides)


# ---- Kernel --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def softmax_kernel(dtype_name: str, block_q: int, block_k: int, d_cap: int, m_cap: int):
    """Return (compiled kernel, threads per block) for one dtype and tile configuration."""
    pyfunc, block_q = make_softmax_kernel(dtype_name, block_q, block_k, d_cap, m_cap)
    return cuda.jit(pyfunc), block_q


def make_softmax_kernel(dtype_name: str, block_q: int, block_k: int, d_cap: int,
                        m_cap: int):
    """Return (Python kernel function, threads per block); `compile_ptx` takes the former.

    Tile sizes, head-dimension caps and dtype are compile-time constants of the kernel:
    the shared key and value tiles are (Bk, Dc) and (Bk, Mc), with Bk lowered until
    they fit in `kernattn.cuda.SHARED_BYTES`.
    """
    dt = np.dtype(dtype_name)
    numba_dtype = dt.type  # NumPy scalar types name array dtypes in both targets
    block_k = fit_rows(block_k, (d_cap + m_cap) * dt.itemsize, SHARED_BYTES)
    zero, neg_inf = dt.type(0.0), dt.type(-np.inf)
    bq, bk, dc, mc = block_q, block_k, d_cap, m_cap

    def kernel(
        q, k, v, scale, softcap, causal, offsets, q_lengths, kv_lengths, left, right,
        has_mask, mask, has_bias, bias, has_drop, drop, dropout_scale, out, lse,
    ):
        k_tile = cuda.shared.array((bk, dc), numba_dtype)
        v_tile = cuda.shared.array((bk, mc), numba_dtype)
        q_row = cuda.local.array(dc, numba_dtype)
        acc = cuda.local.array(mc, numba_dtype)
        s_row = cuda.local.array(bk, numba_dtype)
        keep = cuda.local.array(bk, np.bool_)
        tid = cuda.threadIdx.x
        hq, n, d = q.shape[1], q.shape[2], q.shape[3]
        hkv, m = k.shape[1], v.shape[3]
        group = hq // hkv
        b, h = cuda.blockIdx.y // hq, cuda.blockIdx.y % hq
        g = h // group  # contiguous groups: query head h reads key/value head g
        kb = b if k.shape[0] > 1 else 0
        n_b, s_b, off = q_lengths[b], kv_lengths[b], offsets[b]
        i0 = cuda.blockIdx.x * bq
        i = i0 + tid
        live = i < n_b  # padding query rows stay 0 with lse -inf
        # 1. Each row's allowed keys form one interval [lo, hi); every thread computes
        #    the union over the block's rows, so loop bounds are the same block-wide.
        lo, hi = row_interval(i, off, s_b, causal, left, right)
        if not live:
            hi = lo
        first, last = s_b, 0
        for ii in range(min(bq, n_b - i0)):
            a, c = row_interval(i0 + ii, off, s_b, causal, left, right)
            if a < c:
                first, last = min(first, a), max(last, c)
        # 2. The scaled query and the running state of this thread's row.
        for t in range(d):
            q_row[t] = q[b, h, i, t] * scale if live else zero
        for c in range(m):
            acc[c] = zero
        row_max, row_sum = neg_inf, zero
        mb, mh = (b if mask.shape[0] > 1 else 0), (h if mask.shape[1] > 1 else 0)
        mi = i if mask.shape[2] > 1 else 0
        bb, bh = (b if bias.shape[0] > 1 else 0), (h if bias.shape[1] > 1 else 0)
        bi = i if bias.shape[2] > 1 else 0
        db, dh = (b if drop.shape[0] > 1 else 0), (h if drop.shape[1] > 1 else 0)
        di = i if drop.shape[2] > 1 else 0
        # 3. Key tiles in increasing order.
        for j0 in range(first, last, bk):
            nj = min(bk, last - j0)
            kept = False
            for jj in range(nj):
                j = j0 + jj
                ok = lo <= j and j < hi
                if ok and has_mask:
                    ok = mask[mb, mh, mi, j if mask.shape[3] > 1 else 0]
                keep[jj] = ok
                kept = kept or ok
            if cuda.syncthreads_or(1 if kept else 0) == 0:
                continue  # no row of the block keeps a key of this tile
            for e in range(tid, nj * d, bq):
                k_tile[e // d, e % d] = k[kb, g, j0 + e // d, e % d]
            for e in range(tid, nj * m, bq):
                v_tile[e // m, e % m] = v[kb, g, j0 + e // m, e % m]
            cuda.syncthreads()
            if kept:
                # 4. Scores of kept keys: scale q . k, soft-capping, bias.
                tile_max = neg_inf
                for jj in range(nj):
                    if keep[jj]:
                        x = zero
                        for t in range(d):
                            x += q_row[t] * k_tile[jj, t]
                        if softcap > 0:
                            x = soft_cap(x, softcap)
                        if has_bias:
                            j = j0 + jj
                            x += bias[bb, bh, bi, j if bias.shape[3] > 1 else 0]
                        s_row[jj] = x
                        if x > tile_max:
                            tile_max = x
                # 5. Online softmax; a tile whose kept scores are all -inf adds nothing.
                if tile_max != neg_inf:
                    new_max, alpha = online_rescale(row_max, tile_max)
                    row_sum *= alpha
                    for c in range(m):
                        acc[c] *= alpha
                    for jj in range(nj):
                        if keep[jj] and s_row[jj] != neg_inf:
                            w = math.exp(s_row[jj] - new_max)
                            row_sum += w
                            # 6. Dropout after normalisation: the numerator only.
                            if has_drop:
                                j = j0 + jj
                                if drop[db, dh, di, j if drop.shape[3] > 1 else 0]:
                                    w *= dropout_scale
                                else:
                                    w = zero
                            for c in range(m):
                                acc[c] += w * v_tile[jj, c]
                    row_max = new_max
            cuda.syncthreads()  # the next tile overwrites the shared tiles
        # 7. out = acc / l, lse = m + log(l); empty rows keep 0 and -inf.
        if live and row_sum != zero:
            for c in range(m):
                out[b, h, i, c] = acc[c] / row_sum
            lse[b, h, i] = finish_lse(row_max, row_sum)

    return kernel, block_q
