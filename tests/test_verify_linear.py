"""Tests of the similarity and linear variants of kernattn.verify, and of shrinking."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np
import pytest

from kernattn import verify
from kernattn.verify import linear_cases, similarity_cases
from kernattn.verify.check import Output, check_case
from kernattn.verify.shrink import candidates, shrink_case, take

SIMILARITY = verify.VARIANTS["similarity"]
LINEAR = verify.VARIANTS["linear"]


def named(cases, name):
    return next(case for case in cases if case.name == name)


def elu_plus_one(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def linear_ignoring_causal(q, k, v, causal=False):
    """elu+1 linear attention that always sums over every key: wrong once N >= 2."""
    group = q.shape[1] // k.shape[1]
    phi_q, phi_k = elu_plus_one(q), elu_plus_one(np.repeat(k, group, axis=1))
    scores = phi_q @ phi_k.swapaxes(-1, -2)
    return scores @ np.repeat(v, group, axis=1) / scores.sum(axis=-1, keepdims=True)


def linear_correct(q, k, v, causal=False):
    """elu+1 linear attention, dense, with both causal alignments; empty rows are 0."""
    group = q.shape[1] // k.shape[1]
    phi_q, phi_k = elu_plus_one(q), elu_plus_one(np.repeat(k, group, axis=1))
    scores = phi_q @ phi_k.swapaxes(-1, -2)
    n, s = scores.shape[-2:]
    if causal:
        offset = s - n if causal == "bottom_right" else 0
        scores = scores * np.tri(n, s, offset)
    den = scores.sum(axis=-1, keepdims=True)
    out = scores @ np.repeat(v, group, axis=1) / np.where(den == 0, 1.0, den)
    return np.where(den == 0, 0.0, out)


def test_variants_registered():
    assert {"softmax", "similarity", "linear"} <= set(verify.VARIANTS)
    assert "numpy" in {target.backend for target in LINEAR.backend_targets()}


def test_backend_targets_follow_registry():
    registry = {"numpy": None, "loops": None, "extra": None}
    variant = dataclasses.replace(LINEAR, backends=lambda: registry)
    names = [target.name for target in variant.backend_targets()]
    assert names == [
        "numpy (float64 input)", "numpy (float32 input)",
        "extra (float64 input)", "extra (float32 input)",
    ]


def test_similarity_edge_values_from_cases():
    cases = similarity_cases.edge_cases()
    one_26th = named(cases, "edge-sim-poly2-one-26th-exact")
    assert one_26th.expected_out.ravel().tolist() == [float(Fraction(1, 26))]
    signed_eps = named(cases, "edge-sim-signed-1e-06-exact")
    assert signed_eps.expected_out.ravel().tolist() == [float(Fraction(-1) / Fraction(1e-6))]
    nan_rows = named(cases, "edge-sim-zero-den-nan-exact").expected_out.ravel()
    assert np.isnan(nan_rows[0])
    assert nan_rows[1] == 0.9
    assert named(cases, "edge-sim-zero-den-raise-exact").expected_raised == ((0, 0, 0),)


def test_linear_edge_values_from_cases():
    cases = linear_cases.edge_cases()
    normaliser = named(cases, "edge-lin-means-causal-normaliser@chunked3")
    assert normaliser.expected_out.ravel().tolist() == [0, 0.5, 1, 1.5]
    assert named(cases, "edge-lin-taylor-one-38th-exact@parallel").expected_out.item() == 1 / 38
    relu_eps = named(cases, "edge-lin-relu-zero-den-1e-06-exact@parallel").expected_out.ravel()
    assert relu_eps.tolist() == [0.0, float(Fraction(3) / (4 + Fraction(1e-6)))]
    row0 = named(cases, "edge-lin-causal-row0-zero-den-raise-exact@parallel")
    assert row0.expected_raised == ((0, 0, 0),)
    resume = named(cases, "edge-lin-means-initial-state@chunked1")
    assert resume.expected_state[0].item() == 6.0
    assert resume.expected_state[1].item() == 4.0


def test_linear_catalogue_covers_forms_and_chunks():
    names = {case.name for case in linear_cases.edge_cases()}
    for suffix in ("quadratic", "parallel", "recurrent", "chunked1", "chunked3", "chunked5"):
        assert f"edge-lin-means-causal-normaliser@{suffix}" in names
    maps = {case.options["feature_map"] for case in linear_cases.edge_cases()}
    assert {"elu+1", "relu", "polynomial:2", "taylor", "favor:16", "identity"} <= maps


@pytest.mark.parametrize("variant", [SIMILARITY, LINEAR], ids=lambda v: v.name)
def test_oracle_matches_catalogue_exactly(variant):
    cases = variant.edge_cases()
    [report] = verify.run_verify(variant, [], cases)
    assert report.failures == []
    exact = [r for r in report.results if r.case.exact]
    assert len(exact) >= 5
    assert all(result.abs_error == 0.0 for result in exact)


def test_exact_case_demands_identical_bits():
    case = named(similarity_cases.edge_cases(), "edge-sim-poly2-one-26th-exact")
    oracle_target = SIMILARITY.oracle_target()
    off_by_one_ulp = np.nextafter(case.expected_out, 1.0)

    class OneUlpOff:
        name, differences, notes, exact = "one ulp", (), [], True

        def __call__(self, case):
            return Output(off_by_one_ulp)

    oracle = SIMILARITY.oracle(case)
    assert check_case(oracle_target, case, oracle, SIMILARITY.scales).status == verify.AGREE
    result = check_case(OneUlpOff(), case, Output(off_by_one_ulp), SIMILARITY.scales)
    assert result.status == verify.MISMATCH


@pytest.mark.parametrize("variant", [SIMILARITY, LINEAR], ids=lambda v: v.name)
def test_random_cases_reproducible(variant):
    first, again = variant.random_cases(3, 8), variant.random_cases(3, 8)
    assert [case.name for case in first] == [case.name for case in again]
    for a, b in zip(first, again):
        for key in a.arrays:
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key])


def test_linear_random_cases_cover_features_and_maps():
    cases = linear_cases.random_cases(0, 24)
    for feature in linear_cases.LINEAR_FEATURES:
        assert any(feature in case.name for case in cases), feature
    chunks = [case for case in cases if case.options["form"] == "chunked"]
    assert any(case.arrays["q"].shape[2] % case.options["chunk_size"] for case in chunks)
    assert {case.options["feature_map"] for case in cases} >= {"relu", "favor:16", "taylor"}


@pytest.mark.parametrize("variant", [SIMILARITY, LINEAR], ids=lambda v: v.name)
def test_numpy_backend_agrees(variant):
    cases = variant.edge_cases() + variant.random_cases(1, 10)
    targets = [t for t in variant.backend_targets() if t.backend == "numpy"]
    for report in verify.run_verify(variant, targets, cases):
        assert report.failures == [], report.failures[0].detail


def test_wrong_backend_is_caught():
    def halved(case, backend):
        output = LINEAR.invoke(case, "numpy")
        return Output(None if output.out is None else output.out * 0.5, state=output.state)

    target = verify.BackendTarget(halved, "halved")
    [_, report] = verify.run_verify(LINEAR, [target], linear_cases.edge_cases())
    assert "edge-lin-means-causal-normaliser@parallel" in {r.case.name for r in report.failures}


def test_missing_raise_is_mismatch():
    case = named(linear_cases.edge_cases(), "edge-lin-relu-zero-den-raise-exact@parallel")
    zero_case = named(linear_cases.edge_cases(), "edge-lin-relu-zero-den-zero-exact@parallel")
    silent = verify.BackendTarget(lambda c, b: LINEAR.invoke(zero_case, "numpy"), "silent")
    result = check_case(silent, case, LINEAR.oracle(case), LINEAR.scales)
    assert result.status == verify.MISMATCH
    assert "expected ZeroDenominatorError for rows [(0, 0, 0)]" in result.detail


def test_signed_cancellation_widens_tolerance():
    case = named(similarity_cases.edge_cases(), "edge-sim-rtol-cancellation")
    plain = verify.Case("cancel", case.arrays, {"sim": "dot"})
    scales = similarity_cases.scales(plain, SIMILARITY.oracle(plain))
    well_conditioned = verify.Case("plain", {**case.arrays, "k": np.abs(case.arrays["k"])},
                                   {"sim": "dot"})
    plain_scales = similarity_cases.scales(well_conditioned, SIMILARITY.oracle(well_conditioned))
    assert np.max(scales.out) > 1e5 * np.max(plain_scales.out)


def test_user_linear_function_correct_passes():
    cases = linear_cases.edge_cases("elu+1") + linear_cases.random_cases(0, 16, "elu+1")
    target = LINEAR.function_target(linear_correct, "correct")
    [_, report] = verify.run_verify(LINEAR, [target], cases)
    assert report.failures == []
    assert report.count(verify.AGREE) >= 5
    assert all("@" not in r.case.name or r.case.name.endswith("@parallel") for r in report.results)


def test_user_function_gets_feature_map_keyword():
    seen = []

    def with_map(q, k, v, feature_map, causal=False):
        seen.append(feature_map)
        return linear_correct(q, k, v, causal=causal)

    case = named(linear_cases.edge_cases(), "edge-lin-means-causal-normaliser@parallel")
    result = check_case(LINEAR.function_target(with_map, "f"), case, LINEAR.oracle(case),
                        LINEAR.scales)
    assert result.status == verify.AGREE
    assert repr(seen[0]) == "EluPlusOne()"


def test_user_similarity_function_gets_sim():
    def dense(q, k, v, sim, zero_denominator="raise", causal=None):
        n, s = q.shape[2], k.shape[2]
        keep = np.ones((n, s), dtype=bool)
        if causal is not None:
            offset = s - n if causal == "bottom_right" else 0
            keep = np.tri(n, s, offset, dtype=bool)
        scores = np.array([[sim(x, y) for y in k[0, 0]] for x in q[0, 0]]) * keep
        den = scores.sum(axis=-1, keepdims=True)
        zero = (den == 0) & keep.any(axis=-1, keepdims=True)  # rows with no key are 0
        if zero_denominator == "raise" and zero.any():
            raise ZeroDivisionError("zero denominator")
        out = scores @ v[0, 0] / np.where(den == 0, 1.0, den)
        fill = np.nan if zero_denominator == "nan" else 0.0
        return np.where(zero, fill, out)[None, None]

    cases = [case for case in similarity_cases.edge_cases()
             if case.arrays["q"].shape[:2] == (1, 1) and "mask" not in case.arrays
             and "kv_lengths" not in case.arrays and "rtol" not in case.options
             and isinstance(case.options.get("zero_denominator", "raise"), str)]
    [_, report] = verify.run_verify(SIMILARITY, [SIMILARITY.function_target(dense, "dense")], cases)
    assert report.failures == []
    assert report.count(verify.AGREE) >= 6


def test_shrink_buggy_causal_to_tiny():
    cases = linear_cases.random_cases(0, 16, "elu+1")
    target = LINEAR.function_target(linear_ignoring_causal, "ignores causal")
    [report] = verify.run_verify(LINEAR, [target], cases, shrink=True)
    assert report.failures
    for result in report.failures:
        shrunk = result.shrunk.case
        sizes = verify.shrink.sizes(shrunk)
        for axis in ("B", "Hq", "Hkv", "D", "M"):
            assert sizes[axis] == 1, sizes
        assert sizes["N"] <= 2, sizes
        assert sizes["S"] <= 2, sizes
        assert shrunk.options.get("causal") not in (None, False)
        assert result.shrunk.result.status == verify.MISMATCH


def test_shrink_returns_none_when_case_passes():
    case = named(linear_cases.edge_cases(), "edge-lin-means-causal-normaliser@parallel")
    target = LINEAR.function_target(linear_correct, "correct")
    assert shrink_case(LINEAR, target, case) is None


def test_take_keeps_broadcast_axes():
    case = verify.Case("c", {
        "q": np.zeros((2, 4, 3, 1)), "k": np.zeros((2, 2, 5, 1)), "v": np.zeros((2, 2, 5, 1)),
        "mask": np.ones((2, 1, 3, 5), dtype=bool), "kv_lengths": np.array([5, 4]),
    })
    smaller = take(case, {"Hq": [0, 2], "S": [0, 1]})
    assert smaller.arrays["q"].shape == (2, 2, 3, 1)
    assert smaller.arrays["mask"].shape == (2, 1, 3, 2)
    assert smaller.arrays["kv_lengths"].tolist() == [2, 2]


def test_candidates_drop_options_first():
    case = named(linear_cases.edge_cases(), "edge-lin-means-initial-state@chunked3")
    first = [description for description, _ in candidates(case)][:3]
    assert first == ["drop initial_state", "drop return_state", "drop causal"]


def test_save_load_keeps_state_and_exact(tmp_path):
    case = named(linear_cases.edge_cases(), "edge-lin-means-initial-state@parallel")
    loaded = verify.load_case(verify.save_case(tmp_path / "c.npz", case))
    assert loaded.expected_state[0].tolist() == case.expected_state[0].tolist()
    assert loaded.arrays["initial_state_z"].tolist() == case.arrays["initial_state_z"].tolist()
    exact = named(linear_cases.edge_cases(), "edge-lin-relu-zero-den-raise-exact@parallel")
    loaded = verify.load_case(verify.save_case(tmp_path / "e.npz", exact))
    assert loaded.exact is True
    assert loaded.expected_raised == ((0, 0, 0),)
    assert loaded.arrays["q"].dtype.kind == "i"


def test_feature_map_names():
    assert repr(verify.feature_map_from_name("polynomial:2")) == "Polynomial(degree=2, c=1)"
    assert verify.feature_map_from_name("favor:64").m == 64
    assert verify.feature_map_from_name("taylor:2:1/2").scale == Fraction(1, 2)
    with pytest.raises(ValueError, match="unknown"):
        verify.feature_map_from_name("softmax")
    with pytest.raises(ValueError, match="parameters"):
        verify.feature_map_from_name("polynomial")
