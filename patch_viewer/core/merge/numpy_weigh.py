"""Sums divided by their weights on the NumPy engine, one axis at a time.

For a separable window the weight map is the outer product of per-axis sums
(:func:`.weights.weight_sums`), so :class:`.numpy_merger.NumpyMerger` divides a region of
sums by one factor per axis (:func:`divide_separable`) and never builds an image-sized weight
map. :func:`weight_factors` gives those factors (and their reciprocals) in the sums' dtype;
:func:`fuse_last` lets the last step run along whole rows instead of the channel axis.
"""

from __future__ import annotations

import numpy as np

from ..grid import PatchGrid
from .weights import weight_sums

__all__ = ["divide_separable", "fuse_last", "weight_factors"]


def weight_factors(grid: PatchGrid, window, params, acc_dtype: np.dtype):
    """Per-axis weight sums and their reciprocals (in the sums' dtype ``acc_dtype``), or None
    when the window does not separate."""
    is_tile = isinstance(window, str) and window == "overlap-tile"
    sums = None if is_tile else weight_sums(grid, window, params)
    if sums is not None:
        # reciprocals serve float sums only (see divide_separable); an integer sum's would be
        # 1/0 cast to an integer where a pixel is uncovered
        floats = acc_dtype.kind == "f"
        with np.errstate(divide="ignore"):
            sums = [
                (
                    w.astype(acc_dtype),
                    (1.0 / w).astype(acc_dtype) if floats else None,
                )
                for w in sums
            ]
    return sums


def divide_separable(
    region: np.ndarray, dst: np.ndarray, factors, rows: slice, recip: bool
) -> None:
    """``dst = region / weights`` for image rows ``rows``, one axis' ``factors`` at a time
    (from :func:`weight_factors`); ``region`` may be overwritten.

    ``recip``: where the sums are kept in float64 for a float32 result, each step multiplies
    by the reciprocal: the result is within a few float64 ulps of the quotient, so it rounds
    to the same float32 (the identity round trip stays exact) at a fraction of a division's
    cost. Where the sums are in the result's own dtype each step divides out one exact
    factor, so an exact multiple of the weights comes back exactly.
    """
    op = np.multiply if recip else np.divide
    last = len(factors) - 1
    for k, (w, inv) in enumerate(factors):
        f = inv if recip else w
        f = f[rows] if k == 0 else f
        target = dst if k == last else region
        if k == last:
            # Spread the last axis' factor over the channels, so that the inner loop runs
            # along whole rows instead of the channel axis (a factor broadcast over it).
            a, t = fuse_last(region), fuse_last(target)
            if a is not None and t is not None:
                op(a, np.repeat(f, region.shape[-1]), out=t)
                return
        shape = [1] * region.ndim
        shape[1 + k] = len(f)
        op(region, f.reshape(shape), out=target)
        region = target


def fuse_last(a: np.ndarray):
    """View ``(..., W, C)`` as ``(..., W * C)`` where memory allows it, else None.

    Examples
    --------
    >>> fuse_last(np.zeros((2, 3, 4))).shape
    (2, 12)
    """
    if a.strides[-2] != a.strides[-1] * a.shape[-1]:
        return None
    return np.lib.stride_tricks.as_strided(
        a,
        a.shape[:-2] + (a.shape[-2] * a.shape[-1],),
        a.strides[:-2] + a.strides[-1:],
        writeable=a.flags.writeable,
    )
