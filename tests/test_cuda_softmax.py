"""CUDA softmax attention against the loop oracle and the NumPy twin.

Without a GPU these tests run in Numba's CUDA simulator (tests/conftest.py turns it on
unless NUMBA_ENABLE_CUDASIM is set), where the kernels use `SIMULATOR_TILES`: tiles of 4
query and 4 key rows, so inputs of a dozen positions cover several tiles. Shapes stay tiny
because the simulator runs every GPU thread as a Python thread.
"""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings

from kernattn import DTypeError, softmax_attention
from kernattn.testing import assert_attention_close

pytest.importorskip("numba_cuda")

from kernattn import cuda as kcuda  # noqa: E402  (after the skip)

try:
    kcuda.require_cuda()
except kcuda.CudaUnavailableError as err:
    pytest.skip(str(err), allow_module_level=True)

from tests.test_numba_softmax import (  # noqa: E402
    assert_float64_close,
    float32_baseline,
    inputs_with_dropout,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Several tiles of the simulator's 4 x 4 tiling; the options of the CPU tiled tests.
TILED_OPTIONS = [
    {},
    dict(causal="top_left"),
    dict(causal="bottom_right"),
    dict(causal="bottom_right", window=(5, 0)),
    dict(alignment="top_left", window=(2, 6)),
    dict(alignment="bottom_right", window=(None, 1), kv_lengths=[10, 5]),
    dict(kv_lengths=[0, 7], q_lengths=[11, 3], causal="bottom_right"),
    dict(mask="broadcast", bias="broadcast", softcap=5.0),
    dict(mask="full", causal="top_left", dropout="full"),
]


def cuda_and_oracle(q, k, v, **options):
    """Return ((out, lse) from cuda, (out, lse) from the loop oracle)."""
    fast = softmax_attention(q, k, v, backend="cuda", return_lse=True, **options)
    oracle = softmax_attention(q, k, v, backend="loops", return_lse=True, **options)
    return fast, oracle


def tiled_case(options, dtype=np.float64, seed=0):
    """Return q, k, v and options for B = 2, Hq = 2, Hkv = 1, N = 11, S = 10."""
    rng = np.random.default_rng(seed)
    b, hq, hkv, n, s, d, m = 2, 2, 1, 11, 10, 3, 2
    q = rng.normal(size=(b, hq, n, d)).astype(dtype)
    k = rng.normal(size=(b, hkv, s, d)).astype(dtype)
    v = rng.normal(size=(b, hkv, s, m)).astype(dtype)
    options = dict(options)
    if options.get("mask") == "broadcast":
        options["mask"] = np.broadcast_to(rng.random((n, s)) < 0.6, (b, 1, n, s))
    elif options.get("mask") == "full":
        options["mask"] = rng.random((b, hq, n, s)) < 0.7
    if options.get("bias") == "broadcast":
        options["bias"] = rng.normal(size=(hq, 1, s))
    if options.pop("dropout", None) == "full":
        options["dropout_mask"] = rng.random((b, hq, n, s)) < 0.8
        options["dropout_p"] = 0.2
    return q, k, v, options


# Cases from real bug reports, with q = k = 0 so that each row is the mean of what it sees.


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_causal_alignment_cases(dtype):
    q, k = np.zeros((2, 1), dtype), np.zeros((4, 1), dtype)
    v = np.arange(4, dtype=dtype).reshape(4, 1)
    top = softmax_attention(q, k, v, causal="top_left", backend="cuda")
    bottom = softmax_attention(q, k, v, causal="bottom_right", backend="cuda")
    np.testing.assert_array_equal(top.ravel(), [0.0, 0.5])
    np.testing.assert_array_equal(bottom.ravel(), [1.0, 1.5])
    q, k = np.zeros((4, 1), dtype), np.zeros((2, 1), dtype)
    v = np.array([[1.0], [2.0]], dtype)
    top = softmax_attention(q, k, v, causal="top_left", backend="cuda")
    bottom, lse = softmax_attention(q, k, v, causal="bottom_right", backend="cuda",
                                    return_lse=True)
    np.testing.assert_array_equal(top.ravel(), [1.0, 1.5, 1.5, 1.5])
    np.testing.assert_array_equal(bottom.ravel(), [0.0, 0.0, 1.0, 1.5])
    assert np.isneginf(lse[:2]).all()


def test_cuda_fully_masked_row_is_zero():
    q = k = np.zeros((4, 1))
    v = np.arange(4.0).reshape(4, 1)
    mask = np.ones((4, 4), dtype=bool)
    mask[1] = False
    out, lse = softmax_attention(q, k, v, mask=mask, backend="cuda", return_lse=True)
    np.testing.assert_array_equal(out.ravel(), [1.5, 0.0, 1.5, 1.5])
    assert lse[1] == -np.inf
    poisoned_q = q.copy()
    poisoned_q[1] = np.nan
    out2 = softmax_attention(poisoned_q, k, v, mask=mask, backend="cuda")
    np.testing.assert_array_equal(out2, out)


@pytest.mark.parametrize("hkv,expected", [(2, [1, 1, 2, 2]), (1, [1, 1, 1, 1])])
def test_cuda_gqa_head_mapping(hkv, expected):
    q = np.zeros((1, 4, 1, 1))
    k = np.zeros((1, hkv, 3, 1))
    v = np.ones((1, hkv, 3, 1)) * (np.arange(hkv) + 1.0)[None, :, None, None]
    out = softmax_attention(q, k, v, backend="cuda")
    np.testing.assert_array_equal(out.ravel(), expected)


def test_cuda_sliding_window_two_keys():
    q = k = np.zeros((6, 1))
    v = np.arange(6.0).reshape(6, 1)
    out = softmax_attention(q, k, v, causal=True, window=(1, 0), backend="cuda")
    np.testing.assert_array_equal(out.ravel(), [0, 0.5, 1.5, 2.5, 3.5, 4.5])


@pytest.mark.parametrize("with_dropout", [False, True])
@pytest.mark.parametrize(
    "options,expected",
    [
        (dict(window=(0, 0)), [0.0, 1.0, 2.0, 3.0, 4.0]),
        (dict(causal=True), [0.0, 0.5, 1.0, 1.5, 2.0]),
    ],
    ids=["window-0-0", "causal"],
)
def test_cuda_structure_without_mask(with_dropout, options, expected):
    q = k = np.zeros((5, 1))
    v = np.arange(5.0).reshape(5, 1)
    if with_dropout:
        options = dict(options, dropout_mask=np.ones((5, 5), dtype=bool))
    out = softmax_attention(q, k, v, backend="cuda", **options)
    np.testing.assert_array_equal(out.ravel(), expected)


def test_cuda_additive_bias_is_not_a_mask():
    q, k = np.zeros((1, 1)), np.zeros((2, 1))
    v = np.array([[0.0], [1.0]])
    out = softmax_attention(q, k, v, bias=np.array([[0.0, math.log(3.0)]]), backend="cuda")
    assert abs(out.item() - 0.75) <= 1e-15
    q = k = np.zeros((2, 1))
    out = softmax_attention(q, k, v, bias=np.tril(np.ones((2, 2))), backend="cuda")
    np.testing.assert_allclose(out.ravel(), [1 / (math.e + 1), 0.5], rtol=1e-15)


# Property test against the loop oracle: every option on small shapes.


@settings(max_examples=12)
@given(inputs_with_dropout())
def test_cuda_matches_loops(inputs):
    q, k, v, options = inputs
    (out, lse), (ref_out, ref_lse) = cuda_and_oracle(q, k, v, **options)
    if q.dtype == np.float64:
        assert out.dtype == np.float64
        assert_float64_close(out, ref_out)
        assert_float64_close(lse, ref_lse)
        return
    assert out.dtype == np.float32
    base_out, base_lse = float32_baseline(q, k, v, **options)
    assert_attention_close(out, ref_out, dtype="float32", baseline=base_out, atol=1e-5)
    assert_attention_close(lse, ref_lse, dtype="float32", baseline=base_lse, atol=1e-5)


# Several tiles: compare with the NumPy twin (itself tested against the loops).


@pytest.mark.parametrize("options", TILED_OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_cuda_tiled_matches_numpy(options):
    q, k, v, options = tiled_case(options)
    out, lse = softmax_attention(q, k, v, backend="cuda", return_lse=True, **options)
    ref_out, ref_lse = softmax_attention(q, k, v, backend="numpy", return_lse=True, **options)
    assert_float64_close(out, ref_out)
    assert_float64_close(lse, ref_lse)


@pytest.mark.parametrize("options", TILED_OPTIONS[:4], ids=lambda o: "-".join(o) or "plain")
def test_cuda_tiled_float32(options):
    q, k, v, options = tiled_case(options, dtype=np.float32)
    out, lse = softmax_attention(q, k, v, backend="cuda", return_lse=True, **options)
    ref_out, ref_lse = softmax_attention(q, k, v, backend="numpy", return_lse=True, **options)
    base_out, base_lse = float32_baseline(q, k, v, **options)
    assert out.dtype == np.float32
    assert_attention_close(out, ref_out, dtype="float32", baseline=base_out, atol=1e-5)
    assert_attention_close(lse, ref_lse, dtype="float32", baseline=base_lse, atol=1e-5)


def test_cuda_nan_beyond_causal_reach_not_read():
    q, k, v, _ = tiled_case({})
    poisoned_k, poisoned_v = k.copy(), v.copy()
    poisoned_k[:, :, 6] = np.nan
    poisoned_v[:, :, 6] = np.nan
    clean = softmax_attention(q, k, v, causal="top_left", backend="cuda")
    out = softmax_attention(q, poisoned_k, poisoned_v, causal="top_left", backend="cuda")
    # Rows 0..5 never see key 6 (tile 4..7 is loaded, but their scores for key 6 are
    # never formed); rows 6.. see it and must be NaN.
    np.testing.assert_array_equal(out[:, :, :6], clean[:, :, :6])
    assert np.isnan(out[:, :, 6:]).all()


def test_cuda_nan_in_masked_values_not_read():
    q, k, v, _ = tiled_case({})
    mask = np.ones((11, 10), dtype=bool)
    mask[:, 7] = False
    mask[5, 2] = False
    poisoned_v = v.copy()
    poisoned_v[:, :, 7] = np.inf
    poisoned_v[:, :, 2] = np.nan
    out = softmax_attention(q, k, poisoned_v, mask=mask, backend="cuda")
    ref = softmax_attention(q, k, poisoned_v, mask=mask, backend="numpy")
    assert_float64_close(out, ref)
    assert np.isfinite(out[:, :, 5]).all()
    assert np.isnan(out[:, :, 6]).all()


def test_cuda_neg_inf_bias_excludes_nan_value():
    q, k, v, _ = tiled_case({})
    bias = np.zeros((11, 10))
    bias[:, 3] = -np.inf
    poisoned_v = v.copy()
    poisoned_v[:, :, 3] = np.nan
    out = softmax_attention(q, k, poisoned_v, bias=bias, backend="cuda")
    assert np.isfinite(out).all()
    assert_float64_close(out, softmax_attention(q, k, v, bias=bias, backend="numpy"))


def test_cuda_shared_batch_keys_not_copied():
    q, k, v, _ = tiled_case({})
    out = softmax_attention(q, k[:1], v[:1], causal="top_left", backend="cuda")
    ref = softmax_attention(q, k[:1], v[:1], causal="top_left", backend="numpy")
    assert_float64_close(out, ref)


def test_cuda_layouts_and_ranks():
    q, k, v, _ = tiled_case({})
    out = softmax_attention(q, k, v, backend="cuda")
    bnhd = softmax_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
        layout="bnhd", backend="cuda",
    )
    np.testing.assert_array_equal(bnhd.transpose(0, 2, 1, 3), out)
    rank2 = softmax_attention(q[0, 0], k[0, 0], v[0, 0], backend="cuda")
    np.testing.assert_array_equal(rank2, out[0, 0])


@pytest.mark.parametrize(
    "dtype,expected",
    [(np.float64, np.float64), (np.float32, np.float32), (np.float16, np.float32),
     (np.int64, np.float64)],
)
def test_cuda_compute_dtype(dtype, expected):
    q = np.ones((3, 2), dtype=dtype)
    out, lse = softmax_attention(q, q, q, backend="cuda", return_lse=True)
    assert out.dtype == expected
    assert lse.dtype == expected


# Device arrays: read in place, result on the device.


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("rank", [4, 3, 2])
def test_cuda_device_arrays_in_device_arrays_out(layout, rank):
    from numba import cuda

    q, k, v, options = tiled_case(dict(causal="top_left", mask="full"))
    q, k, v = q[:1, :1], k[:1], v[:1]
    options["mask"] = options["mask"][:1, :1]
    if layout == "bnhd":
        q, k, v = (x.transpose(0, 2, 1, 3).copy() for x in (q, k, v))
    if rank == 3:
        q, k, v = q[0], k[0], v[0]
    elif rank == 2:
        q, k, v = (x[0, 0] if layout == "bhnd" else x[0, :, 0] for x in (q, k, v))
    expected, expected_lse = softmax_attention(
        q, k, v, layout=layout, backend="numpy", return_lse=True, **options
    )
    mask = cuda.to_device(options.pop("mask"))
    out, lse = softmax_attention(
        cuda.to_device(q), cuda.to_device(k), cuda.to_device(v), mask=mask, layout=layout,
        backend="cuda", return_lse=True, **options,
    )
    assert kcuda.is_device_array(out)
    assert kcuda.is_device_array(lse)
    assert out.shape == expected.shape
    assert lse.shape == expected_lse.shape
    assert_float64_close(out.copy_to_host(), expected)
    assert_float64_close(lse.copy_to_host(), expected_lse)


def test_cuda_device_array_wrong_dtype_raises():
    from numba import cuda

    q = cuda.to_device(np.zeros((3, 2), dtype=np.float32))
    k = np.zeros((3, 2))
    message = "q is a device array of dtype float32, but this call computes in float64"
    with pytest.raises(DTypeError, match=re.escape(message)):
        softmax_attention(q, k, k, backend="cuda")


def test_cuda_without_gpu_names_the_simulator():
    code = (
        "import numpy as np\n"
        "from numba import cuda\n"
        "if cuda.is_available(): print('GPU')\n"
        "else:\n"
        "    from kernattn import softmax_attention\n"
        "    try: softmax_attention(np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2)),"
        " backend='cuda')\n"
        "    except RuntimeError as err: print(type(err).__name__, err)\n"
    )
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    if result.stdout.startswith("GPU"):
        pytest.skip("a GPU is present, so backend='cuda' does not raise")
    assert result.stdout.startswith("CudaUnavailableError"), result.stderr
    assert "NUMBA_ENABLE_CUDASIM=1" in result.stdout


def test_cuda_window_sentinel_matches_cpu():
    """The CUDA kernels take window sizes from the CPU twin's `window_bounds`."""
    from kernattn import _tiles
    from kernattn._numba import softmax as numba_softmax

    assert numba_softmax.UNBOUNDED == _tiles.UNBOUNDED
