"""Cases, calls and tolerances of the "similarity" variant of `kernattn verify`.

A case names its similarity in ``options["sim"]`` (see `kernattn.verify.names`); the
other options are the keywords of `kernattn.similarity_attention`. Shape legend: B
batch, Hq query heads, Hkv key/value heads, N queries, S keys, D query/key head
dimension, M value head dimension.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from kernattn.similarity import PolynomialKernel, similarity_attention
from kernattn.verify.cases import FLOAT_ARRAYS, Case, keep_set
from kernattn.verify.check import Output, Scales
from kernattn.verify.exact import division_scales, exact_attention, polynomial_kernel
from kernattn.verify.names import similarity_from_name

# Sizes of random cases; the loop oracle costs O(B Hq N S (D + M)) Python operations.
MAX_BATCH = 2
MAX_POSITIONS = 8
MAX_HEAD_DIM = 4
EXTRA_FEATURE_PROBABILITY = 0.2

SIMILARITY_FEATURES = (
    "gqa",
    "mask",
    "causal_top_left",
    "causal_bottom_right",
    "window",
    "kv_lengths",
    "q_lengths",
    "empty_rows",
    "zero_policy",
    "rtol",
)
# Cycled independently of the features (the lengths are coprime), so every similarity
# meets every feature over 40 cases. "dot" and "polynomial:3" are signed.
RANDOM_SIMILARITIES = ("exp", "dot", "polynomial:2:1", "polynomial:3")
DEFAULT_CASE_COUNT = 2 * len(SIMILARITY_FEATURES)

# Keywords of similarity_attention that a case's options may hold besides "sim".
KEYWORDS = ("causal", "alignment", "window", "zero_denominator", "rtol")


def invoke(case: Case, backend: str) -> Output:
    """Run `similarity_attention` on `case` with `backend`."""
    q, k, v = (case.arrays[key] for key in "qkv")
    sim = similarity_from_name(case.options["sim"])
    out = similarity_attention(q, k, v, sim, **_keywords(case), backend=backend)
    return Output(np.asarray(out))


def _keywords(case: Case) -> dict[str, Any]:
    keywords = {key: case.arrays[key] for key in ("mask", "kv_lengths", "q_lengths")
                if key in case.arrays}
    keywords.update({key: case.options[key] for key in KEYWORDS if key in case.options})
    return keywords


def user_arguments(case: Case, function: Callable) -> tuple[tuple, dict[str, Any]]:
    """Return ``((q, k, v, sim), keywords)``, as `similarity_attention` takes them."""
    q, k, v = (case.arrays[key] for key in "qkv")
    return (q, k, v, similarity_from_name(case.options["sim"])), _keywords(case)


def scales(case: Case, reference: Output) -> Scales:
    """Return the tolerance scales of a similarity case (see `division_scales`).

    The size of one similarity bounds its rounding error: ``p (|q| . |k| + |c|)^p`` for
    a polynomial, ``exp(s) (1 + scale |q| . |k|)`` for the exponential.
    """
    q, k, v = (case.arrays[key].astype(np.float64) for key in "qkv")
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    keep = keep_set(case)
    sim = similarity_from_name(case.options["sim"])
    products = np.abs(q) @ np.abs(k).swapaxes(-1, -2)  # (B, Hq, N, S)
    with np.errstate(over="ignore", invalid="ignore"):
        if isinstance(sim, PolynomialKernel):
            sims = (q @ k.swapaxes(-1, -2) + float(sim.c)) ** sim.degree
            sizes = sim.degree * (products + abs(float(sim.c))) ** sim.degree
        else:
            scale = sim._scale(q.shape[-1])
            sims = np.exp(scale * (q @ k.swapaxes(-1, -2)))
            sizes = sims * (1 + scale * products)
    sims, sizes = np.where(keep, sims, 0.0), np.where(keep, sizes, 0.0)
    den = sims.sum(axis=-1)
    num_size = sizes @ np.abs(v)
    out_scale = division_scales(
        den, sizes.sum(axis=-1), num_size, reference.out,
        case.options.get("zero_denominator", "raise"),
    )
    return Scales(out_scale)


# --- random cases -------------------------------------------------------------------------


def random_cases(seed: int = 0, count: int = DEFAULT_CASE_COUNT) -> list[Case]:
    """Draw `count` random similarity cases from `np.random.default_rng(seed)`.

    Case i turns on feature ``SIMILARITY_FEATURES[i % 10]``, each other feature with
    probability 0.2, and uses similarity ``RANDOM_SIMILARITIES[i % 4]`` (polynomial:2
    with c = 0 when the focus is a zero-denominator policy, whose zero query vectors
    then give exactly zero denominators).
    """
    rng = np.random.default_rng(seed)
    return [_draw_case(rng, index) for index in range(count)]


def draw_features(rng, focus: str, features: tuple[str, ...], exclusive) -> set[str]:
    """Return the focus feature plus each other one with probability 0.2.

    Of each pair in `exclusive` at most one is kept, the focus when it is in the pair.
    """
    drawn = {focus} | {f for f in features if f != focus and rng.random() < EXTRA_FEATURE_PROBABILITY}
    for first, second in exclusive:
        if first in drawn and second in drawn:
            drawn.discard(second if focus == first else first)
    return drawn


def _draw_case(rng: np.random.Generator, index: int) -> Case:
    focus = SIMILARITY_FEATURES[index % len(SIMILARITY_FEATURES)]
    features = draw_features(
        rng, focus, SIMILARITY_FEATURES, [("causal_top_left", "causal_bottom_right")]
    )
    sim = RANDOM_SIMILARITIES[index % len(RANDOM_SIMILARITIES)]
    if focus == "zero_policy":
        sim = "polynomial:2"
    if focus == "rtol":
        sim = "dot"
    b = int(rng.integers(1, MAX_BATCH + 1))
    hkv = int(rng.integers(1, 3))
    hq = hkv * (int(rng.integers(2, 4)) if "gqa" in features else 1)
    n, s = (int(rng.integers(1, MAX_POSITIONS + 1)) for _ in "ns")
    if focus.startswith("causal"):
        while n == s:  # the alignments differ only when N != S
            s = int(rng.integers(1, MAX_POSITIONS + 1))
    d, m = (int(rng.integers(1, MAX_HEAD_DIM + 1)) for _ in "dm")
    arrays: dict[str, np.ndarray] = {
        "q": rng.standard_normal((b, hq, n, d)),
        "k": rng.standard_normal((b, hkv, s, d)),
        "v": rng.standard_normal((b, hkv, s, m)),
    }
    options: dict[str, Any] = {"sim": sim}
    for alignment in ("top_left", "bottom_right"):
        if f"causal_{alignment}" in features:
            options["causal"] = alignment
    if "window" in features:
        options["window"] = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
        if "causal" not in options:
            options["alignment"] = str(rng.choice(["top_left", "bottom_right"]))
    if "mask" in features or "empty_rows" in features:
        arrays["mask"] = rng.random((b, hq if rng.random() < 0.5 else 1, n, s)) < 0.7
    if "empty_rows" in features:
        mask = np.broadcast_to(arrays["mask"], (b, hq, n, s)).copy()
        mask[rng.random((b, hq, n)) < 0.3] = False
        arrays["mask"] = mask
    if "kv_lengths" in features:
        arrays["kv_lengths"] = rng.integers(0, s + 1, size=b)
    if "q_lengths" in features:
        arrays["q_lengths"] = rng.integers(0, n + 1, size=b)
    if "zero_policy" in features:
        # Zero query vectors: with (q . k)^2 every similarity of the row is exactly 0.
        arrays["q"][rng.random((b, hq, n)) < 0.4] = 0.0
        options["zero_denominator"] = ["zero", "nan", 1e-3][int(rng.integers(0, 3))]
    if "rtol" in features:
        options["zero_denominator"] = "zero"
        options["rtol"] = 1e-3
    if sim in ("dot", "polynomial:3") and "zero_denominator" not in options:
        # A signed similarity whose denominator is exactly zero is improbable with
        # random floats; "nan" makes such a row an expected NaN instead of an error.
        options["zero_denominator"] = "nan"
    for key in FLOAT_ARRAYS:
        if key in arrays:
            arrays[key] = arrays[key].astype(np.float32).astype(np.float64)
    name = f"random-{index:03d}-{sim}-" + "+".join(sorted(features))
    return Case(name, arrays, options)


# --- catalogue -----------------------------------------------------------------------------


def edge_cases() -> list[Case]:
    """Return the catalogue of similarity cases with exact expected values.

    Polynomial similarities of integer inputs (case names ending in ``-exact``) have
    their values computed here in `fractions.Fraction` from ``(q . k + c)^p``; the
    oracle must reproduce them bit for bit. With q = k = 0 and ``exp`` every similarity
    is 1, so each row is the mean of the values it may see.
    """
    cases = []

    def add_exact(name, q, k, v, sim, degree, c, keep=None, options=None):
        q, k, v = (np.asarray(x, dtype=np.int64) for x in (q, k, v))
        n, s = q.shape[2], k.shape[2]
        options = {"sim": sim, **(options or {})}
        draft = Case(name, {"q": q, "k": k, "v": v}, options)
        if keep is not None:
            draft.arrays["mask"] = np.asarray(keep, dtype=bool).reshape(1, 1, n, s)
        policy = options.get("zero_denominator", "raise")
        out, zero_rows = exact_attention(
            q, k, v, keep_set(draft), polynomial_kernel(degree, c), policy
        )
        raised = zero_rows if policy == "raise" and zero_rows else None
        cases.append(Case(name, draft.arrays, options, None if raised else out,
                          expected_raised=raised, exact=True))

    # q = (1, 2), keys (3, 1) and (1, -1), v = [0, 1], (q . k)^2: similarities 25 and 1,
    # out = 1/26. A map without the sqrt(2) factor would give 3/22.
    add_exact("edge-sim-poly2-one-26th-exact", [[[[1, 2]]]], [[[[3, 1], [1, -1]]]],
              [[[[0], [1]]]], "polynomial:2", 2, 0)
    # Zero denominator: q = (0, 0) under (q . k)^2 has numerator and denominator 0; the
    # second query (1, 0) has similarities 1 and 9, so 9/10 under every policy.
    zero_q, keys, values = [[[[0, 0], [1, 0]]]], [[[[1, 2], [3, 4]]]], [[[[0], [1]]]]
    for policy in ("raise", "zero", "nan", 1e-6):
        add_exact(f"edge-sim-zero-den-{policy}-exact", zero_q, keys, values, "polynomial:2",
                  2, 0, options={"zero_denominator": policy})
    # Signed similarity q . k with D = 1, q = [1], k = [1, -1], v = [0, 1]: numerator -1,
    # denominator 0; eps = 1e-6 gives -1 / 1e-6.
    for policy in ("raise", "zero", "nan", 1e-6):
        add_exact(f"edge-sim-signed-{policy}-exact", [[[[1]]]], [[[[1], [-1]]]], [[[[0], [1]]]],
                  "dot", 1, 0, options={"zero_denominator": policy})
    # An odd polynomial (signed) under a mask and both causal alignments, N = 3, S = 4.
    q3 = [[[[1, -1], [2, 0], [-1, 2]]]]
    k3 = [[[[1, 1], [0, -2], [2, 1], [-1, 1]]]]
    v3 = [[[[1, 0], [0, 1], [2, -1], [3, 2]]]]
    mask = [[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 0]]
    add_exact("edge-sim-cubic-mask-exact", q3, k3, v3, "polynomial:3:1", 3, 1, keep=mask,
              options={"zero_denominator": "zero"})
    for alignment in ("top_left", "bottom_right"):
        add_exact(f"edge-sim-cubic-causal-{alignment}-exact", q3, k3, v3, "polynomial:3:1", 3, 1,
                  options={"causal": alignment, "zero_denominator": "zero"})

    def add_means(name, n, s, values, options, out, extra=None):
        arrays = {"q": np.zeros((1, 1, n, 1)), "k": np.zeros((1, 1, s, 1)),
                  "v": np.asarray(values, dtype=np.float64).reshape(1, 1, s, 1)}
        arrays.update(extra or {})
        expected = np.asarray(out, dtype=np.float64).reshape(1, 1, n, 1)
        cases.append(Case(name, arrays, {"sim": "exp", **options}, expected))

    add_means("edge-sim-causal-n2-s4-top-left", 2, 4, range(4), {"causal": "top_left"}, [0, 0.5])
    add_means("edge-sim-causal-n2-s4-bottom-right", 2, 4, range(4), {"causal": "bottom_right"},
              [1, 1.5])
    add_means("edge-sim-causal-n4-s2-bottom-right", 4, 2, [1, 2], {"causal": "bottom_right"},
              [0, 0, 1, 1.5])
    row_1_masked = np.ones((1, 1, 4, 4), dtype=bool)
    row_1_masked[..., 1, :] = False
    add_means("edge-sim-fully-masked-row", 4, 4, range(4), {}, [1.5, 0, 1.5, 1.5],
              {"mask": row_1_masked})
    add_means("edge-sim-kv-lengths", 3, 4, range(4), {}, [0.5, 0.5, 0.5],
              {"kv_lengths": np.array([2])})
    # kv_lengths 3 of S = 4 with bottom-right causal: the last query sees keys 0..2.
    add_means("edge-sim-kv-lengths-causal-bottom-right", 2, 4, range(4),
              {"causal": "bottom_right"}, [0.5, 1], {"kv_lengths": np.array([3])})
    # rtol: q . k with k = (1, -(1 - 2^-20)) cancels to 2^-20 of a sum of |sims| near 2.
    cases.append(Case(
        "edge-sim-rtol-cancellation",
        {"q": np.ones((1, 1, 1, 1)), "k": np.array([1.0, -(1 - 2.0**-20)]).reshape(1, 1, 2, 1),
         "v": np.array([1.0, 2.0]).reshape(1, 1, 2, 1)},
        {"sim": "dot", "zero_denominator": "zero", "rtol": 1e-5},
        np.zeros((1, 1, 1, 1)),
    ))
    return cases
