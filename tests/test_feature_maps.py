"""Feature maps: exact identities in Fraction arithmetic, random maps against their kernels."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from kernattn import OptionError, ShapeError
from kernattn import feature_maps as fm

ALPHA = 1e-3  # significance level of every statistical test below


def exact_dot(feature_map, x, y) -> Fraction:
    """Return φ(x) . φ(y) = sum_f w_f u_f(x) u_f(y) in exact arithmetic."""
    w, ux = feature_map.rational_features(x)
    w_y, uy = feature_map.rational_features(y)
    assert w == w_y
    return sum((a * b * c for a, b, c in zip(w, ux, uy)), Fraction(0))


def test_polynomial_case_values():
    """x = (1, 2), y = (3, 1): (x.y)^2 = 25 and (x.y + 1)^2 = 36, exactly."""
    x, y = [1, 2], [3, 1]
    assert exact_dot(fm.Polynomial(2, c=0), x, y) == 25
    assert exact_dot(fm.Polynomial(2, c=1), x, y) == 36
    phi = fm.Polynomial(2, c=1)(np.array([1.0, 2.0]))
    r2 = math.sqrt(2)
    np.testing.assert_allclose(phi, [1, r2, 2 * r2, 1, 2 * r2, 4], rtol=1e-15)


def test_polynomial_wrong_maps_give_case_values():
    """The monomials without √2 give 19 and the elementwise square gives 13, not 25."""
    _, ux = fm.Polynomial(2, c=0).rational_features([1, 2])
    _, uy = fm.Polynomial(2, c=0).rational_features([3, 1])
    assert sum(a * b for a, b in zip(ux, uy)) == 19
    assert sum(a * a * b * b for a, b in zip([1, 2], [3, 1])) == 13


def test_taylor_case_value():
    """Second-order Taylor map: 1 + s + s^2/2 = 18.5 for s = x.y = 5, exactly."""
    assert exact_dot(fm.TaylorExp(2, scale=1), [1, 2], [3, 1]) == Fraction(37, 2)


@st.composite
def polynomial_cases(draw):
    p = draw(st.integers(1, 4))
    d = draw(st.integers(1, 5))
    c = draw(st.sampled_from([0, 1, 2]))
    vector = st.lists(st.integers(-5, 5), min_size=d, max_size=d)
    return p, c, draw(vector), draw(vector)


@given(polynomial_cases())
def test_polynomial_identity_exact(case):
    p, c, x, y = case
    dot = sum(a * b for a, b in zip(x, y))
    assert exact_dot(fm.Polynomial(p, c=c), x, y) == (dot + c) ** p


@given(polynomial_cases())
def test_polynomial_float_features_match_exact(case):
    p, c, x, _ = case
    phi = fm.Polynomial(p, c=c)
    w, u = phi.rational_features(x)
    expected = [math.sqrt(wi) * float(ui) for wi, ui in zip(w, u)]
    np.testing.assert_allclose(phi(np.array(x, dtype=float)), expected, rtol=1e-13)


@pytest.mark.parametrize("d", range(1, 6))
@pytest.mark.parametrize("p", range(1, 5))
def test_polynomial_num_features(p, d):
    assert fm.Polynomial(p, c=1).num_features(d) == math.comb(d + p, p)
    assert fm.Polynomial(p, c=0).num_features(d) == math.comb(d + p - 1, p)
    assert fm.Polynomial(p, c=1)(np.zeros((3, d))).shape == (3, math.comb(d + p, p))


@given(
    st.integers(0, 4),
    st.fractions(min_value=Fraction(1, 8), max_value=2, max_denominator=8),
    st.lists(st.integers(-4, 4), min_size=3, max_size=3),
    st.lists(st.integers(-4, 4), min_size=3, max_size=3),
)
def test_taylor_identity_exact(order, scale, x, y):
    s = scale * sum(a * b for a, b in zip(x, y))
    expected = sum(s**r / math.factorial(r) for r in range(order + 1))
    assert exact_dot(fm.TaylorExp(order, scale=scale), x, y) == expected


def test_taylor_default_scale_is_not_rational():
    phi = fm.TaylorExp(2)
    assert not phi.rational
    with pytest.raises(NotImplementedError, match="irrational"):
        phi.rational_features([1, 2])
    x, y = np.array([1.0, 2.0, 0.5, -1.0]), np.array([3.0, 1.0, 2.0, 0.0])
    s = (x @ y) / 2  # scale 1/sqrt(4)
    assert phi(x) @ phi(y) == pytest.approx(1 + s + s * s / 2, rel=1e-14)


def test_identity_and_relu_exact():
    assert exact_dot(fm.Identity(), [1, -2], [3, 4]) == -5
    assert exact_dot(fm.ReLU(), [1, -2], [3, 4]) == 3
    assert fm.ReLU().rational_features([-1, -2])[1] == [0, 0]


def test_elu_plus_one_values():
    x = np.array([-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(fm.EluPlusOne()(x), [math.exp(-1.0), 1.0, 3.0])


@pytest.mark.parametrize(
    "make",
    [
        lambda: fm.PositiveRandomFeatures(8, random_state=3),
        lambda: fm.PositiveRandomFeatures(8, orthogonal=True, random_state=3),
        lambda: fm.TrigRandomFeatures(8, random_state=3),
        lambda: fm.RandomFourierFeatures(8, gamma=0.5, random_state=3),
    ],
    ids=["favor", "favor-orthogonal", "trig", "fourier"],
)
def test_random_map_reproducible_from_seed(make):
    x = np.random.default_rng(0).standard_normal((5, 4))
    np.testing.assert_array_equal(make()(x), make()(x))


def test_random_map_replays_projection():
    fitted = fm.PositiveRandomFeatures(6, random_state=1).fit(3)
    replay = fm.PositiveRandomFeatures(None, projection=fitted.projection_)
    x = np.random.default_rng(2).standard_normal((4, 3))
    np.testing.assert_array_equal(replay(x), fitted(x))
    rff = fm.RandomFourierFeatures(5, gamma=2.0, random_state=4).fit(3)
    replay_rff = fm.RandomFourierFeatures(
        None, gamma=2.0, projection=rff.projection_, offset=rff.offset_
    )
    np.testing.assert_array_equal(replay_rff(x), rff(x))


def test_favor_formula_on_given_projection():
    """φ(x) = m^(-1/2) exp(W x' - |x'|²/2) with x' = x D^(-1/4), by hand for D = 4, m = 2."""
    w = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 2.0]])
    x = np.array([1.0, 2.0, 0.0, 1.0])
    xs = x / math.sqrt(2)  # 4^(-1/4)
    half_sq = (1 + 4 + 1) / 4
    expected = [math.exp(xs[0] - half_sq), math.exp(-xs[1] + 2 * xs[3] - half_sq)]
    phi = fm.PositiveRandomFeatures(None, projection=w)(x)
    np.testing.assert_allclose(phi, np.array(expected) / math.sqrt(2), rtol=1e-15)


def test_random_map_rejects_other_dimension():
    phi = fm.PositiveRandomFeatures(4, random_state=0).fit(3)
    with pytest.raises(ShapeError, match=re.escape("fitted for D = 3, but the input has D = 5")):
        phi(np.zeros(5))


def test_orthogonal_projection_rows():
    """Rows of each D-block are orthogonal; norms follow chi(D) (KS test, level ALPHA)."""
    d = 4
    w = fm.PositiveRandomFeatures(400, orthogonal=True, random_state=5).fit(d).projection_
    for start in range(0, 400, d):
        gram = w[start:start + d] @ w[start:start + d].T
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-12)
    assert stats.kstest(np.linalg.norm(w, axis=1), "chi", args=(d,)).pvalue > ALPHA


# Statistical tests. Each runs fixed seeds, so it is deterministic; the stated
# false-failure probability is the chance that a correct map fails for a fresh seed.
Q = np.array([0.5, -0.3, 0.8, 0.1])
K = np.array([0.2, 0.4, -0.6, 0.3])
DRAWS = 400
FEATURES = 16


def estimates(make, seeds=range(DRAWS)) -> np.ndarray:
    values = []
    for seed in seeds:
        phi = make(seed)
        values.append(float(phi(Q) @ phi(K)))
    return np.array(values)


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: fm.PositiveRandomFeatures(FEATURES, random_state=seed),
        lambda seed: fm.PositiveRandomFeatures(FEATURES, orthogonal=True, random_state=seed),
        lambda seed: fm.TrigRandomFeatures(FEATURES, random_state=seed),
        lambda seed: fm.RandomFourierFeatures(FEATURES, gamma=0.7, random_state=seed),
    ],
    ids=["favor", "favor-orthogonal", "trig", "fourier"],
)
def test_random_features_unbiased(make):
    """Mean of 400 estimates (seeds 0..399, m = 16) matches the kernel: two-sided one-sample
    t-test at level 1e-3, so a correct map fails with probability about 1e-3."""
    values = estimates(make)
    target = float(make(0).kernel(Q, K))
    assert stats.ttest_1samp(values, target).pvalue > ALPHA


def test_unbiasedness_test_detects_missing_norm_term():
    """The same t-test rejects FAVOR+ without the -|x'|²/2 term (biased by exp(...))."""

    def biased(seed):
        phi = fm.PositiveRandomFeatures(FEATURES, random_state=seed)
        return fm.from_function(lambda x: phi(x) * np.exp(0.5 * np.sum(x * x, -1) / 2)[..., None])

    values = estimates(biased)
    target = math.exp(Q @ K / 2)
    assert stats.ttest_1samp(values, target).pvalue < ALPHA


@pytest.mark.parametrize("map_class", [fm.PositiveRandomFeatures, fm.TrigRandomFeatures])
def test_orthogonal_variance_not_larger(map_class):
    """|error| with orthogonal rows is not stochastically larger than with independent rows
    (one-sided Mann-Whitney U at level 1e-3, 400 draws each: seeds 0..399 and 1000..1399).
    Equal distributions fail with probability at most 1e-3; smaller variance, less."""
    target = math.exp(Q @ K / 2)
    orthogonal = estimates(lambda seed: map_class(FEATURES, orthogonal=True, random_state=seed))
    independent = estimates(
        lambda seed: map_class(FEATURES, random_state=seed), seeds=range(1000, 1000 + DRAWS)
    )
    test = stats.mannwhitneyu(
        np.abs(orthogonal - target), np.abs(independent - target), alternative="greater"
    )
    assert test.pvalue > ALPHA


def test_from_function_defaults():
    square = fm.from_function(lambda x: x**2)
    x, y = np.array([1.0, -2.0]), np.array([3.0, 1.0])
    assert square.num_features(2) == 2
    assert float(square.kernel(x, y)) == 13.0
    given_kernel = fm.from_function(lambda x: x, kernel=lambda a, b: np.sum(a * b, -1))
    assert float(given_kernel.kernel(x, y)) == 1.0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: fm.Polynomial(0), "degree is 0; expected an integer >= 1"),
        (lambda: fm.Polynomial(2, c=-1), "c is -1; expected a finite number >= 0"),
        (lambda: fm.PositiveRandomFeatures(0), "num_features is 0; expected an integer >= 1"),
        (lambda: fm.RandomFourierFeatures(4, gamma=-1.0), "gamma is -1.0; expected a positive"),
        (
            lambda: fm.RandomFourierFeatures(None, projection=np.ones((2, 2))),
            "projection and offset go together",
        ),
    ],
)
def test_feature_map_bad_options(make, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        make()


def test_random_map_rejects_zero_dimension():
    with pytest.raises(ShapeError, match="got inputs of dimension D = 0; a random map needs D >= 1"):
        fm.PositiveRandomFeatures(3, random_state=0)(np.ones((2, 0)))
