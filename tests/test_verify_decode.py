"""Tests of the decode variant of kernattn.verify (decode_attention against the loop oracle)."""

from __future__ import annotations

import math
import sys
import textwrap

import numpy as np
import pytest

from kernattn import cli, verify
from kernattn.decode import DECODE_BACKENDS, decode_attention
from kernattn.verify import decode_cases
from kernattn.verify.check import MISMATCH, BackendUnavailable, Output, check_case
from kernattn.verify.shrink import candidates, sizes

DECODE = verify.VARIANTS["decode"]

DECODE_MODULE = textwrap.dedent(
    '''
    from kernattn.softmax import softmax_attention

    def bottom_right(q, k_cache, v_cache, *, kv_lengths, scale=None, softcap=None):
        return softmax_attention(q, k_cache, v_cache, causal="bottom_right",
                                 kv_lengths=kv_lengths, scale=scale, softcap=softcap)

    def top_left(q, k_cache, v_cache, *, kv_lengths, scale=None, softcap=None):
        """Aligns the first new token with cache position 0: wrong unless T == length."""
        return softmax_attention(q, k_cache, v_cache, causal="top_left",
                                 kv_lengths=kv_lengths, scale=scale, softcap=softcap)
    '''
)


@pytest.fixture
def decode_module(tmp_path, monkeypatch):
    """Write an importable module `userdecode` with a correct and a top-left decode."""
    (tmp_path / "userdecode.py").write_text(DECODE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("userdecode", None)


def named(cases, name):
    return next(case for case in cases if case.name == name)


def test_decode_variant_registered():
    assert "decode" in verify.VARIANTS
    names = {target.name for target in DECODE.backend_targets()}
    expected = {
        f"{backend} ({dtype} input)"
        for backend in DECODE_BACKENDS
        if backend != "loops"
        for dtype in ("float64", "float32")
    }
    assert names == expected


def test_decode_edge_values_are_means():
    cases = decode_cases.edge_cases()
    one_token = named(cases, "edge-dec-one-token")
    assert one_token.expected_out.ravel().tolist() == [math.fsum(range(4)) / 4]
    assert one_token.expected_lse.ravel().tolist() == [math.log(4)]
    two_tokens = named(cases, "edge-dec-two-tokens-bottom-right")
    assert two_tokens.expected_out.ravel().tolist() == [1.0, 1.5]
    short = named(cases, "edge-dec-length-below-new-tokens")
    assert short.expected_out.ravel().tolist() == [0.0, 1.0, 1.5]
    assert short.expected_lse.ravel()[0] == -math.inf
    per_row = named(cases, "edge-dec-lengths-per-row")
    assert per_row.expected_out.ravel().tolist() == [0.5, 2.0]
    gqa = named(cases, "edge-dec-gqa-head-mapping")
    assert gqa.expected_out.ravel().tolist() == [1.0, 1.0, 2.0, 2.0]


def test_decode_edge_cases_store_nan_past_lengths():
    cases = decode_cases.edge_cases()
    for name in ("edge-dec-nan-beyond-length", "edge-dec-empty-cache-nan-slots"):
        case = named(cases, name)
        length = int(case.arrays["kv_lengths"][0])
        assert np.isnan(case.arrays["v"][..., length:, :]).all()
        assert np.isnan(case.arrays["k"][..., length:, :]).all()
        assert not np.isnan(case.arrays["v"][..., :length, :]).any()


def test_decode_oracle_matches_catalogue():
    cases = DECODE.edge_cases()
    [report] = verify.run_verify(DECODE, [], cases)
    assert report.target == "loops (oracle) vs exact values"
    assert report.count(verify.AGREE) == len(cases)


def test_decode_random_cases_reproducible():
    first, second = DECODE.random_cases(7, 6), DECODE.random_cases(7, 6)
    assert [case.name for case in first] == [case.name for case in second]
    for a, b in zip(first, second):
        for key in a.arrays:
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
        assert a.options == b.options


def test_decode_random_cases_cover_features():
    cases = DECODE.random_cases(0, decode_cases.DEFAULT_CASE_COUNT)
    new_tokens = {case.arrays["q"].shape[2] for case in cases}
    assert new_tokens == {1, 2, 3}
    assert max(case.arrays["k"].shape[2] for case in cases) <= decode_cases.MAX_CAPACITY
    heads = {(case.arrays["q"].shape[1], case.arrays["k"].shape[1]) for case in cases}
    assert any(hq == hkv for hq, hkv in heads)  # multi-head
    assert any(hkv == 1 and hq > 1 for hq, hkv in heads)  # multi-query
    assert any(hkv > 1 and hq > hkv for hq, hkv in heads)  # grouped-query
    short = [c for c in cases if (c.arrays["kv_lengths"] < c.arrays["q"].shape[2]).any()]
    assert short
    assert any((c.arrays["kv_lengths"] >= c.arrays["q"].shape[2]).all() for c in cases)
    for option in ("softcap", "scale", "num_splits"):
        assert any(option in case.options for case in cases), option
    with_nan = [case for case in cases if np.isnan(case.arrays["v"]).any()]
    assert with_nan
    for case in with_nan:
        for b, length in enumerate(case.arrays["kv_lengths"]):
            assert not np.isnan(case.arrays["v"][b, :, :length]).any()
            assert np.isnan(case.arrays["v"][b, :, length:]).all()


def test_decode_backends_agree():
    cases = verify.build_cases(DECODE, seed=0)
    reports = verify.run_verify(DECODE, DECODE.backend_targets(), cases)
    checked = set()
    for report in reports[1:]:
        if report.not_run is not None:  # cuda without a GPU or the simulator
            continue
        assert report.failures == [], report.target
        assert report.count(verify.AGREE) == len(cases), report.target
        checked.add(report.target.split()[0])
    assert {"numpy", "numba"} <= checked


def test_decode_cuda_splits_past_capacity():
    """More splits than valid keys: the empty splits read no key row."""
    case = verify.Case(
        "splits-past-capacity",
        {"q": np.zeros((1, 1, 1, 1)), "k": np.zeros((1, 1, 1, 1)), "v": np.ones((1, 1, 1, 1)),
         "kv_lengths": np.array([1])},
        {"num_splits": 3},
    )
    target = verify.BackendTarget(DECODE.invoke, "cuda")
    try:
        result = check_case(target, case, DECODE.oracle(case), DECODE.scales)
    except BackendUnavailable:
        pytest.skip("no GPU and no CUDA simulator")
    assert result.status == verify.AGREE, result.detail


def reads_whole_cache(case, backend):
    """A wrong decode that treats every cache slot as valid."""
    q, k_cache, v_cache = (case.arrays[key] for key in "qkv")
    lengths = np.full(q.shape[0], k_cache.shape[2])
    out, lse = decode_attention(q, k_cache, v_cache, kv_lengths=lengths, return_lse=True,
                                backend=backend)
    return Output(np.asarray(out), np.asarray(lse))


def test_decode_stale_slot_reads_caught():
    buggy = verify.BackendTarget(reads_whole_cache, "numpy")
    cases = DECODE.edge_cases()
    [_, report] = verify.run_verify(DECODE, [buggy], cases)
    failed = {result.case.name for result in report.failures}
    assert "edge-dec-one-token" in failed
    assert "edge-dec-nan-beyond-length" in failed


def test_decode_user_function_skips_num_splits():
    seen = []

    def decode(q, k_cache, v_cache, *, kv_lengths, scale=None, softcap=None):
        seen.append(kv_lengths)
        return decode_attention(q, k_cache, v_cache, kv_lengths=kv_lengths, scale=scale,
                                softcap=softcap, backend="numpy")

    target = DECODE.function_target(decode, "decode")
    case = named(DECODE.edge_cases(), "edge-dec-three-splits-seven-keys")
    result = check_case(target, case, DECODE.oracle(case), DECODE.scales)
    assert result.status == verify.AGREE
    assert seen[0].tolist() == [7]


def test_decode_shrink_drops_num_splits():
    case = named(DECODE.edge_cases(), "edge-dec-five-splits-three-keys")
    assert "drop num_splits" in [description for description, _ in candidates(case)]


def test_decode_top_left_fails_and_shrinks(decode_module, capsys):
    failures = decode_module / "failures"
    code = cli.main([
        "verify", "userdecode:top_left", "--variant", "decode", "--cases", "4",
        "--save-failures", str(failures),
    ])
    assert code == cli.EXIT_MISMATCH
    output = capsys.readouterr().out
    assert "MISMATCH edge-dec-two-tokens-bottom-right [B=1 Hq=1 Hkv=1 N=2 S=6" in output
    assert "to [B=1 Hq=1 Hkv=1 N=1 S=2 D=1 M=1" in output
    [saved] = failures.glob("*edge-dec-one-token.npz")
    variant, case = verify.load_replay(saved)
    assert variant.name == "decode"
    assert sizes(case) == {"B": 1, "Hq": 1, "Hkv": 1, "N": 1, "S": 2, "D": 1, "M": 1}
    with np.load(saved, allow_pickle=False) as data:
        command = str(data["command"])
    assert cli.main(command.split()[1:]) == cli.EXIT_MISMATCH
    output = capsys.readouterr().out
    assert "kernattn verify: variant decode, 1 case (replayed)" in output


def test_decode_correct_user_function_passes(decode_module, capsys):
    code = cli.main(["verify", "userdecode:bottom_right", "--variant", "decode", "--cases", "8"])
    assert code == cli.EXIT_OK
    assert "OK: no mismatches" in capsys.readouterr().out


def test_decode_shrunk_case_still_fails(decode_module):
    from userdecode import top_left

    target = DECODE.function_target(top_left, "userdecode:top_left")
    case = named(DECODE.edge_cases(), "edge-dec-two-tokens-bottom-right")
    shrunk = verify.shrink_case(DECODE, target, case)
    assert shrunk.result.status == MISMATCH
    assert sizes(shrunk.case)["N"] == 1
    assert shrunk.case.arrays["kv_lengths"].tolist() == [2]
    assert shrunk.case.options == {}
