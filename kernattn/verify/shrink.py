"""Shrink a failing case to the smallest input on which a target still fails.

Shape legend: B batch, Hq query heads, Hkv key/value heads, N queries, S keys, D
query/key head dimension, M value head dimension, F features.

Greedy reduction in the style of property-based testing: try simpler candidates in a
fixed order (drop an option, then fewer batch rows, heads, queries, keys and columns,
then integer values) and keep the first one on which the target still mismatches the
oracle. Repeat until no candidate fails or the attempt budget is spent. A candidate the
oracle rejects (for example ``causal=True`` with N != S) is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np

from kernattn.verify.cases import Case
from kernattn.verify.check import MISMATCH, CaseResult, TargetNotRun, check_case

# Attempts (one oracle run and one target run each) per failing case. Cases have at
# most a dozen positions, so a full shrink usually needs far fewer.
MAX_ATTEMPTS = 300

# Axes of every array a case may hold, right-aligned: a rank-2 mask is (N, S).
AXES = {
    "q": ("B", "Hq", "N", "D"),
    "k": ("B", "Hkv", "S", "D"),
    "v": ("B", "Hkv", "S", "M"),
    "mask": ("B", "Hq", "N", "S"),
    "bias": ("B", "Hq", "N", "S"),
    "dropout_mask": ("B", "Hq", "N", "S"),
    "kv_lengths": ("B",),
    "q_lengths": ("B",),
    "initial_state_S": ("B", "Hkv", "F", "M"),
    "initial_state_z": ("B", "Hkv", "F"),
}

# Options removed one at a time; each entry lists the option keys and array keys that go
# together.
REMOVABLE = (
    ("mask", (), ("mask",)),
    ("bias", (), ("bias",)),
    ("dropout", ("dropout_p",), ("dropout_mask",)),
    ("kv_lengths", (), ("kv_lengths",)),
    ("q_lengths", (), ("q_lengths",)),
    ("initial_state", (), ("initial_state_S", "initial_state_z")),
    ("return_state", ("return_state",), ()),
    ("window", ("window",), ()),
    ("softcap", ("softcap",), ()),
    ("causal", ("causal", "alignment"), ()),
    ("alignment", ("alignment",), ()),
    ("rtol", ("rtol",), ()),
    ("scale", ("scale",), ()),
    ("chunk_size", ("chunk_size",), ()),
    ("num_splits", ("num_splits",), ()),
)


@dataclass
class ShrinkResult:
    """The smallest failing case found, and how it was reached.

    Attributes
    ----------
    case : Case
        The shrunk case, without expected values (they belong to the original input).
    result : CaseResult
        The target's mismatch on `case`, with the oracle's output as its reference.
    steps : list of str
        The reductions that were kept, in order, such as ``"N 7 -> 2"``.
    attempts : int
        Candidates tried.
    """

    case: Case
    result: CaseResult
    steps: list[str] = field(default_factory=list)
    attempts: int = 0


def shrink_case(variant, target, case: Case, max_attempts: int = MAX_ATTEMPTS) -> ShrinkResult | None:
    """Return the smallest case derived from `case` on which `target` still mismatches.

    Returns None when `target` does not mismatch on `case` to begin with. Cost: at most
    `max_attempts` runs of the oracle and the target, on inputs no larger than `case`.
    """
    first = _mismatch(variant, target, case)
    if first is None:
        return None
    current = ShrinkResult(case, first)
    improved = True
    while improved and current.attempts < max_attempts:
        improved = False
        for description, candidate in candidates(current.case):
            current.attempts += 1
            result = _mismatch(variant, target, candidate)
            if result is not None:
                current.case, current.result = candidate, result
                current.steps.append(description)
                improved = True
                break
            if current.attempts >= max_attempts:
                break
    return current


def _mismatch(variant, target, case: Case) -> CaseResult | None:
    try:
        oracle = variant.oracle(case)
    except Exception:  # the oracle rejects this candidate's options: not a valid input
        return None
    try:
        result = check_case(target, case, oracle, variant.scales)
    except TargetNotRun:  # the target cannot run this candidate at all: not a mismatch
        return None
    return result if result.status == MISMATCH else None


def sizes(case: Case) -> dict[str, int]:
    """Return the sizes B, Hq, Hkv, N, S, D, M of a case."""
    b, hq, n, d = case.arrays["q"].shape
    hkv, s = case.arrays["k"].shape[1:3]
    return {"B": b, "Hq": hq, "Hkv": hkv, "N": n, "S": s, "D": d, "M": case.arrays["v"].shape[3]}


def candidates(case: Case) -> Iterator[tuple[str, Case]]:
    """Yield (description, simpler case) pairs, the boldest reductions first."""
    base = replace(case, expected_out=None, expected_lse=None, expected_state=None,
                   expected_raised=None, exact=False)
    for label, option_keys, array_keys in REMOVABLE:
        if any(key in base.options for key in option_keys) or any(
            key in base.arrays for key in array_keys
        ):
            options = {key: value for key, value in base.options.items() if key not in option_keys}
            arrays = {key: value for key, value in base.arrays.items() if key not in array_keys}
            yield f"drop {label}", replace(base, name=base.name, arrays=arrays, options=options)
    if base.options.get("form") not in (None, "parallel"):
        options = {**base.options, "form": "parallel"}
        options.pop("chunk_size", None)
        yield "form -> parallel", replace(base, options=options)
    size = sizes(base)
    yield from _batch_and_heads(base, size)
    for axes in (("N", "S"), ("N",), ("S",), ("D",), ("M",)):
        yield from _positions(base, size, axes)
    for key in "qkv":
        values = base.arrays[key]
        rounded = np.round(values)
        if not np.array_equal(rounded, values, equal_nan=True):
            yield f"round {key} to integers", _with_array(base, key, rounded)


def _with_array(case: Case, key: str, value: np.ndarray) -> Case:
    return replace(case, arrays={**case.arrays, key: value})


def _batch_and_heads(case: Case, size: dict[str, int]) -> Iterator[tuple[str, Case]]:
    b, hq, hkv = size["B"], size["Hq"], size["Hkv"]
    for keep in _subsets(b):
        yield f"B {b} -> {len(keep)}", take(case, {"B": keep})
    group = hq // hkv
    for heads in _subsets(hkv):
        query_heads = [g * group + r for g in heads for r in range(group)]
        yield (f"Hkv {hkv} -> {len(heads)}, Hq {hq} -> {len(query_heads)}",
               take(case, {"Hkv": heads, "Hq": query_heads}))
    for offsets in _subsets(group):
        query_heads = [g * group + r for g in range(hkv) for r in offsets]
        yield f"Hq {hq} -> {len(query_heads)}", take(case, {"Hq": query_heads})


def _positions(case: Case, size: dict[str, int], axes: tuple[str, ...]) -> Iterator[tuple[str, Case]]:
    lengths = {size[axis] for axis in axes}
    if len(lengths) != 1:
        return  # N and S shrink together only when equal
    (length,) = lengths
    for keep in _subsets(length):
        description = ", ".join(f"{axis} {length} -> {len(keep)}" for axis in axes)
        yield description, take(case, dict.fromkeys(axes, keep))


def _subsets(length: int) -> Iterator[list[int]]:
    """Yield index lists shorter than `length`: single indices, halves, all but one."""
    if length <= 1:
        return
    seen = set()
    options = [[i] for i in range(length)]
    half = length // 2
    options += [list(range(half)), list(range(half, length))] if half > 1 else []
    options += [[j for j in range(length) if j != i] for i in range(length)]
    for keep in options:
        if len(keep) < length and tuple(keep) not in seen:
            seen.add(tuple(keep))
            yield keep


def take(case: Case, indices: dict[str, list[int]]) -> Case:
    """Return `case` restricted to `indices` along the named axes of every array.

    An axis of size 1 that broadcasts against a larger size is left alone. Lengths are
    clipped to the new N and S.
    """
    size = sizes(case)
    arrays = {}
    for key, value in case.arrays.items():
        labels = AXES.get(key, ())[-value.ndim:] if value.ndim else ()
        for axis, label in enumerate(labels):
            if label in indices and not (value.shape[axis] == 1 and size[label] > 1):
                value = np.take(value, indices[label], axis=axis)
        arrays[key] = value
    new = {label: len(indices.get(label, range(size[label]))) for label in size}
    for key, label in (("kv_lengths", "S"), ("q_lengths", "N")):
        if key in arrays:
            arrays[key] = np.minimum(arrays[key], new[label])
    return replace(case, arrays=arrays)


def describe(case: Case) -> str:
    """Return the sizes and options of a case on one line."""
    options = ", ".join(f"{key}={value!r}" for key, value in case.options.items())
    extra = ", ".join(key for key in case.arrays if key not in "qkv")
    text = case.describe_shapes()
    if options:
        text += f"; {options}"
    if extra:
        text += f"; arrays {extra}"
    return text

