"""Decode step (one new token), batch 8, d_model 1024, 16 heads, MHA / GQA-4 / MQA, fp32.

Tokens/s and GB/s of key/value cache read for Numba split-KV decoding, plain NumPy and
PyTorch SDPA (when installed), against the memory bandwidth measured in the same run.
Contexts 1k..8k (16k and 32k with --full). Usage: python benchmarks/bench_decode.py [--full]
"""

import sys

from common import main

if __name__ == "__main__":
    sys.exit(main("decode"))
