"""Per-patch filters, each vectorised over a whole stack of patches.

A filter is called as ``func(stack, spatial_axes, **params)``: ``stack`` holds many patches (and
possibly channels), ``spatial_axes`` names the axes of one patch. It returns an array of the same
shape and never mixes values between patches: ``scipy.ndimage`` filters get a zero sigma (size 1)
on every other axis, and per-patch statistics reduce over ``spatial_axes`` only.

Dtypes: the built-in filters other than identity and median return float32 for integer and
float16 stacks (scipy.ndimage has no float16 arithmetic), and the input's dtype for float32 and
float64; median keeps integer dtypes and computes float16 in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage as ndi

from .checks import check_number

if TYPE_CHECKING:
    from .predict import Predictor

__all__ = ["FILTERS", "Param", "PatchFilter", "get_filter", "otsu_thresholds", "register_filter"]


@dataclass(frozen=True)
class Param:
    """A filter parameter: its default and allowed range (the GUI builds a control from it)."""

    default: float
    min: float
    max: float
    kind: type = float
    doc: str = ""

    def __post_init__(self):
        for key in ("default", "min", "max"):
            check_number(getattr(self, key), f"Param `{key}`")
        if self.kind not in (int, float):
            raise TypeError(f"Param `kind` must be int or float, got {self.kind!r}")
        if not self.min <= self.default <= self.max:
            raise ValueError(
                f"Param `default` must be in [min, max] = [{self.min}, {self.max}], "
                f"got {self.default!r}"
            )

    def check(self, name: str, value: float) -> float:
        """``value`` checked against the declared range, as ``kind``."""
        check_number(
            value, f"filter parameter `{name}`", self.min, self.max, integer=self.kind is int
        )
        return self.kind(value)


@dataclass(frozen=True)
class PatchFilter:
    """A named per-patch filter with declared parameters."""

    name: str
    func: Callable[..., Any]
    params: dict[str, Param] = field(default_factory=dict)
    doc: str = ""
    #: ``halo(**params) -> int``: how far (px) the filter reaches when applied to a whole image,
    #: or None for filters built on per-image statistics (invert, zscore, ...). The chunked
    #: path needs it to compute ``reference="filter"`` block by block.
    halo: Callable[..., int] | None = None

    def validate(self, params: Mapping[str, float] | None) -> dict[str, float]:
        """Parameters with defaults filled in, checked against their declared ranges."""
        params = dict(params or {})
        unknown = set(params) - set(self.params)
        if unknown:
            raise TypeError(
                f"filter {self.name!r} takes parameters {tuple(self.params)}, "
                f"got unknown {tuple(sorted(unknown))}"
            )
        return {k: p.check(k, params.get(k, p.default)) for k, p in self.params.items()}

    def __call__(
        self, stack: np.ndarray, spatial_axes: Sequence[int], **params: float
    ) -> np.ndarray:
        # Non-finite pixels give NaN where a patch statistic is undefined (documented), not
        # RuntimeWarnings from inside NumPy.
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            out = self.func(stack, tuple(spatial_axes), **self.validate(params))
        if np.shape(out) != np.shape(stack):
            raise ValueError(
                f"filter {self.name!r} returned shape {np.shape(out)} for input {np.shape(stack)}"
            )
        return out


#: Filters and predictors by name (built in, registered, or from the entry-point group).
FILTERS: dict[str, PatchFilter | Predictor] = {}


def register_filter(
    name: str,
    func: Callable[..., Any] | None = None,
    *,
    params: dict[str, Param] | None = None,
    batched: bool = True,
    doc: str = "",
    halo: Callable[..., int] | None = None,
) -> Callable[..., Any]:
    """Add a filter to the registry (usable as a decorator).

    Parameters
    ----------
    name : str
        Registry name.
    func : callable
        ``func(stack, spatial_axes, **params)`` when ``batched`` (vectorised over the stack), or
        ``func(patch, **params)`` on one patch of shape ``patch_size`` (one channel at a time)
        when not.
    params : dict of str -> Param, optional
        Declared parameters with defaults and ranges.
    batched : bool, optional
        Whether ``func`` handles a whole stack; per-patch callables are looped over (slower).
    doc : str, optional
        One-line description (default: the function's docstring).
    halo : callable, optional
        ``halo(**params) -> int``, the filter's reach in pixels when applied to a whole image
        (a 3x3 kernel reaches 1). Declaring it lets the chunked (dask) path compute
        ``reference="filter"``; leave it None when the filter uses whole-image statistics.

    Examples
    --------
    >>> @register_filter("square", params={})
    ... def square(stack, spatial_axes):
    ...     return stack ** 2
    >>> FILTERS["square"](np.full((2, 3), 3.0), (1,)).tolist()
    [[9.0, 9.0, 9.0], [9.0, 9.0, 9.0]]
    >>> del FILTERS["square"]
    """
    _check_registration(name, func, params, halo)

    def deco(f):
        _check_registration(name, f, params, halo)
        call = f if batched else _per_patch(f)
        FILTERS[name] = PatchFilter(
            name, call, dict(params or {}), doc or (f.__doc__ or "").strip(), halo
        )
        return f

    return deco if func is None else deco(func)


def _check_registration(name, func, params, halo) -> None:
    """Refuse a bad registration at once, not at the first call (each message names the
    argument)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"filter `name` must be a non-empty string, got {name!r}")
    if func is not None and not callable(func):
        raise TypeError(f"filter `func` must be callable, got {func!r}")
    if params is not None and not isinstance(params, dict):
        raise TypeError(f"filter `params` must be a dict of name -> Param, got {params!r}")
    for key, value in (params or {}).items():
        if not (isinstance(key, str) and key.isidentifier()):
            raise TypeError(f"filter `params` keys must be identifiers, got {key!r}")
        if not isinstance(value, Param):
            raise TypeError(
                f"filter `params[{key!r}]` must be a Param(default, min, max), got {value!r}"
            )
    if halo is not None and not callable(halo):
        raise TypeError(f"filter `halo` must be callable or None, got {halo!r}")


def get_filter(spec: str | PatchFilter | Predictor | Callable[..., Any]) -> PatchFilter | Predictor:
    """A :class:`PatchFilter` (or a :class:`~patch_viewer.core.predict.Predictor`) from a
    registered name, a PatchFilter or Predictor, or a batched callable."""
    from .predict import Predictor

    if isinstance(spec, (PatchFilter, Predictor)):
        return spec
    if isinstance(spec, str):
        if spec not in FILTERS:
            raise ValueError(f"`patch_filter` must be one of {tuple(FILTERS)}, got {spec!r}")
        return FILTERS[spec]
    if callable(spec):
        return PatchFilter(getattr(spec, "__name__", "custom"), spec)
    raise TypeError(f"`patch_filter` must be a name, a PatchFilter or a callable, got {spec!r}")


def _per_patch(f):
    def call(stack, spatial_axes, **params):
        nd = len(spatial_axes)
        moved = np.moveaxis(stack, spatial_axes, range(stack.ndim - nd, stack.ndim))
        out = np.empty(moved.shape, dtype=np.result_type(stack.dtype, np.float32))
        for idx in np.ndindex(moved.shape[:-nd]):
            out[idx] = f(moved[idx], **params)
        return np.moveaxis(out, range(stack.ndim - nd, stack.ndim), spatial_axes)

    return call


def _float(stack):
    """Floats stay as they are, except float16, which scipy.ndimage cannot filter: it and
    integers compute (and come back) in float32."""
    return (
        stack if stack.dtype.kind == "f" and stack.dtype.itemsize >= 4 else stack.astype(np.float32)
    )


def _compiled():
    """:mod:`.separable` (compiled, bit-identical to scipy) on the numba backend, else None:
    the NumPy backend calls scipy.ndimage itself."""
    from .merge.plan import backend

    if backend() != "numba":
        return None
    from . import separable

    return separable


def _gauss_reach(sigma: float) -> int:
    return int(4.0 * sigma + 0.5)  # scipy.ndimage's default truncate=4.0


def _per_axis(stack, spatial_axes, value, other):
    return [value if ax in spatial_axes else other for ax in range(stack.ndim)]


# --------------------------------------------------------------------------- built-in filters
@register_filter("identity", halo=lambda: 0)
def identity(stack, spatial_axes):
    """No change (the merge then reproduces the image exactly)."""
    return stack


@register_filter(
    "gaussian",
    params={"sigma": Param(1.0, 0.1, 20.0, float, "blur radius (px)")},
    halo=_gauss_reach,
)
def gaussian(stack, spatial_axes, sigma):
    """Gaussian blur inside each patch (reflecting at the patch border)."""
    x = _float(stack)
    if (fast := _compiled()) is not None:
        return fast.gaussian(x, spatial_axes, sigma)
    return ndi.gaussian_filter(
        x, _per_axis(stack, spatial_axes, sigma, 0.0), output=np.empty_like(x)
    )


@register_filter(
    "median", params={"size": Param(3, 1, 31, int, "window size (px)")}, halo=lambda size: size // 2
)
def median(stack, spatial_axes, size):
    """Median filter inside each patch (float16 computes in float32)."""
    x = stack.astype(np.float32) if stack.dtype == np.float16 else stack
    return ndi.median_filter(
        x, size=_per_axis(stack, spatial_axes, size, 1), output=np.empty_like(x)
    )


@register_filter(
    "uniform",
    params={"size": Param(3, 1, 31, int, "window size (px)")},
    halo=lambda size: size // 2,
)
def uniform(stack, spatial_axes, size):
    """Moving-average (box) filter inside each patch."""
    x = _float(stack)
    if (fast := _compiled()) is not None:
        return fast.uniform(x, spatial_axes, size)
    return ndi.uniform_filter(
        x, size=_per_axis(stack, spatial_axes, size, 1), output=np.empty_like(x)
    )


@register_filter("sobel", halo=lambda: 1)
def sobel(stack, spatial_axes):
    """Gradient magnitude (Sobel) inside each patch."""
    x = _float(stack)
    fast = _compiled()

    def correlate(v, weights, axis):
        if fast is not None:
            return fast.correlate1d(v, weights, axis)
        return ndi.correlate1d(v, weights, axis=axis, output=np.empty_like(v))

    total = np.zeros_like(x)  # keeps the stack's memory order (as do the outputs below)
    for ax in spatial_axes:
        # ndi.sobel would smooth along every other axis, patch axes included: smooth only
        # along the other spatial axes so that patches never mix.
        g = correlate(x, [-1.0, 0.0, 1.0], ax)
        for other in spatial_axes:
            if other != ax:
                g = correlate(g, [1.0, 2.0, 1.0], other)
        total += g * g
    return np.sqrt(total, out=total)


@register_filter(
    "unsharp",
    params={
        "radius": Param(1.0, 0.1, 20.0, float, "blur radius (px)"),
        "amount": Param(1.0, 0.0, 10.0, float, "sharpening strength"),
    },
    halo=lambda radius, amount: _gauss_reach(radius),
)
def unsharp(stack, spatial_axes, radius, amount):
    """Unsharp mask: ``x + amount * (x - gaussian(x, radius))`` inside each patch."""
    x = _float(stack)
    blurred = gaussian(x, spatial_axes, radius)
    return x + amount * (x - blurred)


def _reduce(ufunc, x, axes):
    """``ufunc.reduce`` over the patch ``axes`` (kept as size 1), one axis at a time from the
    outermost in memory (whole blocks combine elementwise, then a much smaller array is
    reduced along its inner axis): fast whatever the stack's layout, including the
    offset-major stacks the streaming pipeline hands out."""
    other = [abs(x.strides[a]) for a in range(x.ndim) if a not in axes and x.shape[a] > 1]
    if all(abs(x.strides[a]) < min(other, default=np.inf) for a in axes if x.shape[a] > 1):
        return ufunc.reduce(x, axis=tuple(axes), keepdims=True)  # patch-major: one pass
    out = x
    for ax in sorted(axes, key=lambda a: -abs(x.strides[a])):
        out = ufunc.reduce(out, axis=ax, keepdims=True)
    return out


def _apply(ufunc, a, b, like):
    """``ufunc(a, b)`` into a new array laid out like ``like``, iterating in its memory order.

    A per-patch operand (size 1 on the patch axes) is first spread over every axis but the
    outermost in memory (a copy 1/p the size of the stack), so that the main pass runs over
    long contiguous blocks instead of one patch row at a time.
    """
    out = np.empty_like(like, dtype=np.result_type(a, b))
    mem = np.argsort(
        [-st if n > 1 else 0 for st, n in zip(like.strides, like.shape)], kind="stable"
    )
    outer = int(mem[0])
    block = like[(slice(None),) * outer + (slice(0, 1),)]

    def spread(v):
        v = np.asarray(v)
        if v.shape == like.shape or v.ndim != like.ndim or v.shape[outer] != 1:
            return np.broadcast_to(v, like.shape)
        full = np.empty_like(block, dtype=v.dtype)
        np.copyto(full, v)
        return np.broadcast_to(full, like.shape)

    ufunc(spread(a).transpose(mem), spread(b).transpose(mem), out=out.transpose(mem))
    return out


@register_filter("invert")
def invert(stack, spatial_axes):
    """Invert each patch within its own range: ``min + max - x``."""
    x = _float(stack)
    total = _reduce(np.minimum, x, spatial_axes) + _reduce(np.maximum, x, spatial_axes)
    return _apply(np.subtract, total, x, x)


@register_filter("zscore")
def zscore(stack, spatial_axes):
    """Per-patch normalisation to zero mean and unit variance (constant patches become 0)."""
    x = _float(stack)
    n = math.prod(x.shape[a] for a in spatial_axes)
    mean = _reduce(np.add, x, spatial_axes) / n
    out = _apply(np.subtract, x, mean, x)
    std = np.sqrt(_reduce(np.add, out * out, spatial_axes) / n)
    np.divide(out, std, out=out, where=std > 0)
    out[np.broadcast_to(std == 0, out.shape)] = 0
    return out


@register_filter("minmax")
def minmax(stack, spatial_axes):
    """Per-patch rescale to [0, 1] (constant patches become 0)."""
    x = _float(stack)
    lo = _reduce(np.minimum, x, spatial_axes)
    span = _reduce(np.maximum, x, spatial_axes) - lo
    out = _apply(np.subtract, x, lo, x)
    np.divide(out, span, out=out, where=span > 0)
    out[np.broadcast_to(span == 0, out.shape)] = 0
    return out


@register_filter("otsu", params={"nbins": Param(256, 2, 4096, int, "histogram bins")})
def otsu(stack, spatial_axes, nbins):
    """Per-patch Otsu threshold: 1 where a pixel is above its own patch's threshold, else 0."""
    x = _float(stack)
    t = otsu_thresholds(x, spatial_axes, nbins)
    return (x > t).astype(x.dtype)


def otsu_thresholds(x, spatial_axes, nbins=256):
    """Otsu threshold of every patch at once (same bins and rule as skimage.filters.threshold_otsu).

    Returns an array broadcastable against ``x`` (spatial axes kept with length 1).
    """
    nd = len(spatial_axes)
    moved = np.moveaxis(x, spatial_axes, range(x.ndim - nd, x.ndim))
    lead = moved.shape[:-nd]
    flat = moved.reshape(-1, int(np.prod(moved.shape[-nd:]))).astype(np.float64)
    n = flat.shape[0]
    lo = flat.min(axis=1, keepdims=True)
    hi = flat.max(axis=1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    idx = np.clip(((flat - lo) / span * nbins).astype(np.int64), 0, nbins - 1)
    counts = np.bincount((idx + np.arange(n)[:, None] * nbins).ravel(), minlength=n * nbins)
    hist = counts.reshape(n, nbins).astype(np.float64)
    centres = lo + (np.arange(nbins) + 0.5) * span / nbins
    w1 = np.cumsum(hist, axis=1)
    w2 = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
    m1 = np.cumsum(hist * centres, axis=1) / np.maximum(w1, 1)
    m2 = (np.cumsum((hist * centres)[:, ::-1], axis=1) / np.maximum(w2[:, ::-1], 1))[:, ::-1]
    var = w1[:, :-1] * w2[:, 1:] * (m1[:, :-1] - m2[:, 1:]) ** 2
    t = np.take_along_axis(centres, np.argmax(var, axis=1)[:, None], axis=1)[:, 0]
    t = np.where(hi[:, 0] > lo[:, 0], t, lo[:, 0])
    t = t.reshape(lead + (1,) * nd)
    return np.moveaxis(t, range(x.ndim - nd, x.ndim), spatial_axes)
