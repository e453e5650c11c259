"""Numba softmax attention against the loop oracle and the NumPy twin; its fast exp.

The first test run compiles the kernels (tens of seconds on 2 cores); later runs load them
from Numba's cache.
"""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernattn import softmax_attention
from kernattn.softmax import _softmax_attention_numpy, prepare_softmax_inputs
from kernattn.testing import assert_attention_close
from kernattn.testing import strategies as kst

numba = pytest.importorskip("numba")

from kernattn._numba import jit  # noqa: E402  (after the skip)
from kernattn._numba._exp import fast_exp  # noqa: E402
from kernattn._numba.softmax import flat_strided  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numba_and_oracle(q, k, v, **options):
    """Return ((out, lse) from numba, (out, lse) from the loop oracle)."""
    fast = softmax_attention(q, k, v, backend="numba", return_lse=True, **options)
    oracle = softmax_attention(q, k, v, backend="loops", return_lse=True, **options)
    return fast, oracle


def float32_baseline(q, k, v, **options):
    """Return (out, lse) of plain attention computed in float32 (the NumPy twin)."""
    args = prepare_softmax_inputs(
        q, k, v, **{**DEFAULT_OPTIONS, **options}, precision="input", layout="bhnd"
    )
    args.pop("ndim")
    return _softmax_attention_numpy(**args)


DEFAULT_OPTIONS = dict(
    scale=None, mask=None, bias=None, causal=None, alignment=None, window=None,
    softcap=None, kv_lengths=None, q_lengths=None, dropout_mask=None, dropout_p=0.0,
)


def assert_float64_close(actual, desired):
    """Assert agreement to 1e-12 with NaN, -inf and +inf in the same places."""
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(desired))
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(desired))
    finite = np.isfinite(desired)
    np.testing.assert_allclose(actual[finite], desired[finite], rtol=1e-12, atol=1e-12)


# Cases from real bug reports, with q = k = 0 so that each row is the mean of what it sees.


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numba_causal_alignment_cases(dtype):
    q, k = np.zeros((2, 1), dtype), np.zeros((4, 1), dtype)
    v = np.arange(4, dtype=dtype).reshape(4, 1)
    top = softmax_attention(q, k, v, causal="top_left", backend="numba")
    bottom = softmax_attention(q, k, v, causal="bottom_right", backend="numba")
    np.testing.assert_array_equal(top.ravel(), [0.0, 0.5])
    np.testing.assert_array_equal(bottom.ravel(), [1.0, 1.5])
    q, k = np.zeros((4, 1), dtype), np.zeros((2, 1), dtype)
    v = np.array([[1.0], [2.0]], dtype)
    top = softmax_attention(q, k, v, causal="top_left", backend="numba")
    bottom, lse = softmax_attention(
        q, k, v, causal="bottom_right", backend="numba", return_lse=True
    )
    np.testing.assert_array_equal(top.ravel(), [1.0, 1.5, 1.5, 1.5])
    np.testing.assert_array_equal(bottom.ravel(), [0.0, 0.0, 1.0, 1.5])
    assert np.isneginf(lse[:2]).all()


def test_numba_fully_masked_row_is_zero():
    q = k = np.zeros((4, 1))
    v = np.arange(4.0).reshape(4, 1)
    mask = np.ones((4, 4), dtype=bool)
    mask[1] = False
    out, lse = softmax_attention(q, k, v, mask=mask, backend="numba", return_lse=True)
    np.testing.assert_array_equal(out.ravel(), [1.5, 0.0, 1.5, 1.5])
    assert lse[1] == -np.inf
    poisoned_q = q.copy()
    poisoned_q[1] = np.nan
    out2 = softmax_attention(poisoned_q, k, v, mask=mask, backend="numba")
    np.testing.assert_array_equal(out2, out)


@pytest.mark.parametrize("hkv,expected", [(2, [1, 1, 2, 2]), (1, [1, 1, 1, 1])])
def test_numba_gqa_head_mapping(hkv, expected):
    q = np.zeros((1, 4, 1, 1))
    k = np.zeros((1, hkv, 3, 1))
    v = np.ones((1, hkv, 3, 1)) * (np.arange(hkv) + 1.0)[None, :, None, None]
    out = softmax_attention(q, k, v, backend="numba")
    np.testing.assert_array_equal(out.ravel(), expected)


def test_numba_sliding_window_two_keys():
    q = k = np.zeros((6, 1))
    v = np.arange(6.0).reshape(6, 1)
    out = softmax_attention(q, k, v, causal=True, window=(1, 0), backend="numba")
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
def test_numba_structure_without_mask(with_dropout, options, expected):
    q = k = np.zeros((5, 1))
    v = np.arange(5.0).reshape(5, 1)
    if with_dropout:
        options = dict(options, dropout_mask=np.ones((5, 5), dtype=bool))
    out = softmax_attention(q, k, v, backend="numba", **options)
    np.testing.assert_array_equal(out.ravel(), expected)


def test_numba_additive_bias_is_not_a_mask():
    q, k = np.zeros((1, 1)), np.zeros((2, 1))
    v = np.array([[0.0], [1.0]])
    out = softmax_attention(q, k, v, bias=np.array([[0.0, math.log(3.0)]]), backend="numba")
    assert abs(out.item() - 0.75) <= 1e-15
    q = k = np.zeros((2, 1))
    out = softmax_attention(q, k, v, bias=np.tril(np.ones((2, 2))), backend="numba")
    np.testing.assert_allclose(out.ravel(), [1 / (math.e + 1), 0.5], rtol=1e-15)


# Property tests against the loop oracle on small shapes (one tile).


@st.composite
def inputs_with_dropout(draw):
    case = draw(kst.attention_inputs())
    q, options = case["q"], dict(case["options"])
    if draw(st.booleans()):
        b, hq, n, _ = q.shape
        s = case["k"].shape[2]
        keep = draw(st.lists(st.booleans(), min_size=b * hq * n * s, max_size=b * hq * n * s))
        options["dropout_mask"] = np.array(keep, dtype=bool).reshape(b, hq, n, s)
        options["dropout_p"] = 0.25
    if draw(st.booleans()):
        options["scale"] = draw(st.sampled_from([0.1, 1.0, 3.0]))
    return case["q"], case["k"], case["v"], options


@given(inputs_with_dropout())
def test_numba_matches_loops(inputs):
    q, k, v, options = inputs
    (out, lse), (ref_out, ref_lse) = numba_and_oracle(q, k, v, **options)
    if q.dtype == np.float64:
        assert out.dtype == np.float64
        assert_float64_close(out, ref_out)
        assert_float64_close(lse, ref_lse)
        return
    # float32 and float16 inputs compute in float32: compare with the error of plain
    # float32 attention (FlashAttention's test method).
    assert out.dtype == np.float32
    base_out, base_lse = float32_baseline(q, k, v, **options)
    assert_attention_close(out, ref_out, dtype="float32", baseline=base_out, atol=1e-5)
    assert_attention_close(lse, ref_lse, dtype="float32", baseline=base_lse, atol=1e-5)


# Several tiles: compare with the NumPy twin (itself tested against the loops).


TILED_OPTIONS = [
    {},
    dict(causal="top_left"),
    dict(causal="bottom_right"),
    dict(causal="bottom_right", window=(150, 0)),
    dict(alignment="top_left", window=(40, 200)),
    dict(alignment="bottom_right", window=(None, 3), kv_lengths=[260, 129]),
    dict(kv_lengths=[0, 131], q_lengths=[300, 77], causal="bottom_right"),
    dict(mask="broadcast", bias="broadcast", softcap=5.0),
    dict(mask="full", causal="top_left", dropout="full"),
]


def tiled_case(options, dtype=np.float64, seed=0):
    """Return q, k, v and options for B = 2, Hq = 4, Hkv = 2, N = 300, S = 260."""
    rng = np.random.default_rng(seed)
    b, hq, hkv, n, s, d, m = 2, 4, 2, 300, 260, 16, 8
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


@pytest.mark.parametrize("options", TILED_OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_numba_tiled_matches_numpy(options):
    q, k, v, options = tiled_case(options)
    out, lse = softmax_attention(q, k, v, backend="numba", return_lse=True, **options)
    ref_out, ref_lse = softmax_attention(q, k, v, backend="numpy", return_lse=True, **options)
    assert_float64_close(out, ref_out)
    assert_float64_close(lse, ref_lse)


@pytest.mark.parametrize("options", TILED_OPTIONS[:4], ids=lambda o: "-".join(o) or "plain")
def test_numba_tiled_float32(options):
    q, k, v, options = tiled_case(options, dtype=np.float32)
    out, lse = softmax_attention(q, k, v, backend="numba", return_lse=True, **options)
    ref_out, ref_lse = softmax_attention(q, k, v, backend="numpy", return_lse=True, **options)
    base_out, base_lse = float32_baseline(q, k, v, **options)
    assert out.dtype == np.float32
    assert_attention_close(out, ref_out, dtype="float32", baseline=base_out, atol=1e-5)
    assert_attention_close(lse, ref_lse, dtype="float32", baseline=base_lse, atol=1e-5)


def test_numba_nan_beyond_causal_reach_not_read():
    q, k, v, _ = tiled_case({})
    poisoned_k, poisoned_v = k.copy(), v.copy()
    poisoned_k[:, :, 200] = np.nan
    poisoned_v[:, :, 200] = np.nan
    clean = softmax_attention(q, k, v, causal="top_left", backend="numba")
    out = softmax_attention(q, poisoned_k, poisoned_v, causal="top_left", backend="numba")
    # Rows 0..199 never see key 200 (whole tiles skipped, and the diagonal tile masked);
    # rows 200.. see it and must be NaN. A tile with NaN values sums in a loop instead of
    # BLAS, so rows 128..199 may differ from the clean run in the last bits.
    assert np.isfinite(out[:, :, :200]).all()
    assert_float64_close(out[:, :, :200], clean[:, :, :200])
    assert np.isnan(out[:, :, 200:]).all()


def test_numba_nan_in_masked_values_not_read():
    q, k, v, _ = tiled_case({})
    mask = np.ones((300, 260), dtype=bool)
    mask[:, 7] = False
    mask[5, 100] = False
    poisoned_v = v.copy()
    poisoned_v[:, :, 7] = np.inf
    poisoned_v[:, :, 100] = np.nan
    out = softmax_attention(q, k, poisoned_v, mask=mask, backend="numba")
    ref = softmax_attention(q, k, poisoned_v, mask=mask, backend="numpy")
    assert_float64_close(out, ref)
    assert np.isfinite(out[:, :, 5]).all()
    assert np.isnan(out[:, :, 6]).all()


def test_numba_neg_inf_bias_excludes_nan_value():
    q, k, v, _ = tiled_case({})
    bias = np.zeros((300, 260))
    bias[:, 3] = -np.inf
    poisoned_v = v.copy()
    poisoned_v[:, :, 3] = np.nan
    out = softmax_attention(q, k, poisoned_v, bias=bias, backend="numba")
    assert np.isfinite(out).all()
    assert_float64_close(out, softmax_attention(q, k, v, bias=bias, backend="numpy"))


def test_numba_shared_batch_keys_not_copied():
    q, k, v, _ = tiled_case({})
    out = softmax_attention(q, k[:1], v[:1], causal="top_left", backend="numba")
    ref = softmax_attention(q, k[:1], v[:1], causal="top_left", backend="numpy")
    assert_float64_close(out, ref)


def test_numba_layouts_and_ranks():
    q, k, v, _ = tiled_case({})
    out = softmax_attention(q, k, v, backend="numba")
    bnhd = softmax_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
        layout="bnhd", backend="numba",
    )
    np.testing.assert_array_equal(bnhd.transpose(0, 2, 1, 3), out)
    rank2 = softmax_attention(q[0, 0], k[0, 0], v[0, 0], backend="numba")
    np.testing.assert_array_equal(rank2, out[0, 0])


# Precision, memory layout and determinism.


@pytest.mark.parametrize(
    "dtype,expected",
    [(np.float64, np.float64), (np.float32, np.float32), (np.float16, np.float32),
     (np.int64, np.float64)],
)
def test_numba_compute_dtype(dtype, expected):
    q = np.ones((3, 2), dtype=dtype)
    out, lse = softmax_attention(q, q, q, backend="numba", return_lse=True)
    assert out.dtype == expected
    assert lse.dtype == expected
    assert softmax_attention(q, q, q, backend="numpy").dtype == np.float64


def test_broadcast_mask_read_in_place():
    mask = np.random.default_rng(0).random((30, 40)) < 0.5
    flat, strides = flat_strided(np.broadcast_to(mask, (2, 8, 30, 40)), np.bool_)
    assert flat.size == 30 * 40
    np.testing.assert_array_equal(strides, [0, 0, 40, 1])
    b, h, i, j = 1, 5, 17, 33
    assert flat[b * strides[0] + h * strides[1] + i * strides[2] + j * strides[3]] == mask[i, j]


def test_numba_thread_count_bit_identical():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    q, k, v, options = tiled_case(TILED_OPTIONS[7])
    previous = numba.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            for dtype in (np.float64, np.float32):
                results[threads, dtype] = softmax_attention(
                    q.astype(dtype), k.astype(dtype), v.astype(dtype), causal="top_left",
                    backend="numba", return_lse=True, **options,
                )
    finally:
        numba.set_num_threads(previous)
    for dtype in (np.float64, np.float32):
        for one, two in zip(results[1, dtype], results[2, dtype]):
            assert one.tobytes() == two.tobytes()


# The fast exponential.


@pytest.mark.parametrize(
    "dtype,low,high,bound",
    [(np.float32, -87.3, 88.3, 1.2e-7), (np.float64, -708.0, 709.0, 4.5e-16)],
)
def test_fast_exp_relative_error(dtype, low, high, bound):
    @numba.njit
    def apply(x, out):
        for i in range(x.size):
            out[i] = fast_exp(x[i])

    rng = np.random.default_rng(0)
    x = np.concatenate([
        np.linspace(low, high, 200_001), rng.uniform(-1, 1, 50_000),
        rng.uniform(low, 0, 50_000), [0.0, low, high],
    ]).astype(dtype)
    out = np.empty_like(x)
    apply(x, out)
    exact = np.exp(x.astype(np.float64))
    relative = np.abs(out.astype(np.float64) - exact) / exact
    assert relative.max() < bound
    special = np.array([-np.inf, np.inf, np.nan, low - 1, high + 1, 0.0], dtype=dtype)
    got = np.empty_like(special)
    apply(special, got)
    assert got[0] == 0
    assert got[1] == np.inf
    assert np.isnan(got[2])
    assert got[3] == 0
    assert got[4] == np.inf
    assert got[5] == 1


# Compilation and caching.


def run_python(code, **env):
    """Run `code` in a fresh interpreter at the repository root; return the process."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
        text=True, env={**os.environ, **env}, timeout=600,
    )


def test_import_kernattn_loads_no_numba():
    result = run_python("import sys, kernattn; print('numba' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_numba_unwritable_cache_dir_is_quiet(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory below a regular file cannot be created
    result = run_python(
        """
        import numpy as np, kernattn
        q = np.arange(6.0).reshape(3, 2)
        out = kernattn.softmax_attention(q, q, q, backend="numba")
        ref = kernattn.softmax_attention(q, q, q, backend="numpy")
        assert np.allclose(out, ref, rtol=1e-12, atol=1e-12)
        print("ok")
        """,
        NUMBA_CACHE_DIR=str(blocker / "cache"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert result.stderr == ""


def test_jit_without_cache_location_falls_back():
    namespace = {}
    exec("def double(x):\n    return 2 * x\n", namespace)  # no source file to cache beside
    with pytest.raises(RuntimeError):
        numba.njit(cache=True)(namespace["double"])
    assert jit()(namespace["double"])(21) == 42


# Long sequences in bounded memory.


def peak_rss_growth(func):
    """Return (result, growth of peak resident memory in bytes during func())."""
    status = "/proc/self/status"
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to measure peak memory")

    def peak():
        for line in open(status):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM missing from /proc/self/status")

    def current():
        for line in open(status):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS missing from /proc/self/status")

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak to the current resident size
    before = current()
    result = func()
    return result, peak() - before


@pytest.mark.slow
def test_numba_long_sequence_bounded_memory():
    n, d = 16384, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, n, d), dtype=np.float32) for _ in range(3))
    softmax_attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], backend="numba")  # compile
    (out, lse), growth = peak_rss_growth(
        lambda: softmax_attention(q, k, v, causal=True, backend="numba", return_lse=True)
    )
    # Inputs are 25 MB; one (N, S) float32 score matrix would be 1 GiB.
    assert growth < 64 * 2**20
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0, :, 0], v[0, :, 0], rtol=1e-6)
    last = softmax_attention(q[:, :, -3:], k, v, causal="bottom_right", backend="numpy")
    assert_attention_close(out[:, :, -3:], last, dtype="float32", rtol=1e-4, atol=1e-5)
