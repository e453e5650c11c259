"""Softmax forward, B=1 H=8 D=64, N in {256, 1024, 4096} (16384 with --full), fp32 and fp64.

Numba (tiled online softmax) beside plain NumPy and PyTorch CPU scaled_dot_product_attention
(when installed), with GFLOP/s, the ratio to NumPy fp32 GEMM measured in the same run,
and peak memory. Usage: python benchmarks/bench_softmax.py [--full] [--repeats R]
"""

import sys

from common import main

if __name__ == "__main__":
    sys.exit(main("softmax"))
