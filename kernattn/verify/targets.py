"""Targets that `kernattn verify` checks: kernattn backends and a user's function.

Each target is a callable that takes a `Case` and returns an `Output`; peers from other
libraries live in `kernattn.verify.peers`.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from kernattn.similarity import ZeroDenominatorError
from kernattn.verify.cases import Case
from kernattn.verify.check import (
    ROWS_NOT_NAMED,
    BackendImportError,
    BackendUnavailable,
    KnownDifference,
    Output,
    UnsupportedCase,
)


Invoke = Callable[[Case, str], Output]
Arguments = Callable[[Case, Callable], tuple[tuple, dict[str, Any]]]


class BackendTarget:
    """One backend of a kernattn attention function, fed inputs of one float dtype.

    `invoke(case, backend)` runs the variant's public function and returns an `Output`
    (see `kernattn.verify.Variant`). With ``dtype=None`` the case runs as stored, so
    integer inputs reach the exact route of the loop oracle. A `ZeroDenominatorError`
    becomes an output that names its rows.

    An ImportError raised by the backend means kernattn's installation is broken (a
    backend module or a run-time dependency is missing), so it becomes a
    `BackendImportError` and no case of the backend counts as a mismatch. The
    ``CudaUnavailableError`` of ``backend="cuda"`` on a machine without a GPU becomes
    `BackendUnavailable`.
    """

    differences: tuple[KnownDifference, ...] = ()

    def __init__(self, invoke: Invoke, backend: str, dtype=np.float64, *, exact: bool = False):
        self.invoke = invoke
        self.backend = backend
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.exact = exact
        self.name = backend if self.dtype is None else f"{backend} ({self.dtype.name} input)"
        self.notes: list[str] = []

    def __call__(self, case: Case) -> Output:
        if self.dtype is not None:
            case = case.with_float_dtype(self.dtype)
        try:
            output = self.invoke(case, self.backend)
        except ZeroDenominatorError as exc:
            return Output(None, raised=tuple(exc.rows))
        except ImportError as exc:
            raise BackendImportError(
                f"backend {self.backend!r} cannot be imported: {type(exc).__name__}: {exc}"
            ) from exc
        except Exception as exc:
            if _is_cuda_unavailable(exc):
                raise BackendUnavailable(str(exc)) from exc
            raise
        out = np.asarray(output.out)
        # The narrower of the input and output dtypes sets the tolerance.
        precision = out.dtype
        if self.dtype is not None:
            precision = min(self.dtype, out.dtype, key=lambda dtype: dtype.itemsize)
        return replace(output, out=out, precision=precision)


def _is_cuda_unavailable(exc: Exception) -> bool:
    # kernattn.cuda is imported only by backend="cuda", so its absence from sys.modules
    # means the exception did not come from there.
    cuda = sys.modules.get("kernattn.cuda")
    error_type = getattr(cuda, "CudaUnavailableError", None)
    return error_type is not None and isinstance(exc, error_type)


def softmax_arguments(case: Case, function: Callable) -> tuple[tuple, dict[str, Any]]:
    """Return ``((q, k, v), keywords)`` for a user's softmax attention function."""
    return tuple(case.arrays[key] for key in "qkv"), case.keywords()


class FunctionTarget:
    """A user's attention function, called with NumPy float64 (B, H, N, D) arrays.

    `arguments(case, function)` returns the positional arguments and the keywords of
    the call (default: `softmax_arguments`, q, k, v and softmax_attention's keywords
    that the case uses). lse is not requested. A function that raises
    NotImplementedError, or TypeError naming one of the passed keywords, marks the case
    as not supported. A `ZeroDivisionError` (kernattn's `ZeroDenominatorError` is one)
    counts as raising for a zero denominator; its rows are compared when it names them.
    Any other exception is a mismatch, ImportError included: an import inside the
    function belongs to the function, so it is not treated as a broken kernattn.
    """

    differences: tuple[KnownDifference, ...] = ()

    def __init__(self, function: Callable, name: str, arguments: Arguments | None = None):
        self.function = function
        self.name = name
        self.arguments = arguments or softmax_arguments
        self.notes: list[str] = []

    def __call__(self, case: Case) -> Output:
        args, keywords = self.arguments(case.with_float_dtype(np.float64), self.function)
        try:
            result = self.function(*args, **keywords)
        except NotImplementedError as exc:
            raise UnsupportedCase(f"{self.name} raised NotImplementedError: {exc}") from exc
        except TypeError as exc:
            if any(keyword in str(exc) for keyword in keywords):
                raise UnsupportedCase(f"{self.name} raised TypeError: {exc}") from exc
            raise
        except ZeroDivisionError as exc:
            rows = getattr(exc, "rows", None)
            return Output(None, raised=ROWS_NOT_NAMED if rows is None else tuple(rows))
        if isinstance(result, tuple):
            result = result[0]  # (out, lse) or (out, state) from a function returning both
        return Output(np.asarray(result))


def import_function(spec: str) -> Callable:
    """Import ``"package.module:function"`` and return the function.

    Raises
    ------
    ValueError
        `spec` is not of the form MODULE:FUNCTION, or the function is missing.
    ImportError
        The module cannot be imported.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"target is {spec!r}; expected MODULE:FUNCTION, e.g. mypkg.attn:forward"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"importing module {module_name!r} failed: {error}") from error
    except Exception as error:  # the module's own code raised while being imported
        raise ValueError(
            f"importing module {module_name!r} failed: {type(error).__name__}: {error}"
        ) from error
    function = module
    for part in attribute.split("."):
        if not hasattr(function, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}")
        function = getattr(function, part)
    if not callable(function):
        raise ValueError(f"{spec} is a {type(function).__name__}, not a function")
    return function
