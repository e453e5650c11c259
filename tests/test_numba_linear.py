"""Numba linear attention against the loop oracle: every option, cases, threads, memory."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernattn import ZeroDenominatorError, linear_attention
from kernattn import feature_maps as fm

FORMS = ["quadratic", "parallel", "recurrent", "chunked"]

MAPS = {
    "elu": fm.EluPlusOne,
    "relu": fm.ReLU,  # non-negative terms, so zero denominators without cancellation
    "taylor": lambda: fm.TaylorExp(2),
    "favor": lambda: fm.PositiveRandomFeatures(6, random_state=7),
    "poly-even": lambda: fm.Polynomial(2, c=1.0),
}


def run(backend, q, k, v, feature_map, **options):
    """Return ("ok", out, S, z) or ("raise", rows) for one backend."""
    try:
        out, (state_s, state_z) = linear_attention(
            q, k, v, feature_map, backend=backend, return_state=True, **options
        )
    except ZeroDenominatorError as err:
        return ("raise", err.rows)
    return ("ok", out, state_s, state_z)


def assert_same_outcome(fast, oracle):
    assert fast[0] == oracle[0]
    if oracle[0] == "raise":
        assert fast[1] == oracle[1]
        return
    for got, expected in zip(fast[1:], oracle[1:]):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12, equal_nan=True)


# --- case: causal linear attention normaliser -------------------------------------------


def form_options():
    """(form, chunk_size) pairs: every form, and chunked with sizes 1, 2, 3, 4."""
    return [(form, 64) for form in FORMS[:3]] + [("chunked", c) for c in (1, 2, 3, 4)]


@pytest.mark.parametrize("form, chunk_size", form_options())
def test_numba_causal_normaliser_case_values(form, chunk_size):
    """elu+1 with q = k = 0 makes every feature 1: row i is the mean of v[0..i]."""
    q = k = np.zeros((4, 1))
    v = np.arange(4.0).reshape(4, 1)
    out = linear_attention(q, k, v, fm.EluPlusOne(), causal=True, form=form,
                           chunk_size=chunk_size, backend="numba")
    assert out.ravel().tolist() == [0.0, 0.5, 1.0, 1.5]


@pytest.mark.parametrize("form, chunk_size", form_options())
def test_numba_causal_normaliser_future_invariance(form, chunk_size):
    """Changing k[3] and v[3] leaves rows 0..2 bit-for-bit unchanged."""
    q = k = np.zeros((4, 1))
    v = np.arange(4.0).reshape(4, 1)
    k2, v2 = k.copy(), v.copy()
    k2[3], v2[3] = 5.0, -7.0
    options = dict(causal=True, form=form, chunk_size=chunk_size, backend="numba")
    before = linear_attention(q, k, v, fm.EluPlusOne(), **options)
    after = linear_attention(q, k2, v2, fm.EluPlusOne(), **options)
    np.testing.assert_array_equal(after[:3], before[:3])


# --- against the loop oracle ---------------------------------------------------------------


@st.composite
def problems(draw):
    """Sizes first, then bounded arrays, then the options that fit those sizes."""
    b, hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    n, s = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    d, m = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    map_name = draw(st.sampled_from(sorted(MAPS)))
    feature_map = MAPS[map_name]()
    f = feature_map.num_features(d)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, k = rng.standard_normal((b, hq, n, d)), rng.standard_normal((b, hkv, s, d))
    v = rng.standard_normal((b, hkv, s, m))
    causal = draw(st.sampled_from([False, "top_left", "bottom_right"] + ([True] if n == s else [])))
    options = dict(
        causal=causal,
        form=draw(st.sampled_from(FORMS)),
        chunk_size=draw(st.integers(1, 10)),
        zero_denominator=draw(st.sampled_from(["raise", "zero", "nan", 1e-3])),
    )
    if draw(st.booleans()):
        options["kv_lengths"] = np.array(draw(st.lists(st.integers(0, s), min_size=b, max_size=b)))
        if causal is True:
            options["causal"] = "top_left"
    if isinstance(options["zero_denominator"], str) and draw(st.booleans()):
        options["rtol"] = 1e-6
    if draw(st.booleans()):
        options["initial_state"] = (rng.random((b, hkv, f, m)), rng.random((b, hkv, f)))
    return (q, k, v), map_name, options


@given(problems())
def test_numba_linear_matches_loops(problem):
    """Output, state and raised rows equal the loop twin's for every option."""
    (q, k, v), map_name, options = problem
    feature_map = MAPS[map_name]()
    oracle = run("loops", q, k, v, feature_map, form="quadratic",
                 **{key: value for key, value in options.items() if key != "form"})
    assert_same_outcome(run("numba", q, k, v, feature_map, **options), oracle)


@given(problems())
def test_numba_linear_layout_and_rank(problem):
    """bnhd layout and rank-2 inputs give the bhnd result, transposed or squeezed."""
    (q, k, v), map_name, options = problem
    options = dict(options, zero_denominator="zero", kv_lengths=None, initial_state=None)
    options.pop("rtol", None)
    feature_map = MAPS[map_name]()
    expected = linear_attention(q, k, v, feature_map, backend="numba", **options)
    to_bnhd = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    bnhd = linear_attention(to_bnhd(q), to_bnhd(k), to_bnhd(v), feature_map, backend="numba",
                            layout="bnhd", **options)
    np.testing.assert_array_equal(bnhd, to_bnhd(expected))
    rank2 = linear_attention(q[0, 0], k[0, 0], v[0, 0], feature_map, backend="numba", **options)
    oracle = linear_attention(q[0, 0], k[0, 0], v[0, 0], feature_map, backend="loops", **options)
    np.testing.assert_allclose(rank2, oracle, rtol=1e-9, atol=1e-12)


@given(problems(), st.data())
def test_numba_split_and_resume_equals_one_call(problem, data):
    """Two calls joined by the returned state match one call over all keys (non-causal)."""
    (q, k, v), map_name, options = problem
    feature_map = MAPS[map_name]()
    s = k.shape[2]
    t = data.draw(st.integers(0, s))
    common = dict(form=options["form"], chunk_size=options["chunk_size"],
                  zero_denominator="zero", backend="numba")
    _, state = linear_attention(q, k[:, :, :t], v[:, :, :t], feature_map, return_state=True,
                                **common)
    resumed, final = linear_attention(q, k[:, :, t:], v[:, :, t:], feature_map,
                                      initial_state=state, return_state=True, **common)
    whole, whole_state = linear_attention(q, k, v, feature_map, return_state=True, **common)
    np.testing.assert_allclose(resumed, whole, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(final[0], whole_state[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(final[1], whole_state[1], rtol=1e-9, atol=1e-12)


@given(st.integers(1, 40), st.integers(1, 9), st.sampled_from(FORMS), st.data())
def test_numba_hidden_keys_never_read(n, chunk_size, form, data):
    """NaN in keys and values that no query may see (future keys, padding) cannot leak."""
    rng = np.random.default_rng(n)
    q, k, v = (rng.standard_normal((2, 2, n, 3)) for _ in range(3))
    t = data.draw(st.integers(0, n - 1))
    lengths = np.array([n, t])
    k2, v2 = k.copy(), v.copy()
    k2[:, :, t:], v2[:, :, t:] = np.nan, np.nan
    k2[0], v2[0] = k[0], v[0]
    options = dict(causal="top_left", form=form, chunk_size=chunk_size, backend="numba",
                   kv_lengths=lengths)
    before = linear_attention(q, k, v, fm.EluPlusOne(), **options)
    after = linear_attention(q, k2, v2, fm.EluPlusOne(), **options)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1, :, :t], before[1, :, :t])
    assert np.isfinite(after).all()


# --- zero and signed denominators ---------------------------------------------------------


@pytest.mark.parametrize("form, chunk_size", form_options())
def test_numba_causal_zero_denominator_policies(form, chunk_size):
    """Identity map, D = 1, q = [1, 1, 1], k = [0, 1, 1]: only row 0 has den = 0."""
    q, k, v = np.ones((3, 1)), np.array([[0.0], [1.0], [1.0]]), np.array([[5.0], [1.0], [2.0]])

    def call(policy):
        return linear_attention(q, k, v, fm.Identity(), causal=True, form=form,
                                chunk_size=chunk_size, backend="numba", zero_denominator=policy)

    with pytest.raises(ZeroDenominatorError) as info:
        call("raise")
    assert info.value.rows == [(0, 0, 0)]
    assert call("zero").ravel().tolist() == [0.0, 1.0, 1.5]
    nan = call("nan")
    assert np.isnan(nan[0, 0])
    assert nan[1:].ravel().tolist() == [1.0, 1.5]
    assert call(0.5).ravel().tolist() == [0.0, 1.0 / 1.5, 3.0 / 2.5]  # num / (den + eps)


@pytest.mark.parametrize("form", FORMS)
def test_numba_rtol_flags_cancellation(form):
    q, k, v = np.array([[1.0]]), np.array([[1.0], [-1.0 + 1e-12]]), np.array([[0.0], [1.0]])
    assert np.isfinite(linear_attention(q, k, v, fm.Identity(), form=form, backend="numba")).all()
    with pytest.raises(ZeroDenominatorError, match="cancels to within rtol"):
        linear_attention(q, k, v, fm.Identity(), form=form, backend="numba", rtol=1e-9)


def test_numba_raise_names_rows_across_blocks():
    """Flagged rows are reported with their (batch, head, query) index, all of them."""
    n = 20000  # more rows than one block of the policy pass
    q = np.ones((1, 2, n, 1))
    q[0, 1, [3, n - 1]] = -1.0  # ReLU features 0: the denominator is 0
    k, v = np.ones((1, 1, 4, 1)), np.ones((1, 1, 4, 1))
    with pytest.raises(ZeroDenominatorError) as info:
        linear_attention(q, k, v, fm.ReLU(), backend="numba")
    assert info.value.rows == [(0, 1, 3), (0, 1, n - 1)]


# --- threads, compilation, precision ---------------------------------------------------------


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("causal", [False, "top_left"])
def test_numba_linear_thread_count_bit_identical(causal):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 333, 16))
    k, v = rng.standard_normal((2, 2, 333, 16)), rng.standard_normal((2, 2, 333, 8))
    options = dict(causal=causal, backend="numba", return_state=True)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one, (s_one, z_one) = linear_attention(q, k, v, fm.EluPlusOne(), **options)
        numba.set_num_threads(2)
        two, (s_two, z_two) = linear_attention(q, k, v, fm.EluPlusOne(), **options)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(s_one, s_two)
    np.testing.assert_array_equal(z_one, z_two)


def test_import_compiles_nothing():
    """Importing kernattn and listing the backends leaves the Numba module unloaded."""
    code = (
        "import sys, kernattn; from kernattn.linear import linear_backends; "
        "linear_backends(); print('kernattn._numba.linear' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_numba_kernel_float32_features():
    """float32 features are computed in float32, within float32 error of float64."""
    from kernattn._numba.linear import linear_attention as numba_twin
    from kernattn.linear import _linear_attention_numpy

    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 150, 8)) for _ in range(3))
    phi = fm.EluPlusOne()
    structure = _causal_structure(1, 150)
    arguments = dict(feature_map=phi, exact_inputs=None, structure=structure, form="chunked",
                     chunk_size=64, initial_state=None, zero_denominator="raise", rtol=0.0)
    expected, _, _ = _linear_attention_numpy(q, k, v, phi_q=phi(q), phi_k=phi(k), **arguments)
    f32 = np.float32
    out, state_s, _ = numba_twin(q.astype(f32), k.astype(f32), v.astype(f32),
                                 phi_q=phi(q).astype(f32), phi_k=phi(k).astype(f32), **arguments)
    assert out.dtype == np.float32
    assert state_s.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numba_public_call_keeps_float32(causal, dtype):
    """The public call computes float32 and float16 input in float32."""
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((1, 2, 150, 8)).astype(dtype) for _ in range(3))
    out, (state_s, state_z) = linear_attention(
        q, k, v, fm.EluPlusOne(), causal=causal, backend="numba", return_state=True
    )
    expected = linear_attention(q, k, v, fm.EluPlusOne(), causal=causal, backend="loops")
    assert out.dtype == np.float32
    assert state_s.dtype == np.float32
    assert state_z.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def _causal_structure(b, n):
    from kernattn._validate import resolve_structure

    return resolve_structure(True, None, None, None, None, b, n, n)


# --- long sequences ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_numba_linear_long_sequence_memory(causal):
    """N = 65536, D = M = 64: extra memory stays far below the (N, N) block, and sampled
    rows match the quadratic formula evaluated directly in float64."""
    n, d = 65536, 64
    rng = np.random.default_rng(11)
    q, k, v = (0.5 * rng.standard_normal((1, 1, n, d)) for _ in range(3))
    phi = fm.EluPlusOne()
    linear_attention(q[..., :8, :], k[..., :8, :], v[..., :8, :], phi, causal=causal,
                     backend="numba")  # compile or load the kernel outside the measurement
    tracemalloc.start()
    try:
        out = linear_attention(q, k, v, phi, causal=causal, backend="numba")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    extra = peak - out.nbytes
    # 100 MiB measured: φ(q) and φ(k) (2 N F float64 = 64 MiB) and the feature map's
    # temporaries, all in the wrapper. The kernel adds O(N) rows of denominators.
    assert extra < 150 * 2**20, f"{extra / 2**20:.1f} MiB beyond the output"
    phi_q, phi_k = phi(q[0, 0]), phi(k[0, 0])
    for i in (0, 1, 4097, n - 1):
        seen = i + 1 if causal else n
        weights = phi_k[:seen] @ phi_q[i]
        expected = weights @ v[0, 0, :seen] / weights.sum()
        np.testing.assert_allclose(out[0, 0, i], expected, rtol=1e-9)


def test_numba_chunk_larger_than_sequence():
    """A chunk_size far above N runs as one chunk instead of allocating (C, C) scratch."""
    rng = np.random.default_rng(7)
    q, k, v = rng.standard_normal((3, 2)), rng.standard_normal((5, 2)), rng.standard_normal((5, 2))
    for causal in (False, "bottom_right"):
        out = linear_attention(q, k, v, fm.EluPlusOne(), causal=causal, form="chunked",
                               chunk_size=10**12, backend="numba")
        reference = linear_attention(q, k, v, fm.EluPlusOne(), causal=causal, backend="loops")
        np.testing.assert_allclose(out, reference, rtol=1e-12, atol=1e-14)
