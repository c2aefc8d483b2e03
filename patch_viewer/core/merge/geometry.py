"""The grid on the compiled kernels' three axes (see :mod:`.plan`): origins, padded extents,
the weights' denominators, and each pixel's owner patch for the anchored mean and overlap-tile.
"""

from __future__ import annotations

import numpy as np

from ..grid import PatchGrid
from .plan import AXES3, MergePlan, Source, three_axes

__all__ = ["KernelGeometry", "owners"]


class KernelGeometry:
    """The grid on the kernels' three axes: origins, padded extents, weight denominators and
    the owner maps of the anchor ("first" patch) and of overlap-tile ("centre")."""

    def __init__(self, grid: PatchGrid, plan: MergePlan, c: int):
        self.grid, self.plan, self.c = grid, plan, c
        one = np.zeros(1, np.int64)
        # writeable copies: read-only arrays would compile a second signature of each kernel
        self.origins = three_axes([np.array(o, np.int64) for o in grid.origins], grid, one)
        self.patch = three_axes(grid.patch_size, grid, 1)
        self.extent = three_axes(
            [
                max(n, int(o[-1]) + p)
                for n, o, p in zip(grid.spatial_shape, grid.origins, grid.patch_size)
            ],
            grid,
            1,
        )
        self.spatial = three_axes(grid.spatial_shape, grid, 1)
        _, n1, n2 = self.extent
        self.wc = n2 * c
        self.row_len = n1 * self.wc  # elements of one band row

    def geo(self, src: Source) -> np.ndarray:
        """``(p0, p1, L, g1, g2)`` for a source (whose tables count its grid indices)."""
        return np.array(
            [self.patch[0], self.patch[1], self.patch[2] * self.c, len(src[3]), len(src[4])],
            np.int64,
        )

    def piece_origins(self, row0: int, rows: int):
        """Origins on the three axes for a piece of grid rows ``row0 .. row0 + rows``."""
        o = list(self.origins)
        ax = AXES3[self.grid.ndim][0]
        o[ax] = o[ax][row0 : row0 + rows]
        o2c = o[2] * self.c
        return o[0], o[1], o2c

    def denominators(self):
        """``(den0, den1, denk)`` for :func:`kernels_numba.weigh` (see :class:`MergePlan`)."""
        plan = self.plan
        n0, n1, _ = self.extent
        if plan.weights is not None:  # a window that does not separate: the whole map
            w = np.ones(self.extent + [self.c])
            w[: self.spatial[0], : self.spatial[1], : self.spatial[2]] = plan.weights.reshape(
                self.spatial + [1]
            )
            return np.ones(n0), np.ones(n1), w.reshape(n0 * n1, self.wc)
        factors = plan.factors
        if factors is None:  # max, min, pick: not weighed
            return None
        dens = []
        for f, n in zip(three_axes(factors, self.grid, np.ones(1)), self.extent):
            d = np.ones(n)
            d[: len(f)] = f
            dens.append(d)
        return dens[0], dens[1], np.repeat(dens[2], self.c)[None, :]

    def owner_maps(self, src: Source, rule: str, row0: int = 0, rows: int | None = None):
        """Source offsets of each pixel's owner along the three axes (-1: none in this piece;
        ``src`` holds the grid rows ``row0 .. row0 + rows``)."""
        maps = []
        ax0 = AXES3[self.grid.ndim][0]
        st, tables = src[1], src[2:]
        for ax, (o, p, n) in enumerate(zip(self.origins, self.patch, self.extent)):
            idx, off = owners(o, p, n, rule)
            if ax == ax0 and rows is not None:
                idx = np.where((idx >= row0) & (idx < row0 + rows), idx - row0, -1)
            stride_p = st[1 + ax] if ax < 2 else self.c
            found = tables[ax][np.clip(idx, 0, len(tables[ax]) - 1)] + off * stride_p
            maps.append(np.where(idx >= 0, found, -1))
        cols = (maps[2][:, None] + np.arange(self.c)[None, :]).ravel()
        cols[np.repeat(maps[2] < 0, self.c)] = -1
        return maps[0].astype(np.int64), maps[1].astype(np.int64), cols.astype(np.int64)


def owners(o: np.ndarray, p: int, n: int, rule: str):
    """Per pixel of one axis: the grid index of the patch that owns it (the first covering
    patch, or the one whose centre is nearest, ties to the first), -1 where none covers it,
    and the pixel's offset in that patch."""
    x = np.arange(n)
    first = np.searchsorted(o + p, x, side="right")
    last = np.searchsorted(o, x, side="right") - 1
    idx = first
    if rule == "centre":
        centre = o + (p - 1) / 2
        k = np.searchsorted(centre, x)
        a = np.clip(k - 1, first, np.maximum(last, first))
        b = np.clip(k, first, np.maximum(last, first))
        idx = np.where(
            np.abs(x - centre[np.minimum(b, len(o) - 1)])
            < np.abs(x - centre[np.minimum(a, len(o) - 1)]),
            b,
            a,
        )
    idx = np.where(first <= last, idx, -1)
    off = x - o[np.clip(idx, 0, len(o) - 1)]
    return idx, off
