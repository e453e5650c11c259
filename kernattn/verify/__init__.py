"""Check attention implementations against kernattn's loop oracle.

`kernattn verify` is a thin command-line layer over this package. A `Variant` bundles
what a family of attention needs to be checked: its public function (with a
``backend=`` switch), the registry of its backends, a seeded case generator, an
edge-case catalogue with exact values, and peers from other libraries. The oracle is
always the variant's ``"loops"`` backend.

Modules: `cases` (inputs, .npz files), `check` (tolerances, comparison, reports),
`targets` (kernattn backends, user functions), `peers` (JAX, PyTorch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from kernattn.softmax import softmax_attention, softmax_backends
from kernattn.verify.cases import Case, load_case, save_case, softmax_cases, softmax_edge_cases
from kernattn.verify.check import (
    AGREE,
    DIFFERENCE,
    MISMATCH,
    UNSUPPORTED,
    CaseResult,
    KnownDifference,
    Output,
    TargetReport,
    UnsupportedCase,
    check_target,
)
from kernattn.verify.peers import PEERS, PeerNotInstalled
from kernattn.verify.targets import BackendTarget, FunctionTarget, import_function

ORACLE_BACKEND = "loops"


@dataclass(frozen=True)
class Variant:
    """Registry entry for one family of attention functions that `verify` checks.

    Attributes
    ----------
    name : str
        Name used on the command line (``--variant``) and in reports.
    attention : callable
        Public function ``f(q, k, v, **keywords, backend=..., return_lse=True)``.
    backends : callable
        Returns the dict of backend names the function accepts; every entry except the
        oracle is checked.
    random_cases : callable
        ``random_cases(seed, count)`` returns seeded random `Case` objects.
    edge_cases : callable
        Returns the catalogue of cases with exact expected values.
    peers : dict
        Peer name to a function that returns a list of targets, or raises
        `PeerNotInstalled` when the peer's library is missing.
    float_dtypes : tuple
        Input dtypes every backend is run with.
    """

    name: str
    attention: Callable
    backends: Callable[[], dict]
    random_cases: Callable[[int, int], list[Case]]
    edge_cases: Callable[[], list[Case]]
    peers: dict[str, Callable] = field(default_factory=dict)
    float_dtypes: tuple[str, ...] = ("float64", "float32")

    def oracle(self, case: Case) -> Output:
        """Return the loop oracle's output on `case`."""
        return BackendTarget(self.attention, ORACLE_BACKEND)(case)

    def backend_targets(self) -> list[BackendTarget]:
        """Return one target per non-oracle backend and input dtype."""
        return [
            BackendTarget(self.attention, backend, dtype)
            for backend in self.backends()
            if backend != ORACLE_BACKEND
            for dtype in self.float_dtypes
        ]


VARIANTS: dict[str, Variant] = {
    "softmax": Variant(
        "softmax",
        softmax_attention,
        softmax_backends,
        softmax_cases,
        softmax_edge_cases,
        peers=PEERS,
    ),
}


def build_cases(variant: Variant, seed: int, count: int) -> list[Case]:
    """Return the edge-case catalogue followed by `count` random cases from `seed`."""
    return variant.edge_cases() + variant.random_cases(seed, count)


def run_verify(variant: Variant, targets: list, cases: list[Case]) -> list[TargetReport]:
    """Check every target on every case against the oracle.

    The first report checks the oracle itself against the exact values of the catalogue
    cases. Cost: one oracle run per case, O(B Hq N S (D + M)) Python operations each,
    plus one run of each target per case.
    """
    oracle = {case.name: variant.oracle(case) for case in cases}
    exact = [case for case in cases if case.expected_out is not None]
    oracle_target = BackendTarget(variant.attention, ORACLE_BACKEND)
    oracle_target.name = f"{ORACLE_BACKEND} (oracle) vs exact values"
    reports = [check_target(variant.name, oracle_target, exact, oracle)] if exact else []
    for target in targets:
        reports.append(check_target(variant.name, target, cases, oracle))
    return reports


__all__ = [
    "AGREE",
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
