"""Branch-free exponential that LLVM vectorizes inside Numba loops.

The llvmlite wheels on the package index are built without Intel SVML, so ``np.exp`` in
``@njit`` code is one scalar libm call per element. `fast_exp` is written from arithmetic,
selects and integer bit operations only, so a loop over it compiles to SIMD code (7 to 9 times
faster than ``np.exp`` in a jitted loop on an AVX-512 machine).

Method: ``exp(x) = 2**n * exp(r)`` with ``n = round(x / ln 2)`` and ``r = x - n ln 2``
computed in two parts (Cody and Waite), so ``|r| <= ln(2) / 2``. ``exp(r)`` is its Taylor
polynomial in Horner form (degree 7 in float32, degree 13 in float64: the truncation error
is below half an ulp of the type), and ``2**n`` is built from its exponent bits.

Accuracy, measured against ``np.exp`` in float64 by ``tests/test_numba_softmax.py``:

- float32: relative error below 1.2e-7 (one float32 ulp; 7.6e-8 measured on a grid of
  two million points) on [-87.3, 88.3];
- float64: relative error below 4.5e-16 (two float64 ulp; 2.2e-16 measured) on
  [-708, 709].

Below those ranges the result is 0: results that would be subnormal are flushed to 0, an
absolute error below 1.2e-38 in float32 and 2.3e-308 in float64. Above them it is +inf.
``fast_exp(-inf) == 0``, ``fast_exp(inf) == inf`` and NaN gives NaN, as ``np.exp``.
Only the Numba kernels use it; the loop and NumPy twins keep the exact ``exp``.

NOTE: Numba's cache checks only the source file of the cached function, so after editing
this file delete the ``*.nbi``/``*.nbc`` files of the kernels that call `fast_exp`.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


@intrinsic
def _bits_as_float(typingctx, bits):
    """Reinterpret the bits of an int32 as float32, or of an int64 as float64."""
    if bits == types.int32:
        sig, float_type = types.float32(types.int32), ir.FloatType()
    elif bits == types.int64:
        sig, float_type = types.float64(types.int64), ir.DoubleType()
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], float_type)

    return sig, codegen


def fast_exp(x):
    """Return exp(x) for a float32 or float64 scalar in jitted code (see the module notes)."""
    raise NotImplementedError("fast_exp is callable only from Numba-compiled code")


# float32 constants. LN2_HI has 9 significant bits, so n * LN2_HI is exact for |n| < 2**15.
_LOG2E_32 = np.float32(1.4426950408889634)
_LN2_HI_32 = np.float32(0.693359375)
_LN2_LO_32 = np.float32(-2.12194440e-4)
_LOW_32 = np.float32(-87.3)  # keeps 2**n normal: n >= -126
_HIGH_32 = np.float32(88.3)  # keeps 2**n * exp(r) finite: n <= 127
_C32 = tuple(np.float32(1.0 / math.factorial(i)) for i in range(8))  # 1/i!, i = 0..7

# float64 constants; LN2_HI has 32 significant bits, so n * LN2_HI is exact for |n| < 2**21.
_LOG2E_64 = 1.4426950408889634
_LN2_HI_64 = 6.93145751953125e-1
_LN2_LO_64 = 1.42860682030941723212e-6
_LOW_64 = -708.0  # keeps 2**n normal: n >= -1022
_HIGH_64 = 709.0  # keeps 2**n * exp(r) finite: n <= 1023
_C64 = tuple(1.0 / math.factorial(i) for i in range(14))  # 1/i!, i = 0..13


@overload(fast_exp, jit_options={"fastmath": {"contract"}})
def _fast_exp_overload(x):
    if x == types.float32:
        log2e, ln2_hi, ln2_lo, low, high = _LOG2E_32, _LN2_HI_32, _LN2_LO_32, _LOW_32, _HIGH_32
        c0, c1, c2, c3, c4, c5, c6, c7 = _C32
        half, zero, inf = np.float32(0.5), np.float32(0.0), np.float32(np.inf)
        bias, shift = np.int32(127), np.int32(23)

        def impl(x):
            # Clamp with selects (no branches); NaN, -inf and +inf are restored at the end.
            xc = x if x > low else low
            xc = xc if xc < high else high
            n = np.floor(xc * log2e + half)
            r = (xc - n * ln2_hi) - n * ln2_lo
            p = c7
            p = p * r + c6
            p = p * r + c5
            p = p * r + c4
            p = p * r + c3
            p = p * r + c2
            p = p * r + c1
            p = p * r + c0
            # Numba widens int32 arithmetic to int64, so narrow the exponent bits back.
            two_n = _bits_as_float(np.int32((np.int32(n) + bias) << shift))
            y = p * two_n
            y = y if x >= low else zero
            y = y if x <= high else inf
            return y if x == x else x

        return impl
    if x == types.float64:
        log2e, ln2_hi, ln2_lo, low, high = _LOG2E_64, _LN2_HI_64, _LN2_LO_64, _LOW_64, _HIGH_64
        c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13 = _C64
        bias, shift = np.int64(1023), np.int64(52)

        def impl(x):
            xc = x if x > low else low
            xc = xc if xc < high else high
            n = np.floor(xc * log2e + 0.5)
            r = (xc - n * ln2_hi) - n * ln2_lo
            p = c13
            p = p * r + c12
            p = p * r + c11
            p = p * r + c10
            p = p * r + c9
            p = p * r + c8
            p = p * r + c7
            p = p * r + c6
            p = p * r + c5
            p = p * r + c4
            p = p * r + c3
            p = p * r + c2
            p = p * r + c1
            p = p * r + c0
            two_n = _bits_as_float((np.int64(n) + bias) << shift)
            y = p * two_n
            y = y if x >= low else 0.0
            y = y if x <= high else np.inf
            return y if x == x else x

        return impl
    return None
