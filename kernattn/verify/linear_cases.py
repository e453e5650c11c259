"""Cases, calls and tolerances of the "linear" variant of `kernattn verify`.

A case names its feature map in ``options["feature_map"]`` (see `kernattn.verify.names`);
the other options are keywords of `kernattn.linear_attention`. The initial state is
stored as the arrays ``initial_state_S`` (B, Hkv, F, M) and ``initial_state_z``
(B, Hkv, F). Shape legend: B batch, Hq query heads, Hkv key/value heads, N queries,
S keys, D query/key head dimension, M value head dimension, F features.

Catalogue cases that differ only in the form of the computation share a name up to
``@``: ``edge-lin-causal-normaliser@chunked3`` is the chunked form with chunk size 3.
A user's function sees only the ``@parallel`` member of each such family.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from fractions import Fraction
from typing import Any, Callable

import numpy as np

from kernattn.feature_maps import FeatureMap
from kernattn.linear import FORMS, linear_attention
from kernattn.verify.cases import FLOAT_ARRAYS, Case, keep_set
from kernattn.verify.check import Output, Scales
from kernattn.verify.exact import (
    division_scales,
    exact_attention,
    polynomial_kernel,
    relu_kernel,
    taylor_kernel,
)
from kernattn.verify.names import feature_map_from_name

MAX_BATCH = 2
MAX_POSITIONS = 8
MAX_HEAD_DIM = 4
EXTRA_FEATURE_PROBABILITY = 0.2

LINEAR_FEATURES = (
    "gqa",
    "causal",
    "causal_top_left",
    "causal_bottom_right",
    "kv_lengths",
    "initial_state",
    "return_state",
    "zero_policy",
)
# Cycled independently of the features and forms; "identity", "polynomial:3:0",
# "trig:8" and "fourier:8" are signed, "relu" can give exactly zero denominators.
RANDOM_FEATURE_MAPS = (
    "elu+1", "polynomial:2", "taylor", "favor:16", "relu", "identity", "polynomial:3:0",
    "favor-orthogonal:8", "trig:8", "fourier:8:0.5", "taylor:2:1/2",
)
DEFAULT_CASE_COUNT = 3 * len(LINEAR_FEATURES)
SIGNED_MAPS = ("identity", "polynomial:3:0", "trig:8", "fourier:8:0.5")

# Keywords of linear_attention a case's options may hold besides "feature_map"; a
# user's function is not given "form" and "chunk_size", which only kernattn has.
KEYWORDS = ("causal", "alignment", "zero_denominator", "rtol", "return_state")
FORM_KEYWORDS = ("form", "chunk_size")


def _keywords(case: Case) -> dict[str, Any]:
    keywords = {key: case.options[key] for key in KEYWORDS if key in case.options}
    if "kv_lengths" in case.arrays:
        keywords["kv_lengths"] = case.arrays["kv_lengths"]
    if "initial_state_S" in case.arrays:
        keywords["initial_state"] = (case.arrays["initial_state_S"], case.arrays["initial_state_z"])
    return keywords


def invoke(case: Case, backend: str) -> Output:
    """Run `linear_attention` on `case` with `backend`; the state too with return_state."""
    q, k, v = (case.arrays[key] for key in "qkv")
    fmap = feature_map_from_name(case.options["feature_map"])
    forms = {key: case.options[key] for key in FORM_KEYWORDS if key in case.options}
    result = linear_attention(q, k, v, fmap, **_keywords(case), **forms, backend=backend)
    if case.options.get("return_state"):
        out, (state_s, state_z) = result
        return Output(np.asarray(out), state=(np.asarray(state_s), np.asarray(state_z)))
    return Output(np.asarray(result))


def takes_feature_map(function: Callable) -> bool:
    """Return True when `function` has a parameter named ``feature_map``."""
    try:
        return "feature_map" in inspect.signature(function).parameters
    except (TypeError, ValueError):  # no signature to read: the map is built in
        return False


def user_arguments(case: Case, function: Callable) -> tuple[tuple, dict[str, Any]]:
    """Return ``((q, k, v), keywords)`` for a user's linear attention.

    The feature map is passed as ``feature_map=`` only when the function has that
    parameter; otherwise the function is taken to compute the map the case names.
    """
    keywords = _keywords(case)
    if takes_feature_map(function):
        keywords["feature_map"] = feature_map_from_name(case.options["feature_map"])
    return tuple(case.arrays[key] for key in "qkv"), keywords


def user_case(case: Case) -> bool:
    """Return True for the cases a user's function runs: one per form family."""
    return "@" not in case.name or case.name.endswith("@parallel")


def _zero_kernel(fmap: FeatureMap, d: int) -> float:
    """Return φ(0) . φ(0) for inputs of dimension D."""
    phi = fmap(np.zeros((1, d)))
    return float(phi[0] @ phi[0])


def scales(case: Case, reference: Output) -> Scales:
    """Return the tolerance scales of a linear case (see `division_scales`).

    The terms of the denominator are ``φ(q_i) . φ(k_j)`` and of the state; the size of
    each is the same sum over absolute values of the features.
    """
    q, k, v = (case.arrays[key].astype(np.float64) for key in "qkv")
    group = q.shape[1] // k.shape[1]
    fmap = feature_map_from_name(case.options["feature_map"])
    with np.errstate(over="ignore", invalid="ignore"):
        phi_q, phi_k = fmap(q), fmap(k)  # (B, Hq, N, F), (B, Hkv, S, F)
    keep = keep_set(case)  # (B, Hq, N, S), the causal prefix and kv_lengths
    phi_k_q = np.repeat(phi_k, group, axis=1)
    v_q = np.repeat(v, group, axis=1)
    sims = np.where(keep, phi_q @ phi_k_q.swapaxes(-1, -2), 0.0)
    sizes = np.where(keep, np.abs(phi_q) @ np.abs(phi_k_q).swapaxes(-1, -2), 0.0)
    den, den_size, num_size = sims.sum(axis=-1), sizes.sum(axis=-1), sizes @ np.abs(v_q)
    state_size = None
    valid = keep_set(replace(case, options={**case.options, "causal": False}))[:, ::group, :1, :]
    key_weights = valid[:, :, 0, :, None].astype(np.float64)  # (B, Hkv, S, 1) valid keys
    abs_s = np.abs(phi_k * key_weights).swapaxes(-1, -2) @ np.abs(v)  # (B, Hkv, F, M)
    abs_z = np.abs(phi_k * key_weights).sum(axis=-2)  # (B, Hkv, F)
    if "initial_state_S" in case.arrays:
        s0 = np.repeat(case.arrays["initial_state_S"].astype(np.float64), group, axis=1)
        z0 = np.repeat(case.arrays["initial_state_z"].astype(np.float64), group, axis=1)
        den = den + np.einsum("bhnf,bhf->bhn", phi_q, z0)
        den_size = den_size + np.einsum("bhnf,bhf->bhn", np.abs(phi_q), np.abs(z0))
        num_size = num_size + np.abs(phi_q) @ np.abs(s0)
        abs_s = abs_s + np.abs(case.arrays["initial_state_S"])
        abs_z = abs_z + np.abs(case.arrays["initial_state_z"])
    if case.options.get("return_state"):
        state_size = 1.0 + max(float(abs_s.max(initial=0.0)), float(abs_z.max(initial=0.0)))
    out_scale = division_scales(
        den, den_size, num_size, reference.out, case.options.get("zero_denominator", "raise")
    )
    return Scales(out_scale, state=state_size)


# --- random cases -------------------------------------------------------------------------


def random_cases(
    seed: int = 0, count: int = DEFAULT_CASE_COUNT, feature_map: str | None = None
) -> list[Case]:
    """Draw `count` random linear-attention cases from `np.random.default_rng(seed)`.

    Case i turns on feature ``LINEAR_FEATURES[i % 8]`` and each other feature with
    probability 0.2, uses map ``RANDOM_FEATURE_MAPS[i % 11]`` (ReLU when the focus is a
    zero-denominator policy) unless `feature_map` names one for every case, and form
    ``FORMS[i % 4]``; chunked cases draw a chunk size from 1 to N + 1, so most do not
    divide N.
    """
    rng = np.random.default_rng(seed)
    return [_draw_case(rng, index, feature_map) for index in range(count)]


def _draw_features(rng, focus: str) -> set[str]:
    drawn = {focus} | {
        f for f in LINEAR_FEATURES if f != focus and rng.random() < EXTRA_FEATURE_PROBABILITY
    }
    causal = [f for f in ("causal", "causal_top_left", "causal_bottom_right") if f in drawn]
    for extra in causal:
        if extra != (focus if focus in causal else causal[0]):
            drawn.discard(extra)
    return drawn


def _draw_case(rng: np.random.Generator, index: int, feature_map: str | None) -> Case:
    focus = LINEAR_FEATURES[index % len(LINEAR_FEATURES)]
    features = _draw_features(rng, focus)
    map_name = RANDOM_FEATURE_MAPS[index % len(RANDOM_FEATURE_MAPS)]
    if focus == "zero_policy":
        map_name = "relu"
    if feature_map is not None:
        map_name = feature_map
    form = FORMS[index % len(FORMS)]
    b = int(rng.integers(1, MAX_BATCH + 1))
    hkv = int(rng.integers(1, 3))
    hq = hkv * (int(rng.integers(2, 4)) if "gqa" in features else 1)
    n = int(rng.integers(1, MAX_POSITIONS + 1))
    s = n if "causal" in features else int(rng.integers(1, MAX_POSITIONS + 1))
    d, m = (int(rng.integers(1, MAX_HEAD_DIM + 1)) for _ in "dm")
    arrays: dict[str, np.ndarray] = {
        "q": 0.5 * rng.standard_normal((b, hq, n, d)),
        "k": 0.5 * rng.standard_normal((b, hkv, s, d)),
        "v": rng.standard_normal((b, hkv, s, m)),
    }
    options: dict[str, Any] = {"feature_map": map_name, "form": form}
    if form == "chunked":
        options["chunk_size"] = int(rng.integers(1, n + 2))
    if "causal" in features:
        options["causal"] = True
    for alignment in ("top_left", "bottom_right"):
        if f"causal_{alignment}" in features:
            options["causal"] = alignment
    if "kv_lengths" in features:
        arrays["kv_lengths"] = rng.integers(0, s + 1, size=b)
        if options.get("causal") is True:
            options["causal"] = "bottom_right"  # causal=True is ambiguous with lengths
    if "initial_state" in features:
        # A real state: the sums over a few earlier keys, so positive maps stay positive.
        fmap = feature_map_from_name(map_name)
        earlier_k = 0.5 * rng.standard_normal((b, hkv, 3, d))
        earlier_v = rng.standard_normal((b, hkv, 3, m))
        phi = fmap(earlier_k.astype(np.float32).astype(np.float64))
        arrays["initial_state_S"] = phi.swapaxes(-1, -2) @ earlier_v
        arrays["initial_state_z"] = phi.sum(axis=-2)
    if "return_state" in features:
        options["return_state"] = True
    if "zero_policy" in features:
        # ReLU features of an all-negative query are 0, so its denominator is exactly 0.
        negative = rng.random((b, hq, n)) < 0.4
        arrays["q"][negative] = -np.abs(arrays["q"][negative])
    if map_name == "relu" or "zero_policy" in features:
        options["zero_denominator"] = ["zero", "nan", 1e-3, "raise"][int(rng.integers(0, 4))]
    elif map_name in SIGNED_MAPS:
        options["zero_denominator"] = "nan"
    for key in FLOAT_ARRAYS:
        if key in arrays:
            arrays[key] = arrays[key].astype(np.float32).astype(np.float64)
    name = f"random-{index:03d}-{map_name}-{form}-" + "+".join(sorted(features))
    return Case(name, arrays, options)


# --- catalogue -----------------------------------------------------------------------------

CHUNK_SIZES = (1, 2, 3, 5)  # with N = 4 and 5: sizes that divide N and sizes that do not


def _form_family(case: Case, chunk_sizes=CHUNK_SIZES) -> list[Case]:
    """Return `case` in every form: quadratic, parallel, recurrent, chunked per size."""
    family = []
    for form in FORMS:
        sizes = chunk_sizes if form == "chunked" else (None,)
        for size in sizes:
            options = {**case.options, "form": form}
            suffix = form
            if size is not None:
                options["chunk_size"] = size
                suffix = f"{form}{size}"
            family.append(replace(case, name=f"{case.name}@{suffix}", options=options))
    return family


def _parallel_only(case: Case) -> list[Case]:
    return [replace(case, name=f"{case.name}@parallel", options={**case.options, "form": "parallel"})]


def edge_cases(feature_map: str | None = None) -> list[Case]:
    """Return the catalogue of linear-attention cases with exact expected values.

    With q = k = 0 every feature vector is the same, so every kernel value in a row is
    the same (nonzero for every map except ReLU and maps with c = 0) and each row is the
    mean of the values it may see (``edge-lin-means-*``). Integer inputs with a rational
    map (names ending in ``-exact``) have values computed here in `fractions.Fraction`
    from the kernel's formula; the oracle must reproduce them bit for bit.

    With `feature_map`, every case uses that map. The running means stay expected when
    ``φ(0) . φ(0) != 0``; every other case is checked against the oracle only.
    """
    cases: list[Case] = []
    override = None if feature_map is None else feature_map_from_name(feature_map)
    means_hold = override is None or _zero_kernel(override, 1) != 0

    def means(name, n, s, values, options, out, fmap="elu+1", forms=_parallel_only, extra=None):
        arrays = {"q": np.zeros((1, 1, n, 1)), "k": np.zeros((1, 1, s, 1)),
                  "v": np.asarray(values, dtype=np.float64).reshape(1, 1, s, 1)}
        arrays.update(extra or {})
        expected = np.asarray(out, dtype=np.float64).reshape(1, 1, n, 1) if means_hold else None
        cases.extend(forms(Case(f"edge-lin-means-{name}", arrays,
                                {"feature_map": feature_map or fmap, **options}, expected)))

    # Causal normaliser, elu+1, q = k = 0, v = 0..3: running means [0, 0.5, 1, 1.5] in
    # every form. Multiplying by the normaliser would give [0, 2, 9, 24]; a non-causal
    # denominator [0, 0.25, 0.75, 1.5].
    means("causal-normaliser", 4, 4, range(4), {"causal": True}, [0, 0.5, 1, 1.5],
          forms=_form_family)
    means("non-causal", 4, 4, range(4), {"causal": False}, [1.5] * 4,
          forms=lambda case: _form_family(case, (3,)))
    other_maps = ("polynomial:2", "taylor", "favor:16", "favor-orthogonal:8", "trig:8",
                  "fourier:8:0.5")
    for fmap in other_maps if feature_map is None else ():
        means(f"causal-{fmap}", 4, 4, range(4), {"causal": True}, [0, 0.5, 1, 1.5], fmap=fmap,
              forms=lambda case: _form_family(case, (3,)))
    # Causal alignment when N != S, and kv_lengths (bottom-right aligns the last query
    # with the last valid key).
    means("n2-s4-top-left", 2, 4, range(4), {"causal": "top_left"}, [0, 0.5])
    means("n2-s4-bottom-right", 2, 4, range(4), {"causal": "bottom_right"}, [1, 1.5],
          forms=lambda case: _form_family(case, (1,)))
    means("n4-s2-bottom-right", 4, 2, [1, 2], {"causal": "bottom_right"}, [0, 0, 1, 1.5],
          forms=lambda case: _form_family(case, (3,)))
    means("kv-lengths-causal-bottom-right", 4, 4, range(4), {"causal": "bottom_right"},
          [0, 0, 0, 0.5], extra={"kv_lengths": np.array([2])},
          forms=lambda case: _form_family(case, (3,)))
    means("kv-lengths-non-causal", 3, 4, range(4), {}, [1, 1, 1],
          extra={"kv_lengths": np.array([3])})
    # Grouped-query heads: value head g contains g + 1, so query heads read [1, 1, 2, 2].
    cases.append(Case(
        "edge-lin-means-gqa-head-mapping",
        {"q": np.zeros((1, 4, 1, 1)), "k": np.zeros((1, 2, 3, 1)),
         "v": np.repeat(np.arange(1.0, 3.0).reshape(1, 2, 1, 1), 3, axis=2)},
        {"feature_map": feature_map or "elu+1"},
        np.array([1.0, 1.0, 2.0, 2.0]).reshape(1, 4, 1, 1) if means_hold else None,
    ))
    cases.extend(_form_family(_resume_case(feature_map or "elu+1", means_hold), (1, 3)))
    for case in _exact_cases():
        if feature_map is not None:  # the exact values belong to the case's own map
            case = replace(case, options={**case.options, "feature_map": feature_map},
                           expected_out=None, expected_raised=None, exact=False)
        cases.append(case)
    return cases


def _resume_case(feature_map: str, means_hold: bool) -> Case:
    """Return the split-and-resume case: a state from two earlier keys, two new keys.

    All keys are 0, so each has features φ(0) and kernel value K = φ(0) . φ(0). The
    earlier keys have values 0 and 1 (S0 = φ(0) [1], z0 = 2 φ(0)), the new ones 2 and
    3: causal rows (K + 2K) / 3K = 1 and (K + 2K + 3K) / 4K = 1.5, and the final state
    S = φ(0) [6], z = 4 φ(0).
    """
    phi0 = feature_map_from_name(feature_map)(np.zeros((1, 1, 1)))[0, 0]  # (F,)
    state = lambda total: phi0.reshape(1, 1, -1, 1) * total  # noqa: E731 - (B, Hkv, F, M)
    expected, expected_state = None, None
    if means_hold:
        expected = np.array([1.0, 1.5]).reshape(1, 1, 2, 1)
        expected_state = (state(6.0), 4.0 * phi0.reshape(1, 1, -1))
    return Case(
        "edge-lin-means-initial-state",
        {"q": np.zeros((1, 1, 2, 1)), "k": np.zeros((1, 1, 2, 1)),
         "v": np.array([2.0, 3.0]).reshape(1, 1, 2, 1),
         "initial_state_S": state(1.0), "initial_state_z": 2.0 * phi0.reshape(1, 1, -1)},
        {"feature_map": feature_map, "causal": True, "return_state": True},
        expected,
        expected_state=expected_state,
    )


def _exact_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name, q, k, v, fmap, kernel, options=None, forms=_parallel_only, extra=None):
        q, k, v = (np.asarray(x, dtype=np.int64) for x in (q, k, v))
        options = {"feature_map": fmap, **(options or {})}
        arrays = {"q": q, "k": k, "v": v, **(extra or {})}
        draft = Case(name, arrays, options)
        policy = options.get("zero_denominator", "raise")
        out, zero_rows = exact_attention(q, k, v, keep_set(draft), kernel, policy)
        raised = zero_rows if policy == "raise" and zero_rows else None
        case = Case(f"{name}-exact", arrays, options, None if raised else out,
                    expected_raised=raised, exact=True)
        cases.extend(forms(case))

    # q = (1, 2), keys (3, 1) and (1, -1), v = [0, 1]: (q . k)^2 gives 1/26; with c = 1
    # the second similarity is 0 and out is 0; the Taylor map with scale 1 gives
    # 1 + s + s^2 / 2 = 18.5 and 0.5, so 1/38.
    q14, k14, v14 = [[[[1, 2]]]], [[[[3, 1], [1, -1]]]], [[[[0], [1]]]]
    add("edge-lin-poly2-one-26th", q14, k14, v14, "polynomial:2:0", polynomial_kernel(2, 0),
        forms=_form_family)
    add("edge-lin-poly2-c1", q14, k14, v14, "polynomial:2", polynomial_kernel(2, 1))
    add("edge-lin-taylor-one-38th", q14, k14, v14, "taylor:2:1", taylor_kernel(2, 1))
    # ReLU features of q = (-1, -2) are 0, so that row's denominator is 0; the row
    # q = (1, 0) has kernel values 1 and 3 and gives 3/4 (3 / (4 + eps) under eps).
    for policy in ("raise", "zero", "nan", 1e-6):
        add(f"edge-lin-relu-zero-den-{policy}", [[[[-1, -2], [1, 0]]]], [[[[1, 2], [3, 1]]]],
            [[[[0], [1]]]], "relu", relu_kernel, {"zero_denominator": policy})
    # Causal, identity map, D = 1: q = [0, 1, 2], k = [1, 1, 1], v = [1, 2, 3]. Only row 0
    # has a zero denominator; rows 1 and 2 are 3/2 and 2 under every policy but eps.
    causal_rows = ([[[[0], [1], [2]]]], [[[[1], [1], [1]]]], [[[[1], [2], [3]]]])
    for policy in ("raise", "zero", "nan", 1e-6):
        forms = _form_family if policy == "zero" else _parallel_only
        add(f"edge-lin-causal-row0-zero-den-{policy}", *causal_rows, "identity",
            polynomial_kernel(1, 0), {"causal": True, "zero_denominator": policy}, forms=forms)
    # Small integers under the degree-2 polynomial map, causal, in every form.
    rng = np.random.default_rng(5)
    q, k = rng.integers(-2, 3, size=(1, 1, 5, 2)), rng.integers(-2, 3, size=(1, 1, 5, 2))
    v = rng.integers(-3, 4, size=(1, 1, 5, 2))
    add("edge-lin-poly2-causal", q, k, v, "polynomial:2", polynomial_kernel(2, 1),
        {"causal": True, "zero_denominator": "zero"}, forms=_form_family)
    add("edge-lin-poly2-bottom-right-kv-lengths", q[:, :, :3], k, v, "polynomial:2",
        polynomial_kernel(2, 1), {"causal": "bottom_right", "zero_denominator": "zero"},
        extra={"kv_lengths": np.array([4])}, forms=lambda case: _form_family(case, (2,)))
    add("edge-lin-taylor-half-causal", q, k, v, "taylor:2:1/2", taylor_kernel(2, Fraction(1, 2)),
        {"causal": True})
    return cases
