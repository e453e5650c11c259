"""Decode attention on the CUDA backend against the loop oracle (simulator without a GPU).

The simulator's tiles (`SIMULATOR_TILES`) split the keys every 8 positions and load 4
keys per tile, so caches of a dozen positions cover several splits and tiles.
"""

import numpy as np
import pytest
from hypothesis import given, settings

from kernattn import decode_attention, softmax_attention
from kernattn.testing import assert_attention_close

pytest.importorskip("numba_cuda")

from kernattn import cuda as kcuda  # noqa: E402  (after the skip)

try:
    kcuda.require_cuda()
except kcuda.CudaUnavailableError as err:
    pytest.skip(str(err), allow_module_level=True)

from tests.test_numba_decode import (  # noqa: E402
    assert_float64_close,
    cache_case,
    decode_inputs,
)


@settings(max_examples=12)
@given(decode_inputs())
def test_decode_cuda_matches_loops(inputs):
    q, k, v, options = inputs
    out, lse = decode_attention(q, k, v, return_lse=True, backend="cuda", **options)
    options.pop("num_splits", None)
    ref_out, ref_lse = decode_attention(q, k, v, return_lse=True, backend="loops", **options)
    assert out.dtype == q.dtype
    if q.dtype == np.float64:
        assert_float64_close(out, ref_out)
        assert_float64_close(lse, ref_lse)
    else:
        assert_attention_close(out, ref_out, dtype="float32", rtol=1e-5, atol=1e-5)
        assert_attention_close(lse, ref_lse, dtype="float32", rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_cuda_long_cache(kv_heads, tokens):
    lengths = [21, 1, 17]
    q, k, v = cache_case(3, 4, kv_heads, tokens, 24, 3, 2, lengths, np.float64, seed=1)
    out, lse = decode_attention(q, k, v, kv_lengths=lengths, return_lse=True, backend="cuda")
    ref_out, ref_lse = decode_attention(
        q, k, v, kv_lengths=lengths, return_lse=True, backend="numpy"
    )
    assert_float64_close(out, ref_out)
    assert_float64_close(lse, ref_lse)
    if tokens == 3:  # batch row 1 contains one key, so only its last token may read a key
        assert (out[1, :, :2] == 0).all()
        assert np.isneginf(lse[1, :, :2]).all()


def test_decode_cuda_equals_last_rows_of_full_causal_pass():
    q, k, v = cache_case(1, 2, 1, 12, 12, 3, 2, [12], np.float64, seed=2)
    full = softmax_attention(q, k, v, causal=True, backend="loops")
    out = decode_attention(q[:, :, -3:], k, v, kv_lengths=[12], backend="cuda")
    assert_float64_close(out, full[:, :, -3:])


@pytest.mark.parametrize("kv_heads,expected", [(2, [1, 1, 2, 2]), (1, [1, 1, 1, 1])])
def test_decode_cuda_gqa_head_mapping(kv_heads, expected):
    q = np.zeros((1, 4, 1, 1))
    k = np.zeros((1, kv_heads, 3, 1))
    v = np.ones((1, kv_heads, 3, 1)) * (np.arange(kv_heads) + 1.0)[None, :, None, None]
    out = decode_attention(q, k, v, kv_lengths=[3], backend="cuda")
    np.testing.assert_array_equal(out.ravel(), expected)


def test_decode_cuda_two_tokens_by_hand():
    k = np.zeros((1, 1, 6, 1))
    v = np.arange(6.0).reshape(1, 1, 6, 1)
    v[..., 4:, :] = np.nan  # stale slots beyond the valid length
    q = np.zeros((1, 1, 2, 1))
    out = decode_attention(q, k, v, kv_lengths=[4], num_splits=2, backend="cuda")
    np.testing.assert_array_equal(out.ravel(), [1.0, 1.5])


def test_decode_cuda_more_splits_than_keys():
    """Splits past the last valid key are empty and read no key row (capacity 1)."""
    q, k, v = np.zeros((1, 1, 1, 1)), np.zeros((1, 1, 1, 1)), np.ones((1, 1, 1, 1))
    out, lse = decode_attention(q, k, v, kv_lengths=[1], num_splits=3, return_lse=True,
                                backend="cuda")
    np.testing.assert_array_equal(out.ravel(), [1.0])
    np.testing.assert_array_equal(lse.ravel(), [0.0])


def test_decode_cuda_split_count_changes_only_rounding():
    q, k, v = cache_case(2, 2, 1, 1, 20, 3, 2, [20, 13], np.float64, seed=3)
    reference = decode_attention(q, k, v, kv_lengths=[20, 13], backend="loops")
    for splits in (1, 3, 20):
        out = decode_attention(q, k, v, kv_lengths=[20, 13], num_splits=splits,
                               backend="cuda")
        assert_float64_close(out, reference)


def test_decode_cuda_bnhd_layout():
    q, k, v = cache_case(1, 2, 1, 2, 9, 3, 2, [7], np.float64, seed=5)
    out = decode_attention(q, k, v, kv_lengths=[7], backend="cuda")
    bnhd = decode_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
        kv_lengths=[7], layout="bnhd", backend="cuda",
    )
    np.testing.assert_array_equal(bnhd.transpose(0, 2, 1, 3), out)


def test_decode_cuda_device_arrays_in_device_arrays_out():
    from numba import cuda

    q, k, v = cache_case(1, 2, 1, 2, 9, 3, 2, [7], np.float32, seed=6)
    expected, expected_lse = decode_attention(q, k, v, kv_lengths=[7], return_lse=True,
                                              backend="cuda")
    out, lse = decode_attention(
        cuda.to_device(q), cuda.to_device(k), cuda.to_device(v), kv_lengths=[7],
        return_lse=True, backend="cuda",
    )
    assert kcuda.is_device_array(out)
    np.testing.assert_array_equal(out.copy_to_host(), expected)
    np.testing.assert_array_equal(lse.copy_to_host(), expected_lse)
