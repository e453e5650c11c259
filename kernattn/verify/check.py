"""Compare targets with the oracle, case by case, and collect the results per target.

A target is any callable that takes a `Case` and returns an `Output`: ``out``, and
``lse`` or the linear-attention ``state`` when it computes them. It raises
`UnsupportedCase` for an option it cannot express; that case is then reported, not
failed. The tolerance of each comparison comes from a `Scales` that the variant
computes from the case (see `kernattn.verify.Variant.scales`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

import numpy as np

from kernattn.verify.cases import Case

# Error allowed per unit of problem size, by the dtype of the target's output: a target
# passes when |out - reference| <= unit * (1 + logit size) * value size, elementwise.
# The unit is about 4500 float64 epsilons and about 80 float32 epsilons: room for any
# summation order, far below the O(value size) error of a wrong mask or head mapping.
ERROR_UNIT = {
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float32): 1e-5,
    np.dtype(np.float16): 1e-2,
}

# Stands for the rows of a zero-denominator exception that does not name them.
ROWS_NOT_NAMED = ((-1, -1, -1),)

AGREE = "agree"
DIFFERENCE = "known difference"
UNSUPPORTED = "not supported"
MISMATCH = "MISMATCH"


class UnsupportedCase(Exception):
    """Raised by a target for a case whose options it cannot express."""


class TargetNotRun(Exception):
    """Raised by a target that cannot run in this environment at all.

    `check_target` stops the target at the first one and reports the message once,
    in place of a result per case.
    """


class BackendImportError(TargetNotRun):
    """Raised when a kernattn backend's module cannot be imported: a broken installation.

    `kernattn verify` exits with its own code for it, because no case of the backend
    was checked.
    """


class BackendUnavailable(TargetNotRun):
    """Raised for a backend that this machine cannot run, such as ``"cuda"`` without a GPU.

    The backend is optional, so its target is reported as not run and does not fail.
    """


@dataclass(frozen=True)
class Output:
    """Result of one target on one case: out (B, Hq, N, M) and lse (B, Hq, N) or None.

    `precision` is the float dtype whose tolerance applies; None means the dtype of
    `out`. A target fed float32 inputs sets it to float32 even when it returns float64,
    because rounding the inputs already costs float32 accuracy.

    `state` is the ``(S (B, Hkv, F, M), z (B, Hkv, F))`` pair of linear attention with
    ``return_state=True``. `raised` holds the (batch, head, query) rows of a
    `ZeroDenominatorError` when the call raised one; `out` is then None.
    """

    out: np.ndarray | None
    lse: np.ndarray | None = None
    precision: np.dtype | None = None
    state: tuple[np.ndarray, np.ndarray] | None = None
    raised: tuple[tuple[int, int, int], ...] | None = None


@dataclass(frozen=True)
class Scales:
    """Error sizes that, times the unit of the target's precision, give the tolerances.

    `out` is a float or an array broadcastable to out (B, Hq, N, M); `lse` and `state`
    are floats (None: not compared).
    """

    out: float | np.ndarray
    lse: float | None = None
    state: float | None = None


@dataclass(frozen=True)
class KnownDifference:
    """A documented convention in which a peer differs from kernattn.

    `adjust` maps a case and a reference output to the case to run the peer on and the
    output the peer's convention predicts. A mismatch that disappears after adjusting is
    reported under `name` instead of as a disagreement.
    """

    name: str
    description: str
    adjust: Callable[[Case, Output], tuple[Case, Output]]


class Target(Protocol):
    """What `check_case` needs of a target; `exact` (optional, default False) asks for
    bit-identical agreement with the exact values of cases marked ``exact``."""

    name: str
    differences: tuple[KnownDifference, ...]
    notes: list[str]

    def __call__(self, case: Case) -> Output: ...


@dataclass
class CaseResult:
    """Outcome of one target on one case; `shrunk` is a `ShrinkResult` for a shrunk
    mismatch (see `kernattn.verify.shrink`)."""

    case: Case
    status: str
    abs_error: float = 0.0
    rel_error: float = 0.0
    detail: str = ""
    differences: tuple[str, ...] = ()
    reference: Output | None = None
    shrunk: Any = None


@dataclass
class TargetReport:
    """Results of one target over all cases, as one row of the verify table."""

    variant: str
    target: str
    results: list[CaseResult] = field(default_factory=list)
    differences: tuple[KnownDifference, ...] = ()
    notes: list[str] = field(default_factory=list)
    not_run: TargetNotRun | None = None

    def count(self, status: str) -> int:
        return sum(result.status == status for result in self.results)

    @property
    def failures(self) -> list[CaseResult]:
        return [result for result in self.results if result.status == MISMATCH]

    @property
    def max_abs_error(self) -> float:
        return max((r.abs_error for r in self.results if r.status == AGREE), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((r.rel_error for r in self.results if r.status == AGREE), default=0.0)

    @property
    def import_failed(self) -> bool:
        """Whether the target stopped because its backend could not be imported."""
        return isinstance(self.not_run, BackendImportError)

    @property
    def verdict(self) -> str:
        if self.import_failed:
            return "ERROR"
        if self.failures:
            return "FAIL"
        if self.not_run is not None:
            return "not run"
        if self.count(DIFFERENCE) or self.count(UNSUPPORTED):
            return "ok (see notes)"
        return "ok"


def error_scales(case: Case) -> tuple[float, float]:
    """Return (logit size, value size) of a softmax case, ignoring non-finite entries.

    The logit size bounds |s_ij| by Cauchy-Schwarz: ``scale * max|q_i| * max|k_j|``,
    capped by the soft-cap, plus the largest |bias|. The value size is the largest |v|
    (at least 1) times the dropout rescaling.
    """
    q, k, v = (
        np.nan_to_num(case.arrays[key], nan=0.0, posinf=0.0, neginf=0.0) for key in "qkv"
    )
    d = q.shape[-1]
    scale = case.options.get("scale")
    scale = 1.0 / np.sqrt(d) if scale is None else abs(scale)
    q_norm = np.linalg.norm(q, axis=-1).max(initial=0.0)
    k_norm = np.linalg.norm(k, axis=-1).max(initial=0.0)
    logit = scale * q_norm * k_norm
    if case.options.get("softcap") is not None:
        logit = min(logit, case.options["softcap"])
    bias = case.arrays.get("bias")
    if bias is not None:
        logit += np.abs(bias[np.isfinite(bias)]).max(initial=0.0)
    value = max(1.0, float(np.abs(v).max(initial=0.0)))
    value /= 1.0 - case.options.get("dropout_p", 0.0)
    return float(logit), value


def softmax_scales(case: Case, reference: Output) -> Scales:
    """Return the scales of a softmax case: ``(1 + L) V`` for out, ``1 + L + max|lse|``.

    L and V are the logit and value sizes of `error_scales`.
    """
    logit, value = error_scales(case)
    lse_size = 0.0
    if reference.lse is not None:
        lse_size = float(np.abs(reference.lse[np.isfinite(reference.lse)]).max(initial=0.0))
    return Scales((1 + logit) * value, 1 + logit + lse_size)


def compare(
    case: Case, got: Output, reference: Output, scales: Scales | None = None
) -> tuple[bool, float, float, str]:
    """Compare `got` with `reference`; return (passed, abs error, rel error, detail).

    Non-finite entries must match exactly (NaN where the reference is NaN, -inf lse rows
    where it is -inf). Finite entries must agree within ``unit * scales`` with the unit
    of the precision of `got` (default scales: `softmax_scales`). A reference that
    raised a `ZeroDenominatorError` is matched only by one naming the same rows. The
    relative error is normwise: max |got - ref| / max |ref| (divided by 1 when the
    reference is all zero).
    """
    if reference.raised is not None or got.raised is not None:
        return _compare_raised(got, reference)
    out = np.asarray(got.out)
    if out.shape != reference.out.shape:
        detail = f"out has shape {out.shape}; expected {reference.out.shape}"
        return False, np.inf, np.inf, detail
    precision = np.dtype(got.precision or out.dtype)
    unit = ERROR_UNIT.get(precision, ERROR_UNIT[np.dtype(np.float32)])
    if scales is None:
        scales = softmax_scales(case, reference)
    tolerance = unit * np.broadcast_to(scales.out, out.shape)
    passed, abs_error, detail = _compare_array("out", out, reference.out, tolerance)
    finite_ref = np.abs(reference.out[np.isfinite(reference.out)])
    ref_size = float(finite_ref.max(initial=0.0))
    rel_error = abs_error / (ref_size if ref_size > 0 else 1.0)  # an all-zero reference: vs 1
    if got.lse is not None and reference.lse is not None and scales.lse is not None:
        lse = np.asarray(got.lse, dtype=np.float64)
        if lse.shape != reference.lse.shape:
            return False, abs_error, rel_error, (
                f"lse has shape {lse.shape}; expected {reference.lse.shape}"
            )
        lse_passed, _, lse_detail = _compare_array("lse", lse, reference.lse, unit * scales.lse)
        if passed and not lse_passed:
            passed, detail = False, lse_detail
    if reference.state is not None and scales.state is not None:
        if got.state is None:
            return False, abs_error, rel_error, "no state returned; expected (S, z)"
        for name, got_part, ref_part in zip(("S", "z"), got.state, reference.state):
            got_part = np.asarray(got_part)
            if got_part.shape != ref_part.shape:
                return False, abs_error, rel_error, (
                    f"state {name} has shape {got_part.shape}; expected {ref_part.shape}"
                )
            part_passed, _, part_detail = _compare_array(
                f"state {name}", got_part, ref_part, unit * scales.state
            )
            if passed and not part_passed:
                passed, detail = False, part_detail
    return passed, abs_error, rel_error, detail


def _compare_raised(got: Output, reference: Output) -> tuple[bool, float, float, str]:
    if reference.raised is None:
        rows = list(got.raised)[:5]
        return False, np.inf, np.inf, f"raised ZeroDenominatorError for rows {rows}; expected values"
    if got.raised is None:
        rows = list(reference.raised)[:5]
        return False, np.inf, np.inf, (
            f"returned values; expected ZeroDenominatorError for rows {rows}"
        )
    if got.raised == ROWS_NOT_NAMED:  # a user's exception: only the fact is compared
        return True, 0.0, 0.0, ""
    if sorted(got.raised) != sorted(reference.raised):
        return False, np.inf, np.inf, (
            f"ZeroDenominatorError names rows {sorted(got.raised)[:5]}; expected "
            f"{sorted(reference.raised)[:5]}"
        )
    return True, 0.0, 0.0, ""


def _compare_array(
    name: str, got: np.ndarray, ref: np.ndarray, tol: float | np.ndarray
) -> tuple[bool, float, str]:
    got = got.astype(np.float64)
    both_finite = np.isfinite(got) & np.isfinite(ref)
    # Non-finite entries must be identical, NaN included.
    same_special = (got == ref) | (np.isnan(got) & np.isnan(ref))
    bad_special = ~both_finite & ~same_special
    with np.errstate(invalid="ignore"):  # inf - inf where both are non-finite
        error = np.where(both_finite, np.abs(got - ref), 0.0)
    abs_error = float(error.max(initial=0.0))
    tol = np.broadcast_to(tol, error.shape)
    if bad_special.any():
        index = tuple(int(i) for i in np.argwhere(bad_special)[0])
        return False, abs_error, (
            f"{name}{list(index)} is {float(got[index])!r}; expected {float(ref[index])!r} "
            f"({int(bad_special.sum())} non-finite entries differ)"
        )
    excess = error - tol
    if (excess > 0).any():
        index = tuple(int(i) for i in np.unravel_index(np.argmax(excess), error.shape))
        return False, abs_error, (
            f"{name}{list(index)} is {float(got[index])!r}; expected {float(ref[index])!r} "
            f"(error {error[index]:.3g} > tolerance {tol[index]:.3g})"
        )
    return True, abs_error, ""


def references_for(case: Case, oracle: Output) -> list[Output]:
    """Return the oracle output and, for catalogue cases, the exact expected values."""
    references = [oracle]
    if case.expected_out is not None:
        references.append(Output(case.expected_out, case.expected_lse, state=case.expected_state))
    elif case.expected_raised is not None:
        references.append(Output(None, raised=case.expected_raised))
    return references


ScalesFunction = Callable[[Case, Output], Scales]


def check_case(
    target: Target, case: Case, oracle: Output, scales: ScalesFunction | None = None
) -> CaseResult:
    """Run `target` on `case` and compare with the oracle and any exact values.

    `scales(case, reference)` sets the tolerances (default: `softmax_scales`). When the
    plain comparison fails, each combination of the target's known differences is
    tried, fewest first; the first that explains the result is named.
    """
    scales = scales or softmax_scales
    try:
        got = target(case)
    except UnsupportedCase as exc:
        return CaseResult(case, UNSUPPORTED, detail=str(exc))
    except TargetNotRun:
        raise
    except Exception as exc:  # the target itself failed: report it as a mismatch
        detail = f"raised {type(exc).__name__}: {exc}"
        return CaseResult(case, MISMATCH, np.inf, np.inf, detail, reference=oracle)
    references = references_for(case, oracle)
    exact = case.exact and getattr(target, "exact", False)
    passed, abs_error, rel_error, detail = _compare_all(case, got, references, scales, exact)
    if passed:
        return CaseResult(case, AGREE, abs_error, rel_error)
    for size in range(1, len(target.differences) + 1):
        for combination in itertools.combinations(target.differences, size):
            if _explained_by(target, case, oracle, combination, got, scales):
                names = tuple(difference.name for difference in combination)
                return CaseResult(case, DIFFERENCE, abs_error, rel_error, detail, names)
    return CaseResult(case, MISMATCH, abs_error, rel_error, detail, reference=oracle)


def _compare_all(
    case: Case, got: Output, references: list[Output], scales: ScalesFunction,
    exact: bool = False,
):
    """Compare with every reference; with `exact`, out must equal the exact values."""
    worst = (True, 0.0, 0.0, "")
    for index, reference in enumerate(references):
        reference_scales = None
        if reference.raised is None:
            reference_scales = scales(case, reference)
            if exact and index > 0:
                reference_scales = replace(reference_scales, out=0.0)
        passed, abs_error, rel_error, detail = compare(case, got, reference, reference_scales)
        if not passed:
            return passed, abs_error, rel_error, detail
        worst = (True, max(worst[1], abs_error), max(worst[2], rel_error), "")
    return worst


def _explained_by(
    target: Target, case: Case, oracle: Output, combination, got: Output, scales
) -> bool:
    references = references_for(case, oracle)
    adjusted_case = case
    for difference in combination:
        adjusted = [difference.adjust(adjusted_case, reference) for reference in references]
        adjusted_case = adjusted[0][0]
        references = [output for _, output in adjusted]
    if adjusted_case is not case:  # the peer runs again only when its input changed
        try:
            got = target(adjusted_case)
        except Exception:  # an adjustment the peer cannot run explains nothing
            return False
    return _compare_all(adjusted_case, got, references, scales)[0]


def check_target(
    variant: str,
    target: Target,
    cases: list[Case],
    oracle: dict[str, Output],
    scales: ScalesFunction | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TargetReport:
    """Run one target over every case and return its report.

    `progress(done, total)` is called after each case when given. A target that raises
    `TargetNotRun` is stopped there; the exception is stored in ``report.not_run``.
    """
    report = TargetReport(variant, target.name, differences=target.differences)
    for index, case in enumerate(cases):
        try:
            result = check_case(target, case, oracle[case.name], scales)
        except TargetNotRun as exc:
            report.not_run = exc
            break
        report.results.append(result)
        if progress is not None:
            progress(index + 1, len(cases))
    report.notes.extend(target.notes)
    return report
