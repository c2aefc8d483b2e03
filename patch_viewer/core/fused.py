"""Filters that run inside the compiled merge (the fused stream of :func:`process`).

Where a filter is element-wise, or element-wise once a statistic of its own patch is known,
the compiled backend applies it while it merges, reading each patch where it lies in the
image: no patch stack and no filtered stack is ever stored. ``invert``, ``minmax`` and
``zscore`` become ``(v - c) / d`` with one ``(c, d)`` per patch (computed in the filter's
dtype, so ``invert`` and ``minmax`` give the batch path's bits; ``zscore`` takes its mean and
deviation from float64 sums where NumPy sums pairwise in float32, so it agrees to a few ulp);
a function marked with :func:`elementwise` is compiled and called on each value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # for annotations only (fused_form imports the registry when called)
    from .filter_registry import PatchFilter

__all__ = ["Fused", "elementwise", "fused_form"]


def elementwise(func: Callable) -> Callable:
    """Mark ``func(x) -> y`` (written for scalars and arrays alike, such as ``x * 2``) as an
    element-wise filter: :func:`process` then runs it inside the compiled merge, with no
    filtered patch stored. Elsewhere it is called on whole stacks.

    Examples
    --------
    >>> import patch_viewer as pv
    >>> double = pv.elementwise(lambda x: x * np.float32(2))
    >>> image = np.ones((8, 8), np.float32)
    >>> r = pv.process(image, pv.PatchGrid(image.shape, 4, stride=2), double, metrics=False)
    >>> float(r.merged.max())
    2.0
    """

    def on_stack(stack, spatial_axes):
        return func(stack)

    on_stack.__elementwise__ = func  # type: ignore[attr-defined]  # the marker fused_form reads
    on_stack.__name__ = getattr(func, "__name__", "elementwise")
    on_stack.__doc__ = getattr(func, "__doc__", None)
    return on_stack


@dataclass(frozen=True)
class Fused:
    """How the compiled merge applies a filter: ``kind`` is ``"identity"``, ``"range"``
    (per-patch min and max), ``"moments"`` (per-patch mean and deviation) or ``"map"``."""

    kind: str
    dtype: np.dtype  # what the filter returns (and the kernels read the image as)
    rule: Callable | None = None  # (stat_a, stat_b) -> (c, d), or the compiled function


def _invert(lo, hi):
    return lo + hi, np.full_like(lo, -1)  # c - v = (v - c) / -1, exactly


def _minmax(lo, hi):
    span = hi - lo
    return lo, np.where(span > 0, span, np.inf).astype(lo.dtype)  # constant patches: 0


def _zscore(mean, std):
    return mean, np.where(std > 0, std, np.inf).astype(mean.dtype)


_RULES = {
    "invert": ("range", _invert),
    "minmax": ("range", _minmax),
    "zscore": ("moments", _zscore),
}


def fused_form(filt: PatchFilter, params: dict, dtype: np.dtype, channels: int) -> Fused | None:
    """The fused form of a :class:`~patch_viewer.core.filter_registry.PatchFilter` for images of
    ``dtype`` with ``channels`` channels, or None where it must run on materialised batches."""
    from .filter_registry import FILTERS

    dtype = np.dtype(dtype)
    as_float = dtype if dtype.kind == "f" else np.dtype(np.float32)
    fn = getattr(filt.func, "__elementwise__", None)
    if fn is not None:
        if dtype.kind != "f" or dtype.itemsize < 4 or params:
            return None
        try:
            out = np.asarray(fn(np.zeros(1, dtype)))
        except Exception:  # noqa: BLE001 (the batch path reports it)
            return None
        if out.dtype != dtype or out.shape != (1,):
            return None
        return Fused("map", dtype, _compiled(fn))
    if FILTERS.get(filt.name) is not filt:
        return None
    if filt.name == "identity":
        return Fused("identity", dtype)
    if filt.name in _RULES and channels == 1 and as_float.itemsize >= 4:
        kind, rule = _RULES[filt.name]
        return Fused(kind, as_float, rule)
    return None


_COMPILED: dict = {}


def _compiled(fn):
    from numba import njit

    if fn not in _COMPILED:
        _COMPILED[fn] = njit(fn)
    return _COMPILED[fn]


class PatchStats:
    """Per-patch statistics of one padded canonical image ``(1, *spatial, 1)``, for grid rows
    taken a batch at a time: ``(a, b)`` arrays of shape ``(1, rows, g1, g2)`` (the kernels'
    three grid axes), the filter's ``rule`` then makes them ``(c, d)``.

    Minima and maxima come from separable sliding-window filters over the image (scipy's
    ``minimum_filter1d``: O(image), not O(patches x patch area)) sampled at the origins; an
    image holding NaN takes a compiled per-patch pass instead (NaN then propagates, as in
    ``np.min``). Means and deviations are one compiled two-pass per patch.
    """

    def __init__(self, fused: Fused, padded: np.ndarray, grid):
        from scipy import ndimage as ndi

        self.fused, self.grid = fused, grid
        self.maps = None
        if fused.kind == "range":
            x = padded[0, ..., 0]
            if not np.isnan(x).any():
                lo = hi = x
                for ax, p in enumerate(grid.patch_size):
                    lo = ndi.minimum_filter1d(lo, p, axis=ax, origin=-(p // 2))
                    hi = ndi.maximum_filter1d(hi, p, axis=ax, origin=-(p // 2))
                self.maps = (lo, hi)

    def __call__(self, src, geo, row0: int, rows: int):
        from .merge import kernels_fused as K
        from .merge.plan import three_axes

        dtype = self.fused.dtype
        shape = (1, len(src[2]), len(src[3]), len(src[4]))
        if self.maps is not None:
            origins = [np.asarray(o) for o in self.grid.origins]
            origins[0] = origins[0][row0 : row0 + rows]
            index = np.ix_(*origins)
            counts = three_axes([len(o) for o in origins], self.grid, 1)
            a, b = (m[index].reshape([1, *counts]).astype(dtype) for m in self.maps)
        else:
            a, b = np.empty(shape, dtype), np.empty(shape, dtype)
            stats = K.patch_range if self.fused.kind == "range" else K.patch_moments
            stats(*src, geo, 1, a, b)
        assert self.fused.rule is not None  # "range" and "moments" forms carry their rule
        return self.fused.rule(a, b)
