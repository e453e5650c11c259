"""Multi-head attention with input and output projections, and a KV cache for decoding.

Shape legend: B batch, Hq query heads, Hkv key/value heads, N queries (new tokens),
S keys, D query/key head dimension, M value head dimension, C cache capacity. Model-side
feature sizes are named d_model (features of x), d_kv (features of the memory in
cross-attention) and d_out (features of the output).

Weights follow ``y = x @ W`` with ``W`` of shape (d_in, d_out). Heads are contiguous column
blocks: columns ``[h * D, (h + 1) * D)`` of ``w_q`` are query head h. Query head h reads
key/value head ``h // (Hq // Hkv)``, as in `kernattn.softmax_attention`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from kernattn import _validate as V
from kernattn.loops import multihead as loops_multihead
from kernattn.softmax import softmax_attention, softmax_backends

_WEIGHT_NAMES = ("w_q", "w_k", "w_v", "w_o")
_BIAS_NAMES = ("b_q", "b_k", "b_v", "b_o")


def _frozen_array(name: str, x, ndim: int, expected: str) -> np.ndarray:
    """Return a read-only float64 copy of `x`, checked to have rank `ndim`."""
    arr = V.as_float_array(name, x)
    if arr.ndim != ndim:
        raise V.ShapeError(
            f"{name} has rank {arr.ndim} (shape {arr.shape}); expected rank {ndim} "
            f"{expected}"
        )
    arr = np.array(arr, dtype=np.float64, copy=True)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class AttentionParams:
    """Projection weights and biases of one multi-head attention layer.

    Every array is stored as a read-only float64 copy. Head sizes are not stored: they
    follow from the column counts once `multi_head_attention` is given ``num_heads``
    and ``num_kv_heads``.

    Parameters
    ----------
    w_q : array_like, shape (d_model, Hq * D)
        Query projection; ``Q = x @ w_q + b_q``.
    w_k : array_like, shape (d_kv, Hkv * D)
        Key projection, applied to x (self-attention) or to the memory
        (cross-attention, where d_kv is the memory's feature size).
    w_v : array_like, shape (d_kv, Hkv * M)
        Value projection.
    w_o : array_like, shape (Hq * M, d_out)
        Output projection, applied to the concatenated head outputs.
    b_q, b_k, b_v, b_o : array_like, optional
        Biases of shapes (Hq * D,), (Hkv * D,), (Hkv * M,) and (d_out,).

    Notes
    -----
    PyTorch's ``nn.Linear`` and ``nn.MultiheadAttention`` store weights as
    (d_out, d_in) and compute ``x @ W.T``, so their weights are the transposes of these.
    `from_torch_multihead_attention` does the conversion.
    """

    w_q: np.ndarray
    w_k: np.ndarray
    w_v: np.ndarray
    w_o: np.ndarray
    b_q: np.ndarray | None = None
    b_k: np.ndarray | None = None
    b_v: np.ndarray | None = None
    b_o: np.ndarray | None = None

    def __post_init__(self):
        expected_weight = {
            "w_q": "(d_model, Hq * D)",
            "w_k": "(d_kv, Hkv * D)",
            "w_v": "(d_kv, Hkv * M)",
            "w_o": "(Hq * M, d_out)",
        }
        for name in _WEIGHT_NAMES:
            arr = _frozen_array(name, getattr(self, name), 2, expected_weight[name])
            object.__setattr__(self, name, arr)  # the dataclass is frozen
        for name, weight_name in zip(_BIAS_NAMES, _WEIGHT_NAMES):
            value = getattr(self, name)
            if value is None:
                continue
            arr = _frozen_array(name, value, 1, "(one entry per output column)")
            columns = getattr(self, weight_name).shape[1]
            if arr.shape[0] != columns:
                raise V.ShapeError(
                    f"{name} has {arr.shape[0]} entries, but {weight_name} has {columns} "
                    f"columns; expected one bias entry per column"
                )
            object.__setattr__(self, name, arr)
        if self.w_v.shape[0] != self.w_k.shape[0]:
            raise V.ShapeError(
                f"w_v has {self.w_v.shape[0]} rows, but w_k has {self.w_k.shape[0]}; "
                f"keys and values are projected from the same input, so both need d_kv rows"
            )


@dataclass(frozen=True)
class _HeadSizes:
    hq: int
    hkv: int
    d: int
    m: int


def _check_heads(params: AttentionParams, num_heads, num_kv_heads) -> _HeadSizes:
    """Derive (Hq, Hkv, D, M) from the head counts and the weight shapes."""
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise V.OptionError(f"{name} is {value!r}; expected a positive integer")
    hq, hkv = int(num_heads), int(num_kv_heads)
    if hq % hkv != 0:
        raise V.OptionError(
            f"num_kv_heads = {hkv} does not divide num_heads = {hq}; grouped-query "
            f"attention needs Hq % Hkv == 0"
        )
    for name, heads, head_name in (
        ("w_q", hq, "num_heads"), ("w_k", hkv, "num_kv_heads"), ("w_v", hkv, "num_kv_heads")
    ):
        columns = getattr(params, name).shape[1]
        if columns % heads != 0:
            raise V.ShapeError(
                f"{name} has {columns} columns, which is not a multiple of "
                f"{head_name} = {heads}"
            )
    d = params.w_q.shape[1] // hq
    d_k = params.w_k.shape[1] // hkv
    if d_k != d:
        raise V.ShapeError(
            f"w_k gives head dimension D = {d_k} ({params.w_k.shape[1]} columns / "
            f"num_kv_heads = {hkv}), but w_q gives D = {d} ({params.w_q.shape[1]} columns "
            f"/ num_heads = {hq}); queries and keys must share D"
        )
    m = params.w_v.shape[1] // hkv
    if params.w_o.shape[0] != hq * m:
        raise V.ShapeError(
            f"w_o has {params.w_o.shape[0]} rows; expected Hq * M = {hq} * {m} = "
            f"{hq * m} (num_heads times the value head dimension that w_v gives)"
        )
    return _HeadSizes(hq, hkv, d, m)


def _check_tokens(name: str, x) -> tuple[np.ndarray, int]:
    """Return `x` as a float64 (B, L, features) array, and the rank it came with.

    Rank 2 (L, features) gains a batch axis of size 1.
    """
    arr = V.as_float_array(name, x)
    if arr.ndim not in (2, 3):
        raise V.ShapeError(
            f"{name} has rank {arr.ndim} (shape {arr.shape}); expected rank 3 "
            f"(B, positions, features) or rank 2 (positions, features)"
        )
    return (arr[None] if arr.ndim == 2 else arr), arr.ndim


class KVCache:
    """Preallocated keys and values of past tokens, with a valid length per batch row.

    Parameters
    ----------
    batch : int
        Batch size B.
    num_kv_heads : int
        Key/value heads Hkv.
    capacity : int
        Positions C that each batch row can hold.
    head_dim : int
        Key head dimension D.
    value_dim : int, optional
        Value head dimension M; defaults to `head_dim`.
    dtype : floating dtype, default float64
        Storage dtype. Attention is computed in float64 whatever the storage dtype,
        but a float32 cache rounds the keys and values it stores, so decoding then
        matches the full pass only to float32 accuracy.

    Attributes
    ----------
    keys : ndarray, shape (B, Hkv, C, D)
        Storage. Slots at positions ``>= lengths[b]`` of batch row b are stale and never
        read. Slots never written hold NaN, so a read of one would show in the output.
    values : ndarray, shape (B, Hkv, C, M)
        Storage, as `keys`.

    Notes
    -----
    Row b's valid keys are ``keys[b, :, :lengths[b]]``. Attending with bottom-right
    causal alignment over those keys (``kv_lengths = lengths``) makes the last new token
    see every cached position, which is what `multi_head_attention` does with
    ``cache=``. Memory: ``B * Hkv * C * (D + M)`` elements.

    Examples
    --------
    >>> cache = KVCache(batch=2, num_kv_heads=1, capacity=4, head_dim=3)
    >>> cache.append(np.ones((2, 1, 2, 3)), np.ones((2, 1, 2, 3)), counts=[2, 1])
    >>> cache.lengths
    array([2, 1])
    >>> cache.valid_keys(1).shape
    (1, 1, 3)
    """

    def __init__(
        self,
        batch: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        value_dim: int | None = None,
        dtype=np.float64,
    ):
        value_dim = head_dim if value_dim is None else value_dim
        sizes = (
            ("batch", batch, 1),
            ("num_kv_heads", num_kv_heads, 1),
            ("capacity", capacity, 0),
            ("head_dim", head_dim, 0),
            ("value_dim", value_dim, 0),
        )
        for name, value, minimum in sizes:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise V.OptionError(f"{name} is {value!r}; expected an integer")
            if value < minimum:
                raise V.OptionError(f"{name} is {value}; expected an integer >= {minimum}")
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise V.DTypeError(f"dtype is {dtype}; expected a floating dtype such as float64")
        self.batch = int(batch)
        self.num_kv_heads = int(num_kv_heads)
        self.capacity = int(capacity)
        self.head_dim = int(head_dim)
        self.value_dim = int(value_dim)
        self.keys = np.full((self.batch, self.num_kv_heads, self.capacity, self.head_dim),
                            np.nan, dtype=dtype)
        self.values = np.full((self.batch, self.num_kv_heads, self.capacity, self.value_dim),
                              np.nan, dtype=dtype)
        self._lengths = np.zeros(self.batch, dtype=np.int64)

    @property
    def lengths(self) -> np.ndarray:
        """Valid positions per batch row, shape (B,), int64 (a copy)."""
        return self._lengths.copy()

    def __repr__(self) -> str:
        return (
            f"KVCache(batch={self.batch}, num_kv_heads={self.num_kv_heads}, "
            f"capacity={self.capacity}, head_dim={self.head_dim}, "
            f"value_dim={self.value_dim}, dtype={self.keys.dtype}, "
            f"lengths={self._lengths.tolist()})"
        )

    def valid_keys(self, b: int) -> np.ndarray:
        """Return a view of batch row b's valid keys, shape (Hkv, lengths[b], D)."""
        return self.keys[b, :, : self._lengths[b]]

    def valid_values(self, b: int) -> np.ndarray:
        """Return a view of batch row b's valid values, shape (Hkv, lengths[b], M)."""
        return self.values[b, :, : self._lengths[b]]

    def append(self, k_new, v_new, counts=None) -> None:
        """Write new keys and values after each row's valid positions.

        Parameters
        ----------
        k_new : array_like, shape (B, Hkv, T, D)
            Keys of T new tokens.
        v_new : array_like, shape (B, Hkv, T, M)
            Values of the same tokens.
        counts : array_like of int, shape (B,), optional
            Tokens to take from each row (the first ``counts[b]`` of the T), for ragged
            appends; the rest are padding and are not written. Default: all T.

        Raises
        ------
        ShapeError
            Shapes that do not match the cache, or a row whose new length would exceed
            the capacity. Nothing is written when an error is raised.
        """
        k_new = V.as_float_array("k_new", k_new)
        v_new = V.as_float_array("v_new", v_new)
        b, hkv, d, m = self.batch, self.num_kv_heads, self.head_dim, self.value_dim
        if k_new.ndim != 4 or k_new.shape[:2] != (b, hkv) or k_new.shape[3] != d:
            raise V.ShapeError(
                f"k_new has shape {k_new.shape}; expected (B, Hkv, T, D) = "
                f"({b}, {hkv}, T, {d}) to match the cache"
            )
        t = k_new.shape[2]
        if v_new.shape != (b, hkv, t, m):
            raise V.ShapeError(
                f"v_new has shape {v_new.shape}; expected (B, Hkv, T, M) = "
                f"({b}, {hkv}, {t}, {m}) to match k_new and the cache"
            )
        counts = V.check_lengths("counts", counts, b, t, "T")
        counts = np.full(b, t, dtype=np.int64) if counts is None else counts
        new_lengths = self._lengths + counts
        over = np.flatnonzero(new_lengths > self.capacity)
        if over.size:
            row = int(over[0])
            raise V.ShapeError(
                f"appending {int(counts[row])} tokens to batch row {row}, which contains "
                f"{int(self._lengths[row])}, needs {int(new_lengths[row])} positions, "
                f"but the cache capacity is C = {self.capacity}; create the KVCache "
                f"with capacity >= {int(new_lengths[row])}"
            )
        for row in range(b):
            start, stop = int(self._lengths[row]), int(new_lengths[row])
            self.keys[row, :, start:stop] = k_new[row, :, : stop - start]
            self.values[row, :, start:stop] = v_new[row, :, : stop - start]
        self._lengths = new_lengths


def _linear_numpy(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Return ``x @ w + bias`` for x (B, L, d_in), w (d_in, d_out): (B, L, d_out)."""
    y = x @ w
    return y if bias is None else y + bias


def _split_heads(y: np.ndarray, heads: int) -> np.ndarray:
    """Return (B, L, H * E) as (B, H, L, E); columns [h * E, (h + 1) * E) are head h."""
    b, length, width = y.shape
    y = y.reshape(b, length, heads, width // heads)  # (B, L, H, E)
    return y.transpose(0, 2, 1, 3)  # (B, H, L, E)


def _resolve_cache_causal(causal, alignment) -> str:
    """Return the causal option for attending over a cache: always bottom-right."""
    if causal not in (None, True, "bottom_right"):
        raise V.OptionError(
            f"causal is {causal!r} with a cache; decoding with a KV cache is causal with "
            f"bottom-right alignment, so pass causal=None, True or 'bottom_right'"
        )
    if alignment not in (None, "bottom_right"):
        raise V.OptionError(
            f"alignment is {alignment!r} with a cache; the new tokens follow the cached "
            f"ones, so the alignment is 'bottom_right' (pass None or 'bottom_right')"
        )
    return "bottom_right"


def multi_head_attention(
    x,
    params: AttentionParams,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    memory=None,
    cache: KVCache | None = None,
    mask=None,
    bias=None,
    causal: bool | str | None = None,
    alignment: str | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    kv_lengths=None,
    q_lengths=None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "numpy",
):
    r"""Compute a multi-head attention layer: projections, attention per head, output.

    Parameters
    ----------
    x : array_like, shape (B, N, d_model)
        Input tokens; rank 2 (N, d_model) acts as B = 1 and gives a rank-2 output.
    params : AttentionParams
        Weights ``w_q (d_model, Hq*D)``, ``w_k (d_kv, Hkv*D)``, ``w_v (d_kv, Hkv*M)``,
        ``w_o (Hq*M, d_out)`` and optional biases.
    num_heads : int
        Query heads Hq.
    num_kv_heads : int, optional
        Key/value heads Hkv, dividing Hq. Default Hq (multi-head); 1 is multi-query,
        anything between is grouped-query attention.
    memory : array_like, shape (B, S, d_kv), optional
        Source of keys and values for cross-attention. Default: x (self-attention).
        A batch size of 1 broadcasts over the B rows of x.
    cache : KVCache, optional
        Keys and values of earlier tokens. x contains the T = N new tokens: their keys and
        values are appended to the cache, then the queries attend over every valid
        cached position with bottom-right causal alignment (``kv_lengths`` is the
        cache's lengths after the append). With `q_lengths`, row b appends only its
        first ``q_lengths[b]`` tokens. The cache is left unchanged if an error is
        raised. Not combinable with `memory` or `kv_lengths`.
    mask, bias, causal, alignment, window, softcap, kv_lengths, q_lengths, scale
        Passed to `kernattn.softmax_attention` with q (B, Hq, N, D) and k (B, Hkv, S, D);
        masks and biases broadcast to (B, Hq, N, S). With a cache, S is the capacity C,
        and `causal` may only be None, True or ``"bottom_right"``.
    return_lse : bool, default False
        Also return the per-head log-sum-exp of the attention scores.
    backend : {"numpy", "loops"}, default "numpy"
        ``"loops"`` computes the projections and the attention with scalar loops and
        ``math.fsum`` (the oracle route, for a few dozen positions).

    Returns
    -------
    y : ndarray, shape (B, N, d_out), float64
        Layer output, with the rank of `x`. A padding query (beyond `q_lengths`) has
        attention output 0, so its row of y is ``b_o`` (or 0).
    lse : ndarray, shape (B, Hq, N), float64
        Only with ``return_lse=True``; (Hq, N) for a rank-2 x.

    Raises
    ------
    ShapeError
        A weight whose shape does not fit the head counts or the inputs, a cache of
        other sizes, or an append beyond the cache capacity.
    DTypeError
        Bool or complex inputs or weights.
    OptionError
        Invalid head counts, an unknown backend, a cache combined with `memory`,
        `kv_lengths` or a non-bottom-right causal option, and every option error of
        `softmax_attention`.

    Notes
    -----
    With heads h = 0..Hq-1 and g(h) = h // (Hq / Hkv):

    .. math::

        Q = x W_q + b_q, \quad K = m W_k + b_k, \quad V = m W_v + b_v
        \quad (m = \text{memory or } x),

        O_h = \mathrm{softmax\_attention}(Q_h, K_{g(h)}, V_{g(h)}), \quad
        y = [O_0, \ldots, O_{H_q - 1}]\, W_o + b_o,

    where ``Q_h`` is columns ``[h D, (h + 1) D)`` of Q.

    Cost: projections O(B (N d_model Hq D + S d_kv Hkv (D + M) + N Hq M d_out)),
    attention O(B Hq N S (D + M)). One decoded token (N = 1, model dim d, context n)
    costs O(B d^2 + B n d) time; its memory traffic is the weights, O(d^2), plus the
    cache, O(B n d) for MHA and O(B n d / Hq) for MQA.

    See Also
    --------
    kernattn.softmax_attention : the attention step, with every option.
    KVCache : storage for decoding.
    from_torch_multihead_attention : weights from PyTorch.

    Examples
    --------
    Decoding token by token gives the rows of the full causal pass:

    >>> rng = np.random.default_rng(0)
    >>> params = AttentionParams(*(rng.normal(size=(8, 8)) for _ in range(4)))
    >>> x = rng.normal(size=(1, 5, 8))
    >>> full = multi_head_attention(x, params, num_heads=2, causal=True)
    >>> cache = KVCache(batch=1, num_kv_heads=2, capacity=5, head_dim=4)
    >>> steps = [multi_head_attention(x[:, i:i + 1], params, num_heads=2, cache=cache)
    ...          for i in range(5)]
    >>> bool(np.allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-12))
    True
    """
    if not isinstance(params, AttentionParams):
        raise V.OptionError(
            f"params is {type(params).__name__}; expected an AttentionParams "
            f"(from_torch_multihead_attention converts PyTorch weights)"
        )
    V.check_backend(backend, softmax_backends())
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    heads = _check_heads(params, num_heads, num_kv_heads)
    x, rank = _check_tokens("x", x)  # (B, N, d_model)
    batch = x.shape[0]
    if x.shape[2] != params.w_q.shape[0]:
        raise V.ShapeError(
            f"x has d_model = {x.shape[2]} features, but w_q has {params.w_q.shape[0]} "
            f"rows; expected w_q of shape (d_model, Hq * D)"
        )
    if memory is None:
        source, source_name = x, "x"
    else:
        if cache is not None:
            raise V.OptionError(
                "memory and cache were both given; the cache contains self-attention keys "
                "and values, so pass one of them (for cross-attention, project the "
                "memory once and pass it as memory on every step)"
            )
        source, _ = _check_tokens("memory", memory)  # (B, S, d_kv)
        source_name = "memory"
        if source.shape[0] not in (batch, 1):
            raise V.ShapeError(
                f"memory has batch size {source.shape[0]}, but x has B = {batch}; expected "
                f"the same batch size (or 1, broadcast)"
            )
    if source.shape[2] != params.w_k.shape[0]:
        raise V.ShapeError(
            f"{source_name} has {source.shape[2]} features, but w_k and w_v have "
            f"{params.w_k.shape[0]} rows; expected w_k of shape (d_kv, Hkv * D) with d_kv "
            f"the feature size of {source_name}"
        )
    if cache is not None:
        _check_cache(cache, batch, heads)
        if kv_lengths is not None:
            raise V.OptionError(
                "kv_lengths was given with a cache; the cache's lengths are the key "
                "lengths, so leave kv_lengths as None"
            )
        causal = _resolve_cache_causal(causal, alignment)
        alignment = None
        # Checked here so that a bad q_lengths is reported under its own name, before
        # the cache uses it as the per-row append counts.
        q_lengths = V.check_lengths("q_lengths", q_lengths, batch, x.shape[1], "N")

    # 1. Projections: Q (B, N, Hq*D), K (B, S, Hkv*D), V (B, S, Hkv*M).
    linear = loops_multihead.linear if backend == "loops" else _linear_numpy
    q = _split_heads(linear(x, params.w_q, params.b_q), heads.hq)  # (B, Hq, N, D)
    k = _split_heads(linear(source, params.w_k, params.b_k), heads.hkv)  # (B, Hkv, S, D)
    v = _split_heads(linear(source, params.w_v, params.b_v), heads.hkv)  # (B, Hkv, S, M)

    # 2. With a cache: append the new keys and values, then attend over the cache.
    old_lengths = None
    if cache is not None:
        old_lengths = cache.lengths
        cache.append(k, v, counts=q_lengths)
        k, v = cache.keys, cache.values  # (B, Hkv, C, D), (B, Hkv, C, M)
        kv_lengths = cache.lengths
    try:
        # 3. Attention per head: O (B, Hq, N, M).
        o, lse = softmax_attention(
            q, k, v, scale=scale, mask=mask, bias=bias, causal=causal,
            alignment=alignment, window=window, softcap=softcap, kv_lengths=kv_lengths,
            q_lengths=q_lengths, return_lse=True, backend=backend,
        )
    except BaseException:
        if cache is not None:
            # Slots past the lengths are never read, so restoring the lengths undoes the append.
            cache._lengths = old_lengths
        raise

    # 4. Concatenate heads and project: y (B, N, d_out).
    o = o.transpose(0, 2, 1, 3)  # (B, N, Hq, M)
    o = o.reshape(batch, o.shape[1], heads.hq * heads.m)  # (B, N, Hq*M)
    y = linear(o, params.w_o, params.b_o)  # (B, N, d_out)
    if rank == 2:
        y, lse = y[0], lse[0]  # (N, d_out), (Hq, N)
    return (y, lse) if return_lse else y


def _check_cache(cache, batch: int, heads: _HeadSizes) -> None:
    if not isinstance(cache, KVCache):
        raise V.OptionError(f"cache is {type(cache).__name__}; expected a KVCache or None")
    expected = (batch, heads.hkv, heads.d, heads.m)
    got = (cache.batch, cache.num_kv_heads, cache.head_dim, cache.value_dim)
    if got != expected:
        raise V.ShapeError(
            f"cache has (B, Hkv, D, M) = {got}, but x and the weights give {expected}; "
            f"create the KVCache with batch={batch}, num_kv_heads={heads.hkv}, "
            f"head_dim={heads.d}, value_dim={heads.m}"
        )


def from_torch_multihead_attention(module) -> AttentionParams:
    """Convert the weights of a PyTorch ``nn.MultiheadAttention`` to `AttentionParams`.

    PyTorch computes ``x @ W.T + b`` with W of shape (d_out, d_in); kernattn computes
    ``x @ W + b``, so every weight is transposed. The packed ``in_proj_weight``
    (3 E, E) splits into its query, key and value row blocks, in that order, before
    the transpose. Call `multi_head_attention` with ``num_heads=module.num_heads``;
    PyTorch's default scale 1/sqrt(E / num_heads) is also kernattn's default.

    Parameters
    ----------
    module : torch.nn.MultiheadAttention
        The layer. Its dropout is not applied by kernattn (compare with
        ``module.eval()`` or ``dropout=0``).

    Returns
    -------
    AttentionParams
        float64 copies: ``w_q (E, E)``, ``w_k (kdim, E)``, ``w_v (vdim, E)``,
        ``w_o (E, E)`` and the biases when the module has them.

    Raises
    ------
    NotImplementedError
        For ``add_bias_kv=True`` or ``add_zero_attn=True`` (extra key positions that
        this layer does not model), or ``kdim != vdim`` (keys and values come from one
        memory here).
    """
    if getattr(module, "bias_k", None) is not None or getattr(module, "bias_v", None) is not None:
        raise NotImplementedError(
            "module has add_bias_kv=True; the learned extra key/value position is not "
            "supported by multi_head_attention"
        )
    if getattr(module, "add_zero_attn", False):
        raise NotImplementedError(
            "module has add_zero_attn=True; the extra zero key/value position is not "
            "supported by multi_head_attention"
        )
    if module.kdim != module.vdim:
        raise NotImplementedError(
            f"module has kdim = {module.kdim} and vdim = {module.vdim}; "
            f"multi_head_attention projects keys and values from one memory, so they "
            f"must be equal"
        )
    e = module.embed_dim
    if module.in_proj_weight is not None:
        packed = V.to_numpy(module.in_proj_weight).astype(np.float64)  # (3E, E)
        w_q, w_k, w_v = packed[:e], packed[e: 2 * e], packed[2 * e:]  # each (E, E)
    else:
        w_q = V.to_numpy(module.q_proj_weight).astype(np.float64)  # (E, E)
        w_k = V.to_numpy(module.k_proj_weight).astype(np.float64)  # (E, kdim)
        w_v = V.to_numpy(module.v_proj_weight).astype(np.float64)  # (E, vdim)
    b_q = b_k = b_v = None
    if module.in_proj_bias is not None:
        packed_bias = V.to_numpy(module.in_proj_bias).astype(np.float64)  # (3E,)
        b_q, b_k, b_v = packed_bias[:e], packed_bias[e: 2 * e], packed_bias[2 * e:]
    out_proj = module.out_proj
    b_o = None if out_proj.bias is None else V.to_numpy(out_proj.bias).astype(np.float64)
    return AttentionParams(
        w_q=w_q.T,
        w_k=w_k.T,
        w_v=w_v.T,
        w_o=V.to_numpy(out_proj.weight).astype(np.float64).T,
        b_q=b_q,
        b_k=b_k,
        b_v=b_v,
        b_o=b_o,
    )
