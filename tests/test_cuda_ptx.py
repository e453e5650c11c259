"""Every CUDA kernel compiles to PTX for compute capabilities 8.0 and 9.0, in both dtypes.

``numba.cuda.compile_ptx`` runs NVVM from the numba-cuda wheels and needs no GPU, so a
kernel that would fail to compile on a GPU fails here. The compilation runs once, in a
subprocess with the simulator off (tests/conftest.py turns it on for this process), and
reports one result per (kernel, dtype, compute capability) as JSON.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPABILITIES = [(8, 0), (9, 0)]
DTYPES = ["float32", "float64"]
KERNELS = ["softmax", "decode", "decode_merge", "linear_pieces", "linear_prefix", "linear_rows"]


def kernel_signatures(dtype_name: str) -> dict:
    """Return {kernel name: (Python function, argument types)} at the GPU tile sizes."""
    from numba import types

    from kernattn.cuda import TILES, dim_cap
    from kernattn.cuda.decode import make_decode_kernel, make_merge_kernel
    from kernattn.cuda.linear import make_piece_kernel, make_prefix_kernel, make_row_kernel
    from kernattn.cuda.softmax import make_softmax_kernel

    f = getattr(types, dtype_name)

    def array(ndim, dtype=f):
        return types.Array(dtype, ndim, "C")

    boolean, i64, lengths = types.boolean, types.int64, array(1, types.int64)
    d_cap = m_cap = dim_cap(64)
    softmax, _ = make_softmax_kernel(dtype_name, TILES["block_q"], TILES["block_k"], d_cap,
                                     m_cap)
    decode = make_decode_kernel(dtype_name, TILES["decode_threads"], TILES["block_k"],
                                dim_cap(8), d_cap, m_cap)
    rows, _ = make_row_kernel(dtype_name, TILES["linear_threads"], TILES["linear_rows"],
                              TILES["linear_chunk"])
    return {
        "softmax": (softmax, (
            array(4), array(4), array(4), f, f, boolean, lengths, lengths, lengths, i64, i64,
            boolean, array(4, boolean), boolean, array(4), boolean, array(4, boolean), f,
            array(4), array(3),
        )),
        "decode": (decode, (
            array(4), array(4), array(4), f, f, boolean, lengths, lengths, lengths, i64, i64,
            i64, array(5), array(4),
        )),
        "decode_merge": (make_merge_kernel(dtype_name), (array(5), array(4), array(4), array(3))),
        "linear_pieces": (make_piece_kernel(dtype_name), (
            array(4), array(4), lengths, i64, array(5), array(4),
        )),
        "linear_prefix": (make_prefix_kernel(dtype_name), (array(5), array(4))),
        "linear_rows": (rows, (
            array(4), array(4), array(4), array(2, types.int64), i64, array(5), array(4),
            array(4), array(3),
        )),
    }


def compile_all() -> dict:
    """Compile every kernel for every dtype and capability; return results by name."""
    from numba import cuda
    from numba.cuda import dispatcher

    results = {}
    for cc in CAPABILITIES:
        # A device function called by a kernel asks the driver for the current device's
        # compute capability when it compiles. Without a GPU there is no device, so the
        # capability being compiled for stands in for it.
        dispatcher.get_current_device = lambda cc=cc: type(
            "TargetDevice", (), {"compute_capability": cc}
        )()
        for dtype_name in DTYPES:
            for name, (pyfunc, signature) in kernel_signatures(dtype_name).items():
                key = f"{name}-{dtype_name}-sm{cc[0]}{cc[1]}"
                try:
                    ptx, _ = cuda.compile_ptx(pyfunc, signature, cc=cc)
                except Exception as err:  # reported per kernel, not raised
                    results[key] = {"error": f"{type(err).__name__}: {err}"[:2000]}
                    continue
                results[key] = {
                    "target": re.search(r"\.target\s+(\w+)", ptx).group(1),
                    "entry": ".entry" in ptx,
                    "f64_instructions": len(re.findall(r"\.f64\b", ptx)),
                }
    return results


@functools.lru_cache(maxsize=None)
def ptx_report() -> dict:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    result = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"PTX compilation process failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cc", CAPABILITIES, ids=lambda cc: f"sm{cc[0]}{cc[1]}")
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("name", KERNELS)
def test_cuda_kernel_compiles_to_ptx(name, dtype_name, cc):
    pytest.importorskip("numba_cuda")
    report = ptx_report()[f"{name}-{dtype_name}-sm{cc[0]}{cc[1]}"]
    assert "error" not in report, report.get("error")
    assert report["entry"]
    assert report["target"] == f"sm_{cc[0]}{cc[1]}"
    if dtype_name == "float32":
        # float32 kernels compute in float32: no float64 arithmetic or conversion.
        assert report["f64_instructions"] == 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    print(json.dumps(compile_all()))
