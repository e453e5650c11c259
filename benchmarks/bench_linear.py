"""Linear attention, elu+1, B=1 H=8 D=M=64, N in {1024, 4096, 16384} (65536 with --full).

Causal and non-causal: kernattn's Numba backend (fp32 and fp64) and NumPy backend beside
PyTorch CPU cumulative-sum and chunked formulations (when installed), times in ms and
PyTorch / Numba ratios. Usage: python benchmarks/bench_linear.py [--full] [--repeats R]
"""

import sys

from common import main

if __name__ == "__main__":
    sys.exit(main("linear"))
