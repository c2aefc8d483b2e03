"""The built-in per-patch filters, each vectorised over a whole stack of patches.

Each is registered in ``FILTERS`` (:mod:`.filter_registry`) when this module is imported, and
called as ``func(stack, spatial_axes, **params)``. None mixes values between patches:
``scipy.ndimage`` filters get a zero sigma (size 1) on every other axis, and per-patch
statistics reduce over ``spatial_axes`` only. Separable linear filters run on the compiled
kernels of :mod:`.separable` on the numba backend.

Dtypes: the built-in filters other than identity and median return float32 for integer and
float16 stacks (scipy.ndimage has no float16 arithmetic), and the input's dtype for float32 and
float64; median keeps integer dtypes and computes float16 in float32.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from .filter_registry import FILTERS, Param, PatchFilter, get_filter, register_filter

# The registry moved to .filter_registry; what this module exported from there stays
# importable from here (and importing it registers the built-in filters).
__all__ = ["FILTERS", "Param", "PatchFilter", "get_filter", "otsu_thresholds", "register_filter"]


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
