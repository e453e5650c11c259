"""The `kernattn` command line. This is the only module of kernattn that prints.

    kernattn verify                           every backend of every variant against
                                              the loop oracle
    kernattn verify jax | torch               a peer library against the loop oracle
    kernattn verify MODULE:FUNCTION           a user's function against the loop oracle
    kernattn check-feature-map MODULE:OBJECT  report on a user's feature map
    kernattn bench [...]                      benchmarks (kernattn.bench.run_bench)
    kernattn --version                        the installed version
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np

import kernattn
from kernattn import verify
from kernattn.verify.names import FEATURE_MAP_NAMES, is_feature_map_name
from kernattn.verify.shrink import describe

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2  # also argparse's code for a bad command line
EXIT_PEER_MISSING = 3
EXIT_BACKEND_IMPORT = 4

EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK}  every case agrees, or differs only by a documented convention, or is not
     supported by the target; a backend that cannot run on this machine (cuda
     without a GPU) is reported as not run
  {EXIT_MISMATCH}  at least one mismatch (a real disagreement with the oracle)
  {EXIT_USAGE}  invalid command line, unknown variant, MODULE:FUNCTION not importable, or a
     --replay FILE that is missing, is not a saved case, or conflicts with --variant
  {EXIT_PEER_MISSING}  the peer library (jax or torch) is not installed
  {EXIT_BACKEND_IMPORT}  a kernattn backend (or the loop oracle) failed to import, so kernattn's
     installation is broken; reinstall it. Takes precedence over {EXIT_MISMATCH}.
"""

REINSTALL_HINT = (
    "reinstall kernattn (pip install --force-reinstall kernattn, or pip install -e . in "
    "a source checkout), and remove any stale copy of kernattn that Python finds first"
)

FEATURE_MAP_HELP = "feature-map names: " + ", ".join(FEATURE_MAP_NAMES)

VERIFY_DESCRIPTION = """\
Check attention implementations against kernattn's explicit-loop oracle on seeded
random inputs and on a catalogue of edge cases with exact expected values.

TARGET is one of:
  (none)           every kernattn backend except the oracle, with float64 and float32
                   input, for every variant unless --variant names one
  jax              jax.nn.dot_product_attention (softmax)
  torch            torch.nn.functional.scaled_dot_product_attention (softmax)
  MODULE:FUNCTION  your function, taking NumPy float64 (B, H, N, D) arrays; the current
                   directory is importable. By variant:
                     softmax     f(q, k, v, **keywords of kernattn.softmax_attention)
                     similarity  f(q, k, v, sim, **keywords of similarity_attention)
                     linear      f(q, k, v, **keywords of linear_attention), with
                                 feature_map= only if f has that parameter; otherwise
                                 --feature-map names the map f computes
                     decode      f(q, k_cache, v_cache, kv_lengths=..., **scale and
                                 softcap when the case sets them)

A mismatching case is shrunk to the smallest input that still fails (unless
--no-shrink); --save-failures writes that input and a command that reruns it.
"""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `kernattn` command."""
    parser = argparse.ArgumentParser(
        prog="kernattn", description="Reference attention: check fast kernels against it."
    )
    parser.add_argument(
        "--version", action="version", version=f"kernattn {kernattn.__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "verify",
        help="check attention implementations against the loop oracle",
        description=VERIFY_DESCRIPTION,
        epilog=EXIT_CODES_HELP + "\n" + FEATURE_MAP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("target", nargs="?", default=None, help="what to check (see above)")
    check.add_argument(
        "--variant",
        default=None,
        choices=sorted(verify.VARIANTS),
        help="attention family to check (default: every variant without a TARGET, "
        "softmax with one, the saved one with --replay)",
    )
    check.add_argument(
        "--feature-map",
        metavar="NAME",
        help="linear variant: use this feature map in every case, e.g. elu+1, relu, "
        "polynomial:2, taylor, favor:64 (names listed below)",
    )
    check.add_argument(
        "--seed", type=int, default=0, help="seed of the random cases (default: 0)"
    )
    check.add_argument(
        "--cases",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="number of random cases per variant, besides the edge cases (default: "
        + ", ".join(f"{name} {variant.default_case_count}"
                    for name, variant in verify.VARIANTS.items())
        + ")",
    )
    check.add_argument(
        "--save-failures",
        type=Path,
        metavar="DIR",
        help="write each mismatching input (shrunk) to DIR as .npz, with the command "
        "that reruns it",
    )
    check.add_argument(
        "--replay",
        type=Path,
        action="append",
        metavar="FILE",
        help="check only the case saved in FILE by --save-failures (repeatable); the "
        "variant is the one stored in FILE",
    )
    check.add_argument(
        "--no-shrink", action="store_true", help="report mismatches without shrinking them"
    )
    check.add_argument(
        "--progress",
        action="store_true",
        help="report progress on stderr even when it is not a terminal",
    )
    check.add_argument(
        "--verbose", action="store_true", help="list every case, not only the ones that differ"
    )
    feature_map = commands.add_parser(
        "check-feature-map",
        help="check a feature map's shapes, kernel identity and signs",
        description="Load a feature map and print kernattn.testing.check_feature_map's "
        "report. OBJECT is a FeatureMap instance, a FeatureMap class (called without "
        "arguments) or a callable (..., D) -> (..., F); a name without ':' is a "
        "built-in map. Exit code 0 when every check passes, 1 when one fails, 2 when "
        "OBJECT or the kernel cannot be loaded.",
        epilog=FEATURE_MAP_HELP,
    )
    feature_map.add_argument("object", metavar="MODULE:OBJECT", help="the feature map")
    feature_map.add_argument(
        "--kernel",
        metavar="MODULE:FUNCTION",
        help="kernel(x, y) that φ(x)·φ(y) must equal (or estimate, for a random map); "
        "default: the map's own kernel method",
    )
    feature_map.add_argument(
        "--positive", action="store_true", help="claim that every feature is positive"
    )
    feature_map.add_argument(
        "--seed", type=int, default=0, help="seed of the inputs the checks draw (default: 0)"
    )
    commands.add_parser(
        "bench",
        help="run the benchmarks (arguments go to kernattn.bench)",
        add_help=False,
    )
    return parser


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; expected a count >= 0")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default: sys.argv[1:]) and return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Every later argument, --help included, belongs to the benchmark runner.
        return _run_bench(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help exits 0, a bad command line exits 2
        return int(exc.code or 0)
    if args.command == "check-feature-map":
        return _run_check_feature_map(args)
    return _run_verify(args)


def _run_bench(argv: list[str]) -> int:
    try:
        bench = importlib.import_module("kernattn.bench")
    except ModuleNotFoundError as exc:
        if exc.name != "kernattn.bench":
            raise
        print(
            "kernattn bench: this installation of kernattn has no benchmark runner "
            "(module kernattn.bench is missing); install a kernattn version that "
            "includes it",
            file=sys.stderr,
        )
        return EXIT_USAGE
    run_bench = getattr(bench, "run_bench", None)
    if run_bench is None:
        print("kernattn bench: module kernattn.bench has no function run_bench(argv)",
              file=sys.stderr)
        return EXIT_USAGE
    return int(run_bench(argv) or 0)


def _run_check_feature_map(args: argparse.Namespace) -> int:
    from kernattn.testing import check_feature_map

    _current_directory_importable()
    try:
        feature_map = load_feature_map(args.object)
        kernel = None if args.kernel is None else verify.import_function(args.kernel)
    except (ValueError, ImportError, TypeError) as exc:
        print(f"kernattn check-feature-map: {exc}", file=sys.stderr)
        return EXIT_USAGE
    report = check_feature_map(
        feature_map, kernel, positive=True if args.positive else None, random_state=args.seed
    )
    print(report)
    return EXIT_OK if report.passed else EXIT_MISMATCH


def load_feature_map(spec: str):
    """Return the feature map that ``MODULE:OBJECT`` or a built-in name refers to.

    A built-in name (see `kernattn.verify.names`) wins over a module of the same name.

    A class is instantiated without arguments; an instance or a plain callable is
    returned as it is.

    Raises
    ------
    ValueError, ImportError
        `spec` cannot be imported or is not a feature map.
    TypeError
        A class that cannot be called without arguments.
    """
    if ":" not in spec or is_feature_map_name(spec):
        return verify.feature_map_from_name(spec)
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"feature map is {spec!r}; expected MODULE:OBJECT or a built-in name")
    obj = importlib.import_module(module_name)
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type):
        try:
            obj = obj()
        except TypeError as exc:
            raise TypeError(
                f"{spec} is a class that cannot be called without arguments ({exc}); "
                f"point to an instance instead"
            ) from exc
    if not callable(obj):
        raise ValueError(f"{spec} is a {type(obj).__name__}; expected a feature map or a callable")
    return obj


def _current_directory_importable() -> None:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # let `kernattn verify mymodule:f` find ./mymodule.py


class ProgressLine:
    """Write progress to `stream`: one rewritten line on a terminal, else one line per step.

    Off unless `stream` is a terminal or `forced`.
    """

    def __init__(self, stream: TextIO, forced: bool = False):
        self.stream = stream
        self.terminal = stream.isatty()
        self.enabled = self.terminal or forced
        self.last_label = ""

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.terminal:
            text = f"{label}: {done}/{total}" if total else label
            self.stream.write("\r\033[K" + text[:150])
            self.stream.flush()
        elif total == 0 or (done == total and label != self.last_label):
            self.stream.write(f"{label}: {done}/{total} cases\n" if total else f"{label}\n")
            self.last_label = label

    def close(self) -> None:
        if self.enabled and self.terminal:
            self.stream.write("\r\033[K")
            self.stream.flush()


class UsageError(Exception):
    """A mistake on the command line, reported in one line with exit code 2."""


def _variant_names(args: argparse.Namespace) -> list[str]:
    """Return the variants to run: the one named, else all without a target."""
    if args.variant is not None:
        return [args.variant]
    if args.feature_map is not None:
        return ["linear"]
    if args.target is not None:
        return ["softmax"]
    return list(verify.VARIANTS)


def _replay_cases(args: argparse.Namespace) -> dict[str, list[verify.Case]]:
    """Return the cases saved in the --replay files, grouped by their stored variant.

    Raises
    ------
    UsageError
        A file cannot be read as a saved case, or its variant conflicts with
        --variant or --feature-map.
    """
    grouped: dict[str, list[verify.Case]] = {}
    names: set[str] = set()
    for path in args.replay:
        try:
            variant, case = verify.load_replay(path)
        except verify.CaseFileError as exc:
            raise UsageError(str(exc)) from exc
        if args.variant is not None and variant.name != args.variant:
            raise UsageError(
                f"--variant {args.variant} conflicts with {path}, which contains a "
                f"{variant.name} case; drop --variant or pass --variant {variant.name}"
            )
        if args.feature_map is not None and variant.name != "linear":
            raise UsageError(
                f"--feature-map applies only to linear cases, and {path} contains a "
                f"{variant.name} case"
            )
        if case.name in names:  # the oracle's outputs are stored by case name
            case = replace(case, name=f"{case.name} ({path})")
        names.add(case.name)
        grouped.setdefault(variant.name, []).append(case)
    return {name: grouped[name] for name in verify.VARIANTS if name in grouped}


def _generated_cases(variant: verify.Variant, args: argparse.Namespace) -> list[verify.Case]:
    """Return the edge cases and the seeded random cases of a run without --replay."""
    if args.feature_map is None:
        return verify.build_cases(variant, args.seed, args.cases)
    count = variant.default_case_count if args.cases is None else args.cases
    cases = verify.linear_cases.edge_cases(args.feature_map)
    return cases + verify.linear_cases.random_cases(args.seed, count, args.feature_map)


def _verify_plans(args: argparse.Namespace) -> list[tuple[verify.Variant, list, list]]:
    """Return (variant, targets, cases) for each variant to run.

    Raises
    ------
    UsageError
        An invalid combination of options, a target or feature map that cannot be
        loaded, or a --replay file that cannot be used.
    PeerNotInstalled
        The peer library named as target is missing.
    """
    if args.replay:
        grouped: dict[str, list | None] = dict(_replay_cases(args))
    else:
        grouped = {name: None for name in _variant_names(args)}
    if args.feature_map is not None and list(grouped) != ["linear"]:
        raise UsageError("--feature-map applies only to --variant linear")
    plans = []
    for name, cases in grouped.items():
        variant = verify.VARIANTS[name]
        try:
            targets = _targets(variant, args.target, args.feature_map)
            if args.feature_map is not None:
                verify.feature_map_from_name(args.feature_map)
        except (verify.PeerNotInstalled, verify.BackendImportError):
            raise
        except (ValueError, ImportError) as exc:
            raise UsageError(str(exc)) from exc
        if cases is None:
            cases = _generated_cases(variant, args)
        plans.append((variant, targets, cases))
    return plans


def _run_verify(args: argparse.Namespace) -> int:
    try:
        plans = _verify_plans(args)
    except verify.PeerNotInstalled as exc:
        print(f"kernattn verify: {exc}", file=sys.stderr)
        return EXIT_PEER_MISSING
    except UsageError as exc:
        print(f"kernattn verify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except verify.BackendImportError as exc:
        print(f"kernattn verify: {exc}; {REINSTALL_HINT}", file=sys.stderr)
        return EXIT_BACKEND_IMPORT
    progress = ProgressLine(sys.stderr, args.progress)
    reports = []
    for variant, targets, cases in plans:
        source = "replayed" if args.replay else f"seed {args.seed}"
        print(f"kernattn verify: variant {variant.name}, {_count(len(cases), 'case')} ({source})")
        reports += verify.run_verify(
            variant, targets, cases, shrink=not args.no_shrink, progress=progress
        )
    progress.close()
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
    return _print_verdict(reports, mismatches)


def _print_verdict(reports: list[verify.TargetReport], mismatches: int) -> int:
    """Print the last lines of a verify run and return its exit code."""
    broken = sum(report.import_failed for report in reports)
    not_run = sum(report.not_run is not None for report in reports) - broken
    if broken:
        location = Path(kernattn.__file__).parent
        print(
            f"ERROR: {_count(broken, 'target')} could not run because a kernattn backend "
            f"failed to import (kernattn imported from {location})"
        )
        print(f"  {REINSTALL_HINT}")
    if mismatches:
        print(f"FAIL: {_count(mismatches, 'mismatch', 'mismatches')}")
    elif not broken:
        skipped = f" ({_count(not_run, 'target')} not run, see above)" if not_run else ""
        print(f"OK: no mismatches{skipped}")
    if broken:
        return EXIT_BACKEND_IMPORT
    return EXIT_MISMATCH if mismatches else EXIT_OK


def _count(count: int, singular: str, plural: str | None = None) -> str:
    """Return '1 case', '2 cases' and so on; `plural` defaults to `singular` + 's'."""
    word = singular if count == 1 else (plural or singular + "s")
    return f"{count} {word}"


def _targets(variant: verify.Variant, target: str | None, feature_map: str | None) -> list:
    if target is None:
        return variant.backend_targets()
    if target in variant.peers:
        return variant.peers[target]()
    if ":" not in target:
        peers = [name for name in verify.PEERS if name in variant.peers]
        choices = ", ".join(peers + ["MODULE:FUNCTION"])
        raise ValueError(
            f"target is {target!r}; expected nothing (all backends) or, for variant "
            f"{variant.name}, one of {choices}"
        )
    _current_directory_importable()
    function = verify.import_function(target)
    if (
        variant.name == "linear"
        and feature_map is None
        and not verify.linear_cases.takes_feature_map(function)
    ):
        raise ValueError(
            f"{target} has no feature_map parameter, so its feature map is built in; "
            f"name it with --feature-map NAME ({', '.join(FEATURE_MAP_NAMES)})"
        )
    return [variant.function_target(function, target)]


COLUMNS = (
    "variant", "target", "cases", "agree", "known diff", "not supported", "mismatch",
    "max abs error", "max rel error", "verdict",
)


def format_table(reports: list[verify.TargetReport]) -> str:
    """Return the summary table: one row per target."""
    rows = [COLUMNS]
    for report in reports:
        measured = report.count(verify.AGREE) > 0
        rows.append((
            report.variant,
            report.target,
            str(len(report.results)),
            str(report.count(verify.AGREE)),
            str(report.count(verify.DIFFERENCE)),
            str(report.count(verify.UNSUPPORTED)),
            str(report.count(verify.MISMATCH)),
            _format_error(report.max_abs_error) if measured else "-",
            _format_error(report.max_rel_error) if measured else "-",
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
    if report.not_run is not None:
        label = "error" if report.import_failed else "not run"
        checked = "no case was checked"
        if report.results:
            checked = f"stopped after {_count(len(report.results), 'case')}"
        lines.append(f"  {label}: {report.not_run} ({checked})")
    for note in report.notes:
        lines.append(f"  note: {note}")
    for difference in report.differences:
        names = [r.case.name for r in report.results if difference.name in r.differences]
        if names:
            lines.append(f"  known difference: {difference.name} ({_count(len(names), 'case')})")
            lines.append(f"    {difference.description}")
            lines.append(f"    cases: {', '.join(names)}")
    reasons: dict[str, int] = {}
    for result in report.results:
        if result.status == verify.UNSUPPORTED:
            reasons[result.detail] = reasons.get(result.detail, 0) + 1
    for reason, count in reasons.items():
        lines.append(f"  not supported ({_count(count, 'case')}): {reason}")
    for result in report.results:
        if result.status == verify.MISMATCH:
            lines.append(f"  MISMATCH {result.case.name} [{result.case.describe_shapes()}]")
            lines.append(f"    {result.detail}")
            if result.case.options:
                lines.append(f"    options: {result.case.options}")
            shrunk = result.shrunk
            if shrunk is not None and shrunk.steps:
                steps = _count(len(shrunk.steps), "step")
                tries = _count(shrunk.attempts, "try", "tries")
                lines.append(f"    shrunk in {steps} ({tries}) to [{describe(shrunk.case)}]")
                lines.append(f"    {shrunk.result.detail}")
        elif verbose:
            lines.append(
                f"  {result.status}: {result.case.name} [{result.case.describe_shapes()}] "
                f"abs error {_format_error(result.abs_error)}"
            )
    if not lines:
        return ""
    return "\n".join([f"{report.variant} / {report.target}:"] + lines)


def _save_failures(reports: list[verify.TargetReport], args: argparse.Namespace) -> None:
    """Write the smallest failing input of each mismatch, and the command that reruns it."""
    directory: Path = args.save_failures
    directory.mkdir(parents=True, exist_ok=True)
    target_argument = f" {args.target}" if args.target else ""
    feature_map = f" --feature-map {args.feature_map}" if args.feature_map else ""
    commands = []
    for report in reports:
        for result in report.failures:
            case, reference = result.case, result.reference
            if result.shrunk is not None:
                case, reference = result.shrunk.case, result.shrunk.result.reference
            stem = _slug(f"{report.variant}-{report.target}-{result.case.name}")
            path = directory / f"{stem}.npz"
            command = (
                f"kernattn verify{target_argument} --variant {report.variant}{feature_map} "
                f"--replay {path}"
            )
            references = {"command": np.array(command), "original": np.array(result.case.name)}
            if reference is not None and reference.out is not None:
                references["reference_out"] = reference.out
                if reference.lse is not None:
                    references["reference_lse"] = reference.lse
            verify.save_case(path, case, references, variant=report.variant)
            commands.append(command)
    (directory / "reproduce.txt").write_text("\n".join(commands) + "\n")
    print(f"saved {_count(len(commands), 'failing input')} to {directory}; rerun one with:")
    for command in commands:
        print(f"  {command}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_")


if __name__ == "__main__":
    sys.exit(main())
