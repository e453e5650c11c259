"""Names of feature maps and similarities, as `kernattn verify` writes them.

A case stores its feature map or similarity as a short name (a JSON string in saved
files), and the command line accepts the same names (``--feature-map``). Random maps
take a fixed ``random_state``, so a name always gives the same map.

Feature maps:

==========================  ===================================================
name                        map
==========================  ===================================================
``elu+1``                   `EluPlusOne`
``relu``                    `ReLU`
``identity``                `Identity` (kernel q . k, signed)
``polynomial:P[:C]``        `Polynomial(P, c=C)`, C defaults to 1
``taylor[:ORDER[:SCALE]]``  `TaylorExp(ORDER, scale=SCALE)`, order 2, scale 1/sqrt(D)
``favor:M[:SEED]``          `PositiveRandomFeatures(M, random_state=SEED)`, seed 0
``favor-orthogonal:M[:SEED]``  the same with orthogonal blocks
``trig:M[:SEED]``           `TrigRandomFeatures(M, random_state=SEED)`
``fourier:M[:GAMMA[:SEED]]``  `RandomFourierFeatures(M, GAMMA, random_state=SEED)`
==========================  ===================================================

Similarities: ``dot`` (q . k), ``polynomial:P[:C]`` (``(q . k + C) ** P``, C defaults
to 0 as in `PolynomialKernel`), ``exp[:SCALE]`` (``exp(SCALE q . k)``, scale 1/sqrt(D)).
C and SCALE may be fractions such as ``1/2``.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable

from kernattn import feature_maps as fm
from kernattn.similarity import ExponentialKernel, Kernel, PolynomialKernel

FEATURE_MAP_NAMES = (
    "elu+1", "relu", "identity", "polynomial:P[:C]", "taylor[:ORDER[:SCALE]]",
    "favor:M[:SEED]", "favor-orthogonal:M[:SEED]", "trig:M[:SEED]",
    "fourier:M[:GAMMA[:SEED]]",
)
SIMILARITY_NAMES = ("dot", "polynomial:P[:C]", "exp[:SCALE]")


def _number(text: str) -> int | Fraction:
    """Parse an integer or a fraction such as ``1/2`` or ``0.5`` (kept exact)."""
    value = Fraction(text)
    return int(value) if value.denominator == 1 else value


def _split(name: str, kinds: str, low: int, high: int) -> tuple[str, list[str]]:
    head, *parts = name.strip().split(":")
    if not low <= len(parts) <= high:
        raise ValueError(f"{kinds} {name!r} takes {low} to {high} ':' parameters, not {len(parts)}")
    return head.lower(), parts


def _random_map(cls, parts: list[str], **options):
    seed = int(parts[1]) if len(parts) > 1 else 0
    return cls(int(parts[0]), random_state=seed, **options)


_FEATURE_MAPS: dict[str, tuple[int, int, Callable]] = {
    "elu+1": (0, 0, lambda parts: fm.EluPlusOne()),
    "relu": (0, 0, lambda parts: fm.ReLU()),
    "identity": (0, 0, lambda parts: fm.Identity()),
    "polynomial": (1, 2, lambda parts: fm.Polynomial(
        int(parts[0]), c=_number(parts[1]) if len(parts) > 1 else 1)),
    "taylor": (0, 2, lambda parts: fm.TaylorExp(
        int(parts[0]) if parts else 2, scale=_number(parts[1]) if len(parts) > 1 else None)),
    "favor": (1, 2, lambda parts: _random_map(fm.PositiveRandomFeatures, parts)),
    "favor-orthogonal": (1, 2, lambda parts: _random_map(
        fm.PositiveRandomFeatures, parts, orthogonal=True)),
    "trig": (1, 2, lambda parts: _random_map(fm.TrigRandomFeatures, parts)),
    "fourier": (1, 3, lambda parts: fm.RandomFourierFeatures(
        int(parts[0]), float(parts[1]) if len(parts) > 1 else 1.0,
        random_state=int(parts[2]) if len(parts) > 2 else 0)),
}


def feature_map_from_name(name: str) -> fm.FeatureMap:
    """Return a new feature map for `name` (see the module docstring for the names).

    A new object each call, so a random map fits its projection to the D it first sees.

    Raises
    ------
    ValueError
        Unknown name, wrong number of parameters, or a parameter that is not a number.
    """
    head, parts = _split(name, "feature map", 0, 3)
    if head not in _FEATURE_MAPS:
        raise ValueError(
            f"feature map {name!r} is unknown; expected one of {', '.join(FEATURE_MAP_NAMES)}"
        )
    low, high, build = _FEATURE_MAPS[head]
    if not low <= len(parts) <= high:
        raise ValueError(
            f"feature map {name!r} takes {low} to {high} ':' parameters, not {len(parts)}; "
            f"expected one of {', '.join(FEATURE_MAP_NAMES)}"
        )
    try:
        return build(parts)
    except (ValueError, ZeroDivisionError) as exc:  # OptionError is a ValueError
        raise ValueError(f"feature map {name!r}: {exc}") from exc


def is_feature_map_name(text: str) -> bool:
    """Return True when `text` starts with a built-in feature-map name (before any ':')."""
    return text.strip().split(":")[0].lower() in _FEATURE_MAPS


def similarity_from_name(name: str) -> Kernel:
    """Return the similarity kernel for `name`: ``dot``, ``polynomial:P[:C]``, ``exp[:SCALE]``.

    Raises
    ------
    ValueError
        Unknown name or bad parameters.
    """
    head, parts = _split(name, "similarity", 0, 2)
    try:
        if head == "dot" and not parts:
            return PolynomialKernel(1, 0)
        if head == "polynomial" and parts:
            return PolynomialKernel(int(parts[0]), _number(parts[1]) if len(parts) > 1 else 0)
        if head == "exp" and len(parts) <= 1:
            return ExponentialKernel(float(_number(parts[0])) if parts else None)
    except (ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"similarity {name!r}: {exc}") from exc
    raise ValueError(f"similarity {name!r} is unknown; expected one of {', '.join(SIMILARITY_NAMES)}")
