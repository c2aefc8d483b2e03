"""The weights an :class:`~patch_viewer.core.accumulator.Accumulator` divides by, and the
geometry on the kernels' three axes they are computed on.

The scatter kernels (:mod:`.merge.kernels_scatter`) see every image as three spatial axes
(:data:`.merge.plan.AXES3`: 1-D images on the last, 2-D on the first and last). Here are the
coverage counts of boxes at any origins (a difference array: O(patches + image)), a window
added at every origin, the per-axis sums of a whole grid streamed in order (whose outer
product is the weight map, so no origin need be kept), and the weights of one band of output
rows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np

from .grid import PatchGrid
from .merge.plan import AXES3, backend
from .windows import window_factors

__all__ = [
    "Placements",
    "add_windows",
    "axis_sums",
    "band_weights",
    "box_counts",
    "on_three_axes",
    "origin_tables",
]


def on_three_axes(values, nd: int, fill) -> list:
    """``values`` (one per spatial axis of an ``nd``-D image) on the kernels' three axes,
    ``fill`` elsewhere (:func:`.merge.plan.three_axes`, for a dimension instead of a grid).

    Examples
    --------
    >>> on_three_axes((5, 7), 2, 1)
    [5, 1, 7]
    """
    out = [fill] * 3
    for v, ax in zip(values, AXES3[nd]):
        out[ax] = v
    return out


def box_counts(org: np.ndarray, patch, shape, mult: np.ndarray | None = None) -> np.ndarray:
    """How many boxes of ``patch`` at ``org`` (all inside ``shape``) cover each pixel (int64),
    the box at ``org[k]`` counting ``mult[k]`` times (default once): one weighted bincount of
    the corners, then a cumulative sum per axis.

    Examples
    --------
    >>> box_counts(np.array([[0], [2]]), (3,), (6,)).tolist()
    [1, 1, 2, 1, 1, 0]
    """
    big = tuple(n + 1 for n in shape)
    counts = np.zeros(math.prod(big), np.int64)
    if len(org):
        p = np.array(patch)
        corners = [np.array(c) for c in itertools.product((0, 1), repeat=len(shape))]
        flat = np.concatenate([np.ravel_multi_index(tuple((org + c * p).T), big) for c in corners])
        sign = np.repeat([(-1.0) ** int(c.sum()) for c in corners], len(org))
        if mult is not None:
            sign *= np.tile(mult, len(corners))
        counts += np.rint(np.bincount(flat, sign, minlength=counts.size)).astype(np.int64)
    counts = counts.reshape(big)
    for ax in range(len(shape)):
        np.cumsum(counts, axis=ax, out=counts)
    return counts[tuple(slice(0, n) for n in shape)]


def add_windows(out: np.ndarray, win: np.ndarray, org: np.ndarray, three=False, mult=None) -> None:
    """``win`` added to ``out`` at every origin (the weight map of the added patches), at
    ``org[k]`` ``mult[k]`` times (default once); ``three``: ``out``, ``win`` and ``org`` are on
    the kernels' three axes already."""
    if mult is not None:
        org = np.repeat(org, mult, axis=0)
    nd = 3 if three else org.shape[1]
    if backend() == "numba":
        from .merge.kernels_scatter import scatter_window

        o3 = np.ascontiguousarray(org, np.int64)
        if not three:
            o3 = np.zeros((len(org), 3), np.int64)
            for ax, a3 in enumerate(AXES3[nd]):
                o3[:, a3] = org[:, ax]
        p3 = win.shape if three else on_three_axes(win.shape, nd, 1)
        n3 = out.shape if three else on_three_axes(out.shape, nd, 1)
        geo = np.array([p3[0], p3[1], p3[2], n3[1], n3[2]], np.int64)
        scatter_window(np.ascontiguousarray(win, np.float64).reshape(-1), o3, geo, out.reshape(-1))
        return
    for o in org:
        out[tuple(slice(a, a + p) for a, p in zip(o, win.shape))] += win


def origin_tables(grid: PatchGrid, scale: tuple[Fraction, ...]):
    """``(scaled_origins, (g3, o0, o1, o2))``: the grid's origins per spatial axis at
    ``scale`` (output pixels), and the grid counts and scaled origins on the kernels' three
    axes (as :func:`.merge.kernels_scatter.grid_origins` takes them)."""
    nd = grid.ndim
    scaled_origins = [
        (np.asarray(o, np.int64) * f.numerator) // f.denominator
        for o, f in zip(grid.origins, scale)
    ]
    for o, f in zip(grid.origins, scale):
        if f.denominator != 1 and (np.asarray(o) * f.numerator % f.denominator).any():
            bad = np.asarray(o)[np.asarray(o) * f.numerator % f.denominator != 0]
            raise ValueError(
                f"origins {bad[:3].tolist()} do not map to whole output pixels at scale {f}"
            )
    zero = np.zeros(1, np.int64)
    o3 = on_three_axes(scaled_origins, nd, zero)
    g3 = np.array(on_three_axes(grid.grid_shape, nd, 1), np.int64)
    return scaled_origins, (g3, *[np.ascontiguousarray(o) for o in o3])


def axis_sums(grid: PatchGrid, scale, patch_size, extent, window) -> tuple[list, list]:
    """Per spatial axis, the window sums and the coverage counts (float64) of the whole grid
    at ``scale``, over ``extent`` output pixels: ``window`` is ``(name, params)`` of a
    separable window, or None for the uniform one."""
    sums, counts = [], []
    for ax, (o, f, p, n) in enumerate(zip(grid.origins, scale, patch_size, extent)):
        w = np.ones(p) if window is None else window_factors(window[0], patch_size, **window[1])[ax]
        starts = (np.asarray(o, np.int64) * f.numerator) // f.denominator
        idx = (starts[:, None] + np.arange(p)[None, :]).ravel()
        sums.append(np.bincount(idx, np.tile(w, len(starts)), minlength=n)[:n])
        counts.append(np.bincount(idx, minlength=n)[:n].astype(np.float64))
    return sums, counts


def band_weights(
    org: np.ndarray, mult: np.ndarray | None, y0: int, y1: int, p3, e3, win, nd: int
) -> np.ndarray:
    """The weights of canvas rows ``y0 .. y1`` (float64, on the kernels' three axes) from the
    origins ``org`` ``(N, 3)`` sorted by row, each added ``mult`` times (None: once): the
    coverage counts when ``win`` is None, else the sums of ``win`` (patch ``p3``, canvas
    ``e3`` on the three axes)."""
    lo = np.searchsorted(org[:, 0], y0 - p3[0] + 1)
    hi = np.searchsorted(org[:, 0], y1)
    near = org[lo:hi].copy()
    mult = None if mult is None else mult[lo:hi]
    near[:, 0] += p3[0] - y0  # into a buffer with p0 rows of margin on each side
    shape = (y1 - y0 + 2 * p3[0], e3[1], e3[2])
    if win is None and nd >= 2:  # counts: a difference array over the spatial axes
        ax = list(AXES3[nd])
        counts = box_counts(near[:, ax], [p3[a] for a in ax], [shape[a] for a in ax], mult)
        return counts.reshape(shape)[p3[0] : p3[0] + y1 - y0].astype(np.float64)
    buf = np.zeros(shape)
    add_windows(buf, np.ones(p3) if win is None else win.reshape(p3), near, True, mult)
    return buf[p3[0] : p3[0] + y1 - y0]


class Placements:
    """Where the patches added to an accumulator went: how often each grid patch was added
    (by flat index: a count per patch, whatever the number of batches), and the kernel
    origins of patches added off the grid. The weights are computed from these.

    ``grid_origins(idx)`` gives the kernel origins ``(N, 3)`` of flat grid indices, and
    ``grid_counts()`` the per-axis coverage counts of the whole grid (called once, if ever).
    """

    def __init__(
        self,
        n_patches: int,
        grid_origins: Callable[[np.ndarray], np.ndarray],
        grid_counts: Callable[[], list],
    ) -> None:
        self.n_patches = n_patches
        self.hits: np.ndarray | None = None
        self.origins: list[np.ndarray] = []
        self.version = 0  # of the two above: the caches below hold the version they are of
        self._grid_origins, self._grid_counts = grid_origins, grid_counts
        self._counts: list | None = None
        self._uniform: tuple = (-1, None)
        self._placed: tuple = (-1, None)

    def record(self, o3: np.ndarray, idx: np.ndarray | None) -> None:
        """A batch at kernel origins ``o3``: grid patches ``idx``, or off the grid (None)."""
        if idx is None:
            self.origins.append(o3)
        else:
            if self.hits is None:
                self.hits = np.zeros(self.n_patches, np.int64)
            np.add.at(self.hits, idx, 1)
        self.version += 1

    def uniform_counts(self) -> list | None:
        """Per-axis counts whose outer product is the coverage count, when every grid patch
        was added equally often (in any order) and none off the grid; else None."""
        version, value = self._uniform
        if version != self.version:
            value, hits = None, self.hits
            if hits is not None and not self.origins and hits[0] > 0 and (hits == hits[0]).all():
                if self._counts is None:
                    self._counts = self._grid_counts()
                value = [self._counts[0] * int(hits[0]), *self._counts[1:]]
            self._uniform = (self.version, value)
        return value

    def placed(self) -> tuple[np.ndarray, np.ndarray]:
        """Every added patch's kernel origin ``(N, 3)``, sorted by row, and how often it was
        added ``(N,)`` (each grid patch once, with its count)."""
        version, value = self._placed
        if version != self.version:
            parts, mults = [np.zeros((0, 3), np.int64)], [np.zeros(0, np.int64)]
            if self.hits is not None:
                chosen = np.flatnonzero(self.hits)
                parts.append(self._grid_origins(chosen))
                mults.append(self.hits[chosen])
            parts += self.origins
            mults += [np.ones(len(o), np.int64) for o in self.origins]
            org, mult = np.concatenate(parts), np.concatenate(mults)
            order = np.argsort(org[:, 0], kind="stable")
            value = (org[order], mult[order])
            self._placed = (self.version, value)
        return value
