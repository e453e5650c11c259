"""The `kernattn` command line. This is the only module of kernattn that prints.

    kernattn verify                           every backend against the loop oracle
    kernattn verify jax | torch               a peer library against the loop oracle
    kernattn verify MODULE:FUNCTION           a user's function against the loop oracle
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from kernattn import verify
from kernattn.verify.cases import DEFAULT_CASE_COUNT

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2  # also argparse's code for a bad command line
EXIT_PEER_MISSING = 3

EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK}  every case agrees, or differs only by a documented convention, or is not
     supported by the target
  {EXIT_MISMATCH}  at least one mismatch (a real disagreement with the oracle)
  {EXIT_USAGE}  invalid command line, unknown variant, or MODULE:FUNCTION not importable
  {EXIT_PEER_MISSING}  the peer library (jax or torch) is not installed
"""

VERIFY_DESCRIPTION = """\
Check attention implementations against kernattn's explicit-loop oracle on seeded
random inputs and on a catalogue of edge cases with exact expected values.

TARGET is one of:
  (none)           every kernattn backend except the oracle, with float64 and float32 input
  jax              jax.nn.dot_product_attention
  torch            torch.nn.functional.scaled_dot_product_attention
  MODULE:FUNCTION  your function f(q, k, v, **keywords) taking NumPy (B, H, N, D) arrays
                   and the keyword names of kernattn.softmax_attention; the current
                   directory is importable
"""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `kernattn` command."""
    parser = argparse.ArgumentParser(
        prog="kernattn", description="Reference attention: check fast kernels against it."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "verify",
        help="check attention implementations against the loop oracle",
        description=VERIFY_DESCRIPTION,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("target", nargs="?", default=None, help="what to check (see above)")
    check.add_argument(
        "--variant",
        default="softmax",
        choices=sorted(verify.VARIANTS),
        help="attention family to check (default: softmax)",
    )
    check.add_argument(
        "--seed", type=int, default=0, help="seed of the random cases (default: 0)"
    )
    check.add_argument(
        "--cases",
        type=_non_negative_int,
        default=DEFAULT_CASE_COUNT,
        metavar="N",
        help=f"number of random cases, besides the edge cases (default: {DEFAULT_CASE_COUNT})",
    )
    check.add_argument(
        "--save-failures",
        type=Path,
        metavar="DIR",
        help="write each mismatching input to DIR as .npz, with the command that reruns it",
    )
    check.add_argument(
        "--replay",
        type=Path,
        action="append",
        metavar="FILE",
        help="check only the case saved in FILE by --save-failures (repeatable)",
    )
    check.add_argument(
        "--verbose", action="store_true", help="list every case, not only the ones that differ"
    )
    return parser


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; expected a count >= 0")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default: sys.argv[1:]) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help exits 0, a bad command line exits 2
        return int(exc.code or 0)
    return _run_verify(args)


def _run_verify(args: argparse.Namespace) -> int:
    variant = verify.VARIANTS[args.variant]
    try:
        targets = _targets(variant, args.target)
    except verify.PeerNotInstalled as exc:
        print(f"kernattn verify: {exc}", file=sys.stderr)
        return EXIT_PEER_MISSING
    except (ValueError, ImportError) as exc:
        print(f"kernattn verify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.replay:
        cases = [verify.load_case(path) for path in args.replay]
    else:
        cases = verify.build_cases(variant, args.seed, args.cases)
    print(f"kernattn verify: variant {variant.name}, {len(cases)} cases (seed {args.seed})")
    reports = verify.run_verify(variant, targets, cases)
    print()
    print(format_table(reports))
    for report in reports:
        details = format_details(report, verbose=args.verbose)
        if details:
            print()
            print(details)
    mismatches = sum(len(report.failures) for report in reports)
    if mismatches and args.save_failures is not None:
        print()
        _save_failures(reports, args)
    print()
    if mismatches:
        print(f"FAIL: {mismatches} mismatches")
        return EXIT_MISMATCH
    print("OK: no mismatches")
    return EXIT_OK


def _targets(variant: verify.Variant, target: str | None) -> list:
    if target is None:
        return variant.backend_targets()
    if target in variant.peers:
        return variant.peers[target]()
    if ":" not in target:
        names = ", ".join(sorted(variant.peers))
        raise ValueError(
            f"target is {target!r}; expected nothing (all backends), one of {names}, or "
            f"MODULE:FUNCTION"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # let `kernattn verify mymodule:f` find ./mymodule.py
    function = verify.import_function(target)
    return [verify.FunctionTarget(function, target)]


COLUMNS = (
    "variant", "target", "cases", "agree", "known diff", "not supported", "mismatch",
    "max abs error", "max rel error", "verdict",
)


def format_table(reports: list[verify.TargetReport]) -> str:
    """Return the summary table: one row per target."""
    rows = [COLUMNS]
    for report in reports:
        rows.append((
            report.variant,
            report.target,
            str(len(report.results)),
            str(report.count(verify.AGREE)),
            str(report.count(verify.DIFFERENCE)),
            str(report.count(verify.UNSUPPORTED)),
            str(report.count(verify.MISMATCH)),
            _format_error(report.max_abs_error),
            _format_error(report.max_rel_error),
            report.verdict,
        ))
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    lines = []
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _format_error(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2e}"


def format_details(report: verify.TargetReport, *, verbose: bool = False) -> str:
    """Return the notes, known differences, unsupported cases and mismatches of a target."""
    lines = []
    for note in report.notes:
        lines.append(f"  note: {note}")
    for difference in report.differences:
        names = [r.case.name for r in report.results if difference.name in r.differences]
        if names:
            lines.append(f"  known difference: {difference.name} ({len(names)} cases)")
            lines.append(f"    {difference.description}")
            lines.append(f"    cases: {', '.join(names)}")
    reasons: dict[str, int] = {}
    for result in report.results:
        if result.status == verify.UNSUPPORTED:
            reasons[result.detail] = reasons.get(result.detail, 0) + 1
    for reason, count in reasons.items():
        lines.append(f"  not supported ({count} cases): {reason}")
    for result in report.results:
        if result.status == verify.MISMATCH:
            lines.append(f"  MISMATCH {result.case.name} [{result.case.describe_shapes()}]")
            lines.append(f"    {result.detail}")
            if result.case.options:
                lines.append(f"    options: {result.case.options}")
        elif verbose:
            lines.append(
                f"  {result.status}: {result.case.name} [{result.case.describe_shapes()}] "
                f"abs error {_format_error(result.abs_error)}"
            )
    if not lines:
        return ""
    return "\n".join([f"{report.variant} / {report.target}:"] + lines)


def _save_failures(reports: list[verify.TargetReport], args: argparse.Namespace) -> None:
    directory: Path = args.save_failures
    directory.mkdir(parents=True, exist_ok=True)
    target_argument = f" {args.target}" if args.target else ""
    commands = []
    for report in reports:
        for result in report.failures:
            stem = _slug(f"{report.variant}-{report.target}-{result.case.name}")
            path = directory / f"{stem}.npz"
            command = (
                f"kernattn verify{target_argument} --variant {report.variant} --replay {path}"
            )
            references = {"command": np.array(command)}
            if result.reference is not None:
                references["reference_out"] = result.reference.out
                if result.reference.lse is not None:
                    references["reference_lse"] = result.reference.lse
            verify.save_case(path, result.case, references)
            commands.append(command)
    (directory / "reproduce.txt").write_text("\n".join(commands) + "\n")
    print(f"saved {len(commands)} failing inputs to {directory}; rerun one with:")
    for command in commands:
        print(f"  {command}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_")


if __name__ == "__main__":
    sys.exit(main())
