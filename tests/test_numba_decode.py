"""Decode attention (new tokens against a KV cache): numba against the loop oracle."""

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from functools import partial

from kernattn import OptionError, decode_attention, softmax_attention

# The Numba backend under test; the oracle calls name their backend explicitly.
decode_numba = partial(decode_attention, backend="numba")
from kernattn.testing import assert_attention_close

numba = pytest.importorskip("numba")


def assert_float64_close(actual, desired):
    """Assert agreement to 1e-12 with NaN and -inf in the same places."""
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(desired))
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(desired))
    finite = np.isfinite(desired)
    np.testing.assert_allclose(actual[finite], desired[finite], rtol=1e-12, atol=1e-12)


def cache_case(batch, q_heads, kv_heads, tokens, capacity, d, m, lengths, dtype, seed):
    """Return q, k_cache, v_cache with NaN in every slot beyond the valid lengths."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, q_heads, tokens, d)).astype(dtype)
    k = rng.normal(size=(batch, kv_heads, capacity, d)).astype(dtype)
    v = rng.normal(size=(batch, kv_heads, capacity, m)).astype(dtype)
    for row, length in enumerate(lengths):
        k[row, :, length:] = np.nan
        v[row, :, length:] = np.nan
    return q, k, v


@st.composite
def decode_inputs(draw):
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.integers(1, 2))
    q_heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    tokens = draw(st.integers(1, 3))
    capacity = draw(st.integers(0, 12))
    lengths = draw(st.lists(st.integers(0, capacity), min_size=batch, max_size=batch))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    q, k, v = cache_case(
        batch, q_heads, kv_heads, tokens, capacity, draw(st.integers(1, 4)),
        draw(st.integers(1, 3)), lengths, dtype, draw(st.integers(0, 2**32 - 1)),
    )
    options = dict(kv_lengths=np.array(lengths))
    if draw(st.booleans()):
        options["scale"] = draw(st.sampled_from([0.1, 2.0]))
    if draw(st.booleans()):
        options["softcap"] = draw(st.sampled_from([0.5, 5.0]))
    if draw(st.booleans()):
        options["num_splits"] = draw(st.integers(1, 5))
    return q, k, v, options


@given(decode_inputs())
def test_decode_numba_matches_loops(inputs):
    q, k, v, options = inputs
    out, lse = decode_numba(q, k, v, return_lse=True, **options)
    options.pop("num_splits", None)
    ref_out, ref_lse = decode_attention(q, k, v, return_lse=True, backend="loops", **options)
    assert out.dtype == q.dtype
    if q.dtype == np.float64:
        assert_float64_close(out, ref_out)
        assert_float64_close(lse, ref_lse)
    else:
        assert_attention_close(out, ref_out, dtype="float32", rtol=1e-5, atol=1e-5)
        assert_attention_close(lse, ref_lse, dtype="float32", rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [8, 2, 1], ids=["mha", "gqa4", "mqa"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_numba_long_cache(kv_heads, tokens):
    lengths = [3000, 1, 2049]
    q, k, v = cache_case(3, 8, kv_heads, tokens, 3072, 16, 8, lengths, np.float64, seed=1)
    out, lse = decode_numba(q, k, v, kv_lengths=lengths, return_lse=True)
    ref_out, ref_lse = decode_attention(
        q, k, v, kv_lengths=lengths, return_lse=True, backend="numpy"
    )
    assert_float64_close(out, ref_out)
    assert_float64_close(lse, ref_lse)
    if tokens == 3:  # batch row 1 contains one key, so only its last token may read a key
        assert (out[1, :, :2] == 0).all()
        assert np.isneginf(lse[1, :, :2]).all()


def test_decode_equals_last_rows_of_full_causal_pass():
    q, k, v = cache_case(2, 4, 2, 40, 40, 8, 8, [40, 40], np.float64, seed=2)
    full = softmax_attention(q, k, v, causal=True)
    out = decode_numba(q[:, :, -3:], k, v, kv_lengths=[40, 40])
    assert_float64_close(out, full[:, :, -3:])


@pytest.mark.parametrize("kv_heads,expected", [(2, [1, 1, 2, 2]), (1, [1, 1, 1, 1])])
def test_decode_gqa_head_mapping(kv_heads, expected):
    q = np.zeros((1, 4, 1, 1))
    k = np.zeros((1, kv_heads, 3, 1))
    v = np.ones((1, kv_heads, 3, 1)) * (np.arange(kv_heads) + 1.0)[None, :, None, None]
    out = decode_numba(q, k, v, kv_lengths=[3])
    np.testing.assert_array_equal(out.ravel(), expected)


def test_decode_two_tokens_by_hand():
    k = np.zeros((1, 1, 6, 1))
    v = np.arange(6.0).reshape(1, 1, 6, 1)
    v[..., 4:, :] = np.nan  # stale slots beyond the valid length
    q = np.zeros((1, 1, 2, 1))
    out = decode_numba(q, k, v, kv_lengths=[4], num_splits=2)
    np.testing.assert_array_equal(out.ravel(), [1.0, 1.5])


def test_decode_split_count_changes_only_rounding():
    q, k, v = cache_case(2, 4, 1, 1, 5000, 32, 32, [5000, 4321], np.float64, seed=3)
    reference = decode_numba(q, k, v, kv_lengths=[5000, 4321], num_splits=1)
    for splits in (2, 7, 64):
        out = decode_numba(q, k, v, kv_lengths=[5000, 4321], num_splits=splits)
        assert_float64_close(out, reference)


def test_decode_thread_count_bit_identical():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    previous = numba.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            for dtype in (np.float64, np.float32):
                q, k, v = cache_case(2, 8, 2, 2, 4000, 16, 16, [4000, 2500], dtype, seed=4)
                results[threads, dtype] = decode_numba(
                    q, k, v, kv_lengths=[4000, 2500], return_lse=True
                )
    finally:
        numba.set_num_threads(previous)
    for dtype in (np.float64, np.float32):
        for one, two in zip(results[1, dtype], results[2, dtype]):
            assert one.tobytes() == two.tobytes()


def test_decode_bnhd_layout():
    q, k, v = cache_case(2, 4, 2, 2, 30, 8, 8, [30, 12], np.float64, seed=5)
    out = decode_numba(q, k, v, kv_lengths=[30, 12])
    bnhd = decode_numba(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
        kv_lengths=[30, 12], layout="bnhd",
    )
    np.testing.assert_array_equal(bnhd.transpose(0, 2, 1, 3), out)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(kv_lengths=[4], num_splits=0),
         "num_splits is 0; expected a positive integer or None"),
        (dict(kv_lengths=None), "kv_lengths is None; expected one valid length"),
        (dict(kv_lengths=[4], backend="tpu"),
         "backend is 'tpu'; expected one of 'numpy', 'loops', 'numba', 'cuda'"),
        (dict(kv_lengths=[7]), "kv_lengths[0] is 7; expected a length between 0 and S = 6"),
    ],
)
def test_decode_invalid_options(options, message):
    q, k = np.zeros((1, 1, 1, 1)), np.zeros((1, 1, 6, 1))
    with pytest.raises((OptionError, ValueError), match=re.escape(message)):
        decode_attention(q, k, k, **options)
