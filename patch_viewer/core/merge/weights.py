"""Overlap weights: how much window weight covers each pixel, and which patch owns it."""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import numpy as np

from .._layout import split_regular
from ..checks import check_grid, check_out
from ..grid import PatchGrid
from ..windows import make_window, separable_factors
from .kernels_numpy import overlap_add

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = ["coverage_mask", "max_weight", "outer", "weight_map", "weight_sums", "weights_in"]


def outer(factors, ufunc, out: np.ndarray | None = None) -> np.ndarray:
    """``ufunc.outer`` over a list of 1-D arrays: the nD map of a separable quantity, written
    into ``out`` if given (its last step rounds once into ``out``'s dtype)."""
    head = factors[0]
    for f in factors[1:-1]:
        head = ufunc.outer(head, f)
    if len(factors) == 1:
        return head if out is None else _copied(out, head)
    return ufunc.outer(head, factors[-1], out=out)


def _copied(out: np.ndarray, values: np.ndarray) -> np.ndarray:
    np.copyto(out, values, casting="same_kind")
    return out


def coverage_mask(grid: PatchGrid) -> np.ndarray:
    return outer([c > 0 for c in grid.coverage_1d()], np.logical_and)


def weight_map(
    grid: PatchGrid,
    window: str | ArrayLike = "uniform",
    *,
    out: np.ndarray | None = None,
    **window_params: float,
) -> np.ndarray:
    """Sum of the window weights of all patches covering each pixel.

    With the uniform window this is the coverage count. Separable windows cost O(H + W): the
    map is an outer product of 1-D sums. ``"overlap-tile"`` gives 1 where covered, else 0.

    ``out``, if given, receives the map: a C-contiguous, writeable float array of the grid's
    spatial shape. The map is computed in float64 and rounded once into ``out``'s dtype (a
    float32 ``out`` holds ``weight_map(grid).astype(np.float32)``, without the float64 map).

    Returns
    -------
    ndarray
        float64 (or ``out``), of the grid's spatial shape (no channel axis).

    Examples
    --------
    >>> weight_map(PatchGrid((6,), 4, stride=2)).tolist()
    [1.0, 1.0, 2.0, 2.0, 1.0, 1.0]
    """
    check_grid(grid)
    if out is None:
        return weights_in(grid, window, window_params, np.float64)
    check_out(out, grid.spatial_shape, "f")
    tile = isinstance(window, str) and window == "overlap-tile"
    sums = None if tile else weight_sums(grid, window, window_params)
    if sums is None:
        return _copied(out, weights_in(grid, window, window_params, np.float64))
    return outer([w.astype(np.float64) for w in sums], np.multiply, out=out)  # rounded once


def weight_sums(grid: PatchGrid, window, window_params: dict):
    """Per-axis 1-D weight sums of a separable window (the weight map is their outer
    product), or None for windows that do not separate."""
    factors = separable_factors(window, grid.patch_size, **window_params)
    if factors is None:
        return None
    sums = []
    for f, o, n in zip(factors, grid.origins, grid.spatial_shape):
        starts = np.zeros(max(n, int(o[-1]) + 1))
        starts[o] = 1.0  # origins are distinct
        sums.append(np.convolve(starts, f)[:n])  # each origin contributes f from there on
    return sums


def max_weight(
    grid: PatchGrid, window: str | ArrayLike = "uniform", **window_params: float
) -> float:
    """The largest value of :func:`weight_map`, in O(H + W) for the named windows (no map is
    made): the contrast limit of a weight heatmap that is computed lazily.

    Examples
    --------
    >>> max_weight(PatchGrid((100, 100), 39, stride=1))
    1521.0
    """
    if isinstance(window, str) and window == "overlap-tile":
        return 1.0
    sums = weight_sums(grid, window, window_params)
    if sums is None:
        return float(weights_in(grid, window, window_params, np.float64).max())
    return float(math.prod(float(w.max()) for w in sums))


def weights_in(grid: PatchGrid, window, window_params: dict, dtype) -> np.ndarray:
    """:func:`weight_map` computed in ``dtype``."""
    if isinstance(window, str) and window == "overlap-tile":
        if window_params:
            raise TypeError("window 'overlap-tile' takes no parameters")
        return coverage_mask(grid).astype(dtype)
    sums = weight_sums(grid, window, window_params)
    if sums is not None:
        return outer([w.astype(dtype) for w in sums], np.multiply)
    win = make_window(window, grid.patch_size, **window_params)
    assert win is not None  # uniform and overlap-tile have separable sums (above)
    extent = tuple(n + s for n, s in zip(grid.padded_shape, grid.stride))
    acc = np.zeros((1,) + extent + (1,), dtype)
    runs = [split_regular(o, s) for o, s in zip(grid.origins, grid.stride)]
    for combo in itertools.product(*runs):
        g = tuple(z - a for a, z in combo)
        a = np.broadcast_to(win[..., None], (1,) + g + win.shape + (1,))
        origin = tuple(int(o[a0]) for o, (a0, _) in zip(grid.origins, combo))
        overlap_add(acc, a, origin, grid.stride, np.add, 0.0)
    return acc[(0,) + tuple(slice(0, n) for n in grid.spatial_shape) + (0,)]
