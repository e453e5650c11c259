"""Targets that `kernattn verify` checks: kernattn backends and a user's function.

Each target is a callable that takes a `Case` and returns an `Output`; peers from other
libraries live in `kernattn.verify.peers`.
"""

from __future__ import annotations

import importlib
from typing import Callable

import numpy as np

from kernattn.verify.cases import Case
from kernattn.verify.check import KnownDifference, Output, UnsupportedCase


class BackendTarget:
    """One backend of a kernattn attention function, fed inputs of one float dtype."""

    differences: tuple[KnownDifference, ...] = ()

    def __init__(self, attention: Callable, backend: str, dtype=np.float64):
        self.attention = attention
        self.backend = backend
        self.dtype = np.dtype(dtype)
        self.name = f"{backend} ({self.dtype.name} input)"
        self.notes: list[str] = []

    def __call__(self, case: Case) -> Output:
        case = case.with_float_dtype(self.dtype)
        q, k, v = (case.arrays[key] for key in "qkv")
        keywords = case.keywords()
        out, lse = self.attention(q, k, v, **keywords, backend=self.backend, return_lse=True)
        out = np.asarray(out)
        # The narrower of the input and output dtypes sets the tolerance.
        precision = min(self.dtype, out.dtype, key=lambda dtype: dtype.itemsize)
        return Output(out, np.asarray(lse), precision)


class FunctionTarget:
    """A user's function ``f(q, k, v, **keywords)`` with softmax_attention's keywords.

    Only the keywords a case uses are passed, and lse is not requested. A function that
    raises NotImplementedError, or TypeError naming one of the passed keywords, marks
    the case as not supported. Any other exception is a mismatch.
    """

    differences: tuple[KnownDifference, ...] = ()

    def __init__(self, function: Callable, name: str):
        self.function = function
        self.name = name
        self.notes: list[str] = []

    def __call__(self, case: Case) -> Output:
        keywords = case.keywords()
        q, k, v = (case.arrays[key] for key in "qkv")
        try:
            result = self.function(q, k, v, **keywords)
        except NotImplementedError as exc:
            raise UnsupportedCase(f"{self.name} raised NotImplementedError: {exc}") from exc
        except TypeError as exc:
            if any(keyword in str(exc) for keyword in keywords):
                raise UnsupportedCase(f"{self.name} raised TypeError: {exc}") from exc
            raise
        if isinstance(result, tuple):
            result = result[0]  # (out, lse) from a function that returns both
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
    module = importlib.import_module(module_name)
    function = module
    for part in attribute.split("."):
        if not hasattr(function, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}")
        function = getattr(function, part)
    if not callable(function):
        raise ValueError(f"{spec} is a {type(function).__name__}, not a function")
    return function
