"""Similarity attention and the zero-denominator policies shared with linear attention.

Shape legend: B batch, Hq query heads, Hkv key/value heads, N queries, S keys, D query/key
head dimension, M value head dimension. Arrays are (B, H, N, D) ("bhnd") unless
`layout="bnhd"`; masks are broadcastable to (B, Hq, N, S).

Similarity attention normalises an arbitrary, possibly signed, similarity:
``out_i = sum_j sim(q_i, k_j) v_j / sum_j sim(q_i, k_j)`` over the allowed keys j. The
denominator can be zero or nearly cancel, so every caller chooses what happens then
(`zero_denominator=`); nothing turns into NaN or Inf silently.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Callable

import numpy as np

from kernattn import _validate as V
from kernattn.softmax import _weighted_sum

POLICIES = ("raise", "zero", "nan")
ROWS_SHOWN = 5  # rows listed in a ZeroDenominatorError message


class ZeroDenominatorError(ZeroDivisionError, ValueError):
    """Raised when a normaliser is zero (or cancelled, with ``rtol > 0``) in some rows.

    Subclasses both `ZeroDivisionError` and `ValueError`, so either ``except`` catches it.

    Attributes
    ----------
    rows : list of tuple (batch, head, query)
        Every offending row, in "bhnd" index order: batch row, query head, query index.
    """

    def __init__(self, rows, *, detail: str = "is zero"):
        self.rows = [tuple(int(x) for x in row) for row in rows]
        shown = ", ".join(str(row) for row in self.rows[:ROWS_SHOWN])
        more = f" and {len(self.rows) - ROWS_SHOWN} more" if len(self.rows) > ROWS_SHOWN else ""
        super().__init__(
            f"the attention denominator {detail} in {len(self.rows)} row(s) "
            f"(batch, head, query): {shown}{more}; pass zero_denominator='zero', 'nan' "
            f"or a float eps to choose a result for such rows"
        )


class SimilarityError(ValueError):
    """Raised when a user's similarity raises or returns something other than a real number."""


# --- zero-denominator policy -------------------------------------------------------------


def check_zero_denominator(zero_denominator, rtol) -> tuple[str | float, float]:
    """Validate the policy and tolerance together; return (policy, rtol).

    The policy is "raise", "zero", "nan" or a positive finite float eps. `rtol` is a
    finite number >= 0 and must be 0 with an eps, which shifts every denominator anyway.
    """
    if isinstance(zero_denominator, str):
        if zero_denominator not in POLICIES:
            raise V.OptionError(
                f"zero_denominator is {zero_denominator!r}; expected 'raise', 'zero', "
                f"'nan' or a positive float eps"
            )
        policy: str | float = zero_denominator
    elif isinstance(zero_denominator, numbers.Real) and not isinstance(zero_denominator, bool):
        eps = float(zero_denominator)
        if not (math.isfinite(eps) and eps > 0):
            raise V.OptionError(
                f"zero_denominator is {zero_denominator!r}; a float eps must be positive "
                f"and finite"
            )
        policy = eps
    else:
        raise V.OptionError(
            f"zero_denominator is {zero_denominator!r}; expected 'raise', 'zero', 'nan' "
            f"or a positive float eps"
        )
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real):
        raise V.OptionError(f"rtol is {rtol!r}; expected a finite number >= 0")
    rtol = float(rtol)
    if not (math.isfinite(rtol) and rtol >= 0):
        raise V.OptionError(f"rtol is {rtol}; expected a finite number >= 0")
    if isinstance(policy, float) and rtol > 0:
        raise V.OptionError(
            f"rtol is {rtol} with zero_denominator={policy}; an eps shifts every "
            f"denominator, so rtol applies only to 'raise', 'zero' and 'nan'"
        )
    return policy, rtol


def resolve_denominators(num, den, reference, empty, policy, rtol) -> np.ndarray:
    """Divide `num` by `den` row by row under a zero-denominator policy.

    Parameters
    ----------
    num : ndarray, shape (B, Hq, N, M)
    den : ndarray, shape (B, Hq, N)
    reference : ndarray, shape (B, Hq, N)
        The sum of the absolute values of the terms of `den`; a row is flagged when
        ``|den| <= rtol * reference`` (for ``rtol = 0``: when ``den == 0``).
    empty : ndarray of bool, shape (B, Hq, N)
        Rows with nothing to sum (no allowed key): exactly 0 under every policy.
    policy, rtol
        As returned by `check_zero_denominator`.

    Returns
    -------
    ndarray, shape (B, Hq, N, M)
    """
    live = ~empty
    if isinstance(policy, float):
        den = den + policy
        flagged = live & (den == 0)
        if flagged.any():
            raise ZeroDenominatorError(np.argwhere(flagged), detail=f"plus eps={policy} is zero")
    else:
        # NaN compares False, so NaN from NaN inputs passes through unflagged.
        flagged = live & (np.abs(den) <= rtol * reference)
        if policy == "raise" and flagged.any():
            detail = "is zero" if rtol == 0 else f"cancels to within rtol={rtol}"
            raise ZeroDenominatorError(np.argwhere(flagged), detail=detail)
    divide = live & ~flagged
    safe_den = np.where(divide, den, 1.0)
    out = np.where(divide[..., None], num / safe_den[..., None], 0.0)
    if policy == "nan":
        out[flagged] = np.nan
    return out


# --- similarity kernels ------------------------------------------------------------------


class Kernel:
    """A similarity that evaluates one pair of vectors, a whole block, and exact values.

    Subclasses define `__call__(x, y)` on two vectors of length D (the loop route),
    `block(x, y)` on (N, D) and (S, D) arrays returning (N, S) (the NumPy route) and,
    when `rational` is True, `exact(x, y)` on sequences of Fractions.
    """

    rational = False

    def __call__(self, x, y) -> float:
        raise NotImplementedError

    def block(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def exact(self, x, y) -> Fraction:
        raise NotImplementedError(f"{type(self).__name__} has no exact rational form")


class PolynomialKernel(Kernel):
    """The polynomial similarity ``(x . y + c) ** degree``; ``degree=1, c=0`` is ``q . k``.

    Odd degrees are signed, so their denominators can vanish.
    """

    rational = True

    def __init__(self, degree: int = 1, c: float | Fraction = 0):
        if isinstance(degree, bool) or not isinstance(degree, numbers.Integral) or degree < 1:
            raise V.OptionError(f"degree is {degree!r}; expected an integer >= 1")
        if not isinstance(c, numbers.Rational) and not (
            isinstance(c, numbers.Real) and math.isfinite(c)
        ):
            raise V.OptionError(f"c is {c!r}; expected a finite real number")
        self.degree = int(degree)
        self.c = c

    def __repr__(self) -> str:
        return f"PolynomialKernel(degree={self.degree}, c={self.c!r})"

    def __call__(self, x, y) -> float:
        dot = math.fsum(float(a) * float(b) for a, b in zip(x, y))
        return (dot + float(self.c)) ** self.degree

    def block(self, x, y):
        return (x @ y.T + float(self.c)) ** self.degree

    def exact(self, x, y) -> Fraction:
        dot = sum((Fraction(a) * Fraction(b) for a, b in zip(x, y)), Fraction(0))
        return (dot + Fraction(self.c)) ** self.degree


class ExponentialKernel(Kernel):
    """The softmax similarity ``exp(scale * x . y)``; scale defaults to ``1/sqrt(D)``.

    Similarity attention with this kernel is softmax attention without the max shift,
    so it overflows where softmax does not (scores above about 709).
    """

    def __init__(self, scale: float | None = None):
        self.scale = None if scale is None else V.check_scale(scale, 1)

    def __repr__(self) -> str:
        return f"ExponentialKernel(scale={self.scale!r})"

    def _scale(self, d: int) -> float:
        return V.check_scale(self.scale, d)

    def __call__(self, x, y) -> float:
        dot = math.fsum(float(a) * float(b) for a, b in zip(x, y))
        return math.exp(self._scale(len(x)) * dot)

    def block(self, x, y):
        return np.exp(self._scale(x.shape[-1]) * (x @ y.T))


# --- exact (rational) inputs -------------------------------------------------------------


def rational_array(x) -> np.ndarray | None:
    """Return `x` as an object array of Python ints and Fractions, or None.

    Integer dtypes, and object arrays (or nested lists) whose entries are all ints or
    Fractions, are rational; bool and float data are not.
    """
    if x is None:
        return None
    arr = V.to_numpy(x)
    if arr.dtype.kind in "iu":
        return np.vectorize(int, otypes=[object])(arr) if arr.size else arr.astype(object)
    if arr.dtype.kind == "O":
        flat = arr.ravel()
        if all(
            isinstance(e, numbers.Rational) and not isinstance(e, (bool, np.bool_))
            for e in flat
        ):
            return arr
    return None


def float_input(x):
    """Convert object arrays of Fractions to float64 so the common checks accept them."""
    arr = V.to_numpy(x) if x is not None else None
    if arr is not None and arr.dtype.kind == "O" and rational_array(arr) is not None:
        return np.asarray(arr, dtype=np.float64)
    return x


def prepare_exact_inputs(q, k, v, layout: str, batch: int):
    """Return (q, k, v) as rational object arrays in (B, H, N, D) layout, or None.

    Only called after the float checks passed, so the shapes are known to fit.
    """
    arrays = [rational_array(x) for x in (q, k, v)]
    if any(a is None for a in arrays):
        return None
    q4, k4, v4 = (V.to_bhnd(name, a, layout) for name, a in zip("qkv", arrays))
    if k4.shape[0] != batch:
        k4 = np.broadcast_to(k4, (batch,) + k4.shape[1:])
        v4 = np.broadcast_to(v4, (batch,) + v4.shape[1:])
    return q4, k4, v4


def _describe_sim(sim) -> str:
    return getattr(sim, "__name__", None) or repr(sim)


def sim_failure(sim, problem: str, b: int, h: int, i: int, g: int, j: int) -> SimilarityError:
    """Build the error for a similarity that raised or returned a bad value."""
    return SimilarityError(
        f"sim {_describe_sim(sim)} {problem} for q[{b}, {h}, {i}] and k[{b}, {g}, {j}] "
        f"(batch, head, position); sim must take two float64 vectors of length D and "
        f"return a finite real number for finite input"
    )


def call_sim(sim, x, y, where: tuple[int, int, int, int, int]) -> float:
    """Evaluate a user's similarity on one pair, turning failures into `SimilarityError`."""
    try:
        value = sim(x, y)
    except Exception as err:  # any failure of user code is reported with its position
        raise sim_failure(sim, f"raised {err!r}", *where) from err
    arr = np.asarray(value)
    if arr.shape != () or arr.dtype.kind not in "fiu":
        raise sim_failure(
            sim, f"returned {type(value).__name__} {value!r} (shape {arr.shape})", *where
        )
    return float(arr)


# --- public wrapper ----------------------------------------------------------------------


def similarity_attention(
    q,
    k,
    v,
    sim: Callable | Kernel,
    *,
    mask=None,
    causal: bool | str | None = None,
    alignment: str | None = None,
    window: tuple[int | None, int | None] | None = None,
    kv_lengths=None,
    q_lengths=None,
    zero_denominator: str | float = "raise",
    rtol: float = 0.0,
    layout: str = "bhnd",
    backend: str = "numpy",
):
    r"""Compute attention normalised by an arbitrary similarity.

    Parameters
    ----------
    q : array_like, shape (B, Hq, N, D)
        Queries; rank 3 (Hq, N, D) and rank 2 (N, D) act as if leading size-1 axes were
        present. With ``layout="bnhd"`` the shapes are (B, N, Hq, D) and (N, Hq, D).
        Integer data and arrays of `fractions.Fraction` are accepted (see Notes).
    k : array_like, shape (B, Hkv, S, D)
        Keys; query head h reads key/value head ``h // (Hq // Hkv)``.
    v : array_like, shape (B, Hkv, S, M)
        Values.
    sim : callable or Kernel
        ``sim(x, y) -> float`` on two float64 vectors of length D. It may be signed. A
        `Kernel` (`PolynomialKernel`, `ExponentialKernel`) also evaluates whole (N, S)
        blocks for the NumPy backend; other callables are evaluated pair by pair.
    mask : array_like of bool, optional
        Keep-set broadcastable to (B, Hq, N, S); True means the query may attend.
    causal, alignment, window, kv_lengths, q_lengths
        Structural rules, exactly as in `kernattn.softmax_attention`.
    zero_denominator : {"raise", "zero", "nan"} or float, default "raise"
        What a row whose denominator is zero gets: ``"raise"`` raises
        `ZeroDenominatorError` naming every such row; ``"zero"`` gives 0; ``"nan"``
        gives NaN; a positive float eps computes ``num / (den + eps)`` in every row.
    rtol : float, default 0.0
        Also treat a row as zero when ``|den| <= rtol * sum_j |sim(q_i, k_j)|``, which
        catches cancellation of signed similarities. Must be 0 with an eps.
    layout : {"bhnd", "bnhd"}, default "bhnd"
    backend : {"numpy", "loops"}, default "numpy"
        ``"loops"`` is the explicit-loop oracle.

    Returns
    -------
    out : ndarray, shape (B, Hq, N, M), float64
        With the rank and layout of `q`.

    Raises
    ------
    ZeroDenominatorError
        Under ``"raise"``, when some denominator is zero (or cancelled within `rtol`),
        and under an eps when ``den + eps`` is exactly zero.
    SimilarityError
        `sim` raised, returned a non-scalar, or returned NaN or Inf for finite input.
    ShapeError, DTypeError, OptionError
        As in `kernattn.softmax_attention`.

    Notes
    -----
    .. math::

        \mathrm{out}_i = \frac{\sum_{j} \mathrm{sim}(q_i, k_j)\, v_j}
                              {\sum_{j} \mathrm{sim}(q_i, k_j)}

    over the allowed keys j. Softmax attention is ``sim = exp(scale q . k)``. A row with
    no allowed key is exactly 0 under every policy, as in softmax attention; `sim` is
    never called on an excluded pair.

    Exact route: ``backend="loops"`` computes every sum in `fractions.Fraction` when q,
    k and v are all integer arrays (or arrays of ints and Fractions) and `sim` is a
    rational `Kernel` (`PolynomialKernel`). Each output entry is then rounded to float64
    once, so it is the correctly rounded exact result. Otherwise the loops use float64
    with `math.fsum`, and the NumPy backend always uses float64.

    Cost: O(B Hq N S (D + M)) time with a block kernel; the NumPy backend holds one
    (N, S) block at a time.

    See Also
    --------
    kernattn.loops.similarity.similarity_attention : the explicit-loop twin.
    linear_attention : the same result from a feature map, in O(N F M).

    Examples
    --------
    >>> import numpy as np
    >>> q, k = np.array([[1.0, 2.0]]), np.array([[3.0, 1.0], [1.0, -1.0]])
    >>> v = np.array([[0.0], [1.0]])
    >>> similarity_attention(q, k, v, PolynomialKernel(2))  # sims 25 and 1
    array([[0.03846154]])
    >>> q, k = np.array([[1.0]]), np.array([[1.0], [-1.0]])
    >>> similarity_attention(q, k, v, PolynomialKernel(1), zero_denominator="zero")
    array([[0.]])
    """
    policy, rtol = check_zero_denominator(zero_denominator, rtol)
    if not callable(sim):
        raise V.OptionError(
            f"sim is {type(sim).__name__} {sim!r}; expected a callable sim(x, y) -> float "
            f"or a Kernel such as PolynomialKernel(2)"
        )
    impl = V.check_backend(backend, similarity_backends())
    q4, k4, v4, ndim = V.check_qkv(float_input(q), float_input(k), float_input(v), layout)
    b, hq, n, _ = q4.shape
    s = k4.shape[2]
    if mask is not None:
        mask = V.broadcast_bhns("mask", V.as_bool_array("mask", mask), (b, hq, n, s))
    structure = V.resolve_structure(causal, alignment, window, q_lengths, kv_lengths, b, n, s)
    exact_inputs = None
    if getattr(sim, "rational", False):
        exact_inputs = prepare_exact_inputs(q, k, v, layout, b)
    out = impl(
        q4, k4, v4, sim=sim, mask=mask, structure=structure, exact_inputs=exact_inputs,
        zero_denominator=policy, rtol=rtol,
    )
    return V.from_bhnd(out, ndim, layout)


def similarity_backends() -> dict:
    """Return the available similarity-attention backends by name."""
    from kernattn.loops import similarity as loops_similarity

    return {"numpy": _similarity_attention_numpy, "loops": loops_similarity.similarity_attention}


def _similarity_attention_numpy(
    q, k, v, *, sim, mask, structure, exact_inputs, zero_denominator, rtol
):
    """NumPy twin: one (N, S') similarity block per batch row and query head.

    `exact_inputs` is accepted for the twins' common signature; this route is float64.
    """
    b, hq, n, _ = q.shape
    hkv, s, m = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    num = np.zeros((b, hq, n, m))
    den = np.zeros((b, hq, n))
    reference = np.zeros((b, hq, n))
    empty = np.ones((b, hq, n), dtype=bool)
    for bi in range(b):
        # 1. The structural keep-set of this batch row.
        keep_structural = structure.keep(bi, n, s)
        for h in range(hq):
            g = h // group  # contiguous groups: query head h reads key/value head g
            keep = keep_structural if mask is None else keep_structural & mask[bi, h]
            empty[bi, h] = ~keep.any(axis=1)
            if not keep.any():
                continue
            # 2. Only columns some query may read are touched.
            cols = np.flatnonzero(keep.any(axis=0))
            keep = keep[:, cols]
            # 3. Similarities of allowed pairs; excluded entries become exactly 0.
            sims = _similarity_block(sim, q[bi, h], k[bi, g, cols], keep, (bi, h, g), cols)
            weights = np.where(keep, sims, 0.0)
            # 4. Numerator, denominator and the cancellation reference sum_j |sim_ij|.
            num[bi, h] = _weighted_sum(weights, keep, v[bi, g, cols])
            den[bi, h] = weights.sum(axis=1)
            reference[bi, h] = np.abs(weights).sum(axis=1)
    # 5. Divide under the zero-denominator policy.
    return resolve_denominators(num, den, reference, empty, zero_denominator, rtol)


def _similarity_block(sim, qs, ks, keep, heads, cols) -> np.ndarray:
    """Return the (N, S') similarities, checked: allowed, finite inputs give finite sims."""
    bi, h, g = heads
    if isinstance(sim, Kernel):
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            sims = np.asarray(sim.block(qs, ks), dtype=np.float64)
        if sims.shape != keep.shape:
            raise SimilarityError(
                f"sim {sim!r} returned a block of shape {sims.shape} for q of shape "
                f"{qs.shape} and k of shape {ks.shape}; expected {keep.shape}"
            )
    else:
        sims = np.zeros(keep.shape)
        for i, jj in zip(*np.nonzero(keep)):
            sims[i, jj] = call_sim(sim, qs[i], ks[jj], (bi, h, int(i), g, int(cols[jj])))
    finite_inputs = np.isfinite(qs).all(axis=1)[:, None] & np.isfinite(ks).all(axis=1)[None, :]
    bad = keep & finite_inputs & ~np.isfinite(sims)
    if bad.any():
        i, jj = (int(x) for x in np.argwhere(bad)[0])
        raise sim_failure(sim, f"returned {sims[i, jj]}", bi, h, i, g, int(cols[jj]))
    return sims
