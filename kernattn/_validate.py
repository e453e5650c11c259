"""Input checks shared by every public wrapper.

Shape legend (used in names, comments and messages throughout kernattn):
B batch, Hq query heads, Hkv key/value heads, N queries, S keys, D query/key head
dimension, M value head dimension, F feature dimension.

Public functions tidy their input here and hand float64 arrays in the "bhnd" layout to
the implementations, which trust what they receive.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

LAYOUTS = ("bhnd", "bnhd")
ALIGNMENTS = ("top_left", "bottom_right")


class ShapeError(ValueError):
    """Raised when an array has the wrong rank or sizes that do not fit together."""


class DTypeError(TypeError):
    """Raised when an array has a dtype that kernattn does not accept (bool, complex)."""


class OptionError(ValueError):
    """Raised when an option has an invalid value or conflicts with another option."""


def to_numpy(x):
    """Convert NumPy, JAX, PyTorch (CPU or GPU) and nested-list input to a NumPy array."""
    if isinstance(x, np.ndarray):
        return x
    module = type(x).__module__ or ""
    if module.startswith("torch"):
        x = x.detach().cpu()
        # NumPy has no bfloat16, and float32 represents every bfloat16 value exactly.
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def as_float_array(name: str, x, *, dtype=np.float64) -> np.ndarray:
    """Return `x` as a floating array of `dtype`, rejecting bool, complex and object data.

    Integers convert exactly (up to 2**53). float16 and bfloat16 are widened.
    """
    if x is None:
        raise ShapeError(f"{name} is missing: expected an array, got None")
    arr = to_numpy(x)
    kind = arr.dtype.kind
    if kind == "b":
        raise DTypeError(
            f"{name} has dtype bool; expected a real floating or integer array "
            f"(a boolean keep-set goes in `mask`)"
        )
    if kind == "c":
        raise DTypeError(
            f"{name} has complex dtype {arr.dtype}; expected a real floating or integer "
            f"array"
        )
    if kind not in "fiuV" and arr.dtype.name != "bfloat16":
        raise DTypeError(
            f"{name} has dtype {arr.dtype}; expected a real floating or integer array"
        )
    if kind == "V" and arr.dtype.name != "bfloat16":
        raise DTypeError(f"{name} has dtype {arr.dtype}; expected a real floating array")
    return arr.astype(dtype, copy=False)


def as_bool_array(name: str, x, meaning: str = "True = may attend") -> np.ndarray:
    """Return `x` as a bool array; float masks are rejected because they are biases."""
    arr = to_numpy(x)
    if arr.dtype.kind != "b":
        hint = ""
        if name == "mask" and arr.dtype.kind in "fiu":
            hint = "; an additive float mask goes in `bias`"
        raise DTypeError(f"{name} has dtype {arr.dtype}; expected bool ({meaning}){hint}")
    return arr


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise OptionError(f"layout is {layout!r}; expected one of {', '.join(map(repr, LAYOUTS))}")
    return layout


def to_bhnd(name: str, x: np.ndarray, layout: str) -> np.ndarray:
    """Reshape a rank 2, 3 or 4 array in `layout` to a rank-4 (B, H, N, D) view.

    Rank 2 is (N, D). Rank 3 is (H, N, D) for "bhnd" and (N, H, D) for "bnhd".
    """
    if x.ndim not in (2, 3, 4):
        expected = "(B, H, N, D)" if layout == "bhnd" else "(B, N, H, D)"
        raise ShapeError(
            f"{name} has rank {x.ndim} (shape {x.shape}); expected rank 4 {expected}, "
            f"or rank 3 or 2 with leading axes left out"
        )
    if x.ndim == 2:
        return x[None, None]
    if layout == "bhnd":
        return x if x.ndim == 4 else x[None]
    if x.ndim == 3:
        x = x[None]
    return x.transpose(0, 2, 1, 3)


def from_bhnd(x: np.ndarray, ndim: int, layout: str) -> np.ndarray:
    """Undo `to_bhnd` for an output (B, H, N, M), restoring the rank and layout of q."""
    if layout == "bnhd":
        x = x.transpose(0, 2, 1, 3)
        if ndim == 2:
            return x[0, :, 0]
        return x[0] if ndim == 3 else x
    if ndim == 2:
        return x[0, 0]
    return x[0] if ndim == 3 else x


def lse_from_bhn(lse: np.ndarray, ndim: int) -> np.ndarray:
    """Return the (B, H, N) log-sum-exp with the leading axes that q did not have removed."""
    if ndim == 2:
        return lse[0, 0]
    return lse[0] if ndim == 3 else lse


PRECISIONS = ("float64", "input")


def compute_dtype(precision: str, *arrays) -> np.dtype:
    """Return the dtype a backend computes in.

    ``"float64"``: always float64. ``"input"``: float32 when every array is float32,
    float16 or bfloat16, otherwise float64 (float64 and integer inputs).
    """
    if precision == "float64":
        return np.dtype(np.float64)
    # NumPy, JAX and PyTorch dtypes print as "float32" or "torch.float32"; lists have none.
    names = [str(getattr(x, "dtype", "")).removeprefix("torch.") for x in arrays]
    narrow = all(name in ("float32", "float16", "bfloat16") for name in names)
    return np.dtype(np.float32 if narrow else np.float64)


def check_qkv(q, k, v, layout: str, precision: str = "float64"):
    """Validate q, k, v and return them as (B, H, N, D) arrays of the compute dtype.

    The compute dtype follows `precision` (see `compute_dtype`). Returns
    (q, k, v, ndim) where ndim is the rank of q, needed to shape the output.
    """
    layout = check_layout(layout)
    dtype = compute_dtype(precision, q, k, v)
    q = as_float_array("q", q, dtype=dtype)
    k = as_float_array("k", k, dtype=dtype)
    v = as_float_array("v", v, dtype=dtype)
    ndim = q.ndim
    q4, k4, v4 = to_bhnd("q", q, layout), to_bhnd("k", k, layout), to_bhnd("v", v, layout)
    b, hq, n, d = q4.shape
    bk, hkv, s, dk = k4.shape
    bv, hv, sv, m = v4.shape
    if dk != d:
        raise ShapeError(
            f"k has head dimension D = {dk}, but q has D = {d}; q and k must share D"
        )
    if sv != s:
        raise ShapeError(
            f"v has {sv} positions, but k has S = {s}; k and v must have the same "
            f"number of key positions"
        )
    if hv != hkv:
        raise ShapeError(f"v has {hv} heads, but k has Hkv = {hkv}; k and v must match")
    if bk != bv:
        raise ShapeError(f"v has batch size {bv}, but k has {bk}; k and v must match")
    if bk not in (b, 1) or (b == 1 and bk != 1):
        raise ShapeError(
            f"k and v have batch size {bk}, but q has B = {b}; expected the same batch "
            f"size (or 1, broadcast)"
        )
    if hq == 0 or hkv == 0:
        raise ShapeError(
            f"q has {hq} and k has {hkv} heads; expected at least one head in each"
        )
    if hq % hkv != 0:
        raise ShapeError(
            f"k has {hkv} heads, which does not divide the {hq} heads of q; "
            f"grouped-query attention needs Hq % Hkv == 0"
        )
    if bk != b:
        k4 = np.broadcast_to(k4, (b,) + k4.shape[1:])
        v4 = np.broadcast_to(v4, (b,) + v4.shape[1:])
    return q4, k4, v4, ndim


def broadcast_bhns(name: str, x: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Broadcast a mask, bias or dropout pattern to (B, Hq, N, S), with a clear error."""
    try:
        return np.broadcast_to(x, shape)
    except ValueError:
        raise ShapeError(
            f"{name} has shape {x.shape}, which does not broadcast to "
            f"(B, Hq, N, S) = {shape}"
        ) from None


def check_scale(scale, d: int) -> float:
    """Return the score scale: `scale` if given, else 1/sqrt(D) (1.0 when D = 0)."""
    if scale is None:
        return 1.0 / math.sqrt(d) if d > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise OptionError(f"scale is {scale!r}; expected a finite real number or None")
    scale = float(scale)
    if not math.isfinite(scale):
        raise OptionError(f"scale is {scale}; expected a finite real number or None")
    return scale


def check_positive_float(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(f"{name} is {value!r}; expected a positive finite number or None")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise OptionError(f"{name} is {value}; expected a positive finite number or None")
    return value


def check_lengths(name: str, lengths, batch: int, limit: int, axis: str) -> np.ndarray | None:
    """Validate per-batch-row lengths: integers in [0, limit], one per batch row."""
    if lengths is None:
        return None
    arr = to_numpy(lengths)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise DTypeError(f"{name} has dtype {arr.dtype}; expected integers")
    if arr.shape not in ((batch,), (1,)):
        raise ShapeError(
            f"{name} has shape {arr.shape}; expected ({batch},), one length per batch row"
        )
    arr = np.broadcast_to(arr.astype(np.int64), (batch,))
    bad = np.flatnonzero((arr < 0) | (arr > limit))
    if bad.size:
        i = int(bad[0])
        raise OptionError(
            f"{name}[{i}] is {int(arr[i])}; expected a length between 0 and "
            f"{axis} = {limit}"
        )
    return arr


def check_window(window) -> tuple[int | None, int | None] | None:
    """Validate `window=(left, right)`; None on a side means unbounded."""
    if window is None:
        return None
    if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
        raise OptionError(
            f"window is {window!r}; expected a pair (left, right) of non-negative "
            f"integers or None, e.g. (W - 1, 0) for W keys including the query itself"
        )
    sides = []
    for side_name, side in zip(("left", "right"), window):
        if side is None:
            sides.append(None)
            continue
        if isinstance(side, bool) or not isinstance(side, numbers.Integral):
            raise OptionError(
                f"window {side_name} size is {side!r}; expected a non-negative integer or None"
            )
        if side < 0:
            raise OptionError(
                f"window {side_name} size is {side}; expected a non-negative integer "
                f"(None, not a negative size, means unbounded)"
            )
        sides.append(int(side))
    return (sides[0], sides[1])


@dataclass(frozen=True)
class Structure:
    """The structural part of a keep-set, resolved and validated.

    Key j is allowed for query i of batch row b when i < n_b, j < s_b, the causal rule
    `j <= i + off_b` is true (if causal) and `i + off_b - left <= j <= i + off_b + right`
    (if windowed). Here n_b and s_b are the valid query and key lengths of row b, and
    `off_b = s_b - n_b` under bottom-right alignment, 0 under top-left.
    """

    causal: bool
    alignment: str | None
    window: tuple[int | None, int | None] | None
    q_lengths: np.ndarray  # (B,) int64
    kv_lengths: np.ndarray  # (B,) int64

    def offset(self, b: int) -> int:
        if self.alignment == "bottom_right":
            return int(self.kv_lengths[b]) - int(self.q_lengths[b])
        return 0

    def keep(self, b: int, n: int, s: int) -> np.ndarray:
        """Return the (N, S) bool keep-set of batch row b from index arithmetic."""
        i = np.arange(n)[:, None]
        j = np.arange(s)[None, :]
        keep = (i < self.q_lengths[b]) & (j < self.kv_lengths[b])
        off = self.offset(b)
        if self.causal:
            keep &= j <= i + off
        if self.window is not None:
            left, right = self.window
            if left is not None:
                keep &= j >= i + off - left
            if right is not None:
                keep &= j <= i + off + right
        return keep


def resolve_structure(
    causal, alignment, window, q_lengths, kv_lengths, b: int, n: int, s: int
) -> Structure:
    """Validate the causal, alignment, window and length options together.

    The alignment must be named whenever it changes the result: a causal rule or window
    where some batch row has a different number of valid queries and keys.
    """
    if alignment is not None and alignment not in ALIGNMENTS:
        raise OptionError(
            f"alignment is {alignment!r}; expected 'top_left', 'bottom_right' or None"
        )
    if causal is None or causal is False:
        is_causal, named = False, None
    elif causal is True:
        is_causal, named = True, None
    elif isinstance(causal, str) and causal in ALIGNMENTS:
        is_causal, named = True, causal
    else:
        raise OptionError(
            f"causal is {causal!r}; expected None, False, True, 'top_left' or "
            f"'bottom_right'"
        )
    if named is not None and alignment is not None and named != alignment:
        raise OptionError(
            f"causal is {causal!r} but alignment is {alignment!r}; they conflict, so "
            f"pass only one of them"
        )
    alignment = named or alignment
    window = check_window(window)
    q_len = check_lengths("q_lengths", q_lengths, b, n, "N")
    kv_len = check_lengths("kv_lengths", kv_lengths, b, s, "S")
    q_len = np.full(b, n, dtype=np.int64) if q_len is None else q_len
    kv_len = np.full(b, s, dtype=np.int64) if kv_len is None else kv_len
    if alignment is None and (is_causal or window is not None):
        if n != s and is_causal and causal is True:
            raise OptionError(
                f"causal=True is ambiguous when N = {n} differs from S = {s}; pass "
                f"causal='top_left' (PyTorch is_causal) or causal='bottom_right' "
                f"(FlashAttention, KV-cache decoding)"
            )
        if np.any(q_len != kv_len):
            option_text = "causal=True" if is_causal else f"window={window}"
            row = int(np.flatnonzero(q_len != kv_len)[0])
            raise OptionError(
                f"{option_text} depends on the alignment here, because batch row {row} "
                f"has {int(q_len[row])} valid queries and {int(kv_len[row])} valid keys "
                f"(array sizes N = {n}, S = {s}); pass "
                f"alignment='top_left' or alignment='bottom_right'"
            )
        alignment = "top_left"
    return Structure(is_causal, alignment, window, q_len, kv_len)


def check_backend(backend, available: dict) -> object:
    if backend not in available:
        names = ", ".join(repr(name) for name in available)
        raise OptionError(f"backend is {backend!r}; expected one of {names}")
    return available[backend]
