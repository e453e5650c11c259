"""Cases, calls and tolerances of the "decode" variant of `kernattn verify`.

A case contains the T new queries as ``q`` (B, Hq, T, D), the key and value caches as
``k`` (B, Hkv, C, D) and ``v`` (B, Hkv, C, M), and the valid lengths (new tokens
included) as the array ``kv_lengths`` (B,); every decode case has one. The options are
the keywords ``scale``, ``softcap`` and ``num_splits`` of
`kernattn.decode.decode_attention`. In the shared case format T is the query axis N and
the capacity C is the key axis S, so shrinking and reports need nothing new.

Shape legend: B batch, Hq query heads, Hkv key/value heads, T new tokens, C cache
capacity, D query/key head dimension, M value head dimension.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from kernattn.decode import DECODE_BACKENDS, decode_attention
from kernattn.verify.cases import FLOAT_ARRAYS, Case, draw_head_counts
from kernattn.verify.check import Output

# Sizes of random cases; the loop oracle costs O(B Hq T C (D + M)) Python operations.
MAX_BATCH = 2
MAX_NEW_TOKENS = 3
MAX_CAPACITY = 24
MAX_HEAD_DIM = 8
MAX_SPLITS = 8
EXTRA_FEATURE_PROBABILITY = 0.2

DECODE_FEATURES = (
    "gqa",
    "mqa",
    "short_rows",
    "nan_beyond_lengths",
    "softcap",
    "scale",
    "num_splits",
    "large_logits",
)
DEFAULT_CASE_COUNT = 3 * len(DECODE_FEATURES)

# Keywords of decode_attention a case's options may hold. A user's function is not
# given "num_splits", which only kernattn's split-KV backends have.
KEYWORDS = ("scale", "softcap")
SPLIT_KEYWORDS = ("num_splits",)


def decode_backends() -> dict[str, None]:
    """Return the backend names of `decode_attention` as a dict, as `Variant` expects."""
    return dict.fromkeys(DECODE_BACKENDS)


def _keywords(case: Case) -> dict[str, Any]:
    keywords: dict[str, Any] = {"kv_lengths": case.arrays["kv_lengths"]}
    keywords.update({key: case.options[key] for key in KEYWORDS if key in case.options})
    return keywords


def invoke(case: Case, backend: str) -> Output:
    """Run `decode_attention` on `case` with `backend`, returning out and lse."""
    q, k_cache, v_cache = (case.arrays[key] for key in "qkv")
    splits = {key: case.options[key] for key in SPLIT_KEYWORDS if key in case.options}
    out, lse = decode_attention(
        q, k_cache, v_cache, **_keywords(case), **splits, return_lse=True, backend=backend
    )
    return Output(np.asarray(out), np.asarray(lse))


def user_arguments(case: Case, function: Callable) -> tuple[tuple, dict[str, Any]]:
    """Return ``((q, k_cache, v_cache), keywords)``: ``kv_lengths``, and ``scale`` and
    ``softcap`` when the case sets them."""
    return tuple(case.arrays[key] for key in "qkv"), _keywords(case)


# --- random cases -------------------------------------------------------------------------


def random_cases(seed: int = 0, count: int = DEFAULT_CASE_COUNT) -> list[Case]:
    """Draw `count` random decode cases from `np.random.default_rng(seed)`.

    Case i turns on feature ``DECODE_FEATURES[i % 8]`` and each other feature with
    probability 0.2: grouped-query and multi-query heads, rows whose length is below T
    (so their first new tokens see no key), NaN in the cache slots beyond each row's
    length, soft-capping, an explicit scale, a number of key splits (1 to 8, often more
    than the valid keys), and logits with a spread near 1e3. T is 1 to 3 and the
    capacity T to 24; without ``short_rows`` every length is between T and the capacity.
    """
    rng = np.random.default_rng(seed)
    return [_draw_case(rng, index) for index in range(count)]


def _draw_features(rng: np.random.Generator, focus: str) -> set[str]:
    drawn = {focus} | {
        f for f in DECODE_FEATURES if f != focus and rng.random() < EXTRA_FEATURE_PROBABILITY
    }
    if "gqa" in drawn and "mqa" in drawn:
        drawn.discard("mqa" if focus == "gqa" else "gqa")
    return drawn


def _draw_case(rng: np.random.Generator, index: int) -> Case:
    focus = DECODE_FEATURES[index % len(DECODE_FEATURES)]
    features = _draw_features(rng, focus)
    b = int(rng.integers(1, MAX_BATCH + 1))
    hq, hkv = draw_head_counts(rng, features)
    t = int(rng.integers(1, MAX_NEW_TOKENS + 1))
    c = int(rng.integers(t, MAX_CAPACITY + 1))
    d, m = (int(rng.integers(1, MAX_HEAD_DIM + 1)) for _ in "dm")

    arrays: dict[str, np.ndarray] = {
        "q": rng.standard_normal((b, hq, t, d)),
        "k": rng.standard_normal((b, hkv, c, d)),
        "v": rng.standard_normal((b, hkv, c, m)),
    }
    options: dict[str, Any] = {}
    lengths = rng.integers(t, c + 1, size=b)
    if "short_rows" in features:
        # Lengths 0 .. T - 1: the first T - length new tokens of that row see no key.
        short = rng.random(b) < 0.5
        short[int(rng.integers(0, b))] = True
        lengths[short] = rng.integers(0, t, size=int(short.sum()))
    arrays["kv_lengths"] = lengths
    if "large_logits" in features:
        # Entries of size 30 give a score spread near 900: a nearly one-hot softmax that
        # overflows exp, or a split merge, that does not subtract the maximum.
        arrays["q"] *= 30.0
        arrays["k"] *= 30.0
    if "softcap" in features:
        arrays["q"] *= 3.0  # push scores past the cap so that tanh bends them
        options["softcap"] = float(rng.uniform(1.0, 5.0))
    if "scale" in features:
        options["scale"] = float(rng.uniform(0.1, 2.0))
    if "num_splits" in features:
        options["num_splits"] = int(rng.integers(1, MAX_SPLITS + 1))
    if "nan_beyond_lengths" in features:
        beyond = np.arange(c) >= lengths[:, None]  # (B, C) slots never read
        arrays["k"][beyond[:, None, :].repeat(hkv, axis=1)] = np.nan
        arrays["v"][beyond[:, None, :].repeat(hkv, axis=1)] = np.nan
    for key in FLOAT_ARRAYS:
        if key in arrays:
            arrays[key] = arrays[key].astype(np.float32).astype(np.float64)
    name = f"random-{index:03d}-T{t}-" + "+".join(sorted(features))
    return Case(name, arrays, options)


# --- catalogue -----------------------------------------------------------------------------


def edge_cases() -> list[Case]:
    """Return the catalogue of decode cases with exact expected values.

    With q = k = 0 every score is 0, so each output row is the mean of the cache values
    the new token may see and its lse is the log of how many it sees. New token t of
    row b sits at position ``L_b - T + t`` and sees positions 0 .. ``L_b - T + t``.
    """
    cases: list[Case] = []

    def add(name, t, values, lengths, out, counts, heads=(1, 1), options=None):
        hq, hkv = heads
        v = np.asarray(values, dtype=np.float64)  # (B, Hkv, C)
        b, c = v.shape[0], v.shape[-1]
        v = np.broadcast_to(v.reshape(b, -1, c), (b, hkv, c))[..., None]
        arrays = {
            "q": np.zeros((b, hq, t, 1)),
            "k": np.where(np.isnan(v), np.nan, 0.0),  # NaN where v has a stale NaN slot
            "v": np.array(v),
            "kv_lengths": np.asarray(lengths, dtype=np.int64),
        }
        expected_out = np.asarray(out, dtype=np.float64).reshape(b, hq, t, 1)
        with np.errstate(divide="ignore"):  # log(0) = -inf for a token that sees no key
            expected_lse = np.log(np.asarray(counts, dtype=np.float64)).reshape(b, hq, t)
        cases.append(Case(f"edge-dec-{name}", arrays, options or {}, expected_out, expected_lse))

    nan = math.nan
    # One token against kv_lengths [4]: the mean of v[0..3]. The stale slots hold 4 and
    # 5, so reading past the length gives 2 or 2.5 instead of 1.5.
    add("one-token", 1, [[range(6)]], [4], [1.5], [4])
    # Two tokens at positions 2 and 3 (bottom-right alignment); top-left would see 1
    # and 2 keys and give [0, 0.5].
    add("two-tokens-bottom-right", 2, [[range(6)]], [4], [1, 1.5], [3, 4])
    # Length 2 below T = 3: token 0 sits at position -1 and sees no key (0, lse -inf),
    # tokens 1 and 2 see v[0] and v[0..1].
    add("length-below-new-tokens", 3, [[1, 2, 3, 4]], [2], [0, 1, 1.5], [0, 1, 2])
    # An empty cache whose every slot is NaN: the row is 0 with lse -inf, never NaN.
    add("empty-cache-nan-slots", 1, [[nan, nan]], [0], [0], [0])
    # NaN in the slots past the length must not reach the output.
    add("nan-beyond-length", 2, [[0, 1, 2, 3, nan, nan]], [4], [1, 1.5], [3, 4])
    # Each batch row has its own length: [2, 5] over the same values 0..4.
    add("lengths-per-row", 1, [[range(5)], [range(5)]], [2, 5], [0.5, 2], [2, 5])
    # Query head h reads key/value head h // (Hq / Hkv); value head g contains g + 1.
    add("gqa-head-mapping", 1, [[[1, 1, 1, nan], [2, 2, 2, nan]]], [3], [1, 1, 2, 2],
        [3] * 4, heads=(4, 2))
    add("mqa-head-mapping", 1, [[[1, 1, 1, nan]]], [3], [1, 1, 1, 1], [3] * 4, heads=(4, 1))
    # Splits of the keys: 3 splits over 7 keys (sizes that do not divide), and 5 splits
    # over 3 keys, where empty splits must get weight 0 in the merge.
    add("three-splits-seven-keys", 1, [[range(8)]], [7], [3], [7], options={"num_splits": 3})
    add("five-splits-three-keys", 2, [[0, 1, 2, nan, nan]], [3], [0.5, 1], [2, 3],
        options={"num_splits": 5})
    return cases
