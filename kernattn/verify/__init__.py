"""Check attention implementations against kernattn's loop oracle.

`kernattn verify` is a thin command-line layer over this package. A `Variant` bundles
what a family of attention needs to be checked: its public function (with a
``backend=`` switch), the registry of its backends, a seeded case generator, an
edge-case catalogue with exact values, and peers from other libraries. The oracle is
always the variant's ``"loops"`` backend.

Modules: `cases` (softmax inputs, .npz files), `similarity_cases`, `linear_cases` and
`decode_cases` (inputs, calls and tolerances of those variants), `exact` (exact expected values from
the formulas), `names` (feature-map and similarity names), `check` (tolerances,
comparison, reports), `shrink` (smallest failing input), `targets` (kernattn backends,
user functions), `peers` (JAX, PyTorch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kernattn.linear import linear_backends
from kernattn.similarity import similarity_backends
from kernattn.softmax import softmax_attention, softmax_backends
from kernattn.verify import decode_cases, linear_cases, similarity_cases
from kernattn.verify.cases import (
    DEFAULT_CASE_COUNT,
    Case,
    CaseFileError,
    load_case,
    load_case_variant,
    save_case,
    softmax_cases,
    softmax_edge_cases,
)
from kernattn.verify.check import (
    AGREE,
    DIFFERENCE,
    BackendImportError,
    BackendUnavailable,
    TargetNotRun,
    MISMATCH,
    UNSUPPORTED,
    CaseResult,
    KnownDifference,
    Output,
    Scales,
    ScalesFunction,
    TargetReport,
    UnsupportedCase,
    check_case,
    check_target,
    softmax_scales,
)
from kernattn.verify.names import feature_map_from_name, similarity_from_name
from kernattn.verify.peers import PEERS, PeerNotInstalled
from kernattn.verify.shrink import ShrinkResult, shrink_case
from kernattn.verify.targets import (
    Arguments,
    BackendTarget,
    FunctionTarget,
    Invoke,
    import_function,
    softmax_arguments,
)

ORACLE_BACKEND = "loops"


def _softmax_invoke(case: Case, backend: str) -> Output:
    q, k, v = (case.arrays[key] for key in "qkv")
    out, lse = softmax_attention(q, k, v, **case.keywords(), backend=backend, return_lse=True)
    return Output(np.asarray(out), np.asarray(lse))


def _every_case(case: Case) -> bool:
    return True


@dataclass(frozen=True)
class Variant:
    """Registry entry for one family of attention functions that `verify` checks.

    Attributes
    ----------
    name : str
        Name used on the command line (``--variant``) and in reports.
    invoke : callable
        ``invoke(case, backend)`` runs the family's public function with ``backend=``
        on a case and returns an `Output`.
    backends : callable
        Returns the dict of backend names the function accepts; every entry except the
        oracle is checked, so a newly registered backend is picked up by itself.
    random_cases : callable
        ``random_cases(seed, count)`` returns seeded random `Case` objects.
    edge_cases : callable
        Returns the catalogue of cases with exact expected values.
    scales : callable
        ``scales(case, reference)`` returns the `Scales` that set the tolerances.
    user_arguments : callable
        ``user_arguments(case, function)`` returns the positional arguments and keywords
        of a call to a user's function.
    user_case : callable
        Returns False for cases a user's function skips (copies of a case that differ
        only in options the user's function does not take).
    default_case_count : int
        Random cases per run unless ``--cases`` says otherwise.
    peers : dict
        Peer name to a function that returns a list of targets, or raises
        `PeerNotInstalled` when the peer's library is missing.
    float_dtypes : tuple
        Input dtypes every backend is run with.
    marker_option : str or None
        Option that every case of this variant has and no other variant's cases have
        (``"sim"``, ``"feature_map"``). It tells the variant of a case file saved
        without a ``variant`` entry; None for softmax, the variant of the remaining
        files, and for variants added after files gained that entry (decode).
    """

    name: str
    invoke: Invoke
    backends: Callable[[], dict]
    random_cases: Callable[[int, int], list[Case]]
    edge_cases: Callable[[], list[Case]]
    scales: ScalesFunction = softmax_scales
    user_arguments: Arguments = softmax_arguments
    user_case: Callable[[Case], bool] = _every_case
    default_case_count: int = DEFAULT_CASE_COUNT
    peers: dict[str, Callable] = field(default_factory=dict)
    float_dtypes: tuple[str, ...] = ("float64", "float32")
    marker_option: str | None = None

    def oracle(self, case: Case) -> Output:
        """Return the loop oracle's output on `case`, run on the arrays as stored."""
        return self.oracle_target()(case)

    def oracle_target(self) -> BackendTarget:
        """Return the loop oracle as a target that must match exact values bit for bit."""
        return BackendTarget(self.invoke, ORACLE_BACKEND, None, exact=True)

    def backend_targets(self) -> list[BackendTarget]:
        """Return one target per non-oracle backend and input dtype.

        Raises
        ------
        BackendImportError
            The backend registry itself cannot be imported.
        """
        try:
            backends = self.backends()
        except ImportError as exc:
            raise BackendImportError(
                f"the {self.name} backends cannot be listed: {type(exc).__name__}: {exc}"
            ) from exc
        return [
            BackendTarget(self.invoke, backend, dtype)
            for backend in backends
            if backend != ORACLE_BACKEND
            for dtype in self.float_dtypes
        ]

    def function_target(self, function: Callable, name: str) -> FunctionTarget:
        """Return a target for a user's function, called as `user_arguments` specifies."""
        return FunctionTarget(function, name, self.user_arguments)


VARIANTS: dict[str, Variant] = {
    "softmax": Variant(
        "softmax",
        _softmax_invoke,
        softmax_backends,
        softmax_cases,
        softmax_edge_cases,
        peers=PEERS,
    ),
    "similarity": Variant(
        "similarity",
        similarity_cases.invoke,
        similarity_backends,
        similarity_cases.random_cases,
        similarity_cases.edge_cases,
        scales=similarity_cases.scales,
        user_arguments=similarity_cases.user_arguments,
        default_case_count=similarity_cases.DEFAULT_CASE_COUNT,
        marker_option="sim",
    ),
    "linear": Variant(
        "linear",
        linear_cases.invoke,
        linear_backends,
        linear_cases.random_cases,
        linear_cases.edge_cases,
        scales=linear_cases.scales,
        user_arguments=linear_cases.user_arguments,
        user_case=linear_cases.user_case,
        default_case_count=linear_cases.DEFAULT_CASE_COUNT,
        marker_option="feature_map",
    ),
    "decode": Variant(
        "decode",
        decode_cases.invoke,
        decode_cases.decode_backends,
        decode_cases.random_cases,
        decode_cases.edge_cases,
        user_arguments=decode_cases.user_arguments,
        default_case_count=decode_cases.DEFAULT_CASE_COUNT,
    ),
}


def load_replay(path: str | Path) -> tuple[Variant, Case]:
    """Read a case written by `save_case` and return its variant with it.

    The variant is the file's ``variant`` entry. A file without one (written before
    the entry existed) belongs to the variant whose `marker_option` the case has, and
    to softmax when it has none.

    Raises
    ------
    CaseFileError
        The file cannot be read as a saved case, or it names an unknown variant.
    """
    case = load_case(path)
    name = load_case_variant(path)
    if name is None:
        markers = [v.name for v in VARIANTS.values() if v.marker_option in case.options]
        name = markers[0] if markers else "softmax"
    if name not in VARIANTS:
        raise CaseFileError(
            f"{path} contains a case of variant {name!r}, which this version of kernattn "
            f"does not have; expected one of {', '.join(VARIANTS)}"
        )
    return VARIANTS[name], case


def build_cases(variant: Variant, seed: int, count: int | None = None) -> list[Case]:
    """Return the edge-case catalogue followed by `count` random cases from `seed`.

    `count` defaults to the variant's `default_case_count`.
    """
    if count is None:
        count = variant.default_case_count
    return variant.edge_cases() + variant.random_cases(seed, count)


Progress = Callable[[str, int, int], None]


def run_verify(
    variant: Variant,
    targets: list,
    cases: list[Case],
    *,
    shrink: bool = False,
    progress: Progress | None = None,
) -> list[TargetReport]:
    """Check every target on every case against the oracle.

    The first report checks the oracle itself against the exact values of the catalogue
    cases. With `shrink`, each mismatch is reduced to the smallest input that still
    fails (`shrink_case`) and the result is stored in ``CaseResult.shrunk``.
    `progress(label, done, total)` is called after each case. A target with a
    ``wants(case)`` method runs only the cases it wants; a `FunctionTarget` runs the
    cases the variant's `user_case` keeps. Cost: one oracle run per case,
    O(B Hq N S (D + M)) Python operations each, plus one run of each target per case.

    A target that cannot run here (`TargetNotRun`, such as a backend whose module does
    not import) is stopped at its first case and not shrunk. Its report stores the
    error in ``not_run``. When the oracle itself cannot run, the only report returned
    is the oracle's.
    """
    def report_progress(label):
        if progress is None:
            return None
        return lambda done, total: progress(f"{variant.name} / {label}", done, total)

    oracle_target = variant.oracle_target()
    oracle_target.name = f"{ORACLE_BACKEND} (oracle) vs exact values"
    oracle = {}
    step = report_progress("oracle")
    for index, case in enumerate(cases):
        try:
            oracle[case.name] = oracle_target(case)
        except TargetNotRun as exc:  # without the oracle no target can be checked
            return [TargetReport(variant.name, oracle_target.name, not_run=exc)]
        if step is not None:
            step(index + 1, len(cases))
    exact = [case for case in cases if case.expected_out is not None or case.expected_raised]
    reports = []
    if exact:
        reports.append(check_target(variant.name, oracle_target, exact, oracle, variant.scales))
    for target in targets:
        wants = getattr(target, "wants", None)
        if wants is None and isinstance(target, FunctionTarget):
            wants = variant.user_case
        selected = [case for case in cases if wants is None or wants(case)]
        report = check_target(
            variant.name, target, selected, oracle, variant.scales, report_progress(target.name)
        )
        if shrink and report.not_run is None:
            for result in report.failures:
                if progress is not None:
                    progress(f"{variant.name} / {target.name}: shrinking {result.case.name}", 0, 0)
                result.shrunk = shrink_case(variant, target, result.case)
        reports.append(report)
    return reports


__all__ = [
    "AGREE",
    "BackendImportError",
    "BackendUnavailable",
    "CaseFileError",
    "TargetNotRun",
    "load_replay",
    "Progress",
    "Scales",
    "ShrinkResult",
    "check_case",
    "feature_map_from_name",
    "shrink_case",
    "similarity_from_name",
    "DIFFERENCE",
    "MISMATCH",
    "ORACLE_BACKEND",
    "PEERS",
    "UNSUPPORTED",
    "VARIANTS",
    "BackendTarget",
    "Case",
    "CaseResult",
    "FunctionTarget",
    "KnownDifference",
    "Output",
    "PeerNotInstalled",
    "TargetReport",
    "UnsupportedCase",
    "Variant",
    "build_cases",
    "import_function",
    "load_case",
    "run_verify",
    "save_case",
]
