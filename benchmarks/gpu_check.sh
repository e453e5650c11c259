#!/usr/bin/env bash
# Run the CUDA tests on a real GPU (simulator off), then the CUDA benchmark.
#
# Usage: benchmarks/gpu_check.sh [--quick]
# Limits: KERNATTN_GPU_TEST_SECONDS (default 300) for the tests and
# KERNATTN_GPU_BENCH_SECONDS (default 480) for the benchmark. The benchmark prints its
# tables and saves JSON under benchmarks/results/. Exits with 2 at once when no GPU is
# usable.
set -uo pipefail
cd "$(dirname "$0")/.."
export NUMBA_ENABLE_CUDASIM=0
export HYPOTHESIS_PROFILE=ci

if ! timeout 60 python -c "from numba import cuda; raise SystemExit(0 if cuda.is_available() else 1)" \
    2>/dev/null; then
  echo "gpu_check: no usable CUDA GPU (numba.cuda.is_available() is False); nothing run" >&2
  exit 2
fi
python -c "from numba import cuda; d = cuda.get_current_device(); print('GPU:', d.name, d.compute_capability)"

status=0
echo "== CUDA tests on the GPU"
timeout "${KERNATTN_GPU_TEST_SECONDS:-300}" python -m pytest -q -p no:cacheprovider \
  tests/test_cuda_softmax.py tests/test_cuda_decode.py tests/test_cuda_linear.py \
  tests/test_cuda_ptx.py || status=$?

echo "== CUDA benchmark"
timeout "${KERNATTN_GPU_BENCH_SECONDS:-480}" python benchmarks/bench_cuda.py "$@" || status=$?
exit "$status"
