"""Benchmarks behind `kernattn bench`: side-by-side tables, JSON results, optional plots.

Shape legend: B batch, Hq query heads, Hkv key/value heads, N queries, S keys, D head
dimension, L cache length. This module is the harness; the scripts in ``benchmarks/``
call it too. It prints because it is the body of a command (`run_bench` is called by
`kernattn.cli`); nothing else in the library imports it.

Every figure comes with the machine it was measured on and the reference speeds of that
machine measured in the same run (fp32 GEMM GFLOP/s with NumPy, memory bandwidth from a
large array copy), so ratios stay meaningful across machines. Times are the median of
several calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

SOFTMAX_SIZES = (256, 1024, 4096)
SOFTMAX_SIZES_FULL = SOFTMAX_SIZES + (16384,)
NUMPY_MAX_N = 4096  # the NumPy reference holds an (N, S) matrix per head: 2 GiB at 16384
DECODE_CONTEXTS = (1024, 2048, 4096, 8192)
DECODE_CONTEXTS_FULL = DECODE_CONTEXTS + (16384, 32768)
DECODE_BATCH, DECODE_D_MODEL, DECODE_HEADS = 8, 1024, 16
DECODE_VARIANTS = (("MHA", 16), ("GQA-4", 4), ("MQA", 1))  # (name, Hkv)
GEMM_SIZE = 2048
SETTLE_S = 0.3
COPY_BYTES = 512 * 2**20


# ---- Measurement --------------------------------------------------------------------------


def median_time(func: Callable[[], object], repeats: int) -> float:
    """Return the median wall time in seconds of `repeats` calls, after one warm-up call.

    It first sleeps `SETTLE_S`: OpenBLAS and OpenMP worker threads spin for a while after
    their last task, and on a 2-core machine spinning threads of the previous library
    halve the speed of the next one.
    """
    time.sleep(SETTLE_S)
    func()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def peak_memory_growth(func: Callable[[], object]) -> float | None:
    """Return how far the peak resident memory rose during func(), in MiB (Linux only).

    Writing 5 to /proc/self/clear_refs resets the peak (VmHWM) to the current resident
    size, so allocations of NumPy, Numba and PyTorch all count. None elsewhere.
    """
    try:
        _release_free_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_kib("VmRSS")
        func()
        return (_proc_status_kib("VmHWM") - before) / 1024
    except OSError:
        return None


def _release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc), so earlier cases do not hide growth."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} missing from /proc/self/status")


def gemm_gflops(repeats: int) -> float:
    """Return NumPy's fp32 GEMM speed on 2048^3 in GFLOP/s (all BLAS threads)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=np.float32)
    b = rng.standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=np.float32)
    return 2 * GEMM_SIZE**3 / median_time(lambda: a @ b, repeats) / 1e9


def copy_bandwidth(repeats: int) -> float:
    """Return memory bandwidth in GB/s from copying a 512 MiB array (read + write)."""
    src = np.ones(COPY_BYTES // 4, dtype=np.float32)
    dst = np.empty_like(src)
    return 2 * COPY_BYTES / median_time(lambda: np.copyto(dst, src), repeats) / 1e9


def machine_info() -> dict:
    """Return the CPU, thread counts and BLAS kernels in use, for every results file."""
    info = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
    }
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_threads"] = numba.get_num_threads()
    except ImportError:
        info["numba"] = None
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (the BLAS that Numba calls)
        from threadpoolctl import threadpool_info

        info["blas"] = [
            {key: lib.get(key) for key in ("filepath", "architecture", "version", "num_threads")}
            for lib in threadpool_info()
            if lib.get("user_api") == "blas"
        ]
    except ImportError:
        info["blas"] = None
    torch = _import_torch()
    info["torch"] = None if torch is None else torch.__version__
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _import_torch():
    """Return the torch module set to the Numba thread count, or None when absent."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count() or 1)))
    return torch


# ---- Softmax attention --------------------------------------------------------------------


def numpy_softmax_attention(q, k, v, causal: bool):
    """Plain NumPy attention in the input dtype, one materialised (N, S) matrix per head."""
    b, h, n, d = q.shape
    out = np.empty_like(q)
    scale = q.dtype.type(1.0 / math.sqrt(d))
    upper = np.triu(np.ones((n, k.shape[2]), dtype=bool), 1) if causal else None
    for bi in range(b):
        for hi in range(h):
            scores = (q[bi, hi] * scale) @ k[bi, hi].T
            if causal:
                scores[upper] = -np.inf
            scores -= scores.max(axis=1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=1, keepdims=True)
            out[bi, hi] = scores @ v[bi, hi]
    return out


def softmax_suite(full: bool, repeats: int, reference: dict) -> dict:
    """Time softmax forward, B=1, H=8, D=64: numba vs NumPy vs PyTorch SDPA."""
    from kernattn import softmax_attention

    torch = _import_torch()
    rows = []
    for n in SOFTMAX_SIZES_FULL if full else SOFTMAX_SIZES:
        rng = np.random.default_rng(n)
        base = [rng.standard_normal((1, 8, n, 64)) for _ in range(3)]
        for dtype in ("float32", "float64"):
            q, k, v = (x.astype(dtype) for x in base)
            for causal in (False, True):
                flops = 4 * 8 * n * n * 64 / (2 if causal else 1)
                runs = {
                    "numba": lambda: softmax_attention(
                        q, k, v, causal=causal or None, backend="numba"
                    ),
                }
                if n <= NUMPY_MAX_N:
                    runs["numpy"] = lambda: numpy_softmax_attention(q, k, v, causal)
                if torch is not None:
                    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
                    runs["torch"] = lambda: torch.nn.functional.scaled_dot_product_attention(
                        tq, tk, tv, is_causal=causal
                    )
                row = {"N": n, "dtype": dtype, "causal": causal}
                reps = repeats if n < 16384 else max(1, repeats // 3)
                for name, func in runs.items():
                    seconds = median_time(func, reps)
                    row[name] = {
                        "ms": seconds * 1e3,
                        "gflops": flops / seconds / 1e9,
                        "peak_mib": peak_memory_growth(func),
                    }
                numba_gflops = row["numba"]["gflops"]
                row["numba_vs_torch"] = (
                    numba_gflops / row["torch"]["gflops"] if "torch" in row else None
                )
                row["numba_vs_gemm"] = numba_gflops / reference["gemm_fp32_gflops"]
                rows.append(row)
    return {"rows": rows}


def format_softmax(result: dict) -> str:
    header = (
        "| N | dtype | causal | numba ms | numba GFLOP/s | NumPy GFLOP/s | torch GFLOP/s "
        "| numba / torch | numba / GEMM | peak MiB numba / NumPy / torch |"
    )
    lines = [header, "|" + "---|" * 10]
    for row in result["rows"]:
        def value(name, key, fmt):
            return fmt.format(row[name][key]) if name in row and row[name][key] is not None else "-"

        ratio = "-" if row["numba_vs_torch"] is None else f"{row['numba_vs_torch']:.2f}x"
        peaks = " / ".join(value(name, "peak_mib", "{:.0f}") for name in ("numba", "numpy", "torch"))
        lines.append(
            f"| {row['N']} | {row['dtype']} | {'yes' if row['causal'] else 'no'} "
            f"| {value('numba', 'ms', '{:.2f}')} | {value('numba', 'gflops', '{:.1f}')} "
            f"| {value('numpy', 'gflops', '{:.1f}')} | {value('torch', 'gflops', '{:.1f}')} "
            f"| {ratio} | {row['numba_vs_gemm']:.0%} | {peaks} |"
        )
    return "\n".join(lines)


# ---- Decode -------------------------------------------------------------------------------


def numpy_decode(q, k, v):
    """Plain NumPy grouped decode in the input dtype: (B, Hkv, G, D) x (B, Hkv, L, D)."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d) * q.dtype.type(1.0 / math.sqrt(d))
    scores = qg @ k.transpose(0, 1, 3, 2)  # (B, Hkv, G, L)
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return (scores @ v).reshape(b, hq, 1, v.shape[3])


def decode_suite(full: bool, repeats: int, reference: dict) -> dict:
    """Time one decode step (T = 1), batch 8, d_model 1024, 16 heads, fp32, per variant."""
    from kernattn import decode_attention

    torch = _import_torch()
    d = DECODE_D_MODEL // DECODE_HEADS
    rows = []
    for length in DECODE_CONTEXTS_FULL if full else DECODE_CONTEXTS:
        for variant, hkv in DECODE_VARIANTS:
            rng = np.random.default_rng(length + hkv)
            q = rng.standard_normal((DECODE_BATCH, DECODE_HEADS, 1, d), dtype=np.float32)
            k = rng.standard_normal((DECODE_BATCH, hkv, length, d), dtype=np.float32)
            v = rng.standard_normal((DECODE_BATCH, hkv, length, d), dtype=np.float32)
            lengths = np.full(DECODE_BATCH, length)
            cache_bytes = k.nbytes + v.nbytes
            runs = {
                "numba": lambda: decode_attention(q, k, v, kv_lengths=lengths, backend="numba"),
                "numpy": lambda: numpy_decode(q, k, v),
            }
            if torch is not None:
                tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
                runs["torch"] = lambda: torch.nn.functional.scaled_dot_product_attention(
                    tq, tk, tv, enable_gqa=True
                )
            row = {"context": length, "variant": variant, "kv_heads": hkv,
                   "cache_mib": cache_bytes / 2**20}
            for name, func in runs.items():
                seconds = median_time(func, repeats)
                row[name] = {
                    "ms": seconds * 1e3,
                    "tokens_per_s": DECODE_BATCH / seconds,
                    "gb_per_s": cache_bytes / seconds / 1e9,
                }
                row[name]["of_bandwidth"] = row[name]["gb_per_s"] / reference["copy_gb_per_s"]
            rows.append(row)
            del k, v
    return {"rows": rows}


def format_decode(result: dict) -> str:
    header = (
        "| context | variant | cache MiB | numba tokens/s | numba GB/s | numba % of bandwidth "
        "| NumPy tokens/s | torch tokens/s | torch % of bandwidth |"
    )
    lines = [header, "|" + "---|" * 9]
    for row in result["rows"]:
        def value(name, key, fmt):
            return fmt.format(row[name][key]) if name in row else "-"

        lines.append(
            f"| {row['context']} | {row['variant']} | {row['cache_mib']:.0f} "
            f"| {value('numba', 'tokens_per_s', '{:.0f}')} "
            f"| {value('numba', 'gb_per_s', '{:.1f}')} "
            f"| {value('numba', 'of_bandwidth', '{:.0%}')} "
            f"| {value('numpy', 'tokens_per_s', '{:.0f}')} "
            f"| {value('torch', 'tokens_per_s', '{:.0f}')} "
            f"| {value('torch', 'of_bandwidth', '{:.0%}')} |"
        )
    return "\n".join(lines)


# ---- Linear attention ---------------------------------------------------------------------


LINEAR_SIZES = (1024, 4096, 16384)
LINEAR_SIZES_FULL = LINEAR_SIZES + (65536,)
LINEAR_HEADS, LINEAR_DIM = 8, 64  # D = M = F for elu+1
TORCH_CHUNK = 64
# The cumulative-sum formulation stores (B, H, N, F, M) twice: 1 GiB in fp32 at N = 4096.
CUMSUM_MAX_N = 4096
# The NumPy backend's chunked form loops over chunks in Python; it takes seconds per call
# at N = 65536, so it runs once there instead of `repeats` times.
NUMPY_SINGLE_RUN_N = 65536


def torch_elu_features(torch, x):
    return torch.nn.functional.elu(x) + 1


def torch_cumsum(torch, q, k, v, causal: bool):
    """Prefix sums of φ(k_j) v_jᵀ over positions: (B, H, N, F, M) in memory."""
    pq, pk = torch_elu_features(torch, q), torch_elu_features(torch, k)
    if not causal:
        return torch_parallel(torch, pq, pk, v)
    states = torch.einsum("bhnf,bhnm->bhnfm", pk, v).cumsum(dim=2)
    num = torch.einsum("bhnf,bhnfm->bhnm", pq, states)
    den = torch.einsum("bhnf,bhnf->bhn", pq, pk.cumsum(dim=2))
    return num / den[..., None]


def torch_chunked(torch, q, k, v, causal: bool, chunk: int = TORCH_CHUNK):
    """Chunks of C queries: a masked (C, C) block inside, prefix states between chunks."""
    pq, pk = torch_elu_features(torch, q), torch_elu_features(torch, k)
    if not causal:
        return torch_parallel(torch, pq, pk, v)
    b, h, n, f = pq.shape
    m = v.shape[-1]
    pq_c = pq.reshape(b, h, n // chunk, chunk, f)  # (B, H, N/C, C, F)
    pk_c = pk.reshape(b, h, n // chunk, chunk, f)
    v_c = v.reshape(b, h, n // chunk, chunk, m)
    block = (pq_c @ pk_c.transpose(-1, -2)).tril()  # (B, H, N/C, C, C)
    chunk_s = pk_c.transpose(-1, -2) @ v_c  # (B, H, N/C, F, M)
    chunk_z = pk_c.sum(dim=3)  # (B, H, N/C, F)
    before_s = chunk_s.cumsum(dim=2) - chunk_s  # state of the keys before each chunk
    before_z = chunk_z.cumsum(dim=2) - chunk_z
    num = pq_c @ before_s + block @ v_c
    den = (pq_c @ before_z[..., None])[..., 0] + block.sum(dim=-1)
    return (num / den[..., None]).reshape(b, h, n, m)


def torch_parallel(torch, pq, pk, v):
    """Non-causal: S = φ(K)ᵀ V and z = Σ φ(k_j) once, then φ(Q) S / φ(Q) z."""
    state_s = pk.transpose(-1, -2) @ v  # (B, H, F, M)
    state_z = pk.sum(dim=2)  # (B, H, F)
    return (pq @ state_s) / (pq @ state_z[..., None])


def linear_suite(full: bool, repeats: int, reference: dict) -> dict:
    """Time causal and non-causal linear attention (elu+1, B = 1, H = 8, D = M = 64).

    kernattn's Numba backend in fp32 and fp64 and its NumPy backend (fp64, chunked form)
    run through `kernattn.linear_attention`, feature map included; PyTorch CPU runs a
    cumulative-sum formulation (up to `CUMSUM_MAX_N`) and a chunked one, in fp32 and fp64.
    """
    from kernattn import linear_attention
    from kernattn.feature_maps import EluPlusOne

    torch = _import_torch()
    phi = EluPlusOne()
    rows = []
    for n in LINEAR_SIZES_FULL if full else LINEAR_SIZES:
        rng = np.random.default_rng(n)
        q, k, v = (0.5 * rng.standard_normal((1, LINEAR_HEADS, n, LINEAR_DIM)) for _ in range(3))
        for causal in (True, False):
            row = {"N": n, "causal": causal, "B": 1, "H": LINEAR_HEADS, "D": LINEAR_DIM}
            numba_out = linear_attention(q, k, v, phi, causal=causal, backend="numba")
            for dtype_name, dtype in (("fp32", np.float32), ("fp64", np.float64)):
                qq, kk, vv = (x.astype(dtype) for x in (q, k, v))
                row[f"numba_{dtype_name}"] = _measure(
                    lambda: linear_attention(qq, kk, vv, phi, causal=causal, backend="numba"),
                    repeats,
                )
            numpy_repeats = 1 if n >= NUMPY_SINGLE_RUN_N else repeats
            row["numpy_fp64"] = _measure(
                lambda: linear_attention(q, k, v, phi, causal=causal, form="chunked"),
                numpy_repeats,
            )
            if torch is not None:
                _add_torch_linear(row, torch, q, k, v, causal, numba_out, repeats)
            rows.append(row)
    return {"rows": rows}


def _add_torch_linear(row, torch, q, k, v, causal, numba_out, repeats) -> None:
    """Add the PyTorch columns, and their largest difference from the Numba output."""
    formulations = {"torch_chunked": torch_chunked}
    if row["N"] <= CUMSUM_MAX_N:
        formulations["torch_cumsum"] = torch_cumsum
    for dtype_name, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        tq, tk, tv = (torch.from_numpy(x).to(dtype) for x in (q, k, v))
        for name, formulation in formulations.items():
            with torch.inference_mode():
                call = lambda: formulation(torch, tq, tk, tv, causal)  # noqa: E731
                result = _measure(call, repeats)
                result["max_abs_diff_to_numba"] = float(
                    np.max(np.abs(call().double().numpy() - numba_out))
                )
            row[f"{name}_{dtype_name}"] = result


def _measure(call, repeats: int) -> dict:
    return {"ms": 1e3 * median_time(call, repeats), "peak_mib": peak_memory_growth(call)}


def format_linear(result: dict) -> str:
    """Return the rows as a Markdown table: times in ms, then PyTorch / Numba ratios."""
    columns = [
        ("numba fp32", "numba_fp32"),
        ("numba fp64", "numba_fp64"),
        ("NumPy fp64", "numpy_fp64"),
        ("torch cumsum fp32", "torch_cumsum_fp32"),
        ("torch chunked fp32", "torch_chunked_fp32"),
        ("torch cumsum fp64", "torch_cumsum_fp64"),
        ("torch chunked fp64", "torch_chunked_fp64"),
    ]
    header = ["causal", "N"] + [f"{label} ms" for label, _ in columns]
    header += ["best torch fp32 / numba fp32", "best torch fp64 / numba fp64",
               "numba fp32 peak MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["rows"]:
        cells = [str(row["causal"]), str(row["N"])]
        cells += [f"{row[key]['ms']:.1f}" if key in row else "-" for _, key in columns]
        for precision in ("fp32", "fp64"):
            times = [row[key]["ms"] for key in row
                     if key.startswith("torch") and key.endswith(precision)]
            numba_ms = row[f"numba_{precision}"]["ms"]
            cells.append(f"{min(times) / numba_ms:.2f}x" if times else "-")
        peak = row["numba_fp32"]["peak_mib"]
        cells.append("-" if peak is None else f"{peak:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- Compilation --------------------------------------------------------------------------

_COMPILE_PROBE = """
import json, time
start = time.perf_counter()
import numpy as np
import kernattn
imported = time.perf_counter()
import numba
numba_imported = time.perf_counter()
q = np.ones((1, 1, 8, 4), dtype=np.float32)
kernattn.softmax_attention(q, q, q, backend="numba")
softmax_done = time.perf_counter()
kernattn.decode_attention(q, q, q, kv_lengths=[8], backend="numba")
decode_done = time.perf_counter()
print(json.dumps({
    "import_kernattn_s": imported - start,
    "import_numba_s": numba_imported - imported,
    "softmax_first_call_s": softmax_done - numba_imported,
    "decode_first_call_s": decode_done - softmax_done,
}))
"""


def compile_suite(full: bool, repeats: int, reference: dict) -> dict:
    """Time first calls in fresh processes: with an empty Numba cache, then a warm one."""
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
        for state in ("compile (empty cache)", "cached load", "cached load"):
            result = subprocess.run(
                [sys.executable, "-c", textwrap.dedent(_COMPILE_PROBE)], env=env,
                capture_output=True, text=True, timeout=900,
            )
            if result.returncode != 0:
                raise RuntimeError(f"compile probe failed:\n{result.stderr}")
            rows.append({"state": state, **json.loads(result.stdout)})
    return {"rows": rows}


def format_compile(result: dict) -> str:
    lines = [
        "| state | import kernattn s | import numba s | softmax first call s "
        "| decode first call s |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['state']} | {row['import_kernattn_s']:.3f} | {row['import_numba_s']:.3f} "
            f"| {row['softmax_first_call_s']:.3f} | {row['decode_first_call_s']:.3f} |"
        )
    return "\n".join(lines)


# ---- Command ------------------------------------------------------------------------------

SUITES = {
    "softmax": (softmax_suite, format_softmax),
    "decode": (decode_suite, format_decode),
    "linear": (linear_suite, format_linear),
    "compile": (compile_suite, format_compile),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kernattn bench",
        description="Time kernattn's Numba kernels beside NumPy and PyTorch (when "
        "installed) on this machine; print tables and save JSON.",
    )
    parser.add_argument(
        "suites", nargs="*", choices=[*SUITES, "all"], default=["all"],
        help="what to time (default: all)",
    )
    parser.add_argument(
        "--full", action="store_true",
        help="add the largest sizes: softmax N = 16384, decode contexts 16k and 32k, "
        "linear N = 65536 (several minutes)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (median)")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks") / "results",
        help="folder for the JSON results (default: benchmarks/results)",
    )
    return parser


def run_bench(argv: Sequence[str] | None = None, stream=None) -> int:
    """Run the benchmark command line `argv`; print tables to `stream`; return 0."""
    stream = stream or sys.stdout
    args = build_parser().parse_args(argv)
    names = list(SUITES) if "all" in args.suites else list(dict.fromkeys(args.suites))
    # PyTorch imported after Numba's OpenMP threading layer has started ran about 5x
    # slower in trials on a 2-core machine (two OpenMP runtimes), so import it first.
    _import_torch()
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, "
          f"numba {info.get('numba')} with {info.get('numba_threads')} threads, "
          f"torch {info['torch']}, OPENBLAS_CORETYPE={info['OPENBLAS_CORETYPE']}", file=stream)
    for lib in info.get("blas") or []:
        print(f"BLAS: {Path(lib['filepath']).name} kernel {lib['architecture']} "
              f"version {lib['version']}, {lib['num_threads']} threads", file=stream)
    reference = {
        "gemm_fp32_gflops": gemm_gflops(args.repeats),
        "copy_gb_per_s": copy_bandwidth(args.repeats),
    }
    print(f"reference: NumPy fp32 GEMM {GEMM_SIZE}^3 {reference['gemm_fp32_gflops']:.1f} "
          f"GFLOP/s; array copy {reference['copy_gb_per_s']:.1f} GB/s", file=stream)
    results = {"machine": info, "reference": reference, "argv": list(argv or []), "suites": {}}
    for name in names:
        suite, formatter = SUITES[name]
        result = suite(args.full, args.repeats, reference)
        results["suites"][name] = result
        print(f"\n## {name}\n", file=stream)
        if "skipped" in result:
            print(f"skipped: {result['skipped']}", file=stream)
        else:
            print(formatter(result), file=stream)
    try:
        import numba

        info["numba_threading_layer"] = numba.threading_layer()
    except (ImportError, ValueError):  # ValueError: no parallel kernel has run
        pass
    path = save_results(results, args.out)
    print(f"\nresults saved to {path}", file=stream)
    plot = save_plot(results, path.with_suffix(".png"))
    if plot is not None:
        print(f"plot saved to {plot}", file=stream)
    return 0


def save_results(results: dict, folder: Path) -> Path:
    """Write `results` as JSON to folder/bench-<UTC time>.json and return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"bench-{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def save_plot(results: dict, path: Path) -> Path | None:
    """Plot softmax GFLOP/s and decode GB/s when matplotlib is installed; return the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    suites = results["suites"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = [
        ("softmax", "N", "gflops", "softmax forward fp32, B=1 H=8 D=64 (GFLOP/s)"),
        ("decode", "context", "gb_per_s", "decode fp32 MHA, batch 8, 16 heads (GB/s)"),
    ]
    for ax, (suite, x_key, y_key, title) in zip(axes, panels):
        rows = suites.get(suite, {}).get("rows", [])
        if suite == "softmax":
            rows = [r for r in rows if r["dtype"] == "float32" and not r["causal"]]
        else:
            rows = [r for r in rows if r["variant"] == "MHA"]
        for impl in ("numba", "numpy", "torch"):
            points = [(r[x_key], r[impl][y_key]) for r in rows if impl in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
