"""The compiled engine: a whole stack merged band by band, and the streaming accumulator.

Both run the kernels of :mod:`.kernels_numba` on the canonical stack of :func:`.plan.kernel_view`.
A whole stack (:func:`merge_bands`) is cut into bands of output rows whose sums fit the cache:
each band reads the patch rows that touch it, is weighed and written once, and no image-sized
canvas is made. Threads take the bands as they come free (:mod:`.threads`; the kernels release
the GIL). The streaming :class:`NumbaMerger` keeps one canvas per image and adds pieces of
patch rows as they come.
"""

from __future__ import annotations

import math

import numpy as np

from ..grid import PatchGrid
from . import kernels_fused as F
from . import kernels_numba as K
from .geometry import KernelGeometry
from .plan import MergePlan, Source, band_rows, stack_source, three_axes
from .precision import anchored_finish, finish, reduce_identity, split_mean
from .threads import merge_pool, share

__all__ = [
    "NumbaMerger",
    "merge_bands",
    "merge_pool",
]


def _powers_of_two(arrays) -> bool:
    """Whether every positive value is a power of two (zeros are uncovered pixels)."""
    return all(bool(np.all((np.frexp(a)[0] == 0.5) | (a == 0))) for a in arrays)


def _reciprocals_exact(plan: MergePlan, out, dens) -> bool:
    """Whether multiplying by reciprocals gives the bits of dividing: integer sums below
    2**24 over integer counts below 2**25, into float32.

    The quotient ``s / c`` is then never a float32 tie (``s / c`` reduces to an integer of at
    most 24 bits over a power of two), and it is at least ``2**-25 / c`` away from one,
    relatively; the product of the sum with three rounded reciprocals errs by under
    ``6 * 2**-53``, so it rounds to the same float32. Dividing costs 2-3x more than the rest of
    a uint8 merge (W3: 10 of 15 ms). (Mode "sum" is the uniform window's: its denominators are
    the coverage counts, integers.)
    """
    if plan.mode != "sum" or np.dtype(out) != np.float32 or plan.data.kind not in "biu":
        return False
    count = math.prod(int(d.max()) for d in dens)
    return _largest(plan.data) * count < 2**24 and count < 2**25


def _largest(dtype: np.dtype) -> int:
    """The largest magnitude an integer (or bool) dtype holds."""
    if dtype.kind == "b":
        return 1
    info = np.iinfo(dtype)
    return max(-int(info.min), int(info.max))


class _Canvas:
    """The arrays one band (or one whole image) accumulates into, flat and contiguous."""

    def __init__(self, plan: MergePlan, size: int):
        mode = plan.mode
        self.acc = np.zeros(size, plan.acc)
        self.lo = np.zeros(size, np.int64) if mode == "split" else None
        self.ref = np.zeros(size, plan.data) if mode in ("anchored", "pick") else None
        self.mode = mode
        if mode in ("max", "min"):
            self.acc[:] = reduce_identity(self.acc.dtype, mode)
        #: whether weighing a band leaves it cleared (so no separate pass is needed)
        self.self_clearing = mode in ("sum", "weighted", "anchored")

    def clear(self, n: int):
        """Reset the first ``n`` elements for the next band."""
        if self.self_clearing:
            return
        if self.mode in ("max", "min"):
            self.acc[:n] = reduce_identity(self.acc.dtype, self.mode)
        else:
            self.acc[:n] = 0
        if self.lo is not None:
            self.lo[:n] = 0


def _add(
    geo3: KernelGeometry, canvas: _Canvas, src: Source, origins, bi, i0, i1, y0, y1, maps=None
):
    """Add the patch rows ``i0 .. i1`` of image ``bi`` to ``canvas`` (rows ``y0 .. y1``)."""
    plan = geo3.plan
    o0, o1, o2c = origins
    n1, wc = geo3.extent[1], geo3.wc
    args = (*src, geo3.geo(src), o0, o1, o2c, bi, i0, i1, y0, y1, n1, wc)
    mode = plan.mode
    if maps is not None:  # the anchor (or the picked value) first
        K.band_gather(src[0], src[1], bi, y0, y1, maps[0], maps[1], maps[2], canvas.ref)
    if mode == "sum":
        K.band_sum(*args, canvas.acc)
    elif mode == "split":
        K.band_sum_split(*args, canvas.acc, canvas.lo)
    elif mode == "weighted":
        K.band_weighted(*args, plan.window, canvas.acc)
    elif mode == "anchored" and plan.window is None:  # the uniform window
        K.band_anchored_plain(*args, canvas.ref, canvas.acc)
    elif mode == "anchored":
        K.band_anchored(*args, plan.window, canvas.ref, canvas.acc)
    elif mode == "max":
        K.band_max(*args, canvas.acc)
    elif mode == "min":
        K.band_min(*args, canvas.acc)


class _Result:
    """Image-sized outputs of a merge before they are finished into the output dtype."""

    def __init__(self, geo3: KernelGeometry, n_images: int, dtype, into=None):
        plan = geo3.plan
        shape = (n_images, geo3.spatial[0], geo3.spatial[1], geo3.spatial[2] * geo3.c)
        mode = plan.mode
        # means for an integer output are rounded from float64 (float32 could round a
        # fraction just below .5 up to it)
        work = np.float64 if dtype is not None and np.dtype(dtype).kind in "biu" else plan.work
        out = {"sum": work, "weighted": work, "anchored": np.float64, "split": np.int64}.get(
            mode, plan.data
        )
        weighed = mode in ("sum", "weighted", "anchored")  # every pixel written
        target = np.dtype(plan.work if dtype is None else dtype)
        fits = into is not None and into.dtype == target and into.size == math.prod(shape)
        if fits and mode in ("sum", "weighted") and np.dtype(out) == target:
            # weighed straight into the caller's array: finish() returns it as it is
            self.out = into.reshape(shape)  # a view: ``into`` is C-contiguous
        else:
            self.out = (np.empty if weighed else np.zeros)(shape, out)
        self.ref = np.zeros(shape, plan.data) if mode == "anchored" else None
        self.lo = np.empty(shape, np.int64) if mode == "split" else None
        self.geo3, self.plan = geo3, plan
        self.dens = geo3.denominators()
        self.weigh = K.weigh
        if (
            self.dens is not None
            and plan.weights is None
            and (_reciprocals_exact(plan, out, self.dens) or _powers_of_two(self.dens))
        ):
            with np.errstate(divide="ignore"):  # 1/0 = inf: 0 * inf is NaN, uncovered
                self.dens = tuple(1.0 / d for d in self.dens)
            self.weigh = K.weigh_scaled

    def write(self, canvas: _Canvas, bi: int, y0: int, y1: int):
        """Weigh (or copy) a band's canvas into rows ``y0 .. y1`` of image ``bi``."""
        geo3 = self.geo3
        n1, wc = geo3.extent[1], geo3.wc
        mode = self.plan.mode
        dst = self.out[bi, y0:y1]
        if mode in ("sum", "weighted", "anchored"):
            self.weigh(canvas.acc, y0, y1, n1, wc, *self.dens, dst)  # and clears the band
        elif mode == "pick":
            K.copy_band(canvas.ref, y0, n1, wc, dst)
        else:
            K.copy_band(canvas.acc, y0, n1, wc, dst)
        if mode == "anchored":
            assert self.ref is not None
            K.copy_band(canvas.ref, y0, n1, wc, self.ref[bi, y0:y1])
        if mode == "split":
            assert self.lo is not None
            K.copy_band(canvas.lo, y0, n1, wc, self.lo[bi, y0:y1])

    def finish(self, grid: PatchGrid, dtype, fill_value) -> np.ndarray:
        """The merged images, canonical ``(b, *spatial, C)``, in ``dtype``."""
        plan = self.plan
        mode = plan.mode
        out = self.out
        target = np.dtype(plan.work if dtype is None else dtype)
        # a weighed sum is 0/0, NaN, where nothing covers: nothing to mark for a NaN fill
        nan_marks = (
            mode in ("sum", "weighted", "anchored")
            and target.kind == "f"
            and (fill_value is None or np.isnan(fill_value))
        )
        covered = None if nan_marks else self.covered(grid)
        if mode == "split":
            assert self.lo is not None
            count = self.counts().reshape(out.shape[1:])
            out = split_mean(
                out,
                self.lo,
                count,
                target if target.kind in "biu" else np.float64,
                plan.data.kind == "u",
            )
        elif mode == "anchored":
            assert self.ref is not None
            return self._shaped(
                anchored_finish(self.ref, out, covered, dtype, fill_value, plan.work), grid
            )
        return self._shaped(finish(out, covered, dtype, fill_value, plan.work), grid)

    def counts(self) -> np.ndarray:
        geo3 = self.geo3
        counts = [c.astype(np.int64) for c in self.geo3.grid.coverage_1d()]
        c3 = three_axes(counts, geo3.grid, np.ones(1, np.int64))
        full = c3[0][:, None, None] * c3[1][None, :, None] * c3[2][None, None, :]
        return np.repeat(full, geo3.c, axis=2)

    def covered(self, grid: PatchGrid):
        """Covered pixels, or None where all are: per-axis masks of ``out``'s axes 1-3 where
        coverage separates (see :func:`.precision.finish`), else a mask broadcastable to it."""
        plan = self.plan
        if plan.weights is not None:
            mask = plan.weights.reshape(self.geo3.spatial) > 0
            return np.repeat(mask, self.geo3.c, axis=2)[None]
        if grid.is_covering:
            return None
        masks = three_axes([c > 0 for c in grid.coverage_1d()], grid, np.ones(1, bool))
        masks[2] = np.repeat(masks[2], self.geo3.c)
        return tuple(masks)

    def _shaped(self, out: np.ndarray, grid: PatchGrid) -> np.ndarray:
        return out.reshape((out.shape[0],) + grid.spatial_shape + (self.geo3.c,))


def merge_bands(
    canon: np.ndarray, grid: PatchGrid, plan: MergePlan, workers: int, dtype, fill_value, into=None
) -> np.ndarray:
    """Merge a whole canonical stack ``(b, *G, *p, C)``: canonical ``(b, *spatial, C)``,
    written into ``into`` (C-contiguous, canonical) where the plan weighs straight into the
    output dtype."""
    b, c = canon.shape[0], canon.shape[-1]
    geo3 = KernelGeometry(grid, plan, c)
    src = stack_source(canon, grid, plan.data)
    origins = geo3.piece_origins(0, grid.grid_shape[0])
    maps = None
    if plan.mode in ("anchored", "pick"):
        maps = geo3.owner_maps(src, "first" if plan.mode == "anchored" else "centre")
    result = _Result(geo3, b, dtype, into)
    n0 = geo3.extent[0]
    rows = band_rows(geo3.row_len * plan.acc.itemsize, n0, b, workers)
    bands = [(bi, y, min(n0, y + rows)) for bi in range(b) for y in range(0, n0, rows)]
    o0, p0 = origins[0], geo3.patch[0]

    def run(chunk):
        canvas = _Canvas(plan, rows * geo3.row_len)
        for bi, y0, y1 in chunk:
            i0 = int(np.searchsorted(o0 + p0, y0, side="right"))
            i1 = int(np.searchsorted(o0, y1, side="left"))
            _add(geo3, canvas, src, origins, bi, i0, i1, y0, y1, maps)
            result.write(canvas, bi, y0, y1)
            canvas.clear((y1 - y0) * geo3.row_len)

    # each thread takes the next band when it is free (see .threads)
    share(bands, workers, run)
    return result.finish(grid, dtype, fill_value)


class NumbaMerger:
    """Streaming accumulator on the compiled kernels: add pieces of a patch stack (grid rows
    ``row0 .. row0 + g`` of images ``b0 .. b0 + b``, rows of one image in ascending order),
    then take the result. One canvas per image; the same sums, in the same order per pixel,
    as :func:`merge_bands`, so both give the same bits."""

    def __init__(self, grid: PatchGrid, n_images: int, n_channels: int, plan: MergePlan):
        self.grid, self.plan = grid, plan
        self.geo3 = KernelGeometry(grid, plan, n_channels)
        self.n_images = n_images
        size = math.prod(self.geo3.extent) * n_channels
        self._canvases: list[_Canvas | None] = [None] * n_images
        self._size = size

    def _canvas(self, bi: int) -> _Canvas:
        canvas = self._canvases[bi]
        if canvas is None:
            canvas = self._canvases[bi] = _Canvas(self.plan, self._size)
        return canvas

    def add(self, piece: np.ndarray, b0: int = 0, row0: int = 0) -> None:
        """Add a canonical piece ``(b, g, *grid_shape[1:], *patch_size, C)``."""
        src = stack_source(piece, self.grid, self.plan.data)
        self.add_source(src, range(b0, b0 + piece.shape[0]), row0, piece.shape[1], b0)

    def add_source(self, src: Source, images, row0: int, rows: int, first: int = 0) -> None:
        """Add the patches of grid rows ``row0 .. row0 + rows`` of ``images`` read from
        ``src`` (which holds exactly those rows; its image ``b`` is image ``first + b``)."""
        plan, geo3 = self.plan, self.geo3
        origins = geo3.piece_origins(row0, rows)
        maps = None
        if plan.mode in ("anchored", "pick"):
            rule = "first" if plan.mode == "anchored" else "centre"
            maps = geo3.owner_maps(src, rule, row0, rows)
        n0 = geo3.extent[0]
        i1 = len(origins[0])
        for b in images:
            _add(geo3, self._canvas(b), src, origins, b - first, 0, i1, 0, n0, maps)

    def result(self, dtype=None, fill_value=None, into=None) -> np.ndarray:
        """The merged images, canonical ``(b, *spatial, C)``; written into ``into`` (canonical,
        C-contiguous) where it fits and the plan weighs straight into the output dtype."""
        result = _Result(self.geo3, self.n_images, dtype, into)
        for bi in range(self.n_images):
            result.write(self._canvas(bi), bi, 0, self.geo3.extent[0])
        return result.finish(self.grid, dtype, fill_value)

    def fuses(self, fused) -> bool:
        """Whether :meth:`add_fused` can apply ``fused`` (a :class:`~patch_viewer.core.fused.
        Fused`) for this merge's plan."""
        mode = self.plan.mode
        if fused.kind == "identity":
            return True
        return mode == "sum" or (mode == "weighted" and fused.kind != "map")

    def add_fused(self, src: Source, image: int, row0: int, rows: int, fused, stats=None) -> None:
        """Filter and add the patches of grid rows ``row0 .. row0 + rows`` of one image, read
        from ``src`` (that image's patches, those rows), without storing a filtered patch.
        ``stats(src, geo, row0, rows) -> (c, d)`` gives the per-patch coefficients of
        ``(v - c) / d`` (see :class:`~patch_viewer.core.fused.PatchStats`)."""
        if fused.kind == "identity":
            self.add_source(src, [image], row0, rows, image)
            return
        plan, geo3 = self.plan, self.geo3
        o0, o1, o2c = geo3.piece_origins(row0, rows)
        n0, n1 = geo3.extent[0], geo3.extent[1]
        geo = geo3.geo(src)
        acc = self._canvas(image).acc
        args = (*src, geo, o0, o1, o2c, 0, 0, len(o0), 0, n0, n1, geo3.wc)
        if fused.kind == "map":
            F.band_map(*args, fused.rule, acc)
            return
        cen, den = stats(src, geo, row0, rows)
        if plan.mode == "sum" and _powers_of_two([np.abs(den)]):  # invert: den = -1
            F.band_affine_scaled(*args, cen, (1 / den).astype(den.dtype), acc)
        elif plan.mode == "sum":
            F.band_affine(*args, cen, den, acc)
        else:
            F.band_affine_weighted(*args, cen, den, plan.window, acc)
