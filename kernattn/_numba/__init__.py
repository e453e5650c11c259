"""Numba twins of kernattn's kernels: ``@njit(parallel=True, cache=True)``, compiled on first use.

Nothing here is imported by ``import kernattn``; the public wrappers import these modules
when ``backend="numba"`` is requested, so Numba loads and compiles only then.

Tunables live here, in one place:

- `BLOCK_Q`, `BLOCK_K`: query and key rows per tile of the softmax kernel. 128 x 128 tiles
  keep the per-tile BLAS products large enough to run near GEMM speed while the (128, 128)
  score tile and its probabilities stay in the L2 cache.
- `DECODE_BLOCK_K`: key rows per tile of the decode kernel.
- `DECODE_SPLIT_KEYS`: keys per split of the decode kernel when `num_splits` is not given.
  It depends on the shapes only, never on the thread count, so results do not change with
  the number of threads.
"""

from __future__ import annotations

BLOCK_Q = 128
BLOCK_K = 128
DECODE_BLOCK_K = 512
DECODE_SPLIT_KEYS = 1024


def jit(**options):
    """Return ``numba.njit(cache=True, **options)``, or the uncached decorator when caching fails.

    Numba raises RuntimeError at decoration time when no cache directory is writable
    (``NUMBA_CACHE_DIR`` read-only, package installed in a read-only tree and no home
    directory). The kernel then compiles in memory on each process start instead.
    """
    import numba

    def decorate(func):
        try:
            return numba.njit(cache=True, **options)(func)
        except RuntimeError:
            return numba.njit(cache=False, **options)(func)

    return decorate


_BLAS_CONTROLLER = None


def single_threaded_blas():
    """Return a context manager that limits every loaded BLAS library to one thread.

    The kernels call BLAS (``np.dot`` on 2-D tiles) from inside ``numba.prange`` loops.
    A multi-threaded OpenBLAS there starts threads inside threads and ran several times
    slower in trials. The controller is built once, after SciPy's BLAS (which Numba's
    ``np.dot`` calls) is loaded, so entering the context costs microseconds.
    """
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS that np.dot uses)
        from threadpoolctl import ThreadpoolController

        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")
