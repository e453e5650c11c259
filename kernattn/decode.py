"""Attention of a few new tokens against a long key/value cache (incremental decoding).

Shape legend: B batch, Hq query heads, Hkv key/value heads, T new tokens, C cache capacity,
D query/key head dimension, M value head dimension.
"""

from __future__ import annotations

import numbers

from kernattn import _validate as V
from kernattn.softmax import (
    BACKEND_PRECISION,
    _any_device_array,
    prepare_softmax_inputs,
    softmax_backends,
)

DECODE_BACKENDS = ("numpy", "loops", "numba", "cuda")


def decode_attention(
    q,
    k_cache,
    v_cache,
    *,
    kv_lengths,
    scale: float | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    layout: str = "bhnd",
    return_lse: bool = False,
    backend: str = "numpy",
):
    r"""Attend T new tokens to a key/value cache that already contains them.

    Parameters
    ----------
    q : array_like, shape (B, Hq, T, D)
        Queries of the new tokens (T is small: 1 for token-by-token decoding). With
        ``layout="bnhd"`` the shape is (B, T, Hq, D).
    k_cache : array_like, shape (B, Hkv, C, D)
        Key cache. Positions 0 .. kv_lengths[b] - 1 are valid and include the T new
        tokens, written at the end; later slots are never read (they may hold NaN).
        ``Hq % Hkv == 0``: multi-head (Hkv = Hq), grouped-query and multi-query (Hkv = 1)
        attention, with query head h reading key/value head ``h // (Hq // Hkv)``.
    v_cache : array_like, shape (B, Hkv, C, M)
        Value cache.
    kv_lengths : array_like of int, shape (B,)
        Valid positions per batch row, new tokens included.
    scale : float, optional
        Score scale. Default ``1 / sqrt(D)``.
    softcap : float, optional
        Soft-capping ``s = softcap * tanh(s / softcap)``.
    num_splits : int, optional
        Numba and CUDA backends only: number of key splits P computed in parallel and
        merged. Default ``ceil(max(kv_lengths) / 1024)`` (CUDA: ``/ 512``), which
        depends on the shapes only, so results are the same for any number of threads.
    layout : {"bhnd", "bnhd"}, default "bhnd"
    return_lse : bool, default False
        Also return the natural-log log-sum-exp, shape (B, Hq, T).
    backend : {"numpy", "loops", "numba", "cuda"}, default "numpy"
        ``"numba"`` computes in the input precision (float32 stays float32; float16 and
        bfloat16 compute in float32); ``"numpy"`` and ``"loops"`` (the oracle) in float64.
        ``"cuda"`` is the Numba CUDA split-KV kernel, in the input precision; device
        arrays are read in place and give Numba device arrays back.

    Returns
    -------
    out : ndarray, shape (B, Hq, T, M)
    lse : ndarray, shape (B, Hq, T)
        Only with ``return_lse=True``.

    Notes
    -----
    New token t of batch row b sits at cache position ``L_b - T + t`` (``L_b`` =
    kv_lengths[b]) and attends to positions ``j <= L_b - T + t``: causal attention with
    bottom-right alignment. The result therefore equals

    ``softmax_attention(q, k_cache, v_cache, causal="bottom_right", kv_lengths=kv_lengths)``

    and the last T rows of a full causal pass over the whole sequence. Rows that see no
    key (when ``L_b < T``) are 0 with ``lse = -inf``.

    The numba backend splits the keys over P parts and threads, reads each cache entry
    once per key/value head (so GQA and MQA read Hq / Hkv times less cache than MHA), and
    merges the parts by log-sum-exp (see `kernattn.merge_attention_states`).
    Cost: O(B Hq T L (D + M)) time; memory traffic O(B Hkv L (D + M)), L = max kv_lengths.

    Examples
    --------
    >>> import numpy as np
    >>> k = np.zeros((1, 1, 6, 1)); v = np.arange(6.0).reshape(1, 1, 6, 1)
    >>> q = np.zeros((1, 1, 2, 1))  # two new tokens, cache positions 2 and 3
    >>> decode_attention(q, k, v, kv_lengths=[4], backend="numpy").ravel()
    array([1. , 1.5])
    """
    if backend not in DECODE_BACKENDS:
        raise V.OptionError(
            f"backend is {backend!r}; expected one of "
            f"{', '.join(repr(name) for name in DECODE_BACKENDS)}"
        )
    if num_splits is not None and (
        isinstance(num_splits, bool)
        or not isinstance(num_splits, numbers.Integral)
        or num_splits < 1
    ):
        raise V.OptionError(f"num_splits is {num_splits!r}; expected a positive integer or None")
    if kv_lengths is None:
        raise V.OptionError(
            "kv_lengths is None; expected one valid length per batch row (the cache "
            "positions in use, new tokens included)"
        )
    if backend == "cuda" and _any_device_array(q, k_cache, v_cache):
        from kernattn.cuda.decode import decode_attention_device

        return decode_attention_device(
            q, k_cache, v_cache, kv_lengths=kv_lengths, scale=scale, softcap=softcap,
            num_splits=num_splits, layout=layout, return_lse=return_lse,
        )
    args = prepare_softmax_inputs(
        q, k_cache, v_cache, scale=scale, mask=None, bias=None, causal="bottom_right",
        alignment=None, window=None, softcap=softcap, kv_lengths=kv_lengths,
        q_lengths=None, dropout_mask=None, dropout_p=0.0, layout=layout,
        precision=BACKEND_PRECISION.get(backend, "float64"),
    )
    ndim = args.pop("ndim")
    if backend in ("numba", "cuda"):
        if backend == "numba":
            from kernattn._numba.decode import decode_attention as decode_split
        else:
            from kernattn.cuda.decode import decode_attention as decode_split

        out, lse = decode_split(
            args["q"], args["k"], args["v"], scale=args["scale"], softcap=args["softcap"],
            structure=args["structure"], num_splits=num_splits,
        )
    else:
        out, lse = softmax_backends()[backend](**args)
    out = V.from_bhnd(out, ndim, layout)
    if return_lse:
        return out, V.lse_from_bhn(lse, ndim)
    return out
