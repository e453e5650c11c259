"""Linear attention, elu+1, B=1 H=8 D=M=64, N in {1024, 4096, 16384} (65536 with --full).

Causal and non-causal, side by side in one run. kernattn's Numba and NumPy backends run
through `kernattn.linear_attention` (float64, feature map included), and the Numba kernel
also runs alone on features computed beforehand. PyTorch CPU formulations run when torch
is installed, in fp32 and fp64: cumulative sums of φ(k_j) v_jᵀ (O(N F M) memory, so only
up to `CUMSUM_MAX_N`) and chunks with a carried state.
Times are medians in ms; ratios are PyTorch time / Numba time (above 1: Numba is faster).
Results go to benchmarks/results/linear-<UTC time>.json.

Usage: python benchmarks/bench_linear.py [--full] [--repeats R] [--heads H]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernattn import linear_attention  # noqa: E402
from kernattn.bench import (  # noqa: E402
    _import_torch,
    gemm_gflops,
    machine_info,
    median_time,
    peak_memory_growth,
)
from kernattn.feature_maps import EluPlusOne  # noqa: E402

SIZES = (1024, 4096, 16384)
SIZES_FULL = SIZES + (65536,)
HEAD_DIM = 64  # D = M = F for elu+1
TORCH_CHUNK = 64
# The cumulative-sum formulation stores (B, H, N, F, M) twice: 1 GiB in fp32 at N = 4096.
CUMSUM_MAX_N = 4096
# The NumPy backend's chunked form loops over chunks in Python; it takes seconds per call
# at N = 65536, so it runs once there instead of `repeats` times.
NUMPY_SINGLE_RUN_N = 65536


# ---- PyTorch formulations ------------------------------------------------------------------


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


# ---- Suite ---------------------------------------------------------------------------------


def linear_suite(full: bool, repeats: int, heads: int) -> dict:
    """Time every implementation on the same inputs; return {"rows": [...]}."""
    torch = _import_torch()
    phi = EluPlusOne()
    rows = []
    for n in SIZES_FULL if full else SIZES:
        rng = np.random.default_rng(n)
        q, k, v = (0.5 * rng.standard_normal((1, heads, n, HEAD_DIM)) for _ in range(3))
        for causal in (True, False):
            row = {"N": n, "causal": causal, "B": 1, "H": heads, "D": HEAD_DIM}
            numba_out = linear_attention(q, k, v, phi, causal=causal, backend="numba")
            row["numba_fp64"] = measure(
                lambda: linear_attention(q, k, v, phi, causal=causal, backend="numba"), repeats
            )
            for dtype_name, dtype in (("fp64", np.float64), ("fp32", np.float32)):
                kernel_call = kernel_only(q, k, v, causal, dtype)
                row[f"numba_kernel_{dtype_name}"] = measure(kernel_call, repeats)
            numpy_repeats = 1 if n >= NUMPY_SINGLE_RUN_N else repeats
            row["numpy_fp64"] = measure(
                lambda: linear_attention(q, k, v, phi, causal=causal, form="chunked"),
                numpy_repeats,
            )
            if torch is not None:
                add_torch(row, torch, q, k, v, causal, numba_out, repeats)
            rows.append(row)
    return {"rows": rows}


def kernel_only(q, k, v, causal: bool, dtype):
    """Return a call of the Numba backend alone on features computed beforehand.

    The public call also evaluates and checks φ(q), φ(k) in NumPy (float64); this shows
    the kernel's share. float32 here is the kernel's float32 path, which the public
    wrapper does not select.
    """
    from kernattn._numba.linear import linear_attention as numba_twin
    from kernattn._validate import resolve_structure

    b, _, n, _ = q.shape
    phi = EluPlusOne()
    structure = resolve_structure(causal, None, None, None, None, b, n, n)
    phi_q, phi_k, values = (np.ascontiguousarray(x, dtype=dtype) for x in (phi(q), phi(k), v))
    options = dict(
        phi_q=phi_q, phi_k=phi_k, feature_map=phi, exact_inputs=None, structure=structure,
        form="parallel", chunk_size=64, initial_state=None, zero_denominator="raise", rtol=0.0,
    )
    return lambda: numba_twin(phi_q, phi_k, values, **options)


def add_torch(row, torch, q, k, v, causal, numba_out, repeats) -> None:
    """Add the PyTorch columns, and their largest difference from the Numba output."""
    formulations = {"torch_chunked": torch_chunked}
    if row["N"] <= CUMSUM_MAX_N:
        formulations["torch_cumsum"] = torch_cumsum
    for dtype_name, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        tq, tk, tv = (torch.from_numpy(x).to(dtype) for x in (q, k, v))
        for name, formulation in formulations.items():
            with torch.inference_mode():
                call = lambda: formulation(torch, tq, tk, tv, causal)  # noqa: E731
                result = measure(call, repeats)
                result["max_abs_diff_to_numba"] = float(
                    np.max(np.abs(call().double().numpy() - numba_out))
                )
            row[f"{name}_{dtype_name}"] = result


def measure(call, repeats: int) -> dict:
    return {"ms": 1e3 * median_time(call, repeats), "peak_mib": peak_memory_growth(call)}


def format_linear(result: dict) -> str:
    """Return the rows as a Markdown table: times in ms, then PyTorch / Numba ratios."""
    columns = [
        ("numba fp64", "numba_fp64"),
        ("numba kernel fp64", "numba_kernel_fp64"),
        ("numba kernel fp32", "numba_kernel_fp32"),
        ("NumPy fp64", "numpy_fp64"),
        ("torch cumsum fp32", "torch_cumsum_fp32"),
        ("torch chunked fp32", "torch_chunked_fp32"),
        ("torch cumsum fp64", "torch_cumsum_fp64"),
        ("torch chunked fp64", "torch_chunked_fp64"),
    ]
    header = ["causal", "N"] + [f"{label} ms" for label, _ in columns]
    header += ["best torch fp32 / numba", "best torch fp64 / numba",
               "best torch fp32 / numba kernel fp32", "numba peak MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["rows"]:
        cells = [str(row["causal"]), str(row["N"])]
        cells += [f"{row[key]['ms']:.1f}" if key in row else "-" for _, key in columns]
        ratios = (
            ("fp32", "numba_fp64"), ("fp64", "numba_fp64"), ("fp32", "numba_kernel_fp32"),
        )
        for precision, numba_key in ratios:
            times = [row[key]["ms"] for key in row if key.startswith("torch") and precision in key]
            cells.append(f"{min(times) / row[numba_key]['ms']:.2f}x" if times else "-")
        peak = row["numba_fp64"]["peak_mib"]
        cells.append("-" if peak is None else f"{peak:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="add N = 65536 (about a minute)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (median)")
    parser.add_argument("--heads", type=int, default=8, help="heads H (default 8)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results")
    args = parser.parse_args(argv)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, numba "
          f"{info.get('numba')} with {info.get('numba_threads')} threads, torch "
          f"{info['torch']}, OPENBLAS_CORETYPE={info['OPENBLAS_CORETYPE']}")
    for lib in info.get("blas") or []:
        print(f"BLAS: {Path(lib['filepath']).name} kernel {lib['architecture']}, "
              f"{lib['num_threads']} threads")
    reference = {"gemm_fp32_gflops": gemm_gflops(args.repeats)}
    print(f"reference: NumPy fp32 GEMM 2048^3 {reference['gemm_fp32_gflops']:.1f} GFLOP/s")
    result = linear_suite(args.full, args.repeats, args.heads)
    print()
    print(format_linear(result))
    results = {"machine": info, "reference": reference, "argv": list(sys.argv[1:]),
               "suites": {"linear": result}}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"linear-{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nresults saved to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
