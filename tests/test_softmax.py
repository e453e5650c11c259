"""Softmax attention: the NumPy twin against the loop twin, exact cases, invariants."""

import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kernattn
from kernattn import DTypeError, OptionError, ShapeError, softmax_attention

BACKENDS = ["numpy", "loops"]


def mean_rows(values, keep):
    """Return the plain mean of the kept values per row, in float64 with math.fsum."""
    rows = []
    for row in keep:
        kept = [float(x) for x, allowed in zip(values, row) if allowed]
        rows.append(math.fsum(kept) / len(kept) if kept else 0.0)
    return np.array(rows)


# Cases from real bug reports, with q = k = 0 so that each row is the mean of what it sees.


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_alignment_fewer_queries(backend):
    q, k, v = np.zeros((2, 1)), np.zeros((4, 1)), np.arange(4.0)[:, None]
    top = softmax_attention(q, k, v, causal="top_left", backend=backend)
    bottom = softmax_attention(q, k, v, causal="bottom_right", backend=backend)
    np.testing.assert_array_equal(top[:, 0], [0.0, 0.5])
    np.testing.assert_array_equal(bottom[:, 0], [1.0, 1.5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_alignment_more_queries(backend):
    q, k, v = np.zeros((4, 1)), np.zeros((2, 1)), np.array([[1.0], [2.0]])
    top = softmax_attention(q, k, v, causal="top_left", backend=backend)
    bottom, lse = softmax_attention(
        q, k, v, causal="bottom_right", return_lse=True, backend=backend
    )
    np.testing.assert_array_equal(top[:, 0], [1.0, 1.5, 1.5, 1.5])
    np.testing.assert_array_equal(bottom[:, 0], [0.0, 0.0, 1.0, 1.5])
    np.testing.assert_array_equal(lse[:2], [-np.inf, -np.inf])
    assert not np.isnan(bottom).any()


def test_causal_true_rejected_when_lengths_differ():
    q, k, v = np.zeros((2, 1)), np.zeros((4, 1)), np.zeros((4, 1))
    with pytest.raises(OptionError, match="causal='top_left'.*causal='bottom_right'"):
        softmax_attention(q, k, v, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_row_is_zero(backend):
    q = k = np.zeros((4, 1))
    v = np.arange(4.0)[:, None]
    mask = np.ones((4, 4), dtype=bool)
    mask[1] = False
    out, lse = softmax_attention(q, k, v, mask=mask, return_lse=True, backend=backend)
    np.testing.assert_array_equal(out[:, 0], [1.5, 0.0, 1.5, 1.5])
    assert lse[1] == -np.inf
    assert not np.isnan(out).any()
    assert not np.isnan(lse).any()


@given(
    st.integers(0, 3),
    st.integers(0, 3),
    st.sampled_from(["q", "k", "v"]),
    st.floats(-1e6, 1e6),
)
def test_fully_masked_row_ignores_every_input(row, col, which, value):
    rng = np.random.default_rng(row * 7 + col)
    arrays = {"q": rng.normal(size=(4, 2)), "k": rng.normal(size=(4, 2)), "v": rng.normal(size=(4, 2))}
    mask = np.ones((4, 4), dtype=bool)
    mask[1] = False
    before = softmax_attention(arrays["q"], arrays["k"], arrays["v"], mask=mask)
    arrays[which][row if which == "q" else col, 0] = value
    after = softmax_attention(arrays["q"], arrays["k"], arrays["v"], mask=mask)
    np.testing.assert_array_equal(after[1], [0.0, 0.0])
    assert np.array_equal(before[1], after[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hkv,expected", [(2, [1, 1, 2, 2]), (1, [1, 1, 1, 1])])
def test_gqa_head_mapping_contiguous(backend, hkv, expected):
    q = np.zeros((4, 1, 1))
    k = np.zeros((hkv, 3, 1))
    v = (np.arange(hkv, dtype=float) + 1)[:, None, None] * np.ones((hkv, 3, 1))
    out = softmax_attention(q, k, v, backend=backend)
    np.testing.assert_array_equal(out[:, 0, 0], expected)


def test_gqa_shared_value_gradient_sums_group():
    # d(sum of outputs)/d v[g, j] = (Hq / Hkv) / S for q = k = 0, by linearity in v.
    q, k = np.zeros((4, 1, 1)), np.zeros((2, 3, 1))
    v = np.zeros((2, 3, 1))
    base = softmax_attention(q, k, v).sum()
    step = 0.25
    for g in range(2):
        for j in range(3):
            moved = v.copy()
            moved[g, j, 0] += step
            slope = (softmax_attention(q, k, moved).sum() - base) / step
            assert slope == pytest.approx(2 / 3, abs=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_window_two_keys(backend):
    q = k = np.zeros((6, 1))
    v = np.arange(6.0)[:, None]
    out = softmax_attention(q, k, v, causal=True, window=(1, 0), backend=backend)
    np.testing.assert_array_equal(out[:, 0], [0, 0.5, 1.5, 2.5, 3.5, 4.5])


@pytest.mark.parametrize("window", [(-1, 0), (0, -2)])
def test_negative_window_rejected(window):
    q = k = v = np.zeros((6, 1))
    with pytest.raises(OptionError, match="None, not a negative size, means unbounded"):
        softmax_attention(q, k, v, window=window)


STRUCTURAL_CASES = [
    (dict(window=(0, 0)), [0, 1, 2, 3, 4]),
    (dict(causal=True), [0, 0.5, 1, 1.5, 2]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("with_dropout", [False, True])
@pytest.mark.parametrize("options,expected", STRUCTURAL_CASES)
def test_structural_option_without_mask(backend, return_lse, with_dropout, options, expected):
    q = k = np.zeros((5, 1))
    v = np.arange(5.0)[:, None]
    extra = {"dropout_mask": np.ones((5, 5), dtype=bool)} if with_dropout else {}
    result = softmax_attention(q, k, v, return_lse=return_lse, backend=backend, **options, **extra)
    out = result[0] if return_lse else result
    equivalent = kernattn.structural_mask(5, 5, **options)
    by_mask = softmax_attention(q, k, v, mask=equivalent, backend=backend)
    np.testing.assert_array_equal(out[:, 0], expected)
    np.testing.assert_array_equal(by_mask, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_additive_bias_weights(backend):
    q, k, v = np.zeros((1, 1)), np.zeros((2, 1)), np.array([[0.0], [1.0]])
    out = softmax_attention(q, k, v, bias=np.array([[0.0, math.log(3.0)]]), backend=backend)
    assert out[0, 0] == pytest.approx(0.75, rel=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_tril_bias_is_not_causal(backend):
    q = k = np.zeros((2, 1))
    v = np.array([[0.0], [1.0]])
    out = softmax_attention(q, k, v, bias=np.tril(np.ones((2, 2))), backend=backend)
    assert out[0, 0] == pytest.approx(1 / (math.e + 1), rel=1e-15)
    assert out[1, 0] == pytest.approx(0.5, rel=1e-15)


def test_float_mask_rejected():
    q = k = v = np.zeros((2, 1))
    with pytest.raises(DTypeError, match=re.escape("an additive float mask goes in `bias`")):
        softmax_attention(q, k, v, mask=np.tril(np.ones((2, 2))))


# Exact expected values by plain means.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,s", [(3, 5), (5, 3), (4, 4)])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("window", [None, (1, 0), (0, 2), (2, None)])
def test_structure_matches_plain_means(backend, n, s, alignment, window):
    q, k, v = np.zeros((n, 1)), np.zeros((s, 1)), np.arange(s, dtype=float)[:, None] ** 2
    off = s - n if alignment == "bottom_right" else 0
    keep = np.zeros((n, s), dtype=bool)
    for i in range(n):
        for j in range(s):
            ok = j <= i + off
            if window is not None:
                left, right = window
                ok = ok and (left is None or j >= i + off - left)
                ok = ok and (right is None or j <= i + off + right)
            keep[i, j] = ok
    out = softmax_attention(q, k, v, causal=alignment, window=window, backend=backend)
    np.testing.assert_allclose(out[:, 0], mean_rows(v[:, 0], keep), rtol=1e-15, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_lengths_align_last_valid_key(backend):
    # Row 0 has 3 valid keys: the last query sees keys 0..2 and the first sees 0..1.
    q, k = np.zeros((2, 1, 2, 1)), np.zeros((2, 1, 5, 1))
    v = np.broadcast_to(np.arange(5.0)[:, None], (2, 1, 5, 1)).copy()
    v[0, 0, 3:] = np.nan  # beyond the valid length: never read
    out = softmax_attention(q, k, v, causal="bottom_right", kv_lengths=[3, 5], backend=backend)
    np.testing.assert_array_equal(out[0, 0, :, 0], [0.5, 1.0])
    np.testing.assert_array_equal(out[1, 0, :, 0], [1.5, 2.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_lengths_zero_padding_rows(backend):
    q, k, v = np.zeros((1, 1, 3, 1)), np.zeros((1, 1, 3, 1)), np.arange(3.0).reshape(1, 1, 3, 1)
    q = q.copy()
    q[0, 0, 2] = np.nan
    out, lse = softmax_attention(q, k, v, q_lengths=[2], return_lse=True, backend=backend)
    np.testing.assert_array_equal(out[0, 0, :, 0], [1.0, 1.0, 0.0])
    assert lse[0, 0, 2] == -np.inf


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_at_masked_positions_does_not_leak(backend):
    q = np.zeros((3, 1))
    k = np.array([[0.0], [np.nan], [0.0]])
    v = np.array([[1.0], [np.inf], [3.0]])
    bias = np.array([[0.0, np.nan, 0.0]] * 3)
    mask = np.array([[True, False, True]] * 3)
    out = softmax_attention(q, k, v, mask=mask, bias=bias, backend=backend)
    np.testing.assert_array_equal(out[:, 0], [2.0, 2.0, 2.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_at_allowed_position_propagates(backend):
    q, k = np.zeros((1, 1)), np.zeros((2, 1))
    v = np.array([[1.0], [np.nan]])
    out = softmax_attention(q, k, v, backend=backend)
    assert np.isnan(out[0, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_neg_inf_bias_row_is_empty(backend):
    q, k, v = np.zeros((2, 1)), np.zeros((2, 1)), np.array([[1.0], [2.0]])
    bias = np.array([[-np.inf, -np.inf], [0.0, -np.inf]])
    out, lse = softmax_attention(q, k, v, bias=bias, return_lse=True, backend=backend)
    np.testing.assert_array_equal(out[:, 0], [0.0, 1.0])
    np.testing.assert_array_equal(lse, [-np.inf, 0.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_stay_finite(backend):
    q = np.array([[1000.0]])
    k = np.array([[1000.0], [999.0]])
    v = np.array([[1.0], [0.0]])
    out, lse = softmax_attention(q, k, v, scale=1.0, return_lse=True, backend=backend)
    expected_weight = 1.0 / (1.0 + math.exp(-1000.0))
    assert out[0, 0] == pytest.approx(expected_weight, rel=1e-15)
    assert lse[0] == pytest.approx(1e6 + math.log1p(math.exp(-1000.0)), rel=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_and_dropout_by_hand(backend):
    q = np.array([[1.0]])
    k = np.array([[2.0], [0.0]])
    v = np.array([[10.0], [20.0]])
    keep = np.array([[False, True]])
    out, lse = softmax_attention(
        q, k, v, scale=1.0, softcap=1.0, dropout_mask=keep, dropout_p=0.5,
        return_lse=True, backend=backend,
    )
    s0 = math.tanh(2.0)
    p1 = 1.0 / (math.exp(s0) + 1.0)
    assert out[0, 0] == pytest.approx(p1 * 20.0 * 2.0, rel=1e-14)
    assert lse[0] == pytest.approx(math.log(math.exp(s0) + 1.0), rel=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_key_axis_gives_zero_rows(backend):
    q, k, v = np.ones((3, 2)), np.zeros((0, 2)), np.zeros((0, 4))
    out, lse = softmax_attention(q, k, v, return_lse=True, backend=backend)
    assert out.shape == (3, 4)
    np.testing.assert_array_equal(out, 0.0)
    np.testing.assert_array_equal(lse, -np.inf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_query_axis(backend):
    out = softmax_attention(np.zeros((0, 2)), np.zeros((3, 2)), np.zeros((3, 4)), backend=backend)
    assert out.shape == (0, 4)


# Input kinds: dtypes, layouts, ranks, memory order.


def test_integer_and_float16_inputs_widened():
    rng = np.random.default_rng(1)
    q, k, v = (rng.integers(-3, 4, size=(2, 3, 4, 2)) for _ in range(3))
    as_int = softmax_attention(q, k, v)
    as_float = softmax_attention(q.astype(float), k.astype(float), v.astype(float))
    half = softmax_attention(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16))
    assert as_int.dtype == np.float64
    np.testing.assert_array_equal(as_int, as_float)
    np.testing.assert_array_equal(half, as_float)  # small integers are exact in float16


def test_non_contiguous_and_read_only_inputs():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(2, 3, 8, 6))
    q, k, v = base[:, :, ::2, ::2], base[:, :, 1::2, 1::2], base[..., ::-1][:, :, ::2, :3]
    for array in (q, k, v):
        array.flags.writeable = False
    out = softmax_attention(q, k, v)
    expected = softmax_attention(q.copy(), k.copy(), v.copy(), backend="loops")
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-15)


def test_bnhd_layout_matches_bhnd():
    rng = np.random.default_rng(3)
    q, k, v = rng.normal(size=(2, 4, 5, 3)), rng.normal(size=(2, 2, 6, 3)), rng.normal(size=(2, 2, 6, 2))
    out, lse = softmax_attention(q, k, v, causal="bottom_right", return_lse=True)
    t = (0, 2, 1, 3)
    out_t, lse_t = softmax_attention(
        q.transpose(t), k.transpose(t), v.transpose(t), causal="bottom_right",
        return_lse=True, layout="bnhd",
    )
    np.testing.assert_array_equal(out_t, out.transpose(t))
    np.testing.assert_array_equal(lse_t, lse)


def test_lower_rank_inputs_keep_rank():
    rng = np.random.default_rng(4)
    q, k, v = rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 5, 2)), rng.normal(size=(3, 5, 1))
    out3, lse3 = softmax_attention(q, k, v, return_lse=True)
    out4 = softmax_attention(q[None], k[None], v[None])
    assert out3.shape == (3, 4, 1)
    assert lse3.shape == (3, 4)
    np.testing.assert_array_equal(out3, out4[0])
    out2 = softmax_attention(q[0], k[0], v[0])
    np.testing.assert_array_equal(out2, out3[0])


# Property tests: the twins agree, and invariants hold on random inputs.


@st.composite
def attention_inputs(draw, max_size=6):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 2))
    n = draw(st.integers(0, max_size))
    s = draw(st.integers(0, max_size))
    d = draw(st.integers(1, 3))
    m = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, hq, n, d)) * draw(st.sampled_from([0.5, 3.0]))
    k = rng.normal(size=(b, hkv, s, d))
    v = rng.normal(size=(b, hkv, s, m))
    options = {}
    causal = draw(st.sampled_from([None, "top_left", "bottom_right"]))
    if causal:
        options["causal"] = causal
    if draw(st.booleans()):
        options["window"] = (draw(st.sampled_from([None, 0, 1, 3])), draw(st.sampled_from([None, 0, 2])))
        options.setdefault("alignment", None)
        if not causal:
            options["alignment"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    if draw(st.booleans()):
        options["mask"] = rng.random((b, 1 if draw(st.booleans()) else hq, n, s)) < 0.7
    if draw(st.booleans()):
        options["bias"] = rng.normal(size=(hq, n, s))
    if draw(st.booleans()):
        options["softcap"] = draw(st.sampled_from([0.5, 5.0]))
    if draw(st.booleans()):
        options["kv_lengths"] = rng.integers(0, s + 1, size=b)
        options.setdefault("alignment", None)
        if not causal:
            options["alignment"] = "bottom_right"
    if draw(st.booleans()):
        options["q_lengths"] = rng.integers(0, n + 1, size=b)
        if not causal:
            options["alignment"] = "bottom_right"
    if draw(st.booleans()):
        options["dropout_mask"] = rng.random((b, hq, n, s)) < 0.8
        options["dropout_p"] = 0.2
    if options.get("alignment", "x") is None:
        del options["alignment"]
    if draw(st.booleans()):
        options["scale"] = draw(st.sampled_from([0.1, 1.0, 10.0]))
    return q, k, v, options


@given(attention_inputs())
def test_numpy_matches_loops(inputs):
    q, k, v, options = inputs
    out, lse = softmax_attention(q, k, v, return_lse=True, **options)
    ref_out, ref_lse = softmax_attention(q, k, v, return_lse=True, backend="loops", **options)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-12, atol=1e-12)


@given(attention_inputs(), st.randoms(use_true_random=False))
def test_joint_key_permutation_invariant(inputs, random):
    q, k, v, options = inputs
    for name in ("causal", "window", "alignment", "kv_lengths"):
        options.pop(name, None)
    s = k.shape[2]
    order = list(range(s))
    random.shuffle(order)
    permuted = dict(options)
    for name in ("mask", "bias", "dropout_mask"):
        if name in options:
            permuted[name] = np.asarray(options[name])[..., order]
    out = softmax_attention(q, k, v, **options)
    out_perm = softmax_attention(q, k[:, :, order], v[:, :, order], **permuted)
    np.testing.assert_allclose(out_perm, out, rtol=1e-12, atol=1e-13)


@given(attention_inputs(), st.floats(-50, 50))
def test_row_constant_bias_shift_invariant(inputs, shift):
    q, k, v, options = inputs
    b, hq, n = q.shape[:3]
    s = k.shape[2]
    bias = np.asarray(options.pop("bias", np.zeros((hq, n, s))))
    row_constants = np.random.default_rng(0).uniform(-1, 1, size=(b, hq, n, 1)) * shift
    out, lse = softmax_attention(q, k, v, bias=bias, return_lse=True, **options)
    out_s, lse_s = softmax_attention(q, k, v, bias=bias + row_constants, return_lse=True, **options)
    np.testing.assert_allclose(out_s, out, rtol=1e-11, atol=1e-12)
    expected_lse = np.where(np.isneginf(lse), -np.inf, lse + row_constants[..., 0])
    np.testing.assert_allclose(lse_s, expected_lse, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_future_keys_do_not_change_causal_rows(backend, data):
    n = data.draw(st.integers(1, 6))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(2, n, 3)), rng.normal(size=(2, n, 3)), rng.normal(size=(2, n, 2))
    i = data.draw(st.integers(0, n - 1))
    out = softmax_attention(q, k, v, causal=True, backend=backend)
    k2, v2 = k.copy(), v.copy()
    k2[:, i + 1:] = rng.normal(size=k2[:, i + 1:].shape) * 100
    v2[:, i + 1:] = np.nan
    out2 = softmax_attention(q, k2, v2, causal=True, backend=backend)
    np.testing.assert_array_equal(out2[:, : i + 1], out[:, : i + 1])


@given(attention_inputs(), st.data())
def test_merge_of_key_split_equals_whole(inputs, data):
    q, k, v, options = inputs
    for name in ("causal", "window", "alignment", "kv_lengths", "dropout_mask", "dropout_p"):
        options.pop(name, None)
    s = k.shape[2]
    cuts = sorted(data.draw(st.lists(st.integers(0, s), max_size=3)))
    bounds = [0, *cuts, s]
    outs, lses = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = {name: np.asarray(value)[..., lo:hi] if name in ("mask", "bias") else value
                for name, value in options.items()}
        out_p, lse_p = softmax_attention(q, k[:, :, lo:hi], v[:, :, lo:hi], return_lse=True, **part)
        outs.append(out_p)
        lses.append(lse_p)
    merged, merged_lse = kernattn.merge_attention_states(outs, lses)
    whole, whole_lse = softmax_attention(q, k, v, return_lse=True, **options)
    np.testing.assert_allclose(merged, whole, rtol=1e-11, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(merged_lse), np.isneginf(whole_lse))
    finite = np.isfinite(whole_lse)
    np.testing.assert_allclose(merged_lse[finite], whole_lse[finite], rtol=1e-12, atol=1e-12)


@given(st.integers(1, 7), st.integers(0, 2**32 - 1))
def test_decoding_rows_equal_causal_forward(n, seed):
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(2, n, 3)), rng.normal(size=(1, n, 3)), rng.normal(size=(1, n, 2))
    full = softmax_attention(q, k, v, causal=True)
    for t in range(n):
        row = softmax_attention(q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], causal="bottom_right")
        np.testing.assert_allclose(row[:, 0], full[:, t], rtol=1e-13, atol=1e-14)


@given(attention_inputs())
def test_gqa_equals_mha_with_repeated_heads(inputs):
    q, k, v, options = inputs
    group = q.shape[1] // k.shape[1]
    out = softmax_attention(q, k, v, **options)
    repeated = softmax_attention(q, np.repeat(k, group, axis=1), np.repeat(v, group, axis=1), **options)
    np.testing.assert_array_equal(out, repeated)


def test_merge_of_empty_parts():
    nan_out = np.full((1, 2), np.nan)
    out, lse = kernattn.merge_attention_states([nan_out, nan_out], [[-np.inf], [-np.inf]])
    np.testing.assert_array_equal(out, [[0.0, 0.0]])
    np.testing.assert_array_equal(lse, [-np.inf])
    out, lse = kernattn.merge_attention_states([nan_out, [[1.0, 2.0]]], [[-np.inf], [0.5]])
    np.testing.assert_array_equal(out, [[1.0, 2.0]])
    np.testing.assert_array_equal(lse, [0.5])


def test_merge_with_base2_lse_is_wrong():
    # Two single-key parts with scores 0 and 1: only the natural-log lse merges correctly.
    outs = [np.array([[0.0]]), np.array([[1.0]])]
    natural = [np.array([0.0]), np.array([1.0])]
    out, _ = kernattn.merge_attention_states(outs, natural)
    assert out[0, 0] == pytest.approx(math.e / (1 + math.e), rel=1e-15)
    base2 = [x / math.log(2) for x in natural]
    wrong, _ = kernattn.merge_attention_states(outs, base2)
    assert abs(wrong[0, 0] - out[0, 0]) > 0.05


def test_merge_bnhd_layout():
    rng = np.random.default_rng(5)
    outs = [rng.normal(size=(2, 3, 4, 5)) for _ in range(2)]
    lses = [rng.normal(size=(2, 4, 3)) for _ in range(2)]
    out, lse = kernattn.merge_attention_states(outs, lses, layout="bnhd")
    ref, ref_lse = kernattn.merge_attention_states(
        [o.transpose(0, 2, 1, 3) for o in outs], lses
    )
    np.testing.assert_allclose(out, ref.transpose(0, 2, 1, 3), rtol=1e-15)
    np.testing.assert_array_equal(lse, ref_lse)


# Bad input: each error names the argument, what it got and what was expected.

Q = np.zeros((1, 2, 3, 4))
K = np.zeros((1, 2, 5, 4))
VV = np.zeros((1, 2, 5, 6))

BAD_INPUTS = [
    ("rank", dict(q=np.zeros(4)), ShapeError, "q has rank 1 (shape (4,)); expected rank 4 (B, H, N, D)"),
    ("head dim", dict(k=np.zeros((1, 2, 5, 3))), ShapeError, "k has head dimension D = 3, but q has D = 4"),
    ("key count", dict(v=np.zeros((1, 2, 4, 6))), ShapeError, "v has 4 positions, but k has S = 5"),
    ("heads", dict(q=np.zeros((1, 3, 3, 4))), ShapeError, "k has 2 heads, which does not divide the 3 heads of q"),
    ("mask shape", dict(mask=np.ones((4, 5), bool)), ShapeError, "mask has shape (4, 5), which does not broadcast to (B, Hq, N, S) = (1, 2, 3, 5)"),
    ("bool q", dict(q=np.zeros((1, 2, 3, 4), bool)), DTypeError, "q has dtype bool"),
    ("complex v", dict(v=np.zeros((1, 2, 5, 6), complex)), DTypeError, "v has complex dtype complex128"),
    ("negative window", dict(window=(2, -1)), OptionError, "window right size is -1"),
    ("causal name", dict(causal="upper"), OptionError, "causal is 'upper'; expected None, False, True, 'top_left' or 'bottom_right'"),
    ("scale", dict(scale=float("nan")), OptionError, "scale is nan; expected a finite real number or None"),
    ("scale inf", dict(scale=float("inf")), OptionError, "scale is inf; expected a finite real number"),
    ("layout", dict(layout="nhd"), OptionError, "layout is 'nhd'; expected one of 'bhnd', 'bnhd'"),
    ("backend", dict(backend="cuda9"), OptionError, "backend is 'cuda9'; expected one of 'numpy', 'loops'"),
    ("dropout without mask", dict(dropout_p=0.1), OptionError, "dropout_p is 0.1 but dropout_mask is None"),
    ("dropout p", dict(dropout_p=1.0, dropout_mask=np.ones((3, 5), bool)), OptionError, "dropout_p is 1.0; expected a float in [0, 1)"),
    ("kv length", dict(kv_lengths=[6]), OptionError, "kv_lengths[0] is 6; expected a length between 0 and S = 5"),
    ("kv length shape", dict(kv_lengths=[1, 2]), ShapeError, "kv_lengths has shape (2,); expected (1,)"),
    ("conflict", dict(causal="top_left", alignment="bottom_right"), OptionError, "they conflict"),
    ("window alignment", dict(window=(1, 0)), OptionError, "pass alignment='top_left' or alignment='bottom_right'"),
    ("softcap", dict(softcap=0.0), OptionError, "softcap is 0.0; expected a positive finite number"),
]


@pytest.mark.parametrize(
    "arguments,error,message", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_rejected(arguments, error, message):
    call = dict(q=Q, k=K, v=VV)
    call.update(arguments)
    with pytest.raises(error, match=re.escape(message)):
        softmax_attention(call.pop("q"), call.pop("k"), call.pop("v"), **call)


def test_merge_rejects_mismatched_parts():
    with pytest.raises(ShapeError, match=re.escape("lses[0] has shape (3,); expected (2,)")):
        kernattn.merge_attention_states([np.zeros((2, 4))], [np.zeros(3)])
    with pytest.raises(ShapeError, match=re.escape("outs has 2 parts but lses has 1")):
        kernattn.merge_attention_states([np.zeros((2, 4))] * 2, [np.zeros(2)])


def test_merge_propagates_nan_and_inf_lse():
    parts = [np.ones((2, 3)), np.ones((2, 3))]
    for bad in (np.nan, np.inf):
        out, lse = kernattn.merge_attention_states(parts, [np.array([bad, 0.0]), np.zeros(2)])
        assert np.isnan(out[0]).all()
        np.testing.assert_array_equal(out[1], [1.0, 1.0, 1.0])
        assert not np.isfinite(lse[0])


def test_zero_heads_rejected():
    empty = np.zeros((1, 0, 4, 1))
    with pytest.raises(ShapeError, match=re.escape("q has 0 and k has 0 heads; expected at least one")):
        softmax_attention(empty, empty, empty)


def test_float_dropout_mask_message():
    q = np.zeros((4, 1))
    with pytest.raises(DTypeError, match=re.escape("dropout_mask has dtype float64; expected bool (True = keep)")):
        softmax_attention(q, q, q, dropout_mask=np.ones((4, 4)))


def test_alignment_error_names_differing_lengths():
    q = np.zeros((4, 1))
    with pytest.raises(OptionError, match="batch row 0 has 4 valid queries and 2 valid keys"):
        softmax_attention(q, q, q, causal=True, kv_lengths=[2])
