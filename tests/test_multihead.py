"""Tests of multi_head_attention, AttentionParams, KVCache and the PyTorch converter.

Expected values come from `reference_layer`, a plain-Python layer written from the
formula (lists, `math.fsum`, its own head split and grouped-query mapping), from the loop
backend, from closed forms, or from PyTorch's nn.MultiheadAttention.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernattn import (
    AttentionParams,
    DTypeError,
    KVCache,
    OptionError,
    ShapeError,
    multi_head_attention,
)

TOL = dict(rtol=1e-12, atol=1e-12)


def make_params(rng, d_model, hq, hkv, d, m, d_out, *, d_kv=None, biases=True):
    d_kv = d_model if d_kv is None else d_kv
    weights = dict(
        w_q=rng.normal(size=(d_model, hq * d)),
        w_k=rng.normal(size=(d_kv, hkv * d)),
        w_v=rng.normal(size=(d_kv, hkv * m)),
        w_o=rng.normal(size=(hq * m, d_out)),
    )
    if biases:
        weights.update(
            b_q=rng.normal(size=hq * d),
            b_k=rng.normal(size=hkv * d),
            b_v=rng.normal(size=hkv * m),
            b_o=rng.normal(size=d_out),
        )
    return AttentionParams(**weights)


def reference_layer(x, params, hq, hkv, *, memory=None, causal=False, kv_lengths=None):
    """Return the layer output (B, N, d_out) computed scalar by scalar.

    Causal rows use bottom-right alignment: query i attends to key j when
    j <= i + (S_b - N), S_b the valid keys of row b.
    """
    x = np.asarray(x, dtype=float).tolist()
    src = x if memory is None else np.asarray(memory, dtype=float).tolist()
    w = {name: getattr(params, name) for name in ("w_q", "w_k", "w_v", "w_o")}
    bias = {}
    for name, w_name in (("b_q", "w_q"), ("b_k", "w_k"), ("b_v", "w_v"), ("b_o", "w_o")):
        value = getattr(params, name)
        bias[name] = [0.0] * w[w_name].shape[1] if value is None else value.tolist()
    w = {name: value.tolist() for name, value in w.items()}

    def linear(rows, weight, b):
        return [
            [math.fsum([row[c] * weight[c][k] for c in range(len(row))] + [b[k]])
             for k in range(len(b))]
            for row in rows
        ]

    d = len(w["w_q"][0]) // hq
    m = len(w["w_v"][0]) // hkv
    group = hq // hkv
    out = []
    for b in range(len(x)):
        q = linear(x[b], w["w_q"], bias["b_q"])
        k = linear(src[b], w["w_k"], bias["b_k"])
        v = linear(src[b], w["w_v"], bias["b_v"])
        n, s = len(q), len(k)
        s_b = s if kv_lengths is None else int(kv_lengths[b])
        concat = [[0.0] * (hq * m) for _ in range(n)]
        for h in range(hq):
            g = h // group
            for i in range(n):
                keys = [j for j in range(s_b) if not causal or j <= i + s_b - n]
                if not keys:
                    continue
                scores = {
                    j: math.fsum(q[i][h * d + t] * k[j][g * d + t] for t in range(d))
                    / math.sqrt(d)
                    for j in keys
                }
                top = max(scores.values())
                weights = {j: math.exp(scores[j] - top) for j in keys}
                total = math.fsum(weights.values())
                for t in range(m):
                    concat[i][h * m + t] = math.fsum(
                        weights[j] / total * v[j][g * m + t] for j in keys
                    )
        out.append(linear(concat, w["w_o"], bias["b_o"]))
    return np.array(out)


def repeat_kv_heads(params, hq, hkv):
    """Return MHA params whose key/value head h copies grouped head h // (Hq / Hkv)."""
    group = hq // hkv
    d = params.w_k.shape[1] // hkv
    m = params.w_v.shape[1] // hkv

    def repeat(a, width):
        blocks = [a[..., (h // group) * width:(h // group + 1) * width] for h in range(hq)]
        return np.concatenate(blocks, axis=-1)

    return dataclasses.replace(
        params,
        w_k=repeat(params.w_k, d),
        w_v=repeat(params.w_v, m),
        b_k=None if params.b_k is None else repeat(params.b_k, d),
        b_v=None if params.b_v is None else repeat(params.b_v, m),
    )


# --- agreement with the plain-Python layer ------------------------------------------

LAYER_CASES = [
    # id, (B, N, S, d_model, d_kv, Hq, Hkv, D, M, d_out), cross, causal, kv_lengths
    ("mha-B2-N5", (2, 5, 5, 6, 6, 2, 2, 3, 3, 4), False, False, None),
    ("gqa-Hq4-Hkv2-causal", (2, 6, 6, 8, 8, 4, 2, 2, 3, 5), False, True, None),
    ("mqa-Hq3-Hkv1-causal", (1, 4, 4, 5, 5, 3, 1, 2, 2, 3), False, True, None),
    ("cross-N3-S5-dkv7", (2, 3, 5, 4, 7, 2, 1, 3, 2, 4), True, False, None),
    ("cross-kv_lengths", (2, 3, 5, 4, 4, 2, 2, 2, 2, 3), True, False, [5, 2]),
    ("cross-causal-bottom-right", (2, 2, 6, 4, 4, 2, 2, 2, 3, 3), True, True, [6, 3]),
]


@pytest.mark.parametrize("backend", ["numpy", "loops"])
@pytest.mark.parametrize(
    "sizes, cross, causal, kv_lengths",
    [case[1:] for case in LAYER_CASES],
    ids=[case[0] for case in LAYER_CASES],
)
def test_multi_head_attention_matches_reference(backend, sizes, cross, causal, kv_lengths):
    b, n, s, d_model, d_kv, hq, hkv, d, m, d_out = sizes
    rng = np.random.default_rng(sum(sizes))
    params = make_params(rng, d_model, hq, hkv, d, m, d_out, d_kv=d_kv)
    x = rng.normal(size=(b, n, d_model))
    memory = rng.normal(size=(b, s, d_kv)) if cross else None
    expected = reference_layer(
        x, params, hq, hkv, memory=memory, causal=causal, kv_lengths=kv_lengths
    )
    got = multi_head_attention(
        x, params, num_heads=hq, num_kv_heads=hkv, memory=memory,
        causal="bottom_right" if causal else None, kv_lengths=kv_lengths, backend=backend,
    )
    np.testing.assert_allclose(got, expected, **TOL)


def test_multi_head_attention_rank2_input():
    rng = np.random.default_rng(1)
    params = make_params(rng, 4, 2, 2, 2, 3, 5)
    x = rng.normal(size=(3, 4))
    y, lse = multi_head_attention(x, params, num_heads=2, causal=True, return_lse=True)
    assert y.shape == (3, 5)
    assert lse.shape == (2, 3)
    np.testing.assert_allclose(y, reference_layer(x[None], params, 2, 2, causal=True)[0], **TOL)


def test_multi_head_attention_without_biases():
    rng = np.random.default_rng(2)
    params = make_params(rng, 4, 2, 1, 2, 2, 3, biases=False)
    x = rng.normal(size=(2, 3, 4))
    got = multi_head_attention(x, params, num_heads=2, num_kv_heads=1)
    np.testing.assert_allclose(got, reference_layer(x, params, 2, 1), **TOL)


def test_multi_head_attention_memory_batch_broadcast():
    rng = np.random.default_rng(3)
    params = make_params(rng, 4, 2, 2, 2, 2, 3)
    x = rng.normal(size=(3, 2, 4))
    memory = rng.normal(size=(4, 4))
    got = multi_head_attention(x, params, num_heads=2, memory=memory)
    expected = reference_layer(x, params, 2, 2, memory=np.broadcast_to(memory, (3, 4, 4)))
    np.testing.assert_allclose(got, expected, **TOL)


def test_multi_head_attention_gqa_head_mapping_exact():
    # Hq = 4, Hkv = 2: key/value head g has the constant value g + 1, q = k = 0, so
    # query heads read [1, 1, 2, 2] (contiguous groups); w_o = I shows each head.
    x = np.zeros((1, 1, 2))
    params = AttentionParams(
        w_q=np.zeros((2, 4)), w_k=np.zeros((2, 2)), w_v=np.zeros((2, 2)),
        w_o=np.eye(4), b_v=np.array([1.0, 2.0]),
    )
    memory = np.zeros((1, 3, 2))
    y = multi_head_attention(x, params, num_heads=4, num_kv_heads=2, memory=memory)
    assert y.tolist() == [[[1.0, 1.0, 2.0, 2.0]]]
    mqa = dataclasses.replace(params, w_k=np.zeros((2, 1)), w_v=np.zeros((2, 1)),
                              b_v=np.array([1.0]))
    y = multi_head_attention(x, mqa, num_heads=4, num_kv_heads=1, memory=memory)
    assert y.tolist() == [[[1.0, 1.0, 1.0, 1.0]]]


@pytest.mark.parametrize("hq, hkv", [(4, 2), (6, 3), (4, 1), (3, 1)], ids=lambda v: str(v))
def test_gqa_equals_mha_with_repeated_heads(hq, hkv):
    rng = np.random.default_rng(10 * hq + hkv)
    params = make_params(rng, 6, hq, hkv, 2, 3, 4)
    x = rng.normal(size=(2, 5, 6))
    grouped = multi_head_attention(x, params, num_heads=hq, num_kv_heads=hkv, causal=True)
    full = multi_head_attention(
        x, repeat_kv_heads(params, hq, hkv), num_heads=hq, causal=True
    )
    np.testing.assert_allclose(grouped, full, **TOL)


@st.composite
def layer_inputs(draw):
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    d, m = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    b, n = draw(st.integers(1, 2)), draw(st.integers(1, 5))
    s = draw(st.integers(1, 6))
    sizes = (b, n, s, draw(st.integers(1, 5)), draw(st.integers(1, 5)), hq, hkv, d, m,
             draw(st.integers(1, 4)))
    options = dict(
        causal=draw(st.sampled_from([None, "top_left", "bottom_right"])),
        window=draw(st.sampled_from([None, (1, 0), (2, None)])),
        softcap=draw(st.sampled_from([None, 2.0])),
        kv_lengths=draw(st.lists(st.integers(0, s), min_size=b, max_size=b)),
        q_lengths=draw(st.lists(st.integers(0, n), min_size=b, max_size=b)),
    )
    if options["window"] is not None and options["causal"] is None:
        options["alignment"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    return sizes, options, draw(st.integers(0, 2**32 - 1))


@given(layer_inputs())
def test_multi_head_attention_numpy_matches_loops(case):
    (b, n, s, d_model, d_kv, hq, hkv, d, m, d_out), options, seed = case
    rng = np.random.default_rng(seed)
    params = make_params(rng, d_model, hq, hkv, d, m, d_out, d_kv=d_kv)
    x = rng.normal(size=(b, n, d_model))
    memory = rng.normal(size=(b, s, d_kv))
    results = [
        multi_head_attention(
            x, params, num_heads=hq, num_kv_heads=hkv, memory=memory, return_lse=True,
            backend=backend, **options,
        )
        for backend in ("numpy", "loops")
    ]
    np.testing.assert_allclose(results[0][0], results[1][0], **TOL)
    np.testing.assert_allclose(results[0][1], results[1][1], **TOL)


def test_padding_query_rows_are_output_bias():
    rng = np.random.default_rng(4)
    params = make_params(rng, 3, 2, 2, 2, 2, 3)
    y = multi_head_attention(rng.normal(size=(2, 3, 3)), params, num_heads=2,
                             q_lengths=[3, 1])
    np.testing.assert_array_equal(y[1, 1:], np.broadcast_to(params.b_o, (2, 3)))


# --- KV cache and decoding ----------------------------------------------------------


def decode(x, params, hq, hkv, chunks, *, capacity=None, poison=True):
    """Feed x (B, N, d_model) through a cache in chunks of the given sizes."""
    b, n, _ = x.shape
    d = params.w_q.shape[1] // hq
    m = params.w_v.shape[1] // hkv
    cache = KVCache(b, hkv, n if capacity is None else capacity, d, m)
    if poison:
        cache.keys[...] = np.nan
        cache.values[...] = np.nan
    outputs, start = [], 0
    for size in chunks:
        outputs.append(multi_head_attention(
            x[:, start:start + size], params, num_heads=hq, num_kv_heads=hkv, cache=cache,
        ))
        start += size
    return np.concatenate(outputs, axis=1), cache


@st.composite
def decode_inputs(draw):
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.integers(1, 3))
    n = draw(st.integers(1, 8))
    chunks = []
    while sum(chunks) < n:
        chunks.append(draw(st.integers(1, n - sum(chunks))))
    sizes = dict(
        b=draw(st.integers(1, 3)), n=n, d_model=draw(st.integers(1, 6)), hq=hq, hkv=hkv,
        d=draw(st.integers(1, 4)), m=draw(st.integers(1, 4)), d_out=draw(st.integers(1, 4)),
        extra=draw(st.integers(0, 3)),
    )
    return sizes, chunks, draw(st.integers(0, 2**32 - 1))


@given(decode_inputs())
def test_cache_decoding_matches_full_causal(case):
    sizes, chunks, seed = case
    rng = np.random.default_rng(seed)
    params = make_params(rng, sizes["d_model"], sizes["hq"], sizes["hkv"], sizes["d"],
                         sizes["m"], sizes["d_out"])
    x = rng.normal(size=(sizes["b"], sizes["n"], sizes["d_model"]))
    full = multi_head_attention(x, params, num_heads=sizes["hq"],
                                num_kv_heads=sizes["hkv"], causal=True)
    got, cache = decode(x, params, sizes["hq"], sizes["hkv"], chunks,
                        capacity=sizes["n"] + sizes["extra"])
    np.testing.assert_allclose(got, full, **TOL)
    assert cache.lengths.tolist() == [sizes["n"]] * sizes["b"]


def test_cache_prefill_then_decode_matches_reference():
    rng = np.random.default_rng(5)
    params = make_params(rng, 6, 4, 2, 3, 2, 5)
    x = rng.normal(size=(2, 9, 6))
    got, _ = decode(x, params, 4, 2, [5, 1, 1, 1, 1], capacity=12)
    np.testing.assert_allclose(got, reference_layer(x, params, 4, 2, causal=True), **TOL)


def test_cache_decoding_loops_backend():
    rng = np.random.default_rng(6)
    params = make_params(rng, 4, 2, 1, 2, 2, 3)
    x = rng.normal(size=(1, 4, 4))
    cache = KVCache(1, 1, 6, 2)
    steps = [
        multi_head_attention(x[:, :2], params, num_heads=2, num_kv_heads=1, cache=cache,
                             backend="loops"),
        multi_head_attention(x[:, 2:3], params, num_heads=2, num_kv_heads=1, cache=cache,
                             backend="loops"),
        multi_head_attention(x[:, 3:], params, num_heads=2, num_kv_heads=1, cache=cache,
                             backend="loops"),
    ]
    expected = reference_layer(x, params, 2, 1, causal=True)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), expected, **TOL)


def test_cache_stale_slots_never_read():
    # Stale slots are filled with NaN keys and Inf values; neither may reach the output.
    rng = np.random.default_rng(7)
    params = make_params(rng, 4, 2, 2, 2, 2, 3)
    x = rng.normal(size=(2, 3, 4))
    cache = KVCache(2, 2, 10, 2)
    multi_head_attention(x[:, :1], params, num_heads=2, cache=cache)
    cache.keys[:, :, 1:] = np.nan
    cache.values[:, :, 1:] = np.inf
    rest = multi_head_attention(x[:, 1:], params, num_heads=2, cache=cache)
    assert np.all(np.isfinite(rest))
    full = multi_head_attention(x, params, num_heads=2, causal=True)
    np.testing.assert_allclose(rest, full[:, 1:], **TOL)


def test_cache_ragged_append_matches_each_row():
    # Row 0 has a 4-token prompt, row 1 a 2-token prompt (padded to 4); then both
    # decode 2 tokens. Each row must equal its own unpadded causal pass.
    rng = np.random.default_rng(8)
    params = make_params(rng, 5, 2, 1, 3, 2, 4)
    prompts = [rng.normal(size=(4, 5)), rng.normal(size=(2, 5))]
    tails = [rng.normal(size=(2, 5)), rng.normal(size=(2, 5))]
    padded = np.full((2, 4, 5), np.nan)  # padding tokens must not be appended
    padded[0], padded[1, :2] = prompts[0], prompts[1]
    cache = KVCache(2, 1, 8, 3, 2)
    first = multi_head_attention(padded, params, num_heads=2, num_kv_heads=1,
                                 cache=cache, q_lengths=[4, 2])
    assert cache.lengths.tolist() == [4, 2]
    steps = [
        multi_head_attention(np.stack([tails[0][t:t + 1], tails[1][t:t + 1]]), params,
                             num_heads=2, num_kv_heads=1, cache=cache)
        for t in range(2)
    ]
    for row in range(2):
        whole = np.concatenate([prompts[row], tails[row]])[None]
        expected = reference_layer(whole, params, 2, 1, causal=True)[0]
        n_prompt = len(prompts[row])
        np.testing.assert_allclose(first[row, :n_prompt], expected[:n_prompt], **TOL)
        got_tail = np.concatenate([step[row] for step in steps])
        np.testing.assert_allclose(got_tail, expected[n_prompt:], **TOL)


def test_cache_append_and_views():
    cache = KVCache(batch=2, num_kv_heads=1, capacity=3, head_dim=2, value_dim=1)
    assert np.isnan(cache.keys).all()
    k = np.arange(8.0).reshape(2, 1, 2, 2)
    v = np.arange(4.0).reshape(2, 1, 2, 1)
    cache.append(k, v, counts=[2, 1])
    assert cache.lengths.tolist() == [2, 1]
    assert cache.valid_keys(0).tolist() == [[[0.0, 1.0], [2.0, 3.0]]]
    assert cache.valid_keys(1).tolist() == [[[4.0, 5.0]]]
    assert cache.valid_values(1).tolist() == [[[2.0]]]
    assert np.isnan(cache.keys[1, 0, 1:]).all()
    cache.append(k[:, :, :1], v[:, :, :1])
    assert cache.lengths.tolist() == [3, 2]
    assert cache.valid_keys(1).tolist() == [[[4.0, 5.0], [4.0, 5.0]]]


def test_cache_lengths_is_a_copy():
    cache = KVCache(1, 1, 2, 1)
    cache.lengths[0] = 2
    assert cache.lengths.tolist() == [0]


def test_cache_append_beyond_capacity_raises_and_writes_nothing():
    cache = KVCache(batch=2, num_kv_heads=1, capacity=4, head_dim=1)
    cache.append(np.zeros((2, 1, 3, 1)), np.zeros((2, 1, 3, 1)), counts=[1, 3])
    message = (
        "appending 2 tokens to batch row 1, which contains 3, needs 5 positions, but the "
        "cache capacity is C = 4; create the KVCache with capacity >= 5"
    )
    with pytest.raises(ShapeError, match=re.escape(message)):
        cache.append(np.ones((2, 1, 2, 1)), np.ones((2, 1, 2, 1)))
    assert cache.lengths.tolist() == [1, 3]
    assert np.isnan(cache.keys[0, 0, 1:]).all()


def test_cache_restored_when_attention_fails():
    rng = np.random.default_rng(9)
    params = make_params(rng, 3, 2, 2, 2, 2, 2)
    cache = KVCache(1, 2, 4, 2)
    with pytest.raises(ShapeError, match=re.escape("mask has shape (3,)")):
        multi_head_attention(rng.normal(size=(1, 2, 3)), params, num_heads=2,
                             cache=cache, mask=np.ones(3, dtype=bool))
    assert cache.lengths.tolist() == [0]


def test_multi_head_attention_with_cache_bad_options():
    rng = np.random.default_rng(11)
    params = make_params(rng, 3, 2, 2, 2, 2, 2)
    x = rng.normal(size=(1, 1, 3))
    cache = KVCache(1, 2, 4, 2)
    cases = [
        (dict(causal="top_left"), OptionError,
         "causal is 'top_left' with a cache; decoding with a KV cache is causal"),
        (dict(causal=False), OptionError, "causal is False with a cache"),
        (dict(alignment="top_left"), OptionError, "alignment is 'top_left' with a cache"),
        (dict(kv_lengths=[1]), OptionError, "kv_lengths was given with a cache"),
        (dict(memory=x), OptionError, "memory and cache were both given"),
        (dict(q_lengths=[2]), OptionError, "q_lengths[0] is 2; expected a length between "
         "0 and N = 1"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            multi_head_attention(x, params, num_heads=2, cache=cache, **kwargs)
    assert cache.lengths.tolist() == [0]
    wrong = KVCache(1, 1, 4, 2)
    with pytest.raises(ShapeError, match=re.escape(
        "cache has (B, Hkv, D, M) = (1, 1, 2, 2), but x and the weights give "
        "(1, 2, 2, 2); create the KVCache with batch=1, num_kv_heads=2, head_dim=2, "
        "value_dim=2"
    )):
        multi_head_attention(x, params, num_heads=2, cache=wrong)
    with pytest.raises(OptionError, match=re.escape("cache is dict; expected a KVCache")):
        multi_head_attention(x, params, num_heads=2, cache={})


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(batch=0), OptionError, "batch is 0; expected an integer >= 1"),
        (dict(capacity=-1), OptionError, "capacity is -1; expected an integer >= 0"),
        (dict(head_dim=2.5), OptionError, "head_dim is 2.5; expected an integer"),
        (dict(dtype=np.int32), DTypeError, "dtype is int32; expected a floating dtype"),
    ],
    ids=["batch-0", "capacity-negative", "head_dim-float", "dtype-int"],
)
def test_cache_bad_arguments(kwargs, error, message):
    arguments = dict(batch=1, num_kv_heads=1, capacity=2, head_dim=1) | kwargs
    with pytest.raises(error, match=re.escape(message)):
        KVCache(**arguments)


def test_cache_append_bad_shapes():
    cache = KVCache(batch=2, num_kv_heads=2, capacity=4, head_dim=3, value_dim=1)
    with pytest.raises(ShapeError, match=re.escape(
        "k_new has shape (2, 1, 1, 3); expected (B, Hkv, T, D) = (2, 2, T, 3)"
    )):
        cache.append(np.zeros((2, 1, 1, 3)), np.zeros((2, 1, 1, 1)))
    with pytest.raises(ShapeError, match=re.escape(
        "v_new has shape (2, 2, 1, 3); expected (B, Hkv, T, M) = (2, 2, 1, 1)"
    )):
        cache.append(np.zeros((2, 2, 1, 3)), np.zeros((2, 2, 1, 3)))
    with pytest.raises(OptionError, match=re.escape("counts[1] is 2; expected a length "
                                                    "between 0 and T = 1")):
        cache.append(np.zeros((2, 2, 1, 3)), np.zeros((2, 2, 1, 1)), counts=[1, 2])


# --- bad input ----------------------------------------------------------------------


def good_weights():
    # Hq = 4, Hkv = 2, D = 3, M = 2, d_model = 5, d_out = 6.
    return dict(w_q=np.zeros((5, 12)), w_k=np.zeros((5, 6)), w_v=np.zeros((5, 4)),
                w_o=np.zeros((8, 6)))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(w_q=np.zeros(5)), ShapeError,
         "w_q has rank 1 (shape (5,)); expected rank 2 (d_model, Hq * D)"),
        (dict(w_o=np.zeros((1, 8, 6))), ShapeError, "w_o has rank 3"),
        (dict(b_k=np.zeros(5)), ShapeError,
         "b_k has 5 entries, but w_k has 6 columns; expected one bias entry per column"),
        (dict(b_o=np.zeros((1, 6))), ShapeError, "b_o has rank 2 (shape (1, 6))"),
        (dict(w_v=np.zeros((4, 4))), ShapeError, "w_v has 4 rows, but w_k has 5"),
        (dict(w_q=np.zeros((5, 12), dtype=bool)), DTypeError, "w_q has dtype bool"),
        (dict(w_k=np.zeros((5, 6), dtype=complex)), DTypeError, "w_k has complex dtype"),
    ],
    ids=["w_q-rank1", "w_o-rank3", "b_k-length", "b_o-rank2", "w_v-rows", "w_q-bool",
         "w_k-complex"],
)
def test_attention_params_bad_input(change, error, message):
    with pytest.raises(error, match=re.escape(message)):
        AttentionParams(**(good_weights() | change))


def test_attention_params_frozen_copies():
    weights = good_weights()
    params = AttentionParams(**weights)
    weights["w_q"][0, 0] = 1.0
    assert params.w_q[0, 0] == 0.0
    assert not params.w_q.flags.writeable
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.w_q = np.ones((5, 12))


@pytest.mark.parametrize(
    "weights, kwargs, error, message",
    [
        ({}, dict(num_heads=0), OptionError, "num_heads is 0; expected a positive integer"),
        ({}, dict(num_heads=4, num_kv_heads=3), OptionError,
         "num_kv_heads = 3 does not divide num_heads = 4; grouped-query attention needs "
         "Hq % Hkv == 0"),
        ({}, dict(num_heads=5, num_kv_heads=1), ShapeError,
         "w_q has 12 columns, which is not a multiple of num_heads = 5"),
        (dict(w_k=np.zeros((5, 10)), w_v=np.zeros((5, 4))), dict(num_heads=4, num_kv_heads=4),
         ShapeError, "w_k has 10 columns, which is not a multiple of num_kv_heads = 4"),
        (dict(w_k=np.zeros((5, 8))), dict(num_heads=4, num_kv_heads=2), ShapeError,
         "w_k gives head dimension D = 4 (8 columns / num_kv_heads = 2), but w_q gives "
         "D = 3 (12 columns / num_heads = 4); queries and keys must share D"),
        (dict(w_o=np.zeros((6, 6))), dict(num_heads=4, num_kv_heads=2), ShapeError,
         "w_o has 6 rows; expected Hq * M = 4 * 2 = 8"),
        ({}, dict(num_heads=4, num_kv_heads=2, backend="tpu"), OptionError,
         "backend is 'tpu'; expected one of 'numpy', 'loops'"),
    ],
    ids=["num_heads-0", "heads-not-dividing", "w_q-columns", "w_k-columns", "D-mismatch",
         "w_o-rows", "unknown-backend"],
)
def test_multi_head_attention_bad_heads(weights, kwargs, error, message):
    params = AttentionParams(**(good_weights() | weights))
    with pytest.raises(error, match=re.escape(message)):
        multi_head_attention(np.zeros((1, 2, 5)), params, **kwargs)


@pytest.mark.parametrize(
    "x, kwargs, error, message",
    [
        (np.zeros((1, 1, 2, 5)), {}, ShapeError,
         "x has rank 4 (shape (1, 1, 2, 5)); expected rank 3 (B, positions, features) "
         "or rank 2 (positions, features)"),
        (np.zeros((1, 2, 4)), {}, ShapeError,
         "x has d_model = 4 features, but w_q has 5 rows"),
        (np.zeros((1, 2, 5), dtype=complex), {}, DTypeError, "x has complex dtype"),
        (np.zeros((2, 2, 5)), dict(memory=np.zeros((3, 4, 5))), ShapeError,
         "memory has batch size 3, but x has B = 2"),
        (np.zeros((2, 2, 5)), dict(memory=np.zeros((2, 4, 7))), ShapeError,
         "memory has 7 features, but w_k and w_v have 5 rows"),
        (np.zeros((1, 2, 5)), dict(causal=True, memory=np.zeros((1, 3, 5))), OptionError,
         "causal=True is ambiguous when N = 2 differs from S = 3"),
        (np.zeros((1, 2, 5)), dict(scale=math.nan), OptionError, "scale is nan"),
    ],
    ids=["x-rank4", "x-d_model", "x-complex", "memory-batch", "memory-features",
         "causal-ambiguous", "scale-nan"],
)
def test_multi_head_attention_bad_input(x, kwargs, error, message):
    params = AttentionParams(**good_weights())
    with pytest.raises(error, match=re.escape(message)):
        multi_head_attention(x, params, num_heads=4, num_kv_heads=2, **kwargs)


def test_multi_head_attention_params_type():
    with pytest.raises(OptionError, match=re.escape(
        "params is dict; expected an AttentionParams"
    )):
        multi_head_attention(np.zeros((1, 2, 5)), good_weights(), num_heads=4)


# --- PyTorch nn.MultiheadAttention --------------------------------------------------


def torch_module(torch, embed_dim, num_heads, **kwargs):
    torch.manual_seed(embed_dim * 31 + num_heads)
    module = torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True, **kwargs)
    with torch.no_grad():  # non-zero biases, so the bias conversion is checked too
        for name, parameter in module.named_parameters():
            if "bias" in name:
                parameter.normal_()
    return module.double().eval()


def test_from_torch_self_attention_causal():
    torch = pytest.importorskip("torch")
    from kernattn import from_torch_multihead_attention

    module = torch_module(torch, 8, 2)
    x = np.random.default_rng(12).normal(size=(2, 5, 8))
    future = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)  # True = blocked
    with torch.no_grad():
        expected, _ = module(*(torch.from_numpy(x),) * 3, attn_mask=future,
                             need_weights=False)
    params = from_torch_multihead_attention(module)
    got = multi_head_attention(x, params, num_heads=module.num_heads, causal=True)
    np.testing.assert_allclose(got, expected.numpy(), **TOL)


def test_from_torch_cross_attention_kdim_and_padding():
    torch = pytest.importorskip("torch")
    from kernattn import from_torch_multihead_attention

    module = torch_module(torch, 6, 3, kdim=4, vdim=4)
    rng = np.random.default_rng(13)
    x, memory = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 5, 4))
    padding = torch.tensor([[False] * 5, [False] * 2 + [True] * 3])  # True = ignored
    with torch.no_grad():
        expected, _ = module(torch.from_numpy(x), *(torch.from_numpy(memory),) * 2,
                             key_padding_mask=padding, need_weights=False)
    params = from_torch_multihead_attention(module)
    assert params.w_k.shape == (4, 6)
    got = multi_head_attention(x, params, num_heads=3, memory=memory, kv_lengths=[5, 2])
    np.testing.assert_allclose(got, expected.numpy(), **TOL)


def test_from_torch_without_bias_and_unsupported():
    torch = pytest.importorskip("torch")
    from kernattn import from_torch_multihead_attention

    module = torch_module(torch, 4, 2, bias=False)
    params = from_torch_multihead_attention(module)
    assert params.b_q is None
    assert params.b_o is None
    x = np.random.default_rng(14).normal(size=(1, 3, 4))
    with torch.no_grad():
        expected, _ = module(*(torch.from_numpy(x),) * 3, need_weights=False)
    np.testing.assert_allclose(multi_head_attention(x, params, num_heads=2),
                               expected.numpy(), **TOL)
    for kwargs, message in [
        (dict(add_bias_kv=True), "module has add_bias_kv=True"),
        (dict(add_zero_attn=True), "module has add_zero_attn=True"),
        (dict(kdim=3, vdim=5), "module has kdim = 3 and vdim = 5"),
    ]:
        with pytest.raises(NotImplementedError, match=re.escape(message)):
            from_torch_multihead_attention(torch_module(torch, 4, 2, **kwargs))
