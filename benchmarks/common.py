"""Shared entry point of the benchmark scripts: run one suite of `kernattn.bench`.

The scripts work from a source checkout without installing kernattn: the repository root
goes first on ``sys.path``. Results are saved under ``benchmarks/results/`` (not tracked
by git). A suite's options are those of ``kernattn bench --help``; for example
``python benchmarks/bench_softmax.py --full`` adds N = 16384.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def main(suite: str) -> int:
    """Run `kernattn bench SUITE` with this script's command-line options."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from kernattn.bench import run_bench

    argv = sys.argv[1:]
    if "--out" not in argv:
        argv = [*argv, "--out", str(RESULTS)]
    return run_bench([suite, *argv])
