"""Numba CUDA twins of kernattn's kernels, loaded only for ``backend="cuda"``.

Nothing here is imported by ``import kernattn``. The public wrappers import this package
when ``backend="cuda"`` is requested; `require_cuda` then imports ``numba.cuda`` and checks
for a GPU (or Numba's CUDA simulator, ``NUMBA_ENABLE_CUDASIM=1``).

Inputs and outputs:

- NumPy inputs are copied to the device, and the results come back as NumPy arrays.
- Inputs that expose ``__cuda_array_interface__`` (PyTorch or CuPy tensors on the GPU,
  Numba device arrays) are read in place, without a copy, and the result is a Numba
  device array. ``torch.as_tensor(out, device="cuda")`` and ``cupy.asarray(out)`` wrap
  it without a copy. See `is_device_array`.

Tunables live here, in one place. `TILES` contains the sizes used on a GPU, and
`SIMULATOR_TILES` the sizes used under the simulator. The simulator runs every thread of
a block as a Python thread, so small tiles keep simulated blocks cheap. They also let
inputs of a dozen positions cover several tiles, which exercises the tile-to-tile code.

- ``block_q``: query rows (and threads) per block of the softmax kernel.
- ``block_k``: the most key rows per shared-memory tile; the kernels lower it so a
  tile fits in `SHARED_BYTES`.
- ``decode_threads``: threads per block of the decode kernel.
- ``decode_split_keys``: keys per split of the decode kernel when `num_splits` is not
  given. It depends on the shapes only, so results do not depend on the device.
- ``linear_threads``: threads per block of the linear-attention kernels.
- ``linear_rows``: the most query rows per block of the linear-attention row kernel.
- ``linear_chunk``: keys per state piece of linear attention (all forms except
  ``"chunked"``, which uses the caller's `chunk_size`, up to ``linear_max_chunk``).
"""

from __future__ import annotations

import numpy as np

TILES = dict(
    block_q=64,
    block_k=64,
    decode_threads=128,
    decode_split_keys=512,
    linear_threads=128,
    linear_rows=32,
    linear_chunk=64,
    linear_max_chunk=256,
)
SIMULATOR_TILES = dict(
    block_q=4,
    block_k=4,
    decode_threads=4,
    decode_split_keys=8,
    linear_threads=4,
    linear_rows=4,
    linear_chunk=4,
    linear_max_chunk=256,
)

# Static shared memory per block: the 48 KiB every CUDA device grants without opt-in.
SHARED_BYTES = 48 * 1024

# Head dimensions are rounded up to a power of two (at least this) to size the local and
# shared arrays of a kernel. Each rounded size compiles once per dtype.
MIN_DIM_CAP = 16


class CudaUnavailableError(RuntimeError):
    """Raised when ``backend="cuda"`` is requested where Numba's CUDA target cannot run."""


def import_cuda():
    """Return the ``numba.cuda`` module; compiling kernels to PTX needs no GPU.

    Raises
    ------
    CudaUnavailableError
        When numba-cuda is not installed.
    """
    try:
        from numba import cuda
    except ImportError as err:
        raise CudaUnavailableError(
            f'backend="cuda" needs the numba-cuda package, which failed to import '
            f'({err}); install it with pip install "kernattn[cuda]"'
        ) from err
    return cuda


def require_cuda():
    """Return the ``numba.cuda`` module, or raise `CudaUnavailableError` saying why not.

    Raises
    ------
    CudaUnavailableError
        When numba-cuda is not installed, or when no GPU with a working driver is
        present and the simulator is off. The message names ``NUMBA_ENABLE_CUDASIM=1``.
    """
    cuda = import_cuda()
    if not cuda.is_available():
        reason = cuda.cuda_error() if hasattr(cuda, "cuda_error") else None
        detail = f" ({' '.join(str(reason).split())})" if reason else ""
        raise CudaUnavailableError(
            f'backend="cuda" found no usable NVIDIA GPU{detail}. To run the CUDA '
            f"kernels on the CPU in Numba's CUDA simulator (slow: inputs of a few dozen "
            f"positions), set the environment variable NUMBA_ENABLE_CUDASIM=1 before "
            f"starting Python"
        )
    return cuda


def simulator_enabled() -> bool:
    """Return whether Numba's CUDA simulator is on in this process."""
    from numba.cuda.core import config

    return bool(config.ENABLE_CUDASIM)


def tiles() -> dict:
    """Return the tile sizes for this process: `SIMULATOR_TILES` under the simulator."""
    return SIMULATOR_TILES if simulator_enabled() else TILES


def dim_cap(size: int) -> int:
    """Return `size` rounded up to a power of two, at least `MIN_DIM_CAP`."""
    cap = MIN_DIM_CAP
    while cap < size:
        cap *= 2
    return cap


def fit_rows(limit: int, bytes_per_row: int, budget: int = SHARED_BYTES) -> int:
    """Return the largest power of two <= `limit` whose rows fit in `budget` bytes (>= 1)."""
    rows = 1
    while rows * 2 <= limit and rows * 2 * bytes_per_row <= budget:
        rows *= 2
    return rows


# ---- Device arrays -------------------------------------------------------------------


def is_device_array(x) -> bool:
    """Return whether `x` lives on the GPU: it exposes ``__cuda_array_interface__``.

    Under the simulator, Numba's simulated device arrays count too. NumPy arrays, lists
    and CPU tensors do not (a CPU PyTorch tensor raises AttributeError for the
    attribute, so `hasattr` is False).
    """
    if x is None or isinstance(x, np.ndarray):
        return False
    return hasattr(x, "__cuda_array_interface__") or type(x).__name__ == "FakeCUDAArray"


def as_device(x):
    """Return a device array `x` as a Numba device array over the same memory (no copy)."""
    if type(x).__name__ == "FakeCUDAArray":
        return x
    from numba import cuda

    return cuda.as_cuda_array(x)


def host_stand_in(x) -> np.ndarray:
    """Return a NumPy array with the shape and dtype of device array `x`, holding no data.

    Every element is the same zero (all strides 0), so the host-side checks of the
    public wrappers (ranks, sizes, dtypes, broadcasting) run on it without copying `x`
    and without allocating its size.
    """
    return np.broadcast_to(np.zeros((), dtype=x.dtype), tuple(x.shape))


def strided_view(x, shape, strides):
    """Return a device view of `x` with `shape` and `strides` (bytes): no copy.

    Stride 0 broadcasts an axis. Numba device arrays transpose only in 2-D and cannot
    add axes, so views are built from the array interface: a new description over the
    same device pointer (simulated arrays: a NumPy strided view).
    """
    shape, strides = tuple(int(s) for s in shape), tuple(int(s) for s in strides)
    if type(x).__name__ == "FakeCUDAArray":
        view = np.lib.stride_tricks.as_strided(x._ary, shape, strides)
        return type(x)(view)
    from numba import cuda

    desc = dict(x.__cuda_array_interface__)
    desc.update(shape=shape, strides=strides, version=max(2, desc.get("version", 2)))
    desc.pop("mask", None)
    return cuda.from_cuda_array_interface(desc, owner=x)


def device_bhnd(x, layout: str):
    """Return a (B, H, N, D) view of a rank 2, 3 or 4 device array in `layout`.

    The view mirrors `kernattn._validate.to_bhnd` (which checked the ranks already).
    """
    shape, strides = list(x.shape), list(x.strides)
    if layout == "bnhd" and x.ndim >= 3:
        while len(shape) < 4:
            shape.insert(0, 1)
            strides.insert(0, 0)
        shape[1], shape[2] = shape[2], shape[1]
        strides[1], strides[2] = strides[2], strides[1]
    while len(shape) < 4:
        shape.insert(0, 1)
        strides.insert(0, 0)
    return strided_view(x, shape, strides)


def device_from_bhnd(x, ndim: int, layout: str):
    """Undo `device_bhnd` for an output (B, H, N, M): the rank and layout of q."""
    shape, strides = list(x.shape), list(x.strides)
    if layout == "bnhd":
        shape[1], shape[2] = shape[2], shape[1]
        strides[1], strides[2] = strides[2], strides[1]
    if layout == "bnhd" and ndim == 2:
        keep = [1, 3]  # (B, N, H, M) with B = H = 1 -> (N, M)
    else:
        keep = list(range(4 - ndim, 4))
    return strided_view(x, [shape[a] for a in keep], [strides[a] for a in keep])


def device_lse_from_bhn(lse, ndim: int):
    """Drop the leading axes of a (B, H, N) device lse that q did not have."""
    keep = list(range(4 - ndim, 3)) if ndim < 4 else [0, 1, 2]
    return strided_view(lse, [lse.shape[a] for a in keep], [lse.strides[a] for a in keep])


def unbroadcast(x: np.ndarray) -> np.ndarray:
    """Return a host array with every zero-stride axis reduced to size 1, C-contiguous.

    Kernels read axis a of such an array at index 0 when its size is 1, so a (N, S) mask
    broadcast to (B, Hq, N, S) is copied to the device as (1, 1, N, S), not expanded.
    """
    if x.size == 0:  # strides of an empty array say nothing about broadcasting
        return np.ascontiguousarray(x)
    index = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None)
                  for n, st in zip(x.shape, x.strides))
    return np.ascontiguousarray(x[index])

