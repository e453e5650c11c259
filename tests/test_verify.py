"""Tests of kernattn.verify: cases, comparison, targets, peers."""

from __future__ import annotations

import math
import re
import sys
from dataclasses import replace

import numpy as np
import pytest

from kernattn import verify
from kernattn.verify import linear_cases, similarity_cases
from kernattn.verify.cases import (
    SOFTMAX_FEATURES,
    keep_set,
    load_case_variant,
    softmax_cases,
    softmax_edge_cases,
)
from kernattn.verify.check import Output, check_case, compare
from kernattn.verify.peers import JAX_EMPTY_ROW_MEAN, NAN_AT_EXCLUDED

SOFTMAX = verify.VARIANTS["softmax"]


def edge_case(name: str) -> verify.Case:
    return next(case for case in softmax_edge_cases() if case.name == name)


def tiled_gqa_attention(q, k, v, *, mask=None, bias=None, scale=None, causal=None):
    """Softmax attention with the grouped-query bug: key/value heads tiled [h0, h1, h0, h1]."""
    group = q.shape[1] // k.shape[1]
    return naive_attention(q, np.tile(k, (1, group, 1, 1)), np.tile(v, (1, group, 1, 1)),
                           mask=mask, bias=bias, scale=scale, causal=causal)


def naive_attention(q, k, v, *, mask=None, bias=None, scale=None, causal=None):
    """Dense softmax attention for Hq = Hkv after repeating heads; empty rows give 0."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    n, s = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = scale * q @ k.swapaxes(-1, -2)
    if bias is not None:
        scores = scores + bias
    keep = np.ones(scores.shape, dtype=bool)
    if mask is not None:
        keep &= mask
    if causal is not None:
        offset = s - n if causal == "bottom_right" else 0
        keep &= np.arange(s)[None, :] <= np.arange(n)[:, None] + offset
    scores = np.where(keep, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0))
    total = weights.sum(axis=-1, keepdims=True)
    return np.where(total > 0, weights / np.where(total > 0, total, 1.0), 0.0) @ v


def test_edge_cases_exact_values():
    cases = {case.name: case for case in softmax_edge_cases()}
    np.testing.assert_array_equal(cases["edge-gqa-head-mapping"].expected_out.ravel(), [1, 1, 2, 2])
    np.testing.assert_array_equal(cases["edge-mqa-head-mapping"].expected_out.ravel(), [1, 1, 1, 1])
    np.testing.assert_array_equal(cases["edge-causal-n4-s2-bottom-right"].expected_out.ravel(), [0, 0, 1, 1.5])
    np.testing.assert_array_equal(cases["edge-fully-masked-row"].expected_lse.ravel(), [math.log(4), -math.inf] + [math.log(4)] * 2)
    np.testing.assert_array_equal(cases["edge-window-two-keys-causal"].expected_out.ravel(), [0, 0.5, 1.5, 2.5, 3.5, 4.5])
    assert cases["edge-bias-float-tril"].expected_out.ravel()[0] == pytest.approx(0.2689414213699951, abs=1e-16)


def test_oracle_matches_edge_case_values():
    reports = verify.run_verify(SOFTMAX, [], softmax_edge_cases())
    assert len(reports) == 1
    assert reports[0].failures == []
    assert reports[0].count(verify.AGREE) == len(softmax_edge_cases())


def test_softmax_cases_reproducible_from_seed():
    first, again, other = softmax_cases(3, 14), softmax_cases(3, 14), softmax_cases(4, 14)
    assert [case.name for case in first] == [case.name for case in again]
    for a, b in zip(first, again):
        for key in a.arrays:
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
    assert any(not np.array_equal(a.arrays["q"], b.arrays["q"]) for a, b in zip(first, other))


def test_softmax_cases_cover_every_feature():
    cases = softmax_cases(0, len(SOFTMAX_FEATURES))
    for case, feature in zip(cases, SOFTMAX_FEATURES):
        assert feature in case.name


def test_softmax_cases_exact_in_float32():
    for case in softmax_cases(1, 28):
        for key in ("q", "k", "v", "bias"):
            if key in case.arrays:
                x = case.arrays[key]
                np.testing.assert_array_equal(x.astype(np.float32).astype(np.float64), x)


def test_nan_cases_store_nan_only_where_excluded():
    cases = [case for case in softmax_cases(0, 42) if "nan_at_excluded" in case.name]
    assert cases
    for case in cases:
        keep = keep_set(case)
        bias = np.broadcast_to(case.arrays["bias"], keep.shape)
        assert not np.isnan(bias[keep]).any()
        assert np.isnan(bias[~keep]).all()
        oracle = SOFTMAX.oracle(case)
        assert np.isfinite(oracle.out).all(), case.name


def test_compare_nan_pattern_must_match():
    case = edge_case("edge-fully-masked-row")
    reference = SOFTMAX.oracle(case)
    out = reference.out.copy()
    out[0, 0, 1, 0] = np.nan
    passed, _, _, detail = compare(case, Output(out, reference.lse), reference)
    assert not passed
    assert "nan" in detail


def test_compare_empty_lse_must_be_neg_inf():
    case = edge_case("edge-fully-masked-row")
    reference = SOFTMAX.oracle(case)
    lse = reference.lse.copy()
    lse[0, 0, 1] = -1e30
    passed, _, _, detail = compare(case, Output(reference.out, lse), reference)
    assert not passed
    assert detail.startswith("lse[0, 0, 1] is")


def test_compare_tolerance_depends_on_dtype():
    case = softmax_cases(0, 1)[0]
    reference = SOFTMAX.oracle(case)
    perturbed = reference.out + 1e-7
    assert not compare(case, Output(perturbed), reference)[0]
    assert compare(case, Output(perturbed.astype(np.float32)), reference)[0]
    assert not compare(case, Output((reference.out + 1e-2).astype(np.float32)), reference)[0]


def test_compare_shape_mismatch():
    case = edge_case("edge-gqa-head-mapping")
    reference = SOFTMAX.oracle(case)
    passed, _, _, detail = compare(case, Output(reference.out[:, :2]), reference)
    assert not passed
    assert "shape" in detail


def test_save_and_load_case_roundtrip(tmp_path):
    case = next(case for case in softmax_cases(0, 14) if "window" in case.name)
    path = verify.save_case(tmp_path / "case.npz", case, {"reference_out": np.zeros(3)})
    with np.load(path, allow_pickle=False) as data:
        assert "reference_out" in data.files
    loaded = verify.load_case(path)
    assert loaded.name == case.name
    assert loaded.options == case.options
    for key in case.arrays:
        np.testing.assert_array_equal(loaded.arrays[key], case.arrays[key])


def test_save_case_stores_variant(tmp_path):
    case = edge_case("edge-gqa-head-mapping")
    path = verify.save_case(tmp_path / "case.npz", case, variant="similarity")
    assert load_case_variant(path) == "similarity"
    assert load_case_variant(verify.save_case(tmp_path / "plain.npz", case)) is None


def test_load_replay_reads_or_infers_variant(tmp_path):
    softmax_case = edge_case("edge-gqa-head-mapping")
    similarity_case = similarity_cases.edge_cases()[0]
    linear_case = linear_cases.edge_cases()[0]
    saved = {
        "softmax": verify.save_case(tmp_path / "s.npz", softmax_case),
        "similarity": verify.save_case(tmp_path / "m.npz", similarity_case),
        "linear": verify.save_case(tmp_path / "l.npz", linear_case),
    }
    for name, path in saved.items():  # files without a variant entry
        variant, case = verify.load_replay(path)
        assert variant.name == name
    stored = verify.save_case(tmp_path / "stored.npz", linear_case, variant="linear")
    variant, case = verify.load_replay(stored)
    assert variant.name == "linear"
    assert case.name == linear_case.name


def test_load_replay_unknown_variant(tmp_path):
    path = verify.save_case(tmp_path / "case.npz", edge_case("edge-gqa-head-mapping"),
                            variant="flash")
    with pytest.raises(verify.CaseFileError, match=re.escape("variant 'flash'")):
        verify.load_replay(path)


def test_load_case_rejects_other_files(tmp_path):
    script = tmp_path / "attn.py"
    script.write_text("print('not a case')\n")
    np.save(tmp_path / "single.npy", np.zeros(3))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    expected = {
        tmp_path / "missing.npz": "missing.npz not found",
        script: "attn.py is not a NumPy .npz file",
        tmp_path / "single.npy": "single.npy is a single .npy array",
        tmp_path / "other.npz": "other.npz has no q, k, v, name, options",
        tmp_path: "cannot be read",
    }
    for path, message in expected.items():
        with pytest.raises(verify.CaseFileError, match=re.escape(message)):
            verify.load_case(path)
    assert issubclass(verify.CaseFileError, ValueError)


def _numpy_and_broken_numba(monkeypatch) -> verify.Variant:
    """Return the softmax variant with backends numpy and numba, numba's module missing."""
    monkeypatch.setitem(sys.modules, "kernattn._numba.softmax", None)  # import fails
    return replace(SOFTMAX, backends=lambda: {"loops": None, "numpy": None, "numba": None})


def test_backend_import_error_stops_target(monkeypatch):
    variant = _numpy_and_broken_numba(monkeypatch)
    cases = softmax_edge_cases()
    reports = verify.run_verify(variant, variant.backend_targets(), cases, shrink=True)
    by_name = {report.target: report for report in reports}
    numpy_report = by_name["numpy (float64 input)"]
    assert numpy_report.not_run is None
    assert numpy_report.count(verify.AGREE) == len(cases)
    for dtype in ("float64", "float32"):
        report = by_name[f"numba ({dtype} input)"]
        assert isinstance(report.not_run, verify.BackendImportError)
        assert "kernattn._numba.softmax" in str(report.not_run)
        assert report.results == []
        assert report.import_failed
        assert report.verdict == "ERROR"


def test_oracle_import_error_ends_variant(monkeypatch):
    def missing_oracle(case, backend):
        raise ModuleNotFoundError("No module named 'kernattn.loops.softmax'")

    variant = replace(SOFTMAX, invoke=missing_oracle)
    [report] = verify.run_verify(variant, [], softmax_edge_cases())
    assert report.target == "loops (oracle) vs exact values"
    assert isinstance(report.not_run, verify.BackendImportError)


def test_backend_registry_import_error():
    def missing_registry():
        raise ModuleNotFoundError("No module named 'kernattn.loops'")

    variant = replace(SOFTMAX, backends=missing_registry)
    with pytest.raises(verify.BackendImportError, match=re.escape("softmax backends cannot")):
        variant.backend_targets()


def test_function_import_error_is_mismatch():
    def imports_missing(q, k, v, **keywords):
        raise ModuleNotFoundError("No module named 'flash_attn'")

    case = edge_case("edge-causal-no-mask")
    result = check_case(verify.FunctionTarget(imports_missing, "f"), case, SOFTMAX.oracle(case))
    assert result.status == verify.MISMATCH
    assert "flash_attn" in result.detail


def test_tiled_gqa_function_mismatches():
    cases = softmax_edge_cases() + softmax_cases(0, 28)
    target = verify.FunctionTarget(tiled_gqa_attention, "tiled")
    [_, report] = verify.run_verify(SOFTMAX, [target], cases)
    failed = {result.case.name for result in report.failures}
    assert "edge-gqa-head-mapping" in failed
    assert "edge-mqa-head-mapping" not in failed  # one key/value head: tiling is harmless
    assert all("gqa" in name for name in failed)


def test_correct_function_agrees_or_unsupported():
    cases = softmax_edge_cases() + softmax_cases(0, 28)
    target = verify.FunctionTarget(naive_attention, "naive")
    [_, report] = verify.run_verify(SOFTMAX, [target], cases)
    assert report.failures == []
    assert report.count(verify.AGREE) > 10
    unsupported = [r for r in report.results if r.status == verify.UNSUPPORTED]
    assert unsupported
    assert all("TypeError" in result.detail for result in unsupported)


def test_function_internal_type_error_is_mismatch():
    def broken(q, k, v, **keywords):
        raise TypeError("unsupported operand type(s)")

    case = edge_case("edge-causal-no-mask")
    result = check_case(verify.FunctionTarget(broken, "broken"), case, SOFTMAX.oracle(case))
    assert result.status == verify.MISMATCH
    assert "unsupported operand" in result.detail


class EmptyRowMeanTarget:
    """Mimics a peer that fills excluded scores with a large finite negative number."""

    name = "large-negative fill"
    differences = (NAN_AT_EXCLUDED, JAX_EMPTY_ROW_MEAN)
    notes: list[str] = []

    def __init__(self, offset=0.0):
        self.offset = offset

    def __call__(self, case):
        q, k, v = (case.arrays[key] for key in "qkv")
        keep = keep_set(case)
        group = q.shape[1] // k.shape[1]
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
        scores = np.where(keep, scores, -0.7 * np.finfo(np.float32).max)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        return Output(weights / weights.sum(axis=-1, keepdims=True) @ v + self.offset)


def test_known_difference_explains_empty_row_mean():
    case = edge_case("edge-fully-masked-row")
    result = check_case(EmptyRowMeanTarget(), case, SOFTMAX.oracle(case))
    assert result.status == verify.DIFFERENCE
    assert result.differences == (JAX_EMPTY_ROW_MEAN.name,)


def test_known_difference_does_not_hide_wrong_values():
    case = edge_case("edge-fully-masked-row")
    result = check_case(EmptyRowMeanTarget(offset=0.1), case, SOFTMAX.oracle(case))
    assert result.status == verify.MISMATCH


def test_jax_peer_agrees():
    pytest.importorskip("jax")
    targets = verify.PEERS["jax"]()
    cases = softmax_edge_cases() + softmax_cases(0, 14)
    [_, report] = verify.run_verify(SOFTMAX, targets, cases)
    assert report.failures == []
    statuses = {result.case.name: result for result in report.results}
    assert statuses["edge-gqa-head-mapping"].status == verify.AGREE
    assert statuses["edge-causal-n2-s4-bottom-right"].status == verify.AGREE
    assert statuses["edge-causal-n4-s2-bottom-right"].differences == (JAX_EMPTY_ROW_MEAN.name,)


def test_torch_peer_agrees():
    pytest.importorskip("torch")
    targets = verify.PEERS["torch"]()
    cases = softmax_edge_cases() + softmax_cases(0, 14)
    reports = verify.run_verify(SOFTMAX, targets, cases)
    for report in reports[1:]:
        assert report.failures == []
        statuses = {result.case.name: result.status for result in report.results}
        assert statuses["edge-gqa-head-mapping"] == verify.AGREE
        assert statuses["edge-causal-n4-s2-bottom-right"] == verify.AGREE
