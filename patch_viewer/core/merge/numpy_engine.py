"""The NumPy engine's entry points: :func:`merge_numpy` merges a whole stack (band by band
where the overlap is shallow, :func:`merge_banded`), :func:`numpy_merger` makes the streaming
accumulator (a :class:`.numpy_merger.NumpyMerger`, or a :class:`SplitMerger` for the exact
means of 64-bit integers)."""

from __future__ import annotations

import contextlib
import itertools
import os

import numpy as np

from .._layout import n_elements
from ..grid import PatchGrid
from .kernels_numpy import overlap_add, short_buffers
from .numpy_merger import NumpyMerger
from .precision import is_wide_int, split_mean, work_dtype
from .threads import share
from .weights import weights_in

__all__ = ["SplitMerger", "merge_banded", "merge_numpy", "numpy_merger"]

# Target size of one band of sums in the banded merge (fits the L2 cache).
BAND_BYTES = 1048576
# Size of the group of patches the banded merge stages in the cache at a time, and the fewest
# patches per group for staging to pay (measured: 1.4x faster at 32 patches of 64x64 float32,
# slower with one or two large patches per group, whose long blocks stream well as they are).
STAGE_BYTES = 512 * 1024
STAGE_MIN_COLUMNS = 8


def merge_banded(m: NumpyMerger, stack: np.ndarray, workers: int = 1) -> np.ndarray:
    """Merge a whole canonical stack band by band: the result in the work dtype.

    The image is cut into bands of rows (or groups of whole images) whose sums fit the
    cache; each band adds every patch row that touches it (clipped to the band), then is
    weighed and written to the result at once. Only the stack is read from memory and only
    the result written: no image-sized canvas is filled, summed into, divided and copied.
    Bands are independent, so ``workers`` threads each take a contiguous run of them.
    Per pixel the patches are added in the same order as :meth:`NumpyMerger.add`.
    """
    grid = m.grid
    nd = m._nd
    b = stack.shape[0]
    n0, s0, p0 = grid.spatial_shape[0], grid.stride[0], grid.patch_size[0]
    kind = m.work if m.mode == "mean" else m.acc_dtype  # max, min: exact
    out = np.empty((b,) + grid.spatial_shape + (stack.shape[-1],), kind)
    rest = m._acc_shape[2:]  # (*extent[1:], C)
    row_bytes = n_elements(rest) * m.acc_dtype.itemsize
    if row_bytes * n0 <= BAND_BYTES:
        per = max(1, BAND_BYTES // (row_bytes * n0))
        bands = [(i, min(b, i + per), 0, n0) for i in range(0, b, per)]
    else:
        h = max(1, BAND_BYTES // row_bytes // s0) * s0
        bands = [(i, i + 1, y, min(n0, y + h)) for i in range(b) for y in range(0, n0, h)]
    shape = (max(c[1] - c[0] for c in bands), max(c[3] - c[2] for c in bands))
    o0 = grid.origins[0]
    crop = tuple(slice(0, n) for n in grid.spatial_shape[1:])
    stride_rest = tuple(grid.stride[1:])
    combos = list(itertools.product(*m._runs[1:]))
    starts = [tuple(int(o[a]) for o, (a, _) in zip(grid.origins[1:], c)) for c in combos]
    m._weight_factors()

    # Patches of one grid row are staged (copied) in groups of columns that fit the cache
    # beside the band: the band's rows of a patch are one contiguous run, read at full
    # memory speed, while the overlap-add reads short blocks of every patch in turn (a
    # pattern the prefetchers do not follow: measured 2x slower from memory than from cache).
    column_bytes = n_elements(stack.shape[3:]) // p0 * min(p0, shape[1]) * stack.dtype.itemsize
    staged = max(1, STAGE_BYTES // max(column_bytes, 1)) if nd > 1 else 0
    if staged < STAGE_MIN_COLUMNS:  # few long blocks per patch: prefetchers keep up
        staged = 0

    def run(chunk):
        # float32 sums that overflow must stop the merge (see merge_patches); otherwise
        # the caller's own error handling applies, as everywhere else
        overflow = np.errstate(over="raise") if m.narrow else contextlib.nullcontext()
        with short_buffers(grid, stack.shape[-1]), overflow:
            scratch = np.empty(
                shape[0] * staged * column_bytes // stack.dtype.itemsize, stack.dtype
            )
            _bands(chunk, np.empty(shape + rest, m.acc_dtype), scratch)

    def _bands(chunk, buf, scratch):
        for b0, b1, y0, y1 in chunk:
            canvas = buf[: b1 - b0, : y1 - y0]
            canvas.fill(m._identity)
            first = int(np.searchsorted(o0 + p0, y0, side="right"))
            stop = int(np.searchsorted(o0, y1, side="left"))
            for i in range(first, stop):  # ascending patch rows
                o = int(o0[i])
                lo, hi = max(y0, o), min(y1, o + p0)
                patch_rows = (slice(None),) * (1 + nd) + (slice(lo - o, hi - o),)
                slab = stack[b0:b1, i : i + 1][patch_rows]
                for combo, start in zip(combos, starts):
                    sub = slab[(slice(None), slice(None)) + tuple(slice(a, z) for a, z in combo)]
                    step = staged or sub.shape[2]
                    for g in range(0, sub.shape[2], step):
                        part = sub[:, :, g : g + step]
                        if staged:
                            copy = scratch[: part.size].reshape(part.shape)
                            np.copyto(copy, part)
                            part = copy
                        origin = (lo - y0,) + start
                        if g:
                            origin = origin[:1] + (start[0] + g * stride_rest[0],) + start[1:]
                        overlap_add(
                            canvas, part, origin, (hi - lo,) + stride_rest, m._op, m._identity
                        )
            region = canvas[(slice(None), slice(None)) + crop]
            dst = out[b0:b1, y0:y1]
            if m.mode == "mean":
                with np.errstate(divide="ignore", invalid="ignore"):
                    m._weigh(region, dst, slice(y0, y1))
            else:
                np.copyto(dst, region, casting="unsafe")

    share(bands, workers, run)  # each thread takes the next band when it is free
    return out


def merge_numpy(
    canon: np.ndarray, grid: PatchGrid, workers: int | None, dtype, fill_value, **options
) -> np.ndarray:
    """Merge a whole canonical stack on the NumPy engine: canonical ``(b, *spatial, C)``.

    Threads run only where the result cannot depend on them: the banded merge (each band is
    summed whole by one thread), and plain sums that are exact (integers, float32 in float64)
    or max/min. Anchored and weighted sums stay on one thread.
    """

    def new_merger(narrow):
        return NumpyMerger(
            grid, canon.shape[0], canon.shape[-1], canon.dtype, narrow=narrow, **options
        )

    merger = numpy_merger(grid, canon.shape[0], canon.shape[-1], canon.dtype, **options)
    if isinstance(merger, SplitMerger):
        merger.add(canon)
        return merger.result(dtype, fill_value)
    merger = new_merger(narrow=True)
    if workers is None:
        # Threads pay off when there are many patches to read (8 MiB or more) and the
        # per-thread canvases they need are small beside them. The banded merge needs no
        # canvas, but its steps must be long enough to outweigh the threads' contention for
        # the interpreter (measured: 2x faster with 1.6M-element patch rows, slower at 130k).
        if merger.bandable:
            many = canon.nbytes >= 8 * 2**20 and n_elements(canon.shape[2:]) >= 2**19
        else:
            many = canon.nbytes >= 8 * 2**20 and canon.nbytes >= 4 * merger.canvas_bytes
        workers = (os.cpu_count() or 1) if many else 1
    if merger.bandable:
        try:
            merged = merge_banded(merger, canon, workers)
        except FloatingPointError:  # float32 sums overflowed (values near the float32 limit)
            merger = new_merger(narrow=False)
            merged = merge_banded(merger, canon, workers)
        return merger.finish(merged, dtype, fill_value)
    if merger.anchor or merger._win is not None:
        workers = 1  # per-thread canvases would add in another order
    merger.add_all(canon, workers)
    return merger.result(dtype, fill_value)


class SplitMerger:
    """Uniform means of 64-bit integers on the NumPy engine, exactly: their high and low 32-bit
    halves are summed by two :class:`NumpyMerger` (float64 sums of 32-bit integers are exact),
    and :func:`.precision.split_mean` divides the two sums in the integer domain."""

    def __init__(self, grid: PatchGrid, n_images: int, n_channels: int, dtype):
        self.grid, self.unsigned = grid, np.dtype(dtype).kind == "u"
        self.work = work_dtype(dtype)
        half = np.uint32 if self.unsigned else np.int32
        self._hi = NumpyMerger(grid, n_images, n_channels, half)
        self._lo = NumpyMerger(grid, n_images, n_channels, np.uint32)

    def add(self, piece: np.ndarray, b0: int = 0, row0: int = 0) -> None:
        self._hi.add(piece >> 32, b0, row0)
        self._lo.add(piece & 0xFFFFFFFF, b0, row0)

    def result(self, dtype=None, fill_value=None) -> np.ndarray:
        crop = (slice(None),) + tuple(slice(0, n) for n in self.grid.spatial_shape)
        hi, lo = (m.acc[crop].astype(np.int64) for m in (self._hi, self._lo))
        count = weights_in(self.grid, "uniform", {}, np.int64)[None, ..., None]
        target = np.dtype(self.work if dtype is None else dtype)
        out = split_mean(
            hi, lo, count, target if target.kind in "biu" else np.float64, self.unsigned
        )
        return self._hi.finish(out, dtype, fill_value)


def numpy_merger(
    grid: PatchGrid,
    n_images: int,
    n_channels: int,
    dtype,
    *,
    window="uniform",
    reduce="mean",
    window_params=None,
):
    """The NumPy engine's streaming accumulator for these options."""
    if is_wide_int(dtype) and reduce == "mean" and isinstance(window, str) and window == "uniform":
        return SplitMerger(grid, n_images, n_channels, dtype)
    return NumpyMerger(
        grid, n_images, n_channels, dtype, window=window, reduce=reduce, window_params=window_params
    )
