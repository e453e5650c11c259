"""A checker for a user's feature map φ: R^D -> R^F and the kernel it claims."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

import numpy as np

from kernattn import feature_maps as fm
from kernattn._validate import OptionError

# Total probability that a correct random map fails the unbiasedness check: a two-sided
# one-sample t-test per input pair, Bonferroni-corrected over the pairs.
FALSE_FAILURE_PROBABILITY = 1e-3
REDRAWS = 300  # independent draws of a random map per input pair
PAIRS = 4  # input pairs for the unbiasedness check
DIMENSIONS = (1, 2, 3, 4)  # default input dimensions D tried by every check


@dataclass
class Check:
    """The outcome of one check: its name, whether it passed, and the evidence."""

    name: str
    passed: bool | None  # None: not applicable or not run
    detail: str


@dataclass
class FeatureMapReport:
    """All checks of one feature map; `passed` is False when any check failed."""

    feature_map: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed is not False for check in self.checks)

    def __str__(self) -> str:
        verdicts = {True: "ok", False: "FAIL", None: "skip"}
        width = max(len(check.name) for check in self.checks)
        lines = [f"feature map {self.feature_map}"]
        for check in self.checks:
            lines.append(f"  {verdicts[check.passed]:4}  {check.name:{width}}  {check.detail}")
        lines.append("  result: " + ("passed" if self.passed else "FAILED"))
        return "\n".join(lines)


def _is_random(feature_map) -> bool:
    return hasattr(feature_map, "fit") and hasattr(feature_map, "random_state")


def _redraw(feature_map, seed, d: int):
    clone = copy.deepcopy(feature_map)
    clone.random_state = seed
    return clone.fit(d)


def _for_dimension(feature_map, d: int):
    """Return the map itself, or for a random map a copy fitted to dimension D."""
    if not _is_random(feature_map):
        return feature_map
    return _redraw(feature_map, feature_map.random_state, d)


def _integer_vectors(rng, count: int, d: int) -> np.ndarray:
    return rng.integers(-3, 4, size=(count, d)).astype(np.float64)


def _check_shape_and_finite(feature_map, dimensions, rng) -> list[Check]:
    problems = []
    for d in dimensions:
        x = rng.normal(size=(2, 3, d))
        try:
            features = np.asarray(_for_dimension(feature_map, d)(x))
        except Exception as error:  # noqa: BLE001 - the report names any failure
            problems.append(f"D = {d}: calling the map raised {type(error).__name__}: {error}")
            continue
        if features.ndim != 3 or features.shape[:2] != (2, 3):
            problems.append(f"D = {d}: input (2, 3, {d}) gave shape {features.shape}; expected (2, 3, F)")
            continue
        expected_f = feature_map.num_features(d)
        if features.shape[-1] != expected_f:
            problems.append(f"D = {d}: F = {features.shape[-1]}, but num_features({d}) = {expected_f}")
        if not np.isfinite(features).all():
            problems.append(f"D = {d}: NaN or Inf features for finite standard-normal input")
    detail = "; ".join(problems) if problems else f"(..., D) -> (..., F) and finite for D in {dimensions}"
    return [Check("shape and finiteness", not problems, detail)]


def _check_exact_identity(feature_map, kernel, dimensions, rng) -> Check:
    """Compare φ(x)·φ(y) with the kernel on small integer vectors.

    The example reported is the worst pair of the smallest failing D, the easiest to read.
    """
    worst = (0.0, None)
    rational = getattr(feature_map, "rational", False)
    for d in dimensions:
        if worst[1] is not None and worst[0] > (0.0 if rational else 1e-10):
            break
        xs, ys = _integer_vectors(rng, 8, d), _integer_vectors(rng, 8, d)
        for x, y in zip(xs, ys):
            want = float(kernel(x, y))
            if rational:
                weights, ux = feature_map.rational_features([Fraction(int(t)) for t in x])
                _, uy = feature_map.rational_features([Fraction(int(t)) for t in y])
                got = float(sum(w * a * b for w, a, b in zip(weights, ux, uy)))
            else:
                got = math.fsum(np.asarray(feature_map(x)) * np.asarray(feature_map(y)))
            error = abs(got - want) / max(1.0, abs(want))
            if not error <= worst[0]:
                worst = (error, (x, y, got, want))
    error, example = worst
    how = "exactly, in rational arithmetic" if rational else "in float64 (rel. error <= 1e-10)"
    if example is None or error <= (0.0 if rational else 1e-10):
        return Check("kernel identity", True, f"φ(x)·φ(y) == kernel(x, y) {how} on integer vectors")
    x, y, got, want = example
    return Check(
        "kernel identity",
        False,
        f"x = {x.tolist()}, y = {y.tolist()}: φ(x)·φ(y) = {got:.10g}, kernel = {want:.10g}",
    )


def _check_unbiased(feature_map, kernel, d: int, rng) -> Check:
    """Test E[φ(x)·φ(y)] == kernel(x, y) over independent redraws of a random map."""
    from scipy import stats

    alpha = FALSE_FAILURE_PROBABILITY / PAIRS
    worst = (1.0, None)
    for pair in range(PAIRS):
        x, y = rng.normal(size=d) * 0.5, rng.normal(size=d) * 0.5
        estimates = np.empty(REDRAWS)
        for r in range(REDRAWS):
            drawn = _redraw(feature_map, 10_000 * pair + r, d)
            estimates[r] = float(np.dot(drawn(x), drawn(y)))
        want = float(kernel(x, y))
        pvalue = float(stats.ttest_1samp(estimates, want).pvalue)
        if pvalue < worst[0]:
            worst = (pvalue, (x, y, estimates.mean(), want))
    pvalue, (x, y, mean, want) = worst
    passed = pvalue >= alpha
    detail = (
        f"mean of {REDRAWS} draws vs kernel at {PAIRS} input pairs, t-test; smallest "
        f"p = {pvalue:.3g} (threshold {alpha:.2g}, false-failure probability "
        f"{FALSE_FAILURE_PROBABILITY:g})"
    )
    if not passed:
        detail += f"; at x = {np.round(x, 3).tolist()}: mean {mean:.6g}, kernel {want:.6g}"
    return Check("kernel unbiased", passed, detail)


def _check_signs(feature_map, positive, dimensions, rng) -> list[Check]:
    samples = []
    for d in dimensions:
        x = np.concatenate([rng.normal(size=(64, d)) * scale for scale in (0.1, 1.0, 5.0)])
        samples.append(np.asarray(_for_dimension(feature_map, d)(x)).ravel())
    features = np.concatenate(samples)
    smallest = float(features.min())
    checks = []
    if positive is None:
        checks.append(Check("positive features", None, f"not claimed; smallest feature seen {smallest:.3g}"))
    else:
        ok = smallest > 0 if positive else True
        checks.append(Check(
            "positive features", ok,
            f"claimed {positive}; smallest feature seen {smallest:.3g}",
        ))
    if smallest > 0:
        vanish = "no zero or negative feature seen, so φ(q)·Σφ(k) > 0 barring underflow"
        checks.append(Check("denominators can vanish", None, vanish))
    else:
        kind = "zero" if smallest == 0 else "negative"
        checks.append(Check(
            "denominators can vanish", None,
            f"yes: {kind} features occur, so φ(q)·Σφ(k) can be <= 0; choose a "
            f"zero_denominator policy",
        ))
    return checks


def check_feature_map(
    feature_map,
    kernel: Callable | None = None,
    *,
    positive: bool | None = None,
    random_state=None,
    dimensions: tuple[int, ...] = DIMENSIONS,
) -> FeatureMapReport:
    r"""Check a feature map: shapes, finiteness, its kernel identity and its signs.

    Parameters
    ----------
    feature_map : FeatureMap or callable
        A built-in map, one wrapped with `kernattn.feature_maps.from_function`, or a
        plain callable (..., D) -> (..., F). A map with ``fit`` and ``random_state``
        (the built-in random maps) is treated as random and redrawn with new seeds.
    kernel : callable, optional
        ``kernel(x, y)`` for vectors of dimension D: the kernel that ``φ(x)·φ(y)``
        should equal (deterministic map) or estimate without bias (random map).
        Default: the map's own ``kernel`` method, when it is not just ``φ(x)·φ(y)``.
    positive : bool, optional
        Claim that every feature is positive; checked on random inputs.
    random_state : int or Generator, optional
        Seed for the inputs the checks draw, via `numpy.random.default_rng`.
    dimensions : tuple of int, default (1, 2, 3, 4)
        Input dimensions D to try, for maps defined only for some D.

    Returns
    -------
    FeatureMapReport
        One `Check` per property; ``report.passed`` and ``str(report)``.

    Notes
    -----
    The identity is checked on integer vectors with entries in [-3, 3] for each D in
    `dimensions`: exactly in `fractions.Fraction` arithmetic when the map is rational
    (``rational_features``), otherwise in float64 to a relative error of 1e-10. For a
    random map, each of 4 input pairs gets 300 independent draws and a two-sided
    one-sample t-test of their mean against the kernel; the threshold is
    Bonferroni-corrected so a correct map fails with probability about 1e-3.
    "Denominators can vanish" is reported, not judged: it is yes when a zero or negative
    feature is seen. Cost: O(draws · F · D) for random maps, small otherwise.

    Examples
    --------
    >>> from kernattn import feature_maps
    >>> report = check_feature_map(feature_maps.Polynomial(2, c=1), positive=False)
    >>> report.passed
    True
    """
    feature_map = fm.as_feature_map(feature_map)
    rng = np.random.default_rng(random_state)
    if kernel is None:
        own = type(feature_map).kernel
        if own is not fm.FeatureMap.kernel and not (
            isinstance(feature_map, fm.FunctionFeatureMap) and feature_map._kernel is None
        ):
            kernel = feature_map.kernel
    elif not callable(kernel):
        raise OptionError(f"kernel is {kernel!r}; expected a callable kernel(x, y) or None")
    report = FeatureMapReport(repr(feature_map))
    dimensions = tuple(int(d) for d in dimensions)
    if not dimensions or min(dimensions) < 1:
        raise OptionError(f"dimensions is {dimensions!r}; expected input dimensions >= 1")
    report.checks += _check_shape_and_finite(feature_map, dimensions, rng)
    if not report.passed:
        return report
    if kernel is None:
        report.checks.append(Check(
            "kernel identity", None, "no kernel given, and φ(x)·φ(y) cannot check itself"
        ))
    elif _is_random(feature_map):
        report.checks.append(_check_unbiased(feature_map, kernel, dimensions[-1], rng))
    else:
        report.checks.append(_check_exact_identity(feature_map, kernel, dimensions, rng))
    report.checks += _check_signs(feature_map, positive, dimensions, rng)
    return report


def assert_feature_map(feature_map, kernel: Callable | None = None, **options) -> None:
    """Raise AssertionError with the whole report unless `check_feature_map` passes.

    Takes the arguments of `check_feature_map`.
    """
    report = check_feature_map(feature_map, kernel, **options)
    if not report.passed:
        raise AssertionError(str(report))
