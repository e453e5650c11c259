"""Linear attention: every form and backend against each other, exact routes, state, errors."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernattn import (
    DTypeError,
    OptionError,
    ShapeError,
    ZeroDenominatorError,
    linear_attention,
    similarity_attention,
)
from kernattn import feature_maps as fm
from kernattn.feature_maps import FeatureMapError
from kernattn.similarity import PolynomialKernel

BACKENDS = ["numpy", "loops"]
FORMS = ["quadratic", "parallel", "recurrent", "chunked"]


# --- case: causal linear attention normaliser -------------------------------------------


def form_options():
    """(form, chunk_size) pairs: every form, and chunked with sizes 1, 2, 3, 4."""
    return [(form, 64) for form in FORMS[:3]] + [("chunked", c) for c in (1, 2, 3, 4)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form, chunk_size", form_options())
def test_causal_normaliser_case_values(backend, form, chunk_size):
    """elu+1 with q = k = 0 makes every feature 1: row i is the mean of v[0..i]."""
    q = k = np.zeros((4, 1))
    v = np.arange(4.0).reshape(4, 1)
    out = linear_attention(q, k, v, fm.EluPlusOne(), causal=True, form=form,
                           chunk_size=chunk_size, backend=backend)
    assert out.ravel().tolist() == [0.0, 0.5, 1.0, 1.5]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form, chunk_size", form_options())
def test_causal_normaliser_future_invariance(backend, form, chunk_size):
    """Changing k[3] and v[3] leaves rows 0..2 bit-for-bit unchanged."""
    q = k = np.zeros((4, 1))
    v = np.arange(4.0).reshape(4, 1)
    k2, v2 = k.copy(), v.copy()
    k2[3], v2[3] = 5.0, -7.0
    options = dict(causal=True, form=form, chunk_size=chunk_size, backend=backend)
    before = linear_attention(q, k, v, fm.EluPlusOne(), **options)
    after = linear_attention(q, k2, v2, fm.EluPlusOne(), **options)
    np.testing.assert_array_equal(after[:3], before[:3])


@given(
    st.lists(st.integers(-9, 9), min_size=1, max_size=12),
    st.sampled_from(FORMS),
    st.integers(1, 13),
    st.sampled_from(BACKENDS),
)
def test_equal_features_give_prefix_means(values, form, chunk_size, backend):
    """With every feature equal, row i is exactly the correctly rounded mean of v[0..i]."""
    n = len(values)
    q = k = np.zeros((n, 2))
    v = np.array(values, dtype=float).reshape(n, 1)
    out = linear_attention(q, k, v, fm.EluPlusOne(), causal=True, form=form,
                           chunk_size=chunk_size, backend=backend)
    expected = [float(Fraction(sum(values[: i + 1]), i + 1)) for i in range(n)]
    assert out.ravel().tolist() == expected


@st.composite
def float_problems(draw, equal_lengths=False):
    b, hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 2))
    n = draw(st.integers(1, 7))
    s = n if equal_lengths else draw(st.integers(1, 7))
    d, m = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, k = rng.standard_normal((b, hq, n, d)), rng.standard_normal((b, hkv, s, d))
    return q, k, rng.standard_normal((b, hkv, s, m))


@given(float_problems(equal_lengths=True), st.sampled_from(FORMS), st.integers(1, 8),
       st.sampled_from(BACKENDS), st.data())
def test_future_keys_leave_causal_rows_unchanged(problem, form, chunk_size, backend, data):
    """Overwriting keys and values from position t on, even with NaN, leaves rows < t
    bit-identical."""
    q, k, v = problem
    n = q.shape[2]
    t = data.draw(st.integers(0, n - 1))
    k2, v2 = k.copy(), v.copy()
    k2[:, :, t:], v2[:, :, t:] = np.nan, np.nan
    options = dict(causal=True, form=form, chunk_size=chunk_size, backend=backend)
    before = linear_attention(q, k, v, fm.EluPlusOne(), **options)
    after = linear_attention(q, k2, v2, fm.EluPlusOne(), **options)
    np.testing.assert_array_equal(after[:, :, :t], before[:, :, :t])


# --- forms and twins --------------------------------------------------------------------


MAPS = {
    "elu": fm.EluPlusOne,
    "taylor": lambda: fm.TaylorExp(2),
    "favor": lambda: fm.PositiveRandomFeatures(6, random_state=7),
    "poly-even": lambda: fm.Polynomial(2, c=1.0),
}


@given(float_problems(), st.sampled_from(sorted(MAPS)), st.sampled_from(FORMS),
       st.integers(1, 8), st.sampled_from([False, "top_left", "bottom_right"]))
def test_linear_forms_and_twins_agree(problem, map_name, form, chunk_size, causal):
    """Every form on NumPy agrees with the quadratic loop oracle and with similarity
    attention on sim = φ(q) . φ(k)."""
    q, k, v = problem
    phi = MAPS[map_name]()
    options = dict(causal=causal, zero_denominator="zero")
    oracle = linear_attention(q, k, v, phi, form="quadratic", backend="loops", **options)
    fast = linear_attention(q, k, v, phi, form=form, chunk_size=chunk_size, **options)
    loops = linear_attention(q, k, v, phi, form=form, chunk_size=chunk_size, backend="loops",
                             **options)
    similarity = similarity_attention(q, k, v, lambda x, y: float(phi(x) @ phi(y)), **options)
    np.testing.assert_allclose(fast, oracle, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(loops, oracle, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(similarity, oracle, rtol=1e-9, atol=1e-12)


@st.composite
def integer_problems(draw):
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    n, s = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    d, m = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    ints = lambda shape: np.array(
        draw(st.lists(st.integers(-3, 3), min_size=math.prod(shape), max_size=math.prod(shape)))
    ).reshape(shape)
    causal = draw(st.sampled_from([False, "top_left", "bottom_right"]))
    return ints((b, h, n, d)), ints((b, h, s, d)), ints((b, h, s, m)), causal


@given(integer_problems(), st.integers(1, 4), st.sampled_from([0, 1, 2]),
       st.sampled_from(FORMS), st.integers(1, 7))
def test_polynomial_linear_equals_similarity_exactly(problem, degree, c, form, chunk_size):
    """Exact route: linear attention with Polynomial(p, c) and similarity attention with
    (q.k + c)^p give the same correctly rounded result, bit for bit, in every form."""
    q, k, v, causal = problem
    options = dict(causal=causal, zero_denominator="nan", backend="loops")
    expected = similarity_attention(q, k, v, PolynomialKernel(degree, c), **options)
    out = linear_attention(q, k, v, fm.Polynomial(degree, c=c), form=form,
                           chunk_size=chunk_size, **options)
    np.testing.assert_array_equal(out, expected)


def test_polynomial_linear_case_value():
    """q = (1, 2), keys (3, 1) and (1, -1), v = [0, 1], φ for (q.k)^2: output 1/26."""
    q, k, v = np.array([[1, 2]]), np.array([[3, 1], [1, -1]]), np.array([[0], [1]])
    for form in FORMS:
        exact = linear_attention(q, k, v, fm.Polynomial(2, c=0), form=form, backend="loops")
        fast = linear_attention(q, k, v, fm.Polynomial(2, c=0), form=form)
        assert exact[0, 0] == float(Fraction(1, 26))
        assert fast[0, 0] == pytest.approx(1 / 26, rel=1e-14)


@given(float_problems(equal_lengths=True), st.sampled_from(FORMS), st.integers(1, 8),
       st.sampled_from(BACKENDS), st.data())
def test_split_and_resume_equals_one_call(problem, form, chunk_size, backend, data):
    q, k, v = problem
    n = q.shape[2]
    split = data.draw(st.integers(0, n))
    phi = fm.Polynomial(2, c=1.0)
    options = dict(causal=True, form=form, chunk_size=chunk_size, backend=backend,
                   zero_denominator="zero", return_state=True)
    whole, (s_whole, z_whole) = linear_attention(q, k, v, phi, **options)
    first, state = linear_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], phi,
                                    **options)
    second, (s_end, z_end) = linear_attention(
        q[:, :, split:], k[:, :, split:], v[:, :, split:], phi, initial_state=state, **options
    )
    np.testing.assert_allclose(np.concatenate([first, second], axis=2), whole,
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s_end, s_whole, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(z_end, z_whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_shapes_follow_q_rank(backend):
    phi = fm.Identity()
    out, (s, z) = linear_attention(np.ones((3, 2)), np.ones((3, 2)), np.ones((3, 4)), phi,
                                   return_state=True, backend=backend)
    assert out.shape == (3, 4)
    assert s.shape == (2, 4)
    assert z.shape == (2,)
    np.testing.assert_array_equal(s, np.full((2, 4), 3.0))
    _, (s4, z4) = linear_attention(np.ones((2, 4, 3, 2)), np.ones((2, 1, 3, 2)),
                                   np.ones((2, 1, 3, 5)), phi, return_state=True, backend=backend)
    assert s4.shape == (2, 1, 2, 5)
    assert z4.shape == (2, 1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_layout_bnhd_matches_bhnd(backend, form):
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((2, 4, 5, 2)), rng.standard_normal((2, 2, 5, 2)), rng.standard_normal((2, 2, 5, 3))
    t = lambda x: x.transpose(0, 2, 1, 3)
    options = dict(causal=True, form=form, chunk_size=2, backend=backend)
    expected = linear_attention(q, k, v, fm.EluPlusOne(), **options)
    out = linear_attention(t(q), t(k), t(v), fm.EluPlusOne(), layout="bnhd", **options)
    np.testing.assert_array_equal(t(out), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_kv_lengths_hide_padding(backend, form):
    rng = np.random.default_rng(4)
    q, k, v = rng.standard_normal((2, 1, 4, 2)), rng.standard_normal((2, 1, 6, 2)), rng.standard_normal((2, 1, 6, 2))
    lengths = np.array([4, 6])
    k_nan, v_nan = k.copy(), v.copy()
    k_nan[0, :, 4:], v_nan[0, :, 4:] = np.nan, np.nan
    options = dict(causal="bottom_right", kv_lengths=lengths, form=form, chunk_size=3,
                   backend=backend)
    out = linear_attention(q, k_nan, v_nan, fm.EluPlusOne(), **options)
    expected = similarity_attention(q, k, v, lambda x, y: float(np.sum(
        fm.EluPlusOne()(x) * fm.EluPlusOne()(y))), causal="bottom_right", kv_lengths=lengths)
    np.testing.assert_allclose(out, expected, rtol=1e-12)


# --- case: zero and signed denominators ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_relu_zero_denominator_case_b(backend, form):
    """ReLU map, q = (-1, -2): φ(q) = 0, so the denominator is 0."""
    q, k, v = np.array([[-1.0, -2.0]]), np.array([[1.0, 1.0], [2.0, 0.0]]), np.array([[0.0], [1.0]])
    call = lambda policy: linear_attention(q, k, v, fm.ReLU(), form=form, backend=backend,
                                           zero_denominator=policy)
    with pytest.raises(ZeroDenominatorError) as info:
        call("raise")
    assert info.value.rows == [(0, 0, 0)]
    assert call("zero")[0, 0] == 0.0
    assert np.isnan(call("nan")[0, 0])
    assert call(1e-6)[0, 0] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form, chunk_size", form_options())
def test_causal_zero_denominator_case_d(backend, form, chunk_size):
    """Identity map, D = 1, q = [1, 1, 1], k = [0, 1, 1]: only row 0 has den = 0."""
    q, k, v = np.ones((3, 1)), np.array([[0.0], [1.0], [1.0]]), np.array([[5.0], [1.0], [2.0]])
    call = lambda policy: linear_attention(q, k, v, fm.Identity(), causal=True, form=form,
                                           chunk_size=chunk_size, backend=backend,
                                           zero_denominator=policy)
    with pytest.raises(ZeroDenominatorError, match=re.escape("in 1 row(s)")) as info:
        call("raise")
    assert info.value.rows == [(0, 0, 0)]
    zero, nan = call("zero"), call("nan")
    assert zero.ravel().tolist() == [0.0, 1.0, 1.5]
    assert np.isnan(nan[0, 0])
    np.testing.assert_array_equal(nan[1:], zero[1:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_linear_rtol_flags_cancellation(backend, form):
    q, k, v = np.array([[1.0]]), np.array([[1.0], [-1.0 + 1e-12]]), np.array([[0.0], [1.0]])
    assert np.isfinite(linear_attention(q, k, v, fm.Identity(), form=form, backend=backend)).all()
    with pytest.raises(ZeroDenominatorError, match="cancels to within rtol"):
        linear_attention(q, k, v, fm.Identity(), form=form, backend=backend, rtol=1e-9)


# --- bad input ----------------------------------------------------------------------------


ONES = (np.ones((3, 2)), np.ones((3, 2)), np.ones((3, 1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_map_wrong_shape_named(backend):
    flat = fm.from_function(lambda x: np.ones(3))
    with pytest.raises(ShapeError, match=re.escape("returned shape (3,) for q of shape (1, 1, 3, 2)")):
        linear_attention(*ONES, flat, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_map_nan_named(backend):
    log_map = fm.from_function(np.log)
    q = np.array([[1.0, -1.0], [1.0, 1.0], [1.0, 1.0]])
    with np.errstate(invalid="ignore"):
        with pytest.raises(FeatureMapError, match=re.escape("returned NaN or Inf for finite q[0, 0, 0]")):
            linear_attention(q, *ONES[1:], log_map, backend=backend)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(chunk_size=0), "chunk_size is 0; expected an integer >= 1"),
        (dict(chunk_size=True), "chunk_size is True; expected an integer >= 1"),
        (dict(form="fused"), "form is 'fused'; expected one of 'quadratic'"),
        (dict(causal=True, alignment="left"), "alignment is 'left'"),
    ],
)
def test_bad_options_named(options, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        linear_attention(*ONES, fm.Identity(), **options)


def test_mismatched_state_named():
    state = (np.zeros((2, 2)), np.zeros(3))
    with pytest.raises(ShapeError, match=re.escape("initial_state S0 has shape (2, 2); expected (2, 1)")):
        linear_attention(*ONES, fm.Identity(), initial_state=state)
    with pytest.raises(ShapeError, match=re.escape("initial_state z0 has shape (3,); expected (2,)")):
        linear_attention(*ONES, fm.Identity(), initial_state=(np.zeros((2, 1)), np.zeros(3)))


@pytest.mark.parametrize("dtype", [bool, complex])
def test_bad_dtype_named(dtype):
    with pytest.raises(DTypeError, match="k has"):
        linear_attention(ONES[0], ONES[1].astype(dtype), ONES[2], fm.Identity())


def test_feature_map_not_callable():
    with pytest.raises(OptionError, match=re.escape("feature_map is str 'elu'")):
        linear_attention(*ONES, "elu")


def test_complex_feature_map_rejected():
    x = np.ones((3, 2))
    with pytest.raises(DTypeError, match="returned dtype complex128; expected real floating features"):
        linear_attention(x, x, x, lambda features: features + 0j)
