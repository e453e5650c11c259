"""Feature maps φ: R^D -> R^F whose dot products define a kernel, for linear attention.

Shape legend: D input dimension (the query/key head dimension), F feature dimension, m
number of random projections. Every map has ``__call__(x)`` taking (..., D) to (..., F),
``num_features(D)`` and ``kernel(x, y)``: the kernel ``φ(x) . φ(y)`` equals exactly for a
deterministic map, and the kernel a random map estimates without bias.

Exact maps (`Polynomial`, `TaylorExp` with a given scale, `Identity`, `ReLU`) are also
`rational`: ``rational_features(x)`` returns weights w and values u as Fractions with
``φ_f(x) = sqrt(w_f) * u_f(x)``, so ``φ(x) . φ(y) = sum_f w_f u_f(x) u_f(y)`` is exact
for rational x and y although the features themselves hold square roots.

Random maps follow scikit-learn's fitted/unfitted split: ``fit(D)`` draws the projection
from `random_state` (resolved once with `numpy.random.default_rng`) and stores it as
``projection_``; the first call fits automatically. Passing ``projection=`` skips the draw,
so another library's projection can be replayed.
"""

from __future__ import annotations

import itertools
import math
import numbers
from fractions import Fraction
from typing import Callable

import numpy as np

from kernattn import _validate as V


class FeatureMapError(ValueError):
    """Raised when a feature map returns NaN or Inf for finite input."""


class FeatureMap:
    """Base class: subclasses define `_features` and `num_features`."""

    rational = False

    def __call__(self, x) -> np.ndarray:
        """Map x of shape (..., D) to features of shape (..., F).

        float32 input is mapped in float32 (as the numba backend computes); anything
        else is converted to float64 first.
        """
        x = np.asarray(x)
        if x.dtype != np.float32:
            x = x.astype(np.float64)
        if x.ndim < 1:
            raise V.ShapeError(f"{self!r} got a scalar; expected an array of shape (..., D)")
        return self._features(x)

    def _features(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def num_features(self, d: int) -> int:
        """Return F, the number of features for inputs of dimension D."""
        raise NotImplementedError

    def kernel(self, x, y) -> np.ndarray:
        """Return the kernel K(x, y) for x, y of shape (..., D), broadcast to (...)."""
        return np.sum(self(x) * self(y), axis=-1)

    def rational_features(self, x) -> tuple[list[Fraction], list[Fraction]]:
        """Return (w, u) with ``φ_f(x) = sqrt(w_f) u_f(x)``, exactly, for rational x."""
        raise NotImplementedError(f"{self!r} has no exact rational form")


# --- exact maps built from monomials -----------------------------------------------------


def _monomials(d: int, degrees) -> list[tuple[int, ...]]:
    """Return the multisets of variable indices, by degree then lexicographically."""
    return [t for r in degrees for t in itertools.combinations_with_replacement(range(d), r)]


def _inverse_factorials(term: tuple[int, ...]) -> Fraction:
    """Return 1 / alpha! for the multi-index alpha counted by `term`."""
    out = Fraction(1)
    for _, group in itertools.groupby(term):
        out /= math.factorial(len(list(group)))
    return out


class _MonomialMap(FeatureMap):
    """A map with one feature ``sqrt(w_alpha) x^alpha`` per monomial alpha."""

    rational = True

    def _terms(self, d: int) -> tuple[list[tuple[int, ...]], list[Fraction]]:
        raise NotImplementedError

    def num_features(self, d: int) -> int:
        return len(self._terms(d)[0])

    def _features(self, x):
        d = x.shape[-1]
        terms, weights = self._terms(d)
        width = max((len(t) for t in terms), default=0)
        # Index d points at an appended column of ones, padding short monomials.
        index = np.array([t + (d,) * (width - len(t)) for t in terms], dtype=np.intp)
        ext = np.concatenate([x, np.ones(x.shape[:-1] + (1,))], axis=-1)
        values = np.prod(ext[..., index], axis=-1) if width else np.ones(x.shape[:-1] + (len(terms),))
        return np.sqrt(np.array([float(w) for w in weights])) * values

    def rational_features(self, x):
        x = [Fraction(e) for e in x]
        terms, weights = self._terms(len(x))
        values = [math.prod((x[i] for i in t), start=Fraction(1)) for t in terms]
        return list(weights), values


class Polynomial(_MonomialMap):
    """Exact map of the polynomial kernel ``(x . y + c) ** degree``.

    Parameters
    ----------
    degree : int
        p >= 1.
    c : float or Fraction, default 1.0
        Offset c >= 0.

    Notes
    -----
    Expanding ``(sum_i x_i y_i + c)^p`` by the multinomial theorem gives one term per
    monomial x^alpha with |alpha| <= p: ``p! / (alpha! (p - |alpha|)!) c^(p - |alpha|)
    x^alpha y^alpha``. Splitting each coefficient as sqrt(w) on x and sqrt(w) on y gives
    the feature ``sqrt(w_alpha) x^alpha``. F = C(D + p, p) for c > 0 and C(D + p - 1, p)
    for c = 0 (degree-p monomials only). For p = 2, c = 1, D = 2 the features are
    ``[1, √2 x1, √2 x2, x1², √2 x1 x2, x2²]``. Time O(F p) per vector.

    Examples
    --------
    >>> import numpy as np
    >>> phi = Polynomial(2, c=0)
    >>> x, y = np.array([1.0, 2.0]), np.array([3.0, 1.0])
    >>> phi(x)
    array([1.        , 2.82842712, 4.        ])
    >>> float(phi(x) @ phi(y)), float((x @ y) ** 2)
    (25.000000000000004, 25.0)
    >>> w, u = phi.rational_features([1, 2]); w, u
    ([Fraction(1, 1), Fraction(2, 1), Fraction(1, 1)], [Fraction(1, 1), Fraction(2, 1), Fraction(4, 1)])
    """

    def __init__(self, degree: int, c: float | Fraction = 1.0):
        if isinstance(degree, bool) or not isinstance(degree, numbers.Integral) or degree < 1:
            raise V.OptionError(f"degree is {degree!r}; expected an integer >= 1")
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not (
            math.isfinite(c) and c >= 0
        ):
            raise V.OptionError(
                f"c is {c!r}; expected a finite number >= 0 (a negative c has no real "
                f"feature map)"
            )
        self.degree = int(degree)
        self.c = c
        self._cache: dict[int, tuple] = {}

    def __repr__(self) -> str:
        return f"Polynomial(degree={self.degree}, c={self.c!r})"

    def _terms(self, d):
        if d not in self._cache:
            p, c = self.degree, Fraction(self.c)
            degrees = range(p + 1) if c != 0 else [p]
            terms = _monomials(d, degrees)
            weights = [
                math.factorial(p) * _inverse_factorials(t) / math.factorial(p - len(t))
                * c ** (p - len(t))
                for t in terms
            ]
            self._cache[d] = (terms, weights)
        return self._cache[d]

    def kernel(self, x, y):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        return (np.sum(x * y, axis=-1) + float(self.c)) ** self.degree


class TaylorExp(_MonomialMap):
    """Truncated Taylor map of ``exp(s)``, ``s = scale * x . y`` (as in Based).

    ``φ(x) . φ(y) = sum_{r <= order} s^r / r!``; for ``order=2`` that is
    ``1 + s + s²/2``. Features ``sqrt(scale^|alpha| / alpha!) x^alpha`` for
    |alpha| <= order, F = C(D + order, order). `scale` defaults to 1/sqrt(D); the map is
    `rational` only when `scale` is given.
    """

    def __init__(self, order: int = 2, scale: float | Fraction | None = None):
        if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < 0:
            raise V.OptionError(f"order is {order!r}; expected an integer >= 0")
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, numbers.Real)
            or not (math.isfinite(scale) and scale > 0)
        ):
            raise V.OptionError(f"scale is {scale!r}; expected a positive finite number or None")
        self.order = int(order)
        self.scale = scale
        self.rational = scale is not None
        self._cache: dict[int, tuple] = {}

    def __repr__(self) -> str:
        return f"TaylorExp(order={self.order}, scale={self.scale!r})"

    def _scale(self, d: int):
        return Fraction(self.scale) if self.scale is not None else V.check_scale(None, d)

    def _terms(self, d):
        if d not in self._cache:
            scale = self._scale(d)
            terms = _monomials(d, range(self.order + 1))
            weights = [scale ** len(t) * _inverse_factorials(t) for t in terms]
            self._cache[d] = (terms, weights)
        return self._cache[d]

    def rational_features(self, x):
        if self.scale is None:
            raise NotImplementedError(
                f"{self!r} uses scale 1/sqrt(D), which is irrational; pass scale= for an "
                f"exact form"
            )
        return super().rational_features(x)

    def kernel(self, x, y):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        s = float(self._scale(x.shape[-1])) * np.sum(x * y, axis=-1)
        return sum(s**r / math.factorial(r) for r in range(self.order + 1))


class Identity(FeatureMap):
    """The identity map, F = D: linear attention with the kernel ``x . y`` (signed)."""

    rational = True

    def __repr__(self) -> str:
        return "Identity()"

    def _features(self, x):
        return x.copy()

    def num_features(self, d):
        return d

    def rational_features(self, x):
        return [Fraction(1)] * len(x), [Fraction(e) for e in x]


class ReLU(FeatureMap):
    """``max(x, 0)``, F = D. Non-negative, but a query with no positive entry gives a zero
    denominator."""

    rational = True

    def __repr__(self) -> str:
        return "ReLU()"

    def _features(self, x):
        return np.maximum(x, 0.0)

    def num_features(self, d):
        return d

    def rational_features(self, x):
        return [Fraction(1)] * len(x), [max(Fraction(e), Fraction(0)) for e in x]


class EluPlusOne(FeatureMap):
    """``elu(x) + 1``, F = D, strictly positive (Katharopoulos et al. 2020, "Transformers
    are RNNs"). Denominators are positive unless ``exp`` underflows."""

    def __repr__(self) -> str:
        return "EluPlusOne()"

    def _features(self, x):
        # elu(x) + 1 = exp(min(x, 0)) + max(x, 0): x + 1 for x > 0 (exp(0) is exactly 1)
        # and exp(x) otherwise. Computed in place, this is several times faster than
        # np.where, which builds four temporaries.
        features = np.minimum(x, 0)
        np.exp(features, out=features)
        features += np.maximum(x, 0)
        return features

    def num_features(self, d):
        return d


# --- random maps -------------------------------------------------------------------------


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise V.OptionError(f"{name} is {value!r}; expected an integer >= 1")
    return int(value)


def draw_gaussian_projection(rng, m: int, d: int, orthogonal: bool) -> np.ndarray:
    """Draw an (m, D) matrix whose rows are standard normal vectors.

    With `orthogonal`, rows come in blocks of D mutually orthogonal directions (Haar
    distributed, the sign of R's diagonal fixed), each scaled by an independent
    chi(D)-distributed norm, so every row on its own is still standard normal.
    """
    if not orthogonal:
        return rng.standard_normal((m, d))
    blocks = []
    for _ in range(-(-m // d)):
        gaussian = rng.standard_normal((d, d))
        q, r = np.linalg.qr(gaussian)
        q = q * np.sign(np.diag(r))[None, :]
        norms = np.sqrt(rng.chisquare(d, size=d))
        blocks.append(q.T * norms[:, None])
    return np.concatenate(blocks)[:m]


class _RandomMap(FeatureMap):
    """Shared fitting logic: a projection (m, D) drawn once or given."""

    def __init__(self, num_features, *, orthogonal=False, random_state=None, projection=None):
        self.orthogonal = bool(orthogonal)
        self.random_state = random_state
        if projection is not None:
            projection = V.as_float_array("projection", projection)
            if projection.ndim != 2 or projection.shape[0] < 1:
                raise V.ShapeError(
                    f"projection has shape {projection.shape}; expected (m, D) with m >= 1"
                )
            if not np.isfinite(projection).all():
                raise V.OptionError("projection contains NaN or Inf; expected finite values")
            if num_features is None:
                num_features = projection.shape[0]
            if num_features != projection.shape[0]:
                raise V.ShapeError(
                    f"num_features is {num_features} but projection has "
                    f"{projection.shape[0]} rows; they must agree (or pass num_features=None)"
                )
        self.m = _check_count("num_features", num_features)
        self.projection_ = projection

    def fit(self, d: int):
        """Draw the (m, D) projection for inputs of dimension D and return self."""
        rng = np.random.default_rng(self.random_state)
        self.projection_ = draw_gaussian_projection(rng, self.m, int(d), self.orthogonal)
        self._fit_extra(rng)
        return self

    def _fit_extra(self, rng) -> None:
        pass

    def _projection(self, d: int) -> np.ndarray:
        if d < 1:
            raise V.ShapeError(
                f"{self!r} got inputs of dimension D = {d}; a random map needs D >= 1"
            )
        if self.projection_ is None:
            self.fit(d)
        if self.projection_.shape[1] != d:
            raise V.ShapeError(
                f"{self!r} is fitted for D = {self.projection_.shape[1]}, but the input "
                f"has D = {d}; call fit({d}) or use a new map"
            )
        return self.projection_


class PositiveRandomFeatures(_RandomMap):
    """FAVOR+ positive random features (Choromanski et al., Performer).

    Parameters
    ----------
    num_features : int or None
        m, the number of projections; F = m. May be None when `projection` is given.
    orthogonal : bool, default False
        Draw rows in orthogonal blocks with chi(D) norms (lower variance).
    random_state : int, Generator or None
        Seed for `numpy.random.default_rng`, used once by `fit`.
    projection : array_like, shape (m, D), optional
        Standard-normal rows W to use instead of drawing them.

    Notes
    -----
    ``x' = x D^(-1/4)`` and ``φ(x) = m^(-1/2) exp(W x' - |x'|²/2)``. Both the projection and
    the ``|x'|²/2`` term use the scaled x'. ``E[φ(q) . φ(k)] = exp(q . k / sqrt(D))``, the
    softmax kernel, and every feature is positive.
    """

    def __repr__(self) -> str:
        return (
            f"PositiveRandomFeatures({self.m}, orthogonal={self.orthogonal}, "
            f"random_state={self.random_state!r})"
        )

    def num_features(self, d):
        return self.m

    def _features(self, x):
        d = x.shape[-1]
        w = self._projection(d)
        xs = x * d ** -0.25
        sq = 0.5 * np.sum(xs * xs, axis=-1, keepdims=True)
        return np.exp(xs @ w.T - sq) / math.sqrt(self.m)

    def kernel(self, x, y):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        return np.exp(np.sum(x * y, axis=-1) / math.sqrt(x.shape[-1]))


class TrigRandomFeatures(PositiveRandomFeatures):
    """Trigonometric random features for the softmax kernel ``exp(q . k / sqrt(D))``.

    Same parameters as `PositiveRandomFeatures`; F = 2m. With ``x' = x D^(-1/4)``,
    ``φ(x) = m^(-1/2) exp(|x'|²/2) [cos(W x'), sin(W x')]``, so ``φ(x) . φ(y) =
    exp((|x'|² + |y'|²)/2) mean_r cos(w_r . (x' - y'))``, unbiased for ``exp(x' . y')``.
    The features are signed, so denominators can vanish.
    """

    def __repr__(self) -> str:
        return (
            f"TrigRandomFeatures({self.m}, orthogonal={self.orthogonal}, "
            f"random_state={self.random_state!r})"
        )

    def num_features(self, d):
        return 2 * self.m

    def _features(self, x):
        d = x.shape[-1]
        w = self._projection(d)
        xs = x * d ** -0.25
        angle = xs @ w.T
        amplitude = np.exp(0.5 * np.sum(xs * xs, axis=-1, keepdims=True)) / math.sqrt(self.m)
        return amplitude * np.concatenate([np.cos(angle), np.sin(angle)], axis=-1)


class RandomFourierFeatures(_RandomMap):
    """Random Fourier features for the Gaussian kernel ``exp(-gamma |x - y|²)``.

    Parameters
    ----------
    num_features : int or None
        m; F = m. May be None when `projection` is given.
    gamma : float, default 1.0
    orthogonal : bool, default False
    random_state : int, Generator or None
    projection : array_like, shape (m, D), optional
        Frequencies, already scaled (rows distributed as N(0, 2 gamma I)). scikit-learn's
        ``RBFSampler`` stores the transpose as ``random_weights_``.
    offset : array_like, shape (m,), optional
        Phases in [0, 2 pi) (``RBFSampler.random_offset_``); required with `projection`.

    Notes
    -----
    ``φ(x) = sqrt(2/m) cos(W x + b)``, the form scikit-learn's ``RBFSampler`` uses; signed,
    so denominators can vanish. Unbiased for the Gaussian kernel.
    """

    def __init__(
        self, num_features, gamma: float = 1.0, *, orthogonal=False, random_state=None,
        projection=None, offset=None,
    ):
        self.gamma = V.check_positive_float("gamma", gamma)
        if gamma is None:
            raise V.OptionError("gamma is None; expected a positive finite number")
        super().__init__(
            num_features, orthogonal=orthogonal, random_state=random_state,
            projection=projection,
        )
        if (projection is None) != (offset is None):
            raise V.OptionError(
                "projection and offset go together: pass both to replay a map, or neither "
                "to draw them from random_state"
            )
        if offset is not None:
            offset = V.as_float_array("offset", offset)
            if offset.shape != (self.m,):
                raise V.ShapeError(f"offset has shape {offset.shape}; expected ({self.m},)")
        self.offset_ = offset

    def __repr__(self) -> str:
        return (
            f"RandomFourierFeatures({self.m}, gamma={self.gamma}, "
            f"orthogonal={self.orthogonal}, random_state={self.random_state!r})"
        )

    def fit(self, d: int):
        """Draw frequencies (rows N(0, 2 gamma I)) and phases U(0, 2 pi); return self."""
        rng = np.random.default_rng(self.random_state)
        standard = draw_gaussian_projection(rng, self.m, int(d), self.orthogonal)
        self.projection_ = math.sqrt(2.0 * self.gamma) * standard
        self.offset_ = rng.uniform(0.0, 2.0 * math.pi, size=self.m)
        return self

    def num_features(self, d):
        return self.m

    def _features(self, x):
        w = self._projection(x.shape[-1])
        return math.sqrt(2.0 / self.m) * np.cos(x @ w.T + self.offset_)

    def kernel(self, x, y):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        return np.exp(-self.gamma * np.sum((x - y) ** 2, axis=-1))


# --- user maps ---------------------------------------------------------------------------


class FunctionFeatureMap(FeatureMap):
    """A user's map ``fn: (..., D) -> (..., F)`` wrapped as a `FeatureMap`."""

    def __init__(self, fn: Callable, kernel: Callable | None = None):
        if not callable(fn):
            raise V.OptionError(f"fn is {type(fn).__name__} {fn!r}; expected a callable")
        if kernel is not None and not callable(kernel):
            raise V.OptionError(f"kernel is {kernel!r}; expected a callable or None")
        self.fn = fn
        self._kernel = kernel

    def __repr__(self) -> str:
        return f"from_function({getattr(self.fn, '__name__', repr(self.fn))})"

    def _features(self, x):
        features = np.asarray(self.fn(x))
        if features.dtype.kind not in "fiu":
            raise V.DTypeError(
                f"feature map {self!r} returned dtype {features.dtype}; expected real "
                f"floating features"
            )
        return features.astype(np.float64, copy=False)

    def num_features(self, d):
        with np.errstate(all="ignore"):  # only the shape of fn(zeros) is read
            return int(self(np.zeros((1, d))).shape[-1])

    def kernel(self, x, y):
        if self._kernel is None:
            return super().kernel(x, y)
        return np.asarray(self._kernel(x, y), dtype=np.float64)


def from_function(fn: Callable, kernel: Callable | None = None) -> FunctionFeatureMap:
    """Wrap ``fn: (..., D) -> (..., F)`` so it works wherever a built-in map does.

    Parameters
    ----------
    fn : callable
        Maps an array of shape (..., D) to (..., F); applied to whole (N, D) blocks.
    kernel : callable, optional
        ``kernel(x, y)`` on (..., D) arrays, the kernel that `fn` computes or estimates.
        Default: ``fn(x) . fn(y)``.

    Examples
    --------
    >>> import numpy as np
    >>> square = from_function(lambda x: x**2)
    >>> square.num_features(3), square(np.array([1.0, -2.0, 3.0]))
    (3, array([1., 4., 9.]))
    """
    return FunctionFeatureMap(fn, kernel)


def as_feature_map(feature_map) -> FeatureMap:
    """Return `feature_map` as a `FeatureMap`, wrapping plain callables with `from_function`."""
    if isinstance(feature_map, FeatureMap):
        return feature_map
    if callable(feature_map):
        return from_function(feature_map)
    raise V.OptionError(
        f"feature_map is {type(feature_map).__name__} {feature_map!r}; expected a "
        f"FeatureMap such as feature_maps.EluPlusOne() or a callable (..., D) -> (..., F)"
    )
