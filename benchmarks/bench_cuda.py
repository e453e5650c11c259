"""Time the CUDA kernels on a GPU: softmax forward, causal linear attention, decode.

Usage: ``python benchmarks/bench_cuda.py [--quick] [--out DIR]``. Prints one table per
suite and saves every figure, with the GPU's name, to ``DIR/cuda-<UTC time>.json``
(default ``benchmarks/results``). Needs a GPU: under Numba's CUDA simulator timings
mean nothing, so the script refuses to run there.

- softmax: B = 1, Hq = Hkv = 8, D = M = 64, N = S in {1024, 4096, 16384, 32768}, causal
  and not, float32 and float64; device arrays in and out (no host copies timed).
  GFLOP/s count 4 B H N S D (half for causal).
- linear: elu+1, causal, B = 1, H = 8, D = M = 64, N up to 32768; the whole public call,
  including the host feature map and the copies, as a user sees it.
- decode: batch 8, 16 query heads, D = 64 (d_model 1024), one new token, contexts
  1k .. 32k, MHA / GQA (4 key/value heads) / MQA; GB/s count the key/value cache bytes
  read (B Hkv L (D + M) itemsize).

Each figure is the median of `REPEATS` timed calls after one untimed call (which
compiles the kernel).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REPEATS = 5
SOFTMAX_N = [1024, 4096, 16384, 32768]
LINEAR_N = [1024, 4096, 16384, 32768]
DECODE_CONTEXTS = [1024, 4096, 16384, 32768]
QUICK_N = [1024, 4096]


def timed(func) -> float:
    """Return the median wall time of `REPEATS` calls of `func` (after a warm-up call)."""
    from numba import cuda

    func()
    cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        func()
        cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_softmax(sizes):
    from numba import cuda

    from kernattn import softmax_attention

    rows = []
    rng = np.random.default_rng(0)
    b, h, d = 1, 8, 64
    for dtype in (np.float32, np.float64):
        for n in sizes:
            q, k, v = (cuda.to_device(rng.standard_normal((b, h, n, d)).astype(dtype))
                       for _ in range(3))
            for causal in (None, "top_left"):
                seconds = timed(lambda: softmax_attention(q, k, v, causal=causal,
                                                          backend="cuda"))
                flops = 4 * b * h * n * n * d / (2 if causal else 1)
                rows.append(dict(suite="softmax", dtype=np.dtype(dtype).name, n=n,
                                 causal=bool(causal), seconds=seconds,
                                 gflops=flops / seconds / 1e9))
    return rows


def bench_linear(sizes):
    from kernattn import linear_attention
    from kernattn.feature_maps import EluPlusOne

    rows = []
    rng = np.random.default_rng(1)
    for n in sizes:
        q, k, v = (rng.standard_normal((1, 8, n, 64)) for _ in range(3))
        seconds = timed(lambda: linear_attention(q, k, v, EluPlusOne(), causal=True,
                                                 backend="cuda", zero_denominator="zero"))
        rows.append(dict(suite="linear", dtype="float64", n=n, causal=True, seconds=seconds,
                         tokens_per_second=8 * n / seconds))
    return rows


def bench_decode(contexts):
    from numba import cuda

    from kernattn import decode_attention

    rows = []
    rng = np.random.default_rng(2)
    b, hq, d = 8, 16, 64
    for name, hkv in (("mha", 16), ("gqa", 4), ("mqa", 1)):
        for length in contexts:
            q = cuda.to_device(rng.standard_normal((b, hq, 1, d)).astype(np.float32))
            k, v = (cuda.to_device(rng.standard_normal((b, hkv, length, d)).astype(np.float32))
                    for _ in range(2))
            lengths = np.full(b, length)
            seconds = timed(lambda: decode_attention(q, k, v, kv_lengths=lengths,
                                                     backend="cuda"))
            cache_bytes = b * hkv * length * 2 * d * 4
            rows.append(dict(suite="decode", dtype="float32", kind=name, n=length,
                             seconds=seconds, tokens_per_second=b / seconds,
                             gbytes_per_second=cache_bytes / seconds / 1e9))
    return rows


def print_table(rows) -> None:
    """Print the rows of one suite as aligned columns."""
    if not rows:
        return
    keys = [key for key in rows[0] if key != "suite"]
    text = [[f"{row[key]:.4g}" if isinstance(row[key], float) else str(row[key])
             for key in keys] for row in rows]
    widths = [max(len(key), *(len(line[i]) for line in text)) for i, key in enumerate(keys)]
    print(f"\n{rows[0]['suite']}")
    print("  ".join(key.rjust(w) for key, w in zip(keys, widths)))
    for line in text:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N and contexts 1k and 4k only")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        print("bench_cuda: NUMBA_ENABLE_CUDASIM is on; simulated timings mean nothing",
              file=sys.stderr)
        return 2
    from numba import cuda

    if not cuda.is_available():
        print("bench_cuda: no CUDA GPU found", file=sys.stderr)
        return 2
    device = cuda.get_current_device()
    name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
    print(f"device: {name}, compute capability {device.compute_capability}")
    rows = []
    for suite, bench, sizes in (("softmax", bench_softmax, SOFTMAX_N),
                                ("linear", bench_linear, LINEAR_N),
                                ("decode", bench_decode, DECODE_CONTEXTS)):
        suite_rows = bench(QUICK_N if args.quick else sizes)
        print_table(suite_rows)
        rows += suite_rows
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cuda-{stamp}.json"
    path.write_text(json.dumps(dict(device=name,
                                    compute_capability=list(device.compute_capability),
                                    repeats=REPEATS, rows=rows), indent=1))
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
