"""Scaled dot-product softmax attention and the merge of partial results.

Shape legend: B batch, Hq query heads, Hkv key/value heads, N queries, S keys, D query/key
head dimension, M value head dimension. Arrays are (B, H, N, D) ("bhnd") unless
`layout="bnhd"`; masks, biases and dropout patterns are always broadcastable to
(B, Hq, N, S).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kernattn import _validate as V


def softmax_attention(
    q,
    k,
    v,
    *,
    scale: float | None = None,
    mask=None,
    bias=None,
    causal: bool | str | None = None,
    alignment: str | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    kv_lengths=None,
    q_lengths=None,
    dropout_mask=None,
    dropout_p: float = 0.0,
    layout: str = "bhnd",
    return_lse: bool = False,
    backend: str = "numpy",
):
    r"""Compute scaled dot-product softmax attention.

    Parameters
    ----------
    q : array_like, shape (B, Hq, N, D)
        Queries. Rank 3 (Hq, N, D) and rank 2 (N, D) inputs act as if leading size-1
        axes were present; the output then has the rank of `q`. With
        ``layout="bnhd"`` the shapes are (B, N, Hq, D) and (N, Hq, D).
    k : array_like, shape (B, Hkv, S, D)
        Keys. ``Hq % Hkv == 0``; query head h reads key/value head
        ``h // (Hq // Hkv)`` (grouped-query attention; ``Hkv = 1`` is multi-query).
    v : array_like, shape (B, Hkv, S, M)
        Values.
    scale : float, optional
        Score scale. Default ``1 / sqrt(D)``.
    mask : array_like of bool, optional
        Keep-set broadcastable to (B, Hq, N, S); True means the query may attend to
        the key. A float mask is rejected: additive masks go in `bias`.
    bias : array_like of float, optional
        Additive bias broadcastable to (B, Hq, N, S), added after soft-capping (ALiBi,
        relative position biases, additive masks).
    causal : {None, False, True, "top_left", "bottom_right"}, optional
        Causal rule. ``"top_left"`` allows key j for query i when ``j <= i``
        (PyTorch ``is_causal``). ``"bottom_right"`` allows ``j <= i + S - N``
        (FlashAttention >= 2.1, KV-cache decoding). ``True`` is accepted only where
        both agree.
    alignment : {None, "top_left", "bottom_right"}, optional
        Places windows (and the causal rule when ``causal=True``) when N != S.
        Required whenever the choice changes the result.
    window : tuple (left, right), optional
        Sliding window: key j is allowed for query i when
        ``i + off - left <= j <= i + off + right``, off = 0 (top-left) or S - N
        (bottom-right). None on a side means unbounded; ``(W - 1, 0)`` is W keys
        including the query itself. Negative sizes are an error.
    softcap : float, optional
        Soft-capping ``s = softcap * tanh(s / softcap)``, applied before `bias`.
    kv_lengths : array_like of int, shape (B,), optional
        Valid keys per batch row; keys at positions >= length are never read. With
        bottom-right alignment the last valid query aligns with the last valid key.
    q_lengths : array_like of int, shape (B,), optional
        Valid queries per batch row; padding query rows are 0 with ``lse = -inf``.
    dropout_mask : array_like of bool, optional
        Dropout keep pattern broadcastable to (B, Hq, N, S). Probabilities become
        ``P * keep / (1 - dropout_p)`` after normalisation; `lse` is unaffected.
    dropout_p : float, default 0.0
        Dropout probability in [0, 1). Non-zero only with a `dropout_mask`.
    layout : {"bhnd", "bnhd"}, default "bhnd"
        Axis order of q, k, v and the output.
    return_lse : bool, default False
        Also return the natural-log log-sum-exp of the final scores over the allowed
        keys.
    backend : {"numpy", "loops", "numba", "cuda"}, default "numpy"
        ``"loops"`` is the explicit-loop oracle (float64, ``math.fsum``), for inputs of
        a few dozen positions. ``"numpy"`` computes in float64. ``"numba"`` is the tiled
        parallel kernel (compiled on first use); it computes in the input precision:
        float32 when q, k and v are float32, float16 or bfloat16, else float64.
        ``"cuda"`` is the Numba CUDA kernel, in the input precision as ``"numba"``;
        device arrays (``__cuda_array_interface__``) are read in place and give a
        Numba device array back (see `kernattn.cuda`).

    Returns
    -------
    out : ndarray, shape (B, Hq, N, M)
        Attention output, with the rank and layout of `q`. float64, or float32 from
        the numba backend with float32 (or narrower) input.
    lse : ndarray, shape (B, Hq, N), same dtype as `out`
        Only with ``return_lse=True``. Head-major in both layouts, as FlashAttention.

    Raises
    ------
    ShapeError
        Ranks or sizes that do not fit together, heads that do not divide, masks that
        do not broadcast.
    DTypeError
        Bool or complex q, k, v or bias; non-bool mask or dropout pattern.
    OptionError
        An invalid or ambiguous option (``causal=True`` with N != S, negative window,
        non-finite scale, unknown backend).

    Notes
    -----
    For each allowed key j of query i, in this order:

    .. math::

        s_{ij} = \mathrm{scale}\; q_i \cdot k_j, \quad
        s_{ij} \leftarrow c \tanh(s_{ij}/c), \quad
        s_{ij} \leftarrow s_{ij} + \mathrm{bias}_{ij},

        \mathrm{out}_i = \sum_j \frac{e^{s_{ij}}}{\sum_{j'} e^{s_{ij'}}} v_j, \quad
        \mathrm{lse}_i = \log \sum_j e^{s_{ij}}.

    Excluded keys are left out of both sums before ``exp``, so NaN or Inf stored at
    excluded positions of k, v or bias never reaches the output. A row with no allowed
    key, or whose allowed scores are all -inf, is exactly 0 with ``lse = -inf``.
    Scores are shifted by the row maximum before ``exp``. Inputs are converted to
    float64 (integers exactly, float16 and bfloat16 by widening).

    Cost: O(B Hq N S (D + M)) time; the NumPy backend holds one (N, S) score block
    at a time, so O(N S + B Hq N M) memory beyond the inputs.

    See Also
    --------
    kernattn.loops.softmax.softmax_attention : the explicit-loop twin.
    merge_attention_states : combine results over disjoint key sets.

    Examples
    --------
    >>> import numpy as np
    >>> q, k = np.zeros((2, 1)), np.zeros((4, 1))
    >>> v = np.arange(4.0).reshape(4, 1)
    >>> softmax_attention(q, k, v, causal="top_left").ravel()
    array([0. , 0.5])
    >>> softmax_attention(q, k, v, causal="bottom_right").ravel()
    array([1. , 1.5])
    """
    if backend == "cuda" and _any_device_array(q, k, v):
        # Device arrays are checked through host stand-ins and never copied to the host.
        from kernattn.cuda.softmax import softmax_attention_device

        return softmax_attention_device(
            q, k, v, scale=scale, mask=mask, bias=bias, causal=causal, alignment=alignment,
            window=window, softcap=softcap, kv_lengths=kv_lengths, q_lengths=q_lengths,
            dropout_mask=dropout_mask, dropout_p=dropout_p, layout=layout,
            return_lse=return_lse,
        )
    args = prepare_softmax_inputs(
        q, k, v, scale=scale, mask=mask, bias=bias, causal=causal, alignment=alignment,
        window=window, softcap=softcap, kv_lengths=kv_lengths, q_lengths=q_lengths,
        dropout_mask=dropout_mask, dropout_p=dropout_p, layout=layout,
        precision=BACKEND_PRECISION.get(backend, "float64"),
    )
    impl = V.check_backend(backend, softmax_backends())
    ndim = args.pop("ndim")
    out, lse = impl(**args)
    out = V.from_bhnd(out, ndim, layout)
    if return_lse:
        return out, V.lse_from_bhn(lse, ndim)
    return out


def prepare_softmax_inputs(
    q, k, v, *, scale, mask, bias, causal, alignment, window, softcap, kv_lengths,
    q_lengths, dropout_mask, dropout_p, layout, precision="float64",
) -> dict:
    """Validate every argument of `softmax_attention` and return the backend arguments.

    The result contains float64 (B, H, N, D) arrays, masks broadcast to (B, Hq, N, S) (or
    None), a resolved `Structure` and the rank of q under "ndim". With
    ``precision="input"``, q, k, v and bias are float32 instead when q, k and v are all
    float32, float16 or bfloat16 (see `kernattn._validate.compute_dtype`).
    """
    dtype = V.compute_dtype(precision, q, k, v)
    q, k, v, ndim = V.check_qkv(q, k, v, layout, precision)
    b, hq, n, d = q.shape
    s = k.shape[2]
    full = (b, hq, n, s)
    if mask is not None:
        mask = V.broadcast_bhns("mask", V.as_bool_array("mask", mask), full)
    if bias is not None:
        bias = V.broadcast_bhns("bias", V.as_float_array("bias", bias, dtype=dtype), full)
    if dropout_mask is not None:
        dropout_mask = V.broadcast_bhns(
            "dropout_mask", V.as_bool_array("dropout_mask", dropout_mask, "True = keep"), full
        )
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float, np.floating)):
        raise V.OptionError(f"dropout_p is {dropout_p!r}; expected a float in [0, 1)")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise V.OptionError(f"dropout_p is {dropout_p}; expected a float in [0, 1)")
    if dropout_p > 0.0 and dropout_mask is None:
        raise V.OptionError(
            f"dropout_p is {dropout_p} but dropout_mask is None; an oracle does not draw "
            f"random numbers, so pass the keep pattern as dropout_mask"
        )
    structure = V.resolve_structure(causal, alignment, window, q_lengths, kv_lengths, b, n, s)
    return dict(
        q=q, k=k, v=v, scale=V.check_scale(scale, d), mask=mask, bias=bias,
        softcap=V.check_positive_float("softcap", softcap), structure=structure,
        dropout_mask=dropout_mask, dropout_scale=1.0 / (1.0 - dropout_p), ndim=ndim,
    )


# Backends that compute in the input precision (float32 stays float32); the others get
# float64 arrays.
BACKEND_PRECISION = {"numba": "input", "cuda": "input"}


def softmax_backends() -> dict:
    """Return the available softmax backends by name; fast ones import on demand."""
    from kernattn.loops import softmax as loops_softmax

    backends = {
        "numpy": _softmax_attention_numpy,
        "loops": loops_softmax.softmax_attention,
        "numba": _softmax_attention_numba,
        "cuda": _softmax_attention_cuda,
    }
    return backends


def _softmax_attention_numba(**kwargs):
    """Numba twin, imported (and compiled) on first use so `import kernattn` stays light."""
    from kernattn._numba.softmax import softmax_attention

    return softmax_attention(**kwargs)


def _any_device_array(*arrays) -> bool:
    from kernattn.cuda import is_device_array

    return any(is_device_array(x) for x in arrays)


def _softmax_attention_cuda(**kwargs):
    """Numba CUDA twin, imported on first use; raises when no GPU (or simulator) is there."""
    from kernattn.cuda.softmax import softmax_attention

    return softmax_attention(**kwargs)


def _softmax_attention_numpy(
    q, k, v, *, scale, mask, bias, softcap, structure, dropout_mask, dropout_scale
):
    """NumPy twin: one (N, S) score block per batch row and query head."""
    b, hq, n, _ = q.shape
    hkv, s, m = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    out = np.zeros((b, hq, n, m))
    lse = np.full((b, hq, n), -np.inf)
    for bi in range(b):
        # 1. The structural keep-set of this batch row, from index arithmetic.
        keep_structural = structure.keep(bi, n, s)
        for h in range(hq):
            g = h // group  # contiguous groups: query head h reads key/value head g
            keep = keep_structural if mask is None else keep_structural & mask[bi, h]
            if not keep.any():
                continue
            # 2. Only columns some query may read are touched, so NaN beyond kv_lengths
            #    or in fully excluded columns is never read.
            cols = np.flatnonzero(keep.any(axis=0))
            keep = keep[:, cols]
            kk, vv = k[bi, g, cols], v[bi, g, cols]
            # 3. Scores, soft-capping, bias: (N, S') float64.
            scores = scale * (q[bi, h] @ kk.T)
            if softcap is not None:
                scores = softcap * np.tanh(scores / softcap)
            if bias is not None:
                scores = scores + bias[bi, h][:, cols]
            # 4. Exclude before exp: excluded scores become -inf, never "large negative".
            scores = np.where(keep, scores, -np.inf)
            keep = keep & ~np.isneginf(scores)  # a -inf score (from bias) excludes its key
            row_max = scores.max(axis=1, keepdims=True)
            # A row whose allowed scores are all -inf is treated as empty.
            shift = np.where(np.isneginf(row_max), 0.0, row_max)
            with np.errstate(invalid="ignore"):  # +inf - +inf gives NaN, as IEEE 754 specifies
                weights = np.exp(scores - shift)
            denom = weights.sum(axis=1, keepdims=True)
            with np.errstate(divide="ignore"):  # log(0) = -inf marks an empty row
                lse[bi, h] = (shift + np.log(denom))[:, 0]
            with np.errstate(invalid="ignore", divide="ignore"):
                probs = np.where(denom == 0, 0.0, weights / denom)
            # 5. Dropout after normalisation.
            if dropout_mask is not None:
                probs = probs * dropout_mask[bi, h][:, cols] * dropout_scale
            out[bi, h] = _weighted_sum(probs, keep, vv)
    return out, lse


def _weighted_sum(probs: np.ndarray, keep: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Return probs @ values, where a non-finite value reaches only rows that keep it.

    A plain product would give 0 * NaN = NaN for excluded entries, so non-finite values
    are zeroed for the product and added back, row by row, where they are kept.
    """
    finite = np.isfinite(values)
    if finite.all():
        return probs @ values
    out = probs @ np.where(finite, values, 0.0)
    for j, col in zip(*np.nonzero(~finite)):
        rows = keep[:, j]
        with np.errstate(invalid="ignore"):
            out[rows, col] += probs[rows, j] * values[j, col]
    return out


def merge_attention_states(outs: Sequence, lses: Sequence, *, layout: str = "bhnd"):
    r"""Merge attention results computed over disjoint sets of keys.

    Parameters
    ----------
    outs : sequence of array_like, each shape (..., Hq, N, M)
        Partial outputs, each normalised over its own keys (split-KV, ring attention,
        paged decoding). With ``layout="bnhd"`` each is (..., N, Hq, M).
    lses : sequence of array_like, each shape (..., Hq, N)
        The matching natural-log log-sum-exp values (-inf for a part with no key).
    layout : {"bhnd", "bnhd"}, default "bhnd"

    Returns
    -------
    out : ndarray, float64, the shape of one part
    lse : ndarray, float64, the shape of one lse part

    Notes
    -----
    .. math::

        \mathrm{lse} = \log \sum_p e^{\mathrm{lse}_p}, \qquad
        \mathrm{out} = \sum_p e^{\mathrm{lse}_p - \mathrm{lse}}\, \mathrm{out}_p .

    Parts with ``lse_p = -inf`` get weight 0 and their output is not read (it may be
    NaN). If every part is empty the result is 0 with ``lse = -inf``. The lse must be
    absolute and natural: a base-2 lse, or one taken relative to a block maximum,
    weights the parts wrongly. O(P · size of out) time.

    Examples
    --------
    >>> out, lse = merge_attention_states([[[1.0]], [[3.0]]], [[0.0], [0.0]])
    >>> out, lse
    (array([[2.]]), array([0.69314718]))
    """
    if len(outs) != len(lses):
        raise V.ShapeError(
            f"outs has {len(outs)} parts but lses has {len(lses)}; expected one lse per part"
        )
    if len(outs) == 0:
        raise V.ShapeError("outs is empty; expected at least one partial result")
    V.check_layout(layout)
    outs = [V.as_float_array(f"outs[{p}]", o) for p, o in enumerate(outs)]
    lses = [V.as_float_array(f"lses[{p}]", x) for p, x in enumerate(lses)]
    for p, (o, x) in enumerate(zip(outs, lses)):
        if o.shape != outs[0].shape:
            raise V.ShapeError(
                f"outs[{p}] has shape {o.shape}, but outs[0] has {outs[0].shape}; "
                f"every part must have the same shape"
            )
        if o.ndim < 1 or x.shape != _lse_shape(o.shape, layout):
            raise V.ShapeError(
                f"lses[{p}] has shape {x.shape}; expected {_lse_shape(o.shape, layout)} "
                f"to match outs[{p}] of shape {o.shape} in layout {layout!r}"
            )
    lse_parts = np.stack(lses)
    with np.errstate(invalid="ignore"):  # a NaN lse gives NaN, as it should
        total = np.logaddexp.reduce(lse_parts, axis=0)
    out = np.zeros(outs[0].shape)
    for o, x in zip(outs, lses):
        with np.errstate(invalid="ignore"):  # -inf - -inf for parts of an empty row
            weight = np.exp(x - total)
        # An empty part (lse = -inf) is left out, so its output is never read. A NaN or
        # +inf lse gives a NaN weight, which reaches the output as NaN.
        empty = _lse_to_out(np.isneginf(x), layout)
        out += np.where(empty, 0.0, _lse_to_out(weight, layout) * o)
    return out, total


def _lse_shape(out_shape: tuple, layout: str) -> tuple:
    if layout == "bhnd" or len(out_shape) < 3:
        return out_shape[:-1]
    # (..., N, H, M) -> (..., H, N)
    return out_shape[:-3] + (out_shape[-2], out_shape[-3])


def _lse_to_out(weight: np.ndarray, layout: str) -> np.ndarray:
    if layout == "bhnd" or weight.ndim < 2:
        return weight[..., None]
    return np.swapaxes(weight, -1, -2)[..., None]
