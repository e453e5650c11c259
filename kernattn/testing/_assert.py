"""Tolerance-aware comparison of an attention result with the float64 oracle."""

from __future__ import annotations

import numpy as np

from kernattn._validate import DTypeError, OptionError, to_numpy

# Default (rtol, atol) per computing dtype, the values torch.testing.assert_close uses.
DEFAULT_TOLERANCES = {
    "float64": (1e-7, 1e-7),
    "float32": (1.3e-6, 1e-5),
    "float16": (1e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
}

# Names of the axes of a (B, H, N, M) output, counted from the last axis.
AXIS_NAMES = ("column", "query", "head", "batch")


def _dtype_name(x) -> str | None:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")
    return {"half": "float16", "float": "float32", "double": "float64"}.get(name, name)


def _as_float64(name: str, x) -> np.ndarray:
    array = to_numpy(x)
    if array.dtype.kind not in "fiu" and array.dtype.name != "bfloat16":
        raise DTypeError(f"{name} has dtype {array.dtype}; expected a real floating array")
    return np.asarray(array, dtype=np.float64)


def _locate(index: tuple[int, ...]) -> str:
    names = AXIS_NAMES[: len(index)][::-1]
    if len(index) > len(AXIS_NAMES):
        names = tuple(f"axis {a}" for a in range(len(index) - 4)) + AXIS_NAMES[::-1]
    return ", ".join(f"{n} {i}" for n, i in zip(names, index))


def assert_attention_close(
    actual,
    desired,
    *,
    dtype: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    baseline=None,
    factor: float = 2.0,
) -> None:
    r"""Assert that an attention result matches the oracle within dtype-aware tolerances.

    Parameters
    ----------
    actual : array_like
        The result under test: a NumPy array, a PyTorch tensor (CPU or GPU; it is
        detached and copied to the host) or a JAX array. Shape (B, H, N, M) gives error
        messages with batch, head, query and column indices; any shape is accepted.
    desired : array_like
        The oracle's result, same shape, ideally float64 (for example from
        ``kernattn.softmax_attention``).
    dtype : str, optional
        The precision `actual` was computed in ("float64", "float32", "float16",
        "bfloat16"). Default: the dtype of `actual`.
    rtol, atol : float, optional
        Elementwise rule ``|actual - desired| <= atol + rtol * |desired|``. Defaults
        per dtype are those of ``torch.testing.assert_close``.
    baseline : array_like, optional
        The straightforward algorithm run in the same low precision. When given, the
        rule becomes ``max|actual - desired| <= factor * max|baseline - desired| +
        atol``, the method FlashAttention's tests use: an implementation may be as
        inexact as plain attention in its dtype, not more.
    factor : float, default 2.0
        Allowed multiple of the baseline's error.

    Raises
    ------
    AssertionError
        With the worst element by (batch, head, query, column), its two values, the
        number of failing elements, the max abs and rel error, and the tolerance.

    Notes
    -----
    NaN in `actual` where `desired` is a number always fails, and so does a number
    where `desired` is NaN. Infinities must match exactly (an ``lse`` of -inf for an
    empty row). O(size) time.

    Examples
    --------
    >>> import numpy as np
    >>> assert_attention_close(np.float32([1.0, 2.0]), np.array([1.0, 2.0000001]))
    >>> assert_attention_close(np.array([[1.0, np.nan]]), np.array([[1.0, 2.0]]))
    Traceback (most recent call last):
    ...
    AssertionError: attention results differ: 1 of 2 elements outside tolerance ...
    """
    if dtype is None:
        # Integer results and unknown dtypes are judged by the strictest rule.
        dtype = _dtype_name(actual)
        dtype = dtype if dtype in DEFAULT_TOLERANCES else "float64"
    if dtype not in DEFAULT_TOLERANCES:
        raise OptionError(
            f"dtype is {dtype!r}; expected one of {', '.join(DEFAULT_TOLERANCES)}"
        )
    default_rtol, default_atol = DEFAULT_TOLERANCES[dtype]
    rtol = default_rtol if rtol is None else float(rtol)
    atol = default_atol if atol is None else float(atol)
    for name, value in (("rtol", rtol), ("atol", atol), ("factor", float(factor))):
        if not value >= 0:
            raise OptionError(f"{name} is {value}; expected a non-negative number")
    got = _as_float64("actual", actual)
    want = _as_float64("desired", desired)
    if got.shape != want.shape:
        raise AssertionError(
            f"attention results differ in shape: actual {got.shape}, desired {want.shape}"
        )

    with np.errstate(invalid="ignore"):
        error = np.abs(got - want)
    both_nan = np.isnan(got) & np.isnan(want)
    same_inf = np.isinf(want) & (got == want)
    error = np.where(both_nan | same_inf, 0.0, error)
    error = np.where(np.isnan(error), np.inf, error)  # NaN on one side only always fails

    if baseline is None:
        limit = atol + rtol * np.where(np.isfinite(want), np.abs(want), 0.0)
        rule = f"rtol={rtol:g}, atol={atol:g} ({dtype})"
    else:
        base = _as_float64("baseline", baseline)
        if base.shape != want.shape:
            raise AssertionError(
                f"baseline has shape {base.shape}, but desired has {want.shape}"
            )
        with np.errstate(invalid="ignore"):
            base_error = np.abs(base - want)
        finite_base = base_error[np.isfinite(base_error)]
        base_max = float(finite_base.max()) if finite_base.size else 0.0
        bound = factor * base_max + atol
        limit = np.full(want.shape, bound)
        rule = (
            f"{factor:g} x baseline error {base_max:.3g} + atol {atol:g} = {bound:.3g} "
            f"({dtype})"
        )

    failing = error > limit
    if not failing.any():
        return
    count = int(failing.sum())
    worst = np.unravel_index(int(np.argmax(np.where(failing, error - limit, -np.inf))), error.shape)
    finite = np.isfinite(error)
    max_abs = float(error[finite].max()) if finite.any() else float("inf")
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = error / np.abs(want)
    relative = relative[finite & np.isfinite(relative)]
    max_rel = float(relative.max()) if relative.size else float("nan")
    location = _locate(tuple(int(i) for i in worst))
    raise AssertionError(
        f"attention results differ: {count} of {error.size} elements outside tolerance "
        f"({rule}).\n"
        f"Worst at ({location}): actual {float(got[worst])!r}, desired {float(want[worst])!r}.\n"
        f"Max abs error {max_abs:.3g}, max rel error {max_rel:.3g} over finite elements."
    )
