"""Inputs for `kernattn verify`: seeded random cases and an edge-case catalogue.

Shape legend: B batch, Hq query heads, Hkv key/value heads, N queries, S keys, D query/key
head dimension, M value head dimension. Every case is stored in the (B, H, N, D) layout
with rank-4 arrays, so each target can translate it without guessing.

Random inputs are rounded to float32 and stored as float64. A target run on the float32
copy of a case then sees exactly the numbers the float64 oracle saw, so the comparison
measures the target's arithmetic and not the rounding of its inputs.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from kernattn.masks import structural_mask

# Names of the array keywords a case may hold besides q, k and v. The initial state of
# linear attention is stored as two arrays and passed as the pair (S0, z0).
ARRAY_KEYWORDS = (
    "mask", "bias", "kv_lengths", "q_lengths", "dropout_mask", "initial_state_S",
    "initial_state_z",
)
FLOAT_ARRAYS = ("q", "k", "v", "bias", "initial_state_S", "initial_state_z")

# Sizes of random cases. The loop oracle costs O(B Hq N S (D + M)) Python operations,
# so these keep a whole default run to a few seconds.
MAX_BATCH = 2
MAX_POSITIONS = 12
MAX_HEAD_DIM = 8

# Each random case turns on one focus feature, and every other feature with this
# probability, so that the features also meet in combinations.
EXTRA_FEATURE_PROBABILITY = 0.2

SOFTMAX_FEATURES = (
    "gqa",
    "mqa",
    "causal_top_left",
    "causal_bottom_right",
    "window",
    "softcap",
    "bias",
    "mask",
    "kv_lengths",
    "q_lengths",
    "dropout",
    "empty_rows",
    "nan_at_excluded",
    "large_logits",
)

# Random cases per run by default: every feature is the focus of three cases.
DEFAULT_CASE_COUNT = 3 * len(SOFTMAX_FEATURES)


@dataclass(frozen=True)
class Case:
    """One input for an attention function, with exact expected values when known.

    Attributes
    ----------
    name : str
        Unique, readable name used in reports and file names.
    arrays : dict of str to ndarray
        ``q`` (B, Hq, N, D), ``k`` (B, Hkv, S, D), ``v`` (B, Hkv, S, M) and any array
        keyword the case uses (``mask``, ``bias``, ``kv_lengths``, ...).
    options : dict
        Scalar keywords (``scale``, ``causal``, ``alignment``, ``window``, ``softcap``,
        ``dropout_p``), as `softmax_attention` names them.
    expected_out : ndarray, shape (B, Hq, N, M), optional
        Exact expected output, for catalogue cases.
    expected_lse : ndarray, shape (B, Hq, N), optional
        Exact expected log-sum-exp, for catalogue cases.
    expected_state : tuple (S (B, Hkv, F, M), z (B, Hkv, F)), optional
        Expected linear-attention state, for catalogue cases with ``return_state``.
    expected_raised : tuple of (batch, head, query), optional
        Rows a `ZeroDenominatorError` must name, for cases whose policy is "raise".
    exact : bool, default False
        q, k and v are integers and the oracle computes in exact rational arithmetic,
        so its output must equal `expected_out` bit for bit.
    """

    name: str
    arrays: dict[str, np.ndarray]
    options: dict[str, Any] = field(default_factory=dict)
    expected_out: np.ndarray | None = None
    expected_lse: np.ndarray | None = None
    expected_state: tuple[np.ndarray, np.ndarray] | None = None
    expected_raised: tuple[tuple[int, int, int], ...] | None = None
    exact: bool = False

    def keywords(self) -> dict[str, Any]:
        """Return every keyword argument except q, k and v."""
        extra = {key: value for key, value in self.arrays.items() if key not in "qkv"}
        return {**extra, **self.options}

    def with_float_dtype(self, dtype) -> Case:
        """Return a copy whose q, k, v, bias and initial state have `dtype`."""
        arrays = {
            key: value.astype(dtype) if key in FLOAT_ARRAYS else value
            for key, value in self.arrays.items()
        }
        return replace(self, arrays=arrays)

    def describe_shapes(self) -> str:
        """Return the sizes as 'B=.. Hq=.. Hkv=.. N=.. S=.. D=.. M=..'."""
        b, hq, n, d = self.arrays["q"].shape
        hkv, s = self.arrays["k"].shape[1:3]
        m = self.arrays["v"].shape[3]
        return f"B={b} Hq={hq} Hkv={hkv} N={n} S={s} D={d} M={m}"


def keep_set(case: Case) -> np.ndarray:
    """Return the (B, Hq, N, S) bool keep-set of a softmax case: structure AND mask."""
    b, hq, n, _ = case.arrays["q"].shape
    s = case.arrays["k"].shape[2]
    options = case.options
    structural = structural_mask(
        n,
        s,
        causal=options.get("causal"),
        alignment=options.get("alignment"),
        window=options.get("window"),
        q_lengths=case.arrays.get("q_lengths"),
        kv_lengths=case.arrays.get("kv_lengths"),
    )
    keep = np.broadcast_to(structural, (b, hq, n, s))
    mask = case.arrays.get("mask")
    if mask is not None:
        keep = keep & np.broadcast_to(mask, (b, hq, n, s))
    return np.array(keep)


def softmax_cases(seed: int = 0, count: int = DEFAULT_CASE_COUNT) -> list[Case]:
    """Draw `count` random softmax cases from `np.random.default_rng(seed)`.

    Case i turns on feature ``SOFTMAX_FEATURES[i % 14]`` and each other feature with
    probability 0.2: grouped-query and multi-query heads, N != S under both causal
    alignments, windows, soft-capping, bias, boolean masks, key and query lengths,
    dropout patterns, rows with no allowed key, NaN stored at excluded positions of k,
    v and bias, and logits near 1e3.
    """
    rng = np.random.default_rng(seed)
    features = SOFTMAX_FEATURES
    return [
        _draw_softmax_case(rng, index, features[index % len(features)])
        for index in range(count)
    ]


def _draw_features(rng: np.random.Generator, focus: str) -> set[str]:
    features = {focus}
    for feature in SOFTMAX_FEATURES:
        if feature != focus and rng.random() < EXTRA_FEATURE_PROBABILITY:
            features.add(feature)
    # Pairs that cannot both hold: keep the focus, drop its partner.
    for first, second in (("gqa", "mqa"), ("causal_top_left", "causal_bottom_right")):
        if first in features and second in features:
            features.discard(second if focus == first else first)
    return features


def draw_head_counts(rng: np.random.Generator, features) -> tuple[int, int]:
    """Return (Hq, Hkv): multi-query with "mqa", grouped-query with "gqa", else Hq = Hkv."""
    if "mqa" in features:
        return int(rng.integers(2, 5)), 1
    if "gqa" in features:
        return 2 * int(rng.integers(2, 4)), 2
    hkv = int(rng.integers(1, 3))
    return hkv, hkv


def _draw_softmax_case(rng: np.random.Generator, index: int, focus: str) -> Case:
    features = _draw_features(rng, focus)
    b = int(rng.integers(1, MAX_BATCH + 1))
    hq, hkv = draw_head_counts(rng, features)
    n = int(rng.integers(1, MAX_POSITIONS + 1))
    s = int(rng.integers(1, MAX_POSITIONS + 1))
    if focus.startswith("causal"):
        while n == s:  # the two alignments differ only when N != S
            s = int(rng.integers(1, MAX_POSITIONS + 1))
    d = int(rng.integers(1, MAX_HEAD_DIM + 1))
    m = int(rng.integers(1, MAX_HEAD_DIM + 1))

    q = rng.standard_normal((b, hq, n, d))
    k = rng.standard_normal((b, hkv, s, d))
    v = rng.standard_normal((b, hkv, s, m))
    arrays: dict[str, np.ndarray] = {"q": q, "k": k, "v": v}
    options: dict[str, Any] = {}

    large_spread = "large_logits" in features and rng.random() < 0.5
    if large_spread:
        # Entries of size 30 give scores scale * q . k with a spread of about 900, so
        # the softmax is nearly one-hot.
        q *= 30.0
        k *= 30.0
    if "softcap" in features:
        q *= 3.0  # push scores past the cap so that tanh bends them
        options["softcap"] = float(rng.uniform(1.0, 5.0))
    if "causal_top_left" in features:
        options["causal"] = "top_left"
    if "causal_bottom_right" in features:
        options["causal"] = "bottom_right"
    if "window" in features:
        left, right = (None if rng.random() < 0.3 else int(rng.integers(0, 4)) for _ in "lr")
        if left is None and right is None:
            left = int(rng.integers(0, 4))
        options["window"] = (left, right)
        if "causal" not in options:
            options["alignment"] = str(rng.choice(["top_left", "bottom_right"]))
    if "bias" in features:
        shape = [(b, hq, n, s), (1, hq, n, s), (n, s)][int(rng.integers(0, 3))]
        arrays["bias"] = rng.standard_normal(shape)
    if "large_logits" in features and not large_spread:
        # A per-row offset of about +-1e3 leaves the softmax unchanged but overflows
        # exp in any implementation that does not subtract the row maximum.
        offset = rng.uniform(500.0, 1000.0, size=(b, hq, n, 1)) * rng.choice([-1.0, 1.0])
        arrays["bias"] = np.broadcast_to(arrays.get("bias", 0.0), (b, hq, n, s)) + offset
    if "mask" in features:
        heads = hq if rng.random() < 0.5 else 1
        arrays["mask"] = rng.random((b, heads, n, s)) < 0.7
    if "empty_rows" in features:
        mask = np.broadcast_to(arrays.get("mask", True), (b, hq, n, s)).copy()
        empty = rng.random((b, hq, n)) < 0.3
        empty[tuple(int(rng.integers(0, size)) for size in (b, hq, n))] = True
        mask[empty] = False
        arrays["mask"] = mask
    if "kv_lengths" in features:
        arrays["kv_lengths"] = rng.integers(0, s + 1, size=b)
    if "q_lengths" in features:
        arrays["q_lengths"] = rng.integers(0, n + 1, size=b)
    if "dropout" in features:
        arrays["dropout_mask"] = rng.random((b, hq, n, s)) < 0.8
        options["dropout_p"] = 0.2
    if "nan_at_excluded" in features:
        _store_nan_at_excluded(rng, arrays, options)

    for key in FLOAT_ARRAYS:
        if key in arrays:
            arrays[key] = arrays[key].astype(np.float32).astype(np.float64)
    name = f"random-{index:03d}-" + "+".join(sorted(features))
    return Case(name, arrays, options)


def _store_nan_at_excluded(rng: np.random.Generator, arrays: dict, options: dict) -> None:
    """Write NaN into k, v and bias wherever no query of the case may read them."""
    b, hq, n, _ = arrays["q"].shape
    hkv, s = arrays["k"].shape[1:3]
    if "kv_lengths" not in arrays:
        # Keys past a length shorter than S give excluded positions in every case.
        arrays["kv_lengths"] = rng.integers(0, s, size=b)
    keep = keep_set(Case("draft", arrays, options))
    bias = arrays.get("bias")
    if bias is None:
        bias = rng.standard_normal((b, hq, n, s))
    bias = np.broadcast_to(bias, keep.shape)
    arrays["bias"] = np.where(keep, bias, np.nan)
    group = hq // hkv
    # A key position of head g is unread when no query head of its group keeps it.
    read = keep.reshape(b, hkv, group, n, s).any(axis=(2, 3))  # (B, Hkv, S)
    arrays["k"][~read] = np.nan
    arrays["v"][~read] = np.nan


def softmax_edge_cases() -> list[Case]:
    """Return the catalogue of small softmax cases with exact expected values.

    Each case comes from a fault seen in real attention implementations. With q = k = 0
    every score is 0, so each output row is the plain mean of the values the row may
    see, and the log-sum-exp is the log of how many keys it sees.
    """
    cases = []

    def add(name, n, s, v, options, out, counts, mask=None, bias=None, extra=None):
        arrays = {"q": np.zeros((1, 1, n, 1)), "k": np.zeros((1, 1, s, 1))}
        arrays["v"] = np.asarray(v, dtype=np.float64).reshape(1, 1, s, 1)
        if mask is not None:
            arrays["mask"] = np.asarray(mask, dtype=bool).reshape(1, 1, n, s)
        if bias is not None:
            arrays["bias"] = np.asarray(bias, dtype=np.float64).reshape(1, 1, n, s)
        arrays.update(extra or {})
        expected_out = np.asarray(out, dtype=np.float64).reshape(1, 1, n, 1)
        expected_lse = None
        if counts is not None:
            with np.errstate(divide="ignore"):  # log(0) = -inf for a row with no key
                expected_lse = np.log(np.asarray(counts, dtype=np.float64)).reshape(1, 1, n)
        cases.append(Case(name, arrays, options, expected_out, expected_lse))

    # Causal alignment when N != S: top-left (PyTorch is_causal) against bottom-right
    # (FlashAttention >= 2.1, KV-cache decoding).
    add("edge-causal-n2-s4-top-left", 2, 4, range(4), {"causal": "top_left"}, [0, 0.5], [1, 2])
    add("edge-causal-n2-s4-bottom-right", 2, 4, range(4), {"causal": "bottom_right"},
        [1, 1.5], [3, 4])
    add("edge-causal-n4-s2-top-left", 4, 2, [1, 2], {"causal": "top_left"},
        [1, 1.5, 1.5, 1.5], [1, 2, 2, 2])
    add("edge-causal-n4-s2-bottom-right", 4, 2, [1, 2], {"causal": "bottom_right"},
        [0, 0, 1, 1.5], [0, 0, 1, 2])
    # A row with no allowed key is 0 with lse = -inf, never NaN.
    row_1_masked = np.ones((4, 4), dtype=bool)
    row_1_masked[1] = False
    add("edge-fully-masked-row", 4, 4, range(4), {}, [1.5, 0, 1.5, 1.5], [4, 0, 4, 4],
        mask=row_1_masked)
    # Sliding window of 2 keys counting the query itself, with causal.
    add("edge-window-two-keys-causal", 6, 6, range(6), {"causal": True, "window": (1, 0)},
        [0, 0.5, 1.5, 2.5, 3.5, 4.5], [1, 2, 2, 2, 2, 2])
    # Structural options without an explicit mask, also with an all-True dropout mask.
    add("edge-window-zero-no-mask", 5, 5, range(5), {"window": (0, 0)}, range(5), [1] * 5)
    add("edge-causal-no-mask", 5, 5, range(5), {"causal": True}, [0, 0.5, 1, 1.5, 2],
        range(1, 6))
    add("edge-causal-all-true-dropout", 5, 5, range(5), {"causal": True, "dropout_p": 0.0},
        [0, 0.5, 1, 1.5, 2], range(1, 6),
        extra={"dropout_mask": np.ones((1, 1, 5, 5), dtype=bool)})
    # Additive bias is not a boolean mask.
    add("edge-bias-ln3", 1, 2, [0, 1], {}, [0.75], None, bias=[[0.0, math.log(3.0)]])
    add("edge-bias-float-tril", 2, 2, [0, 1], {}, [1 / (math.e + 1), 0.5], None,
        bias=np.tril(np.ones((2, 2))))

    # Grouped-query head mapping: head g of v contains the value g + 1, so each query head's output
    # names the key/value head it read. Contiguous groups give [1, 1, 2, 2].
    for name, hkv, out in (("edge-gqa-head-mapping", 2, [1, 1, 2, 2]),
                           ("edge-mqa-head-mapping", 1, [1, 1, 1, 1])):
        arrays = {
            "q": np.zeros((1, 4, 1, 1)),
            "k": np.zeros((1, hkv, 3, 1)),
            "v": np.repeat(np.arange(1.0, hkv + 1).reshape(1, hkv, 1, 1), 3, axis=2),
        }
        expected = np.asarray(out, dtype=np.float64).reshape(1, 4, 1, 1)
        cases.append(Case(name, arrays, {}, expected, np.full((1, 4, 1), math.log(3.0))))
    return cases


class CaseFileError(ValueError):
    """Raised when a file cannot be read as a case written by `save_case`."""


def save_case(
    path: str | Path,
    case: Case,
    references: dict[str, np.ndarray] | None = None,
    *,
    variant: str | None = None,
) -> Path:
    """Write a case to an ``.npz`` file that loads with ``allow_pickle=False``.

    Arrays keep their names; the name and scalar options are stored as JSON in the
    string arrays ``name`` and ``options``. `variant`, the name of the attention family
    the case belongs to, is stored in ``variant`` when given. `references` (for example
    the oracle output under ``reference_out``) are stored alongside.
    """
    path = Path(path)
    payload = dict(case.arrays)
    payload["name"] = np.array(case.name)
    payload["options"] = np.array(json.dumps(case.options))
    payload["exact"] = np.array(case.exact)
    if variant is not None:
        payload["variant"] = np.array(variant)
    if case.expected_out is not None:
        payload["expected_out"] = case.expected_out
    if case.expected_lse is not None:
        payload["expected_lse"] = case.expected_lse
    if case.expected_state is not None:
        payload["expected_state_S"], payload["expected_state_z"] = case.expected_state
    if case.expected_raised is not None:
        payload["expected_raised"] = np.array(case.expected_raised, dtype=np.int64).reshape(-1, 3)
    payload.update(references or {})
    np.savez(path, **payload)
    return path


def load_case(path: str | Path) -> Case:
    """Read a case written by `save_case`.

    Raises
    ------
    CaseFileError
        The file does not exist, cannot be read, or is not a case written by
        `save_case` (not an ``.npz`` archive, or one without q, k, v, name and options).
    """
    return _case_from_contents(path, _read_case_file(path))


def load_case_variant(path: str | Path) -> str | None:
    """Return the variant name stored by ``save_case(..., variant=...)``, else None.

    Raises
    ------
    CaseFileError
        As `load_case`.
    """
    contents = _read_case_file(path)
    return str(contents["variant"]) if "variant" in contents else None


def _read_case_file(path: str | Path) -> dict[str, np.ndarray]:
    expected = "a case saved by kernattn verify --save-failures (.npz)"
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise CaseFileError(f"{path} is a single .npy array; expected {expected}")
        with data:
            contents = {key: data[key] for key in data.files}
    except FileNotFoundError as exc:
        raise CaseFileError(f"{path} not found; expected {expected}") from exc
    except OSError as exc:
        raise CaseFileError(f"{path} cannot be read ({exc}); expected {expected}") from exc
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, CaseFileError):
            raise
        # np.load raises ValueError ("contains pickled (object) data") for any file that
        # is neither .npy nor .npz, EOFError for an empty one.
        raise CaseFileError(f"{path} is not a NumPy .npz file; expected {expected}") from exc
    missing = [key for key in ("q", "k", "v", "name", "options") if key not in contents]
    if missing:
        raise CaseFileError(f"{path} has no {', '.join(missing)}; expected {expected}")
    return contents


def _case_from_contents(path: str | Path, contents: dict[str, np.ndarray]) -> Case:
    try:
        options = json.loads(str(contents.pop("options")))
    except json.JSONDecodeError as exc:
        raise CaseFileError(f"{path}: options is not valid JSON ({exc})") from exc
    if not isinstance(options, dict):
        raise CaseFileError(f"{path}: options is a {type(options).__name__}; expected a JSON object")
    if options.get("window") is not None:
        options["window"] = tuple(options["window"])  # JSON has no tuples
    name = str(contents.pop("name"))
    arrays = {key: contents[key] for key in ("q", "k", "v", *ARRAY_KEYWORDS) if key in contents}
    expected_state = None
    if "expected_state_S" in contents:
        expected_state = (contents["expected_state_S"], contents["expected_state_z"])
    expected_raised = None
    if "expected_raised" in contents:
        expected_raised = tuple(tuple(int(x) for x in row) for row in contents["expected_raised"])
    return Case(
        name,
        arrays,
        options,
        contents.get("expected_out"),
        contents.get("expected_lse"),
        expected_state,
        expected_raised,
        bool(contents.get("exact", False)),
    )
