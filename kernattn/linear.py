"""Linear attention from a feature map, in quadratic, parallel, recurrent and chunked form.

Shape legend: B batch, Hq query heads, Hkv key/value heads, N queries, S keys, D query/key
head dimension, M value head dimension, F feature dimension. Arrays are (B, H, N, D)
("bhnd") unless `layout="bnhd"`. The state (S, z) is kept per key/value head: S has shape
(B, Hkv, F, M) and z has shape (B, Hkv, F) in both layouts.
"""

from __future__ import annotations

import numbers

import numpy as np

from kernattn import _validate as V
from kernattn.feature_maps import FeatureMap, FeatureMapError, as_feature_map
from kernattn.similarity import (
    check_zero_denominator,
    float_input,
    prepare_exact_inputs,
    resolve_denominators,
)
from kernattn.softmax import _weighted_sum

FORMS = ("quadratic", "parallel", "recurrent", "chunked")
DEFAULT_CHUNK_SIZE = 64

# Backends that compute in the input precision (float32 for float32, float16 and bfloat16
# inputs); the others compute in float64.
BACKEND_PRECISION = {"numba": "input", "cuda": "input"}


def linear_attention(
    q,
    k,
    v,
    feature_map,
    *,
    causal: bool | str | None = False,
    alignment: str | None = None,
    kv_lengths=None,
    form: str = "parallel",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    zero_denominator: str | float = "raise",
    rtol: float = 0.0,
    initial_state=None,
    return_state: bool = False,
    layout: str = "bhnd",
    backend: str = "numpy",
):
    r"""Compute linear attention ``φ(q_i)ᵀ S / φ(q_i)ᵀ z`` for a feature map φ.

    Parameters
    ----------
    q : array_like, shape (B, Hq, N, D)
        Queries; rank 3 and rank 2 inputs act as if leading size-1 axes were present.
        With ``layout="bnhd"`` the shapes are (B, N, Hq, D). Integer data and arrays of
        `fractions.Fraction` are accepted (see Notes).
    k : array_like, shape (B, Hkv, S, D)
        Keys; query head h reads key/value head ``h // (Hq // Hkv)``.
    v : array_like, shape (B, Hkv, S, M)
        Values.
    feature_map : FeatureMap or callable
        φ, applied to the last axis: (..., D) -> (..., F). A plain callable is wrapped
        with `feature_maps.from_function`.
    causal : {False, None, True, "top_left", "bottom_right"}, default False
        Causal rule, as in `kernattn.softmax_attention`; its keep-set is a prefix of the
        keys, which is what makes the prefix-sum forms possible.
    alignment : {None, "top_left", "bottom_right"}, optional
        Needed with ``causal=True`` when N != S or `kv_lengths` is shorter than S.
    kv_lengths : array_like of int, shape (B,), optional
        Valid keys per batch row; keys at positions >= length are never read.
    form : {"quadratic", "parallel", "recurrent", "chunked"}, default "parallel"
        How the sums are organised; every form computes the same value.
    chunk_size : int, default 64
        Queries per chunk (and keys per state update) for ``form="chunked"``; any
        size >= 1, including one that does not divide N.
    zero_denominator : {"raise", "zero", "nan"} or float, default "raise"
        Policy for a zero denominator, as in `similarity_attention`.
    rtol : float, default 0.0
        Also flag rows with ``|den| <= rtol * sum_f |φ_f(q_i)| sum_j |φ_f(k_j)|``, the
        sum of the absolute values of the products that make up the denominator.
        NOTE: with `initial_state`, ``|z0_f|`` counts as one term, so a resumed call
        can flag differently from one call when ``rtol > 0``.
    initial_state : tuple (S0, z0), optional
        The state of keys that came before: S0 of shape (B, Hkv, F, M) and z0 of shape
        (B, Hkv, F) (leading axes left out as for q). Every query sees it.
    return_state : bool, default False
        Also return ``(S, z)`` after the last valid key, to resume from.
    layout : {"bhnd", "bnhd"}, default "bhnd"
    backend : {"numpy", "loops", "numba", "cuda"}, default "numpy"
        ``"numba"`` runs every form as the chunked kernel of `kernattn._numba.linear`,
        in parallel over (batch row, query head), in the input precision: float32 when
        q, k and v are float32, float16 or bfloat16 (features are computed in float64 and
        rounded once), float64 otherwise. ``"cuda"`` runs the Numba CUDA kernels of
        `kernattn.cuda.linear` in the same precision; the feature map and the
        zero-denominator policy run on the host, so inputs and output are NumPy arrays.
        The other backends compute in float64.

    Returns
    -------
    out : ndarray, shape (B, Hq, N, M)
        With the rank and layout of `q`; float64, or float32 from ``"numba"`` on float32
        input.
    state : tuple (S, z)
        Only with ``return_state=True``; shapes as for `initial_state`.

    Raises
    ------
    ZeroDenominatorError
        Under ``"raise"``, naming every row whose denominator is zero.
    FeatureMapError
        The map returned NaN or Inf for finite input.
    ShapeError
        The map returned the wrong shape, or `initial_state` does not fit.
    DTypeError, OptionError
        Bad dtypes, an unknown form, ``chunk_size < 1`` and the options of
        `kernattn.softmax_attention`.

    Notes
    -----
    With ``S = sum_j φ(k_j) v_jᵀ`` (F, M) and ``z = sum_j φ(k_j)`` (F) over the keys
    query i may see,

    .. math::

        \mathrm{out}_i = \frac{\varphi(q_i)^\top S}{\varphi(q_i)^\top z}
        = \frac{\sum_j (\varphi(q_i) \cdot \varphi(k_j))\, v_j}
               {\sum_j \varphi(q_i) \cdot \varphi(k_j)},

    which is similarity attention with ``sim = φ(q) . φ(k)``. The forms: quadratic
    builds the (N, S) matrix ``φ(Q) φ(K)ᵀ``; parallel uses S, z (prefix sums of them
    when causal); recurrent adds one key at a time; chunked combines a state carried
    between chunks with a small quadratic block inside each chunk. A row that sees no
    key and no initial state is exactly 0.

    Exact route: with ``backend="loops"``, no `initial_state`, q, k, v all integer (or
    ints and Fractions) and a `rational` map (`Polynomial`, `Identity`, `ReLU`,
    `TaylorExp` with a given scale), every sum is a `fractions.Fraction` and each output
    entry is rounded to float64 once; all four forms then give identical bits. The
    returned state is rounded twice (the sum, then the square-root weight).

    Cost: O(B Hq N F M) time for the parallel, recurrent and chunked forms plus
    O(B Hq N C F) inside chunks of size C, and O(B Hq N S (F + M)) for quadratic. Memory
    O(S F M) for the causal parallel prefix sums, O(F M) for recurrent and chunked;
    only the quadratic form builds an (N, S) block.

    See Also
    --------
    kernattn.loops.linear.linear_attention : the explicit-loop twin.
    similarity_attention : the same result from pairwise similarities.

    Examples
    --------
    >>> import numpy as np
    >>> from kernattn.feature_maps import EluPlusOne
    >>> q = k = np.zeros((4, 1))
    >>> v = np.arange(4.0).reshape(4, 1)
    >>> linear_attention(q, k, v, EluPlusOne(), causal=True, form="chunked", chunk_size=3).ravel()
    array([0. , 0.5, 1. , 1.5])
    """
    policy, rtol = check_zero_denominator(zero_denominator, rtol)
    fmap = as_feature_map(feature_map)
    if form not in FORMS:
        raise V.OptionError(f"form is {form!r}; expected one of {', '.join(map(repr, FORMS))}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise V.OptionError(f"chunk_size is {chunk_size!r}; expected an integer >= 1")
    impl = V.check_backend(backend, linear_backends())
    precision = BACKEND_PRECISION.get(backend, "float64")
    q4, k4, v4, ndim = V.check_qkv(
        float_input(q), float_input(k), float_input(v), layout, precision
    )
    b, hq, n, d = q4.shape
    hkv, s, m = k4.shape[1], k4.shape[2], v4.shape[3]
    structure = V.resolve_structure(causal, alignment, None, None, kv_lengths, b, n, s)
    phi_q = evaluate_feature_map(fmap, q4, "q")
    phi_k = evaluate_feature_map(fmap, k4, "k")
    f = phi_q.shape[-1]
    state = _check_state(initial_state, (b, hkv, f, m), ndim)
    exact_inputs = None
    if fmap.rational and state is None:
        exact_inputs = prepare_exact_inputs(q, k, v, layout, b)
    out, final_s, final_z = impl(
        q4, k4, v4, phi_q=phi_q, phi_k=phi_k, feature_map=fmap, exact_inputs=exact_inputs,
        structure=structure, form=form, chunk_size=int(chunk_size), initial_state=state,
        zero_denominator=policy, rtol=rtol,
    )
    out = V.from_bhnd(out, ndim, layout)
    if return_state:
        return out, (_state_to_rank(final_s, ndim), _state_to_rank(final_z, ndim))
    return out


def linear_backends() -> dict:
    """Return the available linear-attention backends by name."""
    from kernattn.loops import linear as loops_linear

    return {
        "numpy": _linear_attention_numpy,
        "loops": loops_linear.linear_attention,
        "numba": _linear_attention_numba,
        "cuda": _linear_attention_cuda,
    }


def _linear_attention_cuda(q, k, v, **options):
    """Numba CUDA twin, imported on first use; raises when no GPU (or simulator) is there."""
    from kernattn.cuda.linear import linear_attention as cuda_linear_attention

    return cuda_linear_attention(q, k, v, **options)


def _linear_attention_numba(q, k, v, **options):
    """Numba twin, imported (and compiled) on first use so `import kernattn` stays light."""
    from kernattn._numba.linear import linear_attention as numba_linear_attention

    return numba_linear_attention(q, k, v, **options)


def evaluate_feature_map(fmap: FeatureMap, x: np.ndarray, name: str) -> np.ndarray:
    """Apply φ to a (B, H, L, D) array and check the result is (B, H, L, F) and finite.

    Entries computed from non-finite input may be non-finite; those are only read
    where the input is read. The features have the dtype of x: built-in maps compute
    float32 input in float32, and other results are converted.
    """
    d = x.shape[-1]
    try:
        expected_f = int(fmap.num_features(d))
    except (V.DTypeError, V.ShapeError):
        raise
    except Exception as err:  # a user's map that cannot run on zeros is reported here
        raise FeatureMapError(f"feature map {fmap!r} failed on input of dimension D = {d}: {err!r}") from err
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite output is checked below
        phi = np.asarray(fmap(x))
    if phi.dtype.kind not in "fiu":
        raise V.DTypeError(
            f"feature map {fmap!r} returned dtype {phi.dtype} for {name}; expected real "
            f"floating features"
        )
    if phi.dtype != x.dtype:
        phi = phi.astype(x.dtype)
    if phi.shape != x.shape[:-1] + (expected_f,):
        raise V.ShapeError(
            f"feature map {fmap!r} returned shape {phi.shape} for {name} of shape "
            f"{x.shape}; expected {x.shape[:-1] + (expected_f,)}, i.e. (..., F) with "
            f"F = num_features({d}) = {expected_f}"
        )
    finite = np.isfinite(phi)
    if finite.all():  # the common case: one pass, and x need not be read
        return phi
    bad = ~finite.all(axis=-1) & np.isfinite(x).all(axis=-1)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise FeatureMapError(
            f"feature map {fmap!r} returned NaN or Inf for finite {name}{list(where)} "
            f"(batch, head, position) in {int(bad.sum())} vector(s); rescale the input "
            f"or fix the map"
        )
    return phi


def _check_state(initial_state, shape: tuple[int, int, int, int], ndim: int):
    """Return (S0 (B, Hkv, F, M), z0 (B, Hkv, F)) as float64, or None."""
    if initial_state is None:
        return None
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
        raise V.ShapeError(
            f"initial_state is {type(initial_state).__name__}; expected a pair (S0, z0)"
        )
    b, hkv, f, m = shape
    full = {"S0": (b, hkv, f, m), "z0": (b, hkv, f)}
    reduced = {name: _state_to_rank(np.empty(s_), ndim).shape for name, s_ in full.items()}
    arrays = []
    for name, value in zip(("S0", "z0"), initial_state):
        arr = V.as_float_array(f"initial_state {name}", value)
        if arr.shape == reduced[name]:
            arr = arr.reshape(full[name])
        if arr.shape != full[name]:
            raise V.ShapeError(
                f"initial_state {name} has shape {arr.shape}; expected {reduced[name]} "
                f"(B, Hkv, F{', M' if name == 'S0' else ''} with the leading axes q "
                f"leaves out), F = {f} features and M = {m} value dimensions"
            )
        arrays.append(arr)
    return tuple(arrays)


def _state_to_rank(x: np.ndarray, ndim: int) -> np.ndarray:
    """Drop the leading (B, Hkv) axes that a rank-3 or rank-2 q does not have."""
    if ndim == 2:
        return x[0, 0]
    return x[0] if ndim == 3 else x


def key_counts(structure, b: int, n: int) -> np.ndarray:
    """Return, for each query of batch row b, how many leading keys it may see.

    The causal keep-set of query i is the prefix j <= i + off of the valid keys, so a
    count describes it completely and no (N, S) mask is needed.
    """
    s_b = int(structure.kv_lengths[b])
    if not structure.causal:
        return np.full(n, s_b, dtype=np.int64)
    return np.clip(np.arange(n) + structure.offset(b) + 1, 0, s_b)


def _linear_attention_numpy(
    q, k, v, *, phi_q, phi_k, feature_map, exact_inputs, structure, form, chunk_size,
    initial_state, zero_denominator, rtol,
):
    """NumPy twin. `feature_map` and `exact_inputs` are unused: this route is float64."""
    b, hq, n, _ = q.shape
    hkv, m, f = k.shape[1], v.shape[3], phi_q.shape[-1]
    group = hq // hkv
    num = np.zeros((b, hq, n, m))
    den = np.zeros((b, hq, n))
    reference = np.zeros((b, hq, n))
    empty = np.zeros((b, hq, n), dtype=bool)
    final_s = np.zeros((b, hkv, f, m))
    final_z = np.zeros((b, hkv, f))
    for bi in range(b):
        # 1. Keys each query may see, as prefix lengths; only valid keys are sliced in.
        counts = key_counts(structure, bi, n)
        s_b = int(structure.kv_lengths[bi])
        for h in range(hq):
            g = h // group
            pq, pk, vv = phi_q[bi, h], phi_k[bi, g, :s_b], v[bi, g, :s_b]
            if initial_state is None:
                s0, z0 = np.zeros((f, m)), np.zeros(f)
                empty[bi, h] = counts == 0
            else:
                s0, z0 = initial_state[0][bi, g], initial_state[1][bi, g]
            # 2. Numerator and denominator in the requested form.
            rows = _FORM_FUNCTIONS[form](pq, pk, vv, counts, s0, z0, chunk_size)
            num[bi, h], den[bi, h], final_s[bi, g], final_z[bi, g] = rows
            # 3. The cancellation reference sum_f |φ_f(q_i)| sum_{j < c_i} |φ_f(k_j)|.
            abs_prefix = np.concatenate([np.zeros((1, f)), np.cumsum(np.abs(pk), axis=0)])
            reference[bi, h] = np.sum(np.abs(pq) * (abs_prefix[counts] + np.abs(z0)), axis=1)
    # 4. Divide under the zero-denominator policy.
    out = resolve_denominators(num, den, reference, empty, zero_denominator, rtol)
    return out, final_s, final_z


def _quadratic(pq, pk, vv, counts, s0, z0, chunk_size):
    """Materialise A = φ(Q) φ(K)ᵀ (N, S), keep j < c_i, then A @ V and A @ 1."""
    keep = np.arange(pk.shape[0])[None, :] < counts[:, None]
    scores = np.where(keep, pq @ pk.T, 0.0)
    num = _weighted_sum(scores, keep, vv) + pq @ s0
    den = scores.sum(axis=1) + pq @ z0
    return num, den, s0 + pk.T @ vv, z0 + pk.sum(axis=0)


def _parallel(pq, pk, vv, counts, s0, z0, chunk_size):
    """S and z for all keys, or their prefix sums (S, F, M) when the rule is causal."""
    total_s, total_z = s0 + pk.T @ vv, z0 + pk.sum(axis=0)
    if np.all(counts == pk.shape[0]):
        return pq @ total_s, pq @ total_z, total_s, total_z
    f, m = s0.shape
    prefix_s = np.concatenate([np.zeros((1, f, m)), np.cumsum(pk[:, :, None] * vv[:, None, :], axis=0)])
    prefix_z = np.concatenate([np.zeros((1, f)), np.cumsum(pk, axis=0)])
    num = np.einsum("nf,nfm->nm", pq, prefix_s[counts] + s0)
    den = np.einsum("nf,nf->n", pq, prefix_z[counts] + z0)
    return num, den, total_s, total_z


def _recurrent(pq, pk, vv, counts, s0, z0, chunk_size):
    """S_j = S_{j-1} + φ(k_j) v_jᵀ one key at a time; query i reads S after c_i keys."""
    state_s, state_z = s0.copy(), z0.copy()
    n, m = pq.shape[0], s0.shape[1]
    num, den = np.zeros((n, m)), np.zeros(n)
    j = 0
    for i in range(n):
        while j < counts[i]:
            state_s += np.outer(pk[j], vv[j])
            state_z += pk[j]
            j += 1
        num[i] = pq[i] @ state_s
        den[i] = pq[i] @ state_z
    for j in range(j, pk.shape[0]):
        state_s += np.outer(pk[j], vv[j])
        state_z += pk[j]
    return num, den, state_s, state_z


def _chunked(pq, pk, vv, counts, s0, z0, chunk_size):
    """Carry the state between chunks of queries; inside a chunk, a small quadratic block.

    The keys of a query chunk [i0, i1) are [0, c_i0) from the state and [c_i0, c_i)
    from the block. Counts grow by at most one per query, so a block is at most
    chunk_size keys wide.
    """
    state_s, state_z = s0.copy(), z0.copy()
    n, m = pq.shape[0], s0.shape[1]
    num, den = np.zeros((n, m)), np.zeros(n)
    absorbed = 0

    def absorb(until):
        nonlocal absorbed, state_s, state_z
        while absorbed < until:
            stop = min(absorbed + chunk_size, until)
            state_s = state_s + pk[absorbed:stop].T @ vv[absorbed:stop]
            state_z = state_z + pk[absorbed:stop].sum(axis=0)
            absorbed = stop

    for i0 in range(0, n, chunk_size):
        i1 = min(i0 + chunk_size, n)
        lo, hi = int(counts[i0]), int(counts[i1 - 1])
        absorb(lo)
        keep = (lo + np.arange(hi - lo))[None, :] < counts[i0:i1, None]
        block = np.where(keep, pq[i0:i1] @ pk[lo:hi].T, 0.0)
        num[i0:i1] = pq[i0:i1] @ state_s + _weighted_sum(block, keep, vv[lo:hi])
        den[i0:i1] = pq[i0:i1] @ state_z + block.sum(axis=1)
    absorb(pk.shape[0])
    return num, den, state_s, state_z


_FORM_FUNCTIONS = {
    "quadratic": _quadratic,
    "parallel": _parallel,
    "recurrent": _recurrent,
    "chunked": _chunked,
}
