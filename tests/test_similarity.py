"""Similarity attention: loop and NumPy twins, exact routes and zero-denominator policies."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernattn import DTypeError, OptionError, ZeroDenominatorError, softmax_attention
from kernattn import similarity_attention as sim_attn
from kernattn.similarity import ExponentialKernel, PolynomialKernel, SimilarityError

BACKENDS = ["numpy", "loops"]
POLICY_CASES = ["zero", "nan", 1e-6]


def exact_similarity(q, k, v, degree, c=0, allowed=None):
    """Reference (num, den) rows of similarity attention in Fraction arithmetic.

    q (N, D), k (S, D), v (S, M) of ints; allowed(i, j) -> bool.
    """
    rows = []
    for i, qi in enumerate(q):
        keys = [j for j in range(len(k)) if allowed is None or allowed(i, j)]
        sims = {j: (sum(Fraction(a) * b for a, b in zip(qi, k[j])) + c) ** degree for j in keys}
        num = [sum((sims[j] * v[j][col] for j in keys), Fraction(0)) for col in range(len(v[0]))]
        rows.append((num, sum(sims.values(), Fraction(0)), bool(keys)))
    return rows


# --- case: polynomial similarity attention --------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_polynomial_similarity_case_value(backend):
    """q = (1, 2), keys (3, 1) and (1, -1), v = [0, 1], sim = (q.k)^2: sims 25, 1 -> 1/26."""
    q, k, v = [[1, 2]], [[3, 1], [1, -1]], [[0], [1]]
    expected = float(Fraction(1, 26))
    out_int = sim_attn(np.array(q), np.array(k), np.array(v), PolynomialKernel(2), backend=backend)
    out_float = sim_attn(np.array(q, float), np.array(k, float), np.array(v, float),
                         lambda x, y: float(x @ y) ** 2, backend=backend)
    assert out_int[0, 0] == expected
    assert out_float[0, 0] == pytest.approx(expected, rel=1e-15)


def test_exact_route_accepts_fractions():
    q = np.array([[Fraction(1, 3), 2]], dtype=object)
    k = np.array([[3, Fraction(-1, 2)], [1, 1]], dtype=object)
    v = np.array([[1], [Fraction(1, 7)]], dtype=object)
    out = sim_attn(q, k, v, PolynomialKernel(2, c=1), backend="loops")
    (num, den, _), = exact_similarity(q.tolist(), k.tolist(), v.tolist(), 2, 1)
    assert out[0, 0] == float(num[0] / den)


# --- case: zero and signed denominators -----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_denominator_case_a(backend):
    """sim = (q.k)^2 with q = (0, 0): numerator 0 and denominator 0."""
    q, k, v = np.zeros((1, 2)), np.array([[3.0, 1.0], [1.0, -1.0]]), np.array([[0.0], [1.0]])
    with pytest.raises(ZeroDenominatorError, match=re.escape("(batch, head, query): (0, 0, 0)")) as info:
        sim_attn(q, k, v, PolynomialKernel(2), backend=backend)
    assert info.value.rows == [(0, 0, 0)]
    assert sim_attn(q, k, v, PolynomialKernel(2), zero_denominator="zero", backend=backend)[0, 0] == 0.0
    assert np.isnan(sim_attn(q, k, v, PolynomialKernel(2), zero_denominator="nan", backend=backend)[0, 0])
    assert sim_attn(q, k, v, PolynomialKernel(2), zero_denominator=1e-6, backend=backend)[0, 0] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_denominator_case_c_signed(backend):
    """sim = q.k, D = 1, q = [1], k = [1, -1], v = [0, 1]: numerator -1, denominator 0."""
    q, k, v = np.array([[1.0]]), np.array([[1.0], [-1.0]]), np.array([[0.0], [1.0]])
    with pytest.raises(ZeroDenominatorError, match=re.escape("is zero in 1 row(s)")):
        sim_attn(q, k, v, PolynomialKernel(1), backend=backend)
    eps = sim_attn(q, k, v, PolynomialKernel(1), zero_denominator=1e-6, backend=backend)[0, 0]
    assert eps == -1.0 / 1e-6
    assert eps == pytest.approx(-1e6, rel=1e-15)
    assert isinstance(ZeroDenominatorError([(0, 0, 0)]), ZeroDivisionError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rtol_flags_cancellation(backend):
    """den = 1e-12 is not zero, but cancels within rtol = 1e-9 of sum |sim| = 2."""
    q, k, v = np.array([[1.0]]), np.array([[1.0], [-1.0 + 1e-12]]), np.array([[0.0], [1.0]])
    assert np.isfinite(sim_attn(q, k, v, PolynomialKernel(1), backend=backend)).all()
    with pytest.raises(ZeroDenominatorError, match=re.escape("cancels to within rtol=1e-09")):
        sim_attn(q, k, v, PolynomialKernel(1), rtol=1e-9, backend=backend)
    out = sim_attn(q, k, v, PolynomialKernel(1), rtol=1e-9, zero_denominator="zero", backend=backend)
    assert out[0, 0] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_row_is_zero_under_raise(backend):
    """A row with no allowed key has no denominator: it is 0, not an error."""
    mask = np.array([[False, False], [True, True]])
    out = sim_attn(np.ones((2, 1)), np.ones((2, 1)), np.array([[1.0], [3.0]]),
                   PolynomialKernel(1), mask=mask, backend=backend)
    np.testing.assert_array_equal(out, [[0.0], [2.0]])


@st.composite
def signed_problems(draw):
    """Small integer q, k, v in [-2, 2], where zero denominators of q.k are common."""
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    n, s, d, m = (draw(st.integers(1, 5)) for _ in range(4))
    ints = lambda shape: np.array(
        draw(st.lists(st.integers(-2, 2), min_size=math.prod(shape), max_size=math.prod(shape)))
    ).reshape(shape)
    causal = draw(st.sampled_from([None, "top_left", "bottom_right"]))
    degree = draw(st.sampled_from([1, 3]))
    return ints((b, h, n, d)), ints((b, h, s, d)), ints((b, h, s, m)), causal, degree


def expected_rows(q, k, v, causal, degree):
    """Return {(b, h, i): (num, den, has_keys)} in Fraction arithmetic."""
    n, s = q.shape[2], k.shape[2]
    off = s - n if causal == "bottom_right" else 0
    allowed = (lambda i, j: j <= i + off) if causal else None
    rows = {}
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i, row in enumerate(
                exact_similarity(q[b, h].tolist(), k[b, h].tolist(), v[b, h].tolist(), degree,
                                 allowed=allowed)
            ):
                rows[(b, h, i)] = row
    return rows


@given(signed_problems(), st.sampled_from(BACKENDS))
def test_zero_denominator_policies_property(problem, backend):
    """Raise names exactly the rows with den == 0; 'zero' and 'nan' change only those rows;
    every other row is the correctly rounded exact quotient, from both backends."""
    q, k, v, causal, degree = problem
    rows = expected_rows(q, k, v, causal, degree)
    zero_rows = sorted(key for key, (_, den, has_keys) in rows.items() if has_keys and den == 0)
    kernel = PolynomialKernel(degree)
    call = lambda policy: sim_attn(q, k, v, kernel, causal=causal, zero_denominator=policy,
                                   backend=backend)
    if zero_rows:
        with pytest.raises(ZeroDenominatorError) as info:
            call("raise")
        assert sorted(info.value.rows) == zero_rows
    zero, nan = call("zero"), call("nan")
    for key, (num, den, has_keys) in rows.items():
        if key in zero_rows:
            assert (zero[key] == 0).all()
            assert np.isnan(nan[key]).all()
        else:
            expected = [float(x / den) if has_keys else 0.0 for x in num]
            assert zero[key].tolist() == expected
            assert nan[key].tolist() == expected


# --- twins ------------------------------------------------------------------------------


@st.composite
def float_problems(draw):
    b, hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 2))
    n, s, d, m = (draw(st.integers(1, 5)) for _ in range(4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((b, hq, n, d)), rng.standard_normal((b, hkv, s, d)), rng.standard_normal((b, hkv, s, m))
    options = {}
    choice = draw(st.sampled_from(["none", "mask", "causal", "window", "kv_lengths"]))
    if choice == "mask":
        options["mask"] = rng.random((b, hq, n, s)) < 0.7
    elif choice == "causal":
        options["causal"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    elif choice == "window":
        options.update(window=(1, 1), alignment="bottom_right")
    elif choice == "kv_lengths":
        options["kv_lengths"] = rng.integers(0, s + 1, size=b)
    return q, k, v, options


@given(float_problems(), st.sampled_from(["kernel", "callable", "exp"]))
def test_similarity_twins_agree(problem, sim_kind):
    q, k, v, options = problem
    sim = {
        "kernel": PolynomialKernel(2, c=1.0),
        "callable": lambda x, y: float(x @ y) ** 2 + 0.5,
        "exp": ExponentialKernel(),
    }[sim_kind]
    fast = sim_attn(q, k, v, sim, **options)
    oracle = sim_attn(q, k, v, sim, backend="loops", **options)
    np.testing.assert_allclose(fast, oracle, rtol=1e-10, atol=1e-12)


@given(float_problems())
def test_exponential_similarity_is_softmax(problem):
    q, k, v, options = problem
    expected = softmax_attention(q, k, v, **options)
    np.testing.assert_allclose(sim_attn(q, k, v, ExponentialKernel(), **options), expected,
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_bnhd_matches_bhnd(backend):
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((2, 4, 3, 2)), rng.standard_normal((2, 1, 5, 2)), rng.standard_normal((2, 1, 5, 3))
    kernel = PolynomialKernel(2, c=1.0)
    expected = sim_attn(q, k, v, kernel, backend=backend)
    out = sim_attn(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                   kernel, layout="bnhd", backend=backend)
    np.testing.assert_array_equal(out.transpose(0, 2, 1, 3), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_nan_does_not_leak(backend):
    k = np.array([[1.0], [np.nan]])
    v = np.array([[2.0], [np.nan]])
    out = sim_attn(np.ones((2, 1)), k, v, PolynomialKernel(2, c=1.0), causal=True, backend=backend)
    assert out[0, 0] == 2.0
    assert np.isnan(out[1, 0])


# --- bad input --------------------------------------------------------------------------


def raising_sim(x, y):
    raise RuntimeError("boom")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "sim, message",
    [
        (raising_sim, "sim raising_sim raised RuntimeError('boom') for q[0, 0, 0] and k[0, 0, 0]"),
        (lambda x, y: x * y, "returned ndarray"),
        (lambda x, y: float("nan"), "returned nan for q[0, 0, 0] and k[0, 0, 0]"),
    ],
    ids=["raises", "vector", "nan"],
)
def test_bad_sim_named(backend, sim, message):
    with pytest.raises(SimilarityError, match=re.escape(message)):
        sim_attn(np.ones((1, 2)), np.ones((2, 2)), np.ones((2, 1)), sim, backend=backend)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(zero_denominator="ignore"), "zero_denominator is 'ignore'; expected 'raise'"),
        (dict(zero_denominator=-1e-6), "a float eps must be positive and finite"),
        (dict(zero_denominator=1e-6, rtol=1e-3), "rtol applies only to 'raise', 'zero' and 'nan'"),
        (dict(rtol=-1.0), "rtol is -1.0; expected a finite number >= 0"),
        (dict(backend="cuda"), "backend is 'cuda'; expected one of 'numpy', 'loops'"),
    ],
)
def test_bad_options_named(options, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        sim_attn(np.ones((1, 2)), np.ones((2, 2)), np.ones((2, 1)), PolynomialKernel(2), **options)


@pytest.mark.parametrize("bad", [np.ones((1, 2), dtype=bool), np.ones((1, 2), dtype=complex)])
def test_bad_dtype_named(bad):
    with pytest.raises(DTypeError, match="q has"):
        sim_attn(bad, np.ones((2, 2)), np.ones((2, 1)), PolynomialKernel(2))


def test_sim_not_callable():
    with pytest.raises(OptionError, match=re.escape("sim is int 3; expected a callable")):
        sim_attn(np.ones((1, 2)), np.ones((2, 2)), np.ones((2, 1)), 3)
