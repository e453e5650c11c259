"""kernattn.testing: the tolerance-aware assert and the Hypothesis strategies."""

import re

import numpy as np
import pytest
from hypothesis import given

import kernattn
from kernattn import feature_maps
from kernattn.testing import assert_attention_close, assert_feature_map, check_feature_map
from kernattn.testing import strategies as kst


def naive_attention(q, k, v, dtype):
    """Return plain softmax attention computed entirely in `dtype` (the baseline)."""
    q, k, v = (np.asarray(x, dtype=dtype) for x in (q, k, v))
    scores = (q @ k.swapaxes(-1, -2)) * dtype(1 / np.sqrt(q.shape[-1]))
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    return (weights / weights.sum(axis=-1, keepdims=True)) @ v


def test_assert_passes_within_float32_tolerance():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 2, 8, 4)) for _ in range(3))
    desired = kernattn.softmax_attention(q, k, v)
    actual = naive_attention(q, k, v, np.float32)
    assert_attention_close(actual, desired)


def test_assert_float64_default_is_stricter():
    desired = np.array([1.0, 2.0])
    with pytest.raises(AssertionError, match=re.escape("rtol=1e-07, atol=1e-07 (float64)")):
        assert_attention_close(desired + 1e-5, desired)


def test_assert_names_worst_element():
    desired = np.zeros((2, 3, 4, 5))
    actual = desired.copy()
    actual[1, 2, 3, 4] = 0.5
    actual[0, 0, 0, 0] = 0.1
    with pytest.raises(AssertionError) as failure:
        assert_attention_close(actual, desired)
    message = str(failure.value)
    assert "2 of 120 elements outside tolerance" in message
    assert "Worst at (batch 1, head 2, query 3, column 4): actual 0.5, desired 0.0" in message
    assert "Max abs error 0.5" in message


def test_assert_nan_always_fails():
    desired = np.ones((1, 1, 2, 1))
    actual = desired.copy()
    actual[0, 0, 1, 0] = np.nan
    with pytest.raises(AssertionError, match="actual nan, desired 1.0"):
        assert_attention_close(actual, desired, rtol=1.0, atol=1.0)


def test_assert_matching_nan_and_inf_pass():
    desired = np.array([np.nan, -np.inf, 1.0])
    assert_attention_close(desired.copy(), desired)


def test_assert_mismatched_inf_fails():
    with pytest.raises(AssertionError, match="1 of 2 elements"):
        assert_attention_close(np.array([0.0, 1.0]), np.array([-np.inf, 1.0]))


def test_assert_shape_mismatch():
    with pytest.raises(AssertionError, match=re.escape("actual (2,), desired (3,)")):
        assert_attention_close(np.zeros(2), np.zeros(3))


def test_assert_baseline_rule_accepts_naive_and_rejects_worse():
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(1, 2, 16, 8)) * 3 for _ in range(3))
    desired = kernattn.softmax_attention(q, k, v)
    baseline = naive_attention(q, k, v, np.float16)
    assert_attention_close(baseline, desired, baseline=baseline, dtype="float16")
    error = np.abs(baseline.astype(float) - desired).max()
    worse = desired + 3 * error
    with pytest.raises(AssertionError, match="x baseline error"):
        assert_attention_close(worse, desired, baseline=baseline, dtype="float16")


def test_assert_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="dtype is 'int8'"):
        assert_attention_close(np.zeros(1), np.zeros(1), dtype="int8")


def test_assert_accepts_jax_arrays():
    jnp = pytest.importorskip("jax.numpy")
    desired = np.linspace(0, 1, 6).reshape(1, 1, 2, 3)
    assert_attention_close(jnp.asarray(desired, dtype=jnp.float32), desired)
    with pytest.raises(AssertionError, match=re.escape("(bfloat16)")):
        assert_attention_close(jnp.asarray(desired + 0.1, dtype=jnp.bfloat16), desired)


def test_assert_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    desired = np.linspace(0, 1, 6).reshape(1, 1, 2, 3)
    tensor = torch.tensor(desired, dtype=torch.float32, requires_grad=True)
    assert_attention_close(tensor, desired)
    with pytest.raises(AssertionError, match=re.escape("(bfloat16)")):
        assert_attention_close(torch.tensor(desired + 0.1, dtype=torch.bfloat16), desired)


@given(kst.attention_inputs(dtype="float64", max_len=6))
def test_strategy_inputs_numpy_matches_loops(case):
    q, k, v, options = case["q"], case["k"], case["v"], case["options"]
    out = kernattn.softmax_attention(q, k, v, **options)
    expected = kernattn.softmax_attention(q, k, v, backend="loops", **options)
    assert_attention_close(out, expected, rtol=1e-11, atol=1e-12)
    assert not np.isnan(expected).any()


@given(kst.shapes(allow_empty=False))
def test_strategy_shapes_are_valid(shape):
    assert shape.q_heads % shape.kv_heads == 0
    assert min(shape) >= 1


# The feature-map checker.


def polynomial_without_sqrt2(x):
    """Return [x_i², x_i x_j (i < j)]: the degree-2 map with the √2 factor missing."""
    x = np.asarray(x, dtype=float)
    i, j = np.triu_indices(x.shape[-1], 1)
    return np.concatenate([x**2, x[..., i] * x[..., j]], axis=-1)


def squared_dot(x, y):
    return float(np.dot(x, y)) ** 2


def test_checker_passes_exact_polynomial():
    report = check_feature_map(feature_maps.Polynomial(2, c=1.0), random_state=0)
    identity = next(c for c in report.checks if c.name == "kernel identity")
    assert report.passed
    assert "exactly, in rational arithmetic" in identity.detail


def test_checker_catches_missing_sqrt2():
    report = check_feature_map(polynomial_without_sqrt2, squared_dot, random_state=0)
    identity = next(c for c in report.checks if c.name == "kernel identity")
    assert not report.passed
    assert identity.passed is False
    assert "kernel identity" in str(report)
    with pytest.raises(AssertionError, match="FAIL  kernel identity"):
        assert_feature_map(polynomial_without_sqrt2, squared_dot, random_state=0)


def test_checker_fixed_map_passes_where_broken_one_fails():
    def with_sqrt2(x):
        x = np.asarray(x, dtype=float)
        i, j = np.triu_indices(x.shape[-1], 1)
        return np.concatenate([x**2, np.sqrt(2) * x[..., i] * x[..., j]], axis=-1)

    assert check_feature_map(with_sqrt2, squared_dot, random_state=0).passed


def test_checker_positive_claim():
    relu = check_feature_map(feature_maps.ReLU(), positive=True, random_state=0)
    elu = check_feature_map(feature_maps.EluPlusOne(), positive=True, random_state=0)
    vanish = next(c for c in relu.checks if c.name == "denominators can vanish")
    assert not relu.passed
    assert elu.passed
    assert vanish.detail.startswith("yes: zero features occur")


@pytest.mark.parametrize(
    "make",
    [
        lambda: feature_maps.PositiveRandomFeatures(16, random_state=0),
        lambda: feature_maps.PositiveRandomFeatures(16, orthogonal=True, random_state=1),
        lambda: feature_maps.TrigRandomFeatures(8, random_state=2),
        lambda: feature_maps.RandomFourierFeatures(8, gamma=0.5, random_state=3),
    ],
)
def test_checker_random_maps_unbiased(make):
    """Each correct map fails with probability about 1e-3 (the checker's stated level)."""
    report = check_feature_map(make(), random_state=0)
    assert report.passed, str(report)


def test_checker_catches_biased_random_map():
    class NoNormTerm(feature_maps.PositiveRandomFeatures):
        def _features(self, x):
            d = x.shape[-1]
            xs = x * d**-0.25
            return np.exp(xs @ self._projection(d).T) / np.sqrt(self.m)

    report = check_feature_map(NoNormTerm(16, random_state=0), random_state=0)
    unbiased = next(c for c in report.checks if c.name == "kernel unbiased")
    assert unbiased.passed is False


def test_checker_reports_wrong_shape():
    report = check_feature_map(lambda x: np.ones(3), random_state=0)
    assert not report.passed
    assert "expected (2, 3, F)" in report.checks[0].detail


def test_assert_integer_actual_uses_float64_rule():
    assert_attention_close(np.array([1, 2]), np.array([1.0, 2.0]))
    with pytest.raises(AssertionError, match=re.escape("(float64)")):
        assert_attention_close(np.array([1, 3]), np.array([1.0, 2.0]))


def test_assert_rejects_negative_tolerance():
    with pytest.raises(ValueError, match="rtol is -1.0; expected a non-negative number"):
        assert_attention_close(np.ones(2), np.ones(2), rtol=-1)
