"""CUDA linear attention against the loop oracle (simulator without a GPU).

Under the simulator the state pieces hold 4 keys (`SIMULATOR_TILES`) unless the test
passes ``form="chunked"`` with its own chunk size, so sequences of a few keys already
read several state prefixes.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernattn import ZeroDenominatorError, linear_attention
from kernattn import feature_maps as fm

pytest.importorskip("numba_cuda")

from kernattn import cuda as kcuda  # noqa: E402  (after the skip)

try:
    kcuda.require_cuda()
except kcuda.CudaUnavailableError as err:
    pytest.skip(str(err), allow_module_level=True)

from tests.test_numba_linear import (  # noqa: E402
    FORMS,
    MAPS,
    assert_same_outcome,
    form_options,
    problems,
    run,
)

# --- case: causal linear attention normaliser -------------------------------------------


@pytest.mark.parametrize("form, chunk_size", form_options())
def test_cuda_causal_normaliser_case_values(form, chunk_size):
    """elu+1 with q = k = 0 makes every feature 1: row i is the mean of v[0..i]."""
    q = k = np.zeros((4, 1))
    v = np.arange(4.0).reshape(4, 1)
    out = linear_attention(q, k, v, fm.EluPlusOne(), causal=True, form=form,
                           chunk_size=chunk_size, backend="cuda")
    assert out.ravel().tolist() == [0.0, 0.5, 1.0, 1.5]


@pytest.mark.parametrize("form, chunk_size", form_options())
def test_cuda_causal_normaliser_future_invariance(form, chunk_size):
    """Changing k[3] and v[3] leaves rows 0..2 bit-for-bit unchanged."""
    q = k = np.zeros((4, 1))
    v = np.arange(4.0).reshape(4, 1)
    k2, v2 = k.copy(), v.copy()
    k2[3], v2[3] = 5.0, -7.0
    options = dict(causal=True, form=form, chunk_size=chunk_size, backend="cuda")
    before = linear_attention(q, k, v, fm.EluPlusOne(), **options)
    after = linear_attention(q, k2, v2, fm.EluPlusOne(), **options)
    np.testing.assert_array_equal(after[:3], before[:3])


# --- against the loop oracle ---------------------------------------------------------------


@settings(max_examples=15)
@given(problems())
def test_cuda_linear_matches_loops(problem):
    """Output, state and raised rows equal the loop twin's for every option."""
    (q, k, v), map_name, options = problem
    feature_map = MAPS[map_name]()
    oracle = run("loops", q, k, v, feature_map, form="quadratic",
                 **{key: value for key, value in options.items() if key != "form"})
    assert_same_outcome(run("cuda", q, k, v, feature_map, **options), oracle)


@settings(max_examples=8)
@given(st.integers(1, 12), st.integers(1, 5), st.sampled_from(FORMS), st.data())
def test_cuda_hidden_keys_never_read(n, chunk_size, form, data):
    """NaN in keys and values that no query may see (future keys, padding) cannot leak."""
    rng = np.random.default_rng(n)
    q, k, v = (rng.standard_normal((2, 1, n, 2)) for _ in range(3))
    t = data.draw(st.integers(0, n - 1))
    lengths = np.array([n, t])
    k2, v2 = k.copy(), v.copy()
    k2[:, :, t:], v2[:, :, t:] = np.nan, np.nan
    k2[0], v2[0] = k[0], v[0]
    options = dict(causal="top_left", form=form, chunk_size=chunk_size, backend="cuda",
                   kv_lengths=lengths)
    before = linear_attention(q, k, v, fm.EluPlusOne(), **options)
    after = linear_attention(q, k2, v2, fm.EluPlusOne(), **options)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1, :, :t], before[1, :, :t])
    assert np.isfinite(after).all()


# --- zero and signed denominators ---------------------------------------------------------


@pytest.mark.parametrize("form, chunk_size", form_options())
def test_cuda_causal_zero_denominator_policies(form, chunk_size):
    """Identity map, D = 1, q = [1, 1, 1], k = [0, 1, 1]: only row 0 has den = 0."""
    q, k, v = np.ones((3, 1)), np.array([[0.0], [1.0], [1.0]]), np.array([[5.0], [1.0], [2.0]])

    def call(policy):
        return linear_attention(q, k, v, fm.Identity(), causal=True, form=form,
                                chunk_size=chunk_size, backend="cuda", zero_denominator=policy)

    with pytest.raises(ZeroDenominatorError) as info:
        call("raise")
    assert info.value.rows == [(0, 0, 0)]
    assert call("zero").ravel().tolist() == [0.0, 1.0, 1.5]
    nan = call("nan")
    assert np.isnan(nan[0, 0])
    assert nan[1:].ravel().tolist() == [1.0, 1.5]
    assert call(0.5).ravel().tolist() == [0.0, 1.0 / 1.5, 3.0 / 2.5]  # num / (den + eps)


@pytest.mark.parametrize("form", FORMS)
def test_cuda_rtol_flags_cancellation(form):
    q, k, v = np.array([[1.0]]), np.array([[1.0], [-1.0 + 1e-12]]), np.array([[0.0], [1.0]])
    assert np.isfinite(linear_attention(q, k, v, fm.Identity(), form=form, backend="cuda")).all()
    with pytest.raises(ZeroDenominatorError, match="cancels to within rtol"):
        linear_attention(q, k, v, fm.Identity(), form=form, backend="cuda", rtol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_cuda_public_call_keeps_float32(causal):
    """float32 input is computed in float32, within float32 error of the oracle."""
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 1, 9, 2)).astype(np.float32) for _ in range(3))
    out, (state_s, state_z) = linear_attention(
        q, k, v, fm.EluPlusOne(), causal=causal, backend="cuda", return_state=True
    )
    expected = linear_attention(q, k, v, fm.EluPlusOne(), causal=causal, backend="loops")
    assert out.dtype == np.float32
    assert state_s.dtype == np.float32
    assert state_z.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
