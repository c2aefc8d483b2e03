"""The NumPy streaming accumulator (:class:`NumpyMerger`) and its banded whole-stack merge:
the fallback engine where numba is missing, and the oracle of the compiled one."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._layout import DIRECT_MAX_STEPS, ROWS_FIRST_ORDER, is_direct, n_elements, split_regular, stack_order
from ..grid import PatchGrid
from ..windows import make_window, separable_factors
from .kernels_numpy import assign, interleave, ola, overlap_add, owned_segments, short_buffers
from .plan import REDUCTIONS
from .precision import anchored_finish, finish, split_mean, work_dtype
from .weights import coverage_mask, weight_sums, weights_in

__all__ = ["NumpyMerger", "SplitMerger", "merge_numpy", "numpy_merger"]

# Target size of one piece of the patch stack processed at a time (fits the L2/L3 caches).
_PIECE_BYTES = 2 * 2**20
# ... and for the rows-first path (its steps move whole blocks, and its bulk is one strided
# reduce over the rows of a part: tall parts pay; measured best at 32-64 MiB; see _rows_first).
_ROWS_FIRST_PIECE_BYTES = 48 * 2**20
# Target size of one band of sums in the banded merge (fits the L2 cache).
_BAND_BYTES = 1048576
# Size of the group of patches the banded merge stages in the cache at a time, and the fewest
# patches per group for staging to pay (measured: 1.4x faster at 32 patches of 64x64 float32,
# slower with one or two large patches per group, whose long blocks stream well as they are).
_STAGE_BYTES = 512 * 1024
_STAGE_MIN_COLUMNS = 8


def _accumulation(dtype, work: np.dtype, uniform: bool, max_cover: int) -> tuple[np.dtype, bool]:
    """The dtype sums are kept in, and whether they need the anchor (see the module docstring).

    A sum of ``m`` copies of a value with ``b`` significant bits is exact in a float whose
    mantissa has at least ``b + log2(m)`` bits; then ``sum / m`` gives the value back and no
    anchor is needed. That holds in the work dtype for small integers, and in float64 for
    float32/float16 patches (24 + log2(m) <= 53 bits): the plain sum is exact and cheaper than
    subtracting an anchor. Non-uniform windows and float64 patches need the anchor.
    """
    dtype = np.dtype(dtype)
    if not uniform:
        return work, True
    cover = math.log2(max(max_cover, 1))
    if dtype.kind in "biu":
        bits = 1 if dtype.kind == "b" else 8 * dtype.itemsize
        return work, bits + cover > np.finfo(work).nmant + 1
    if dtype.kind == "f" and np.finfo(dtype).nmant + 1 + cover <= np.finfo(np.float64).nmant + 1:
        return np.dtype(np.float64), False
    return work, True


def _is_wide_int(dtype) -> bool:
    dtype = np.dtype(dtype)
    return dtype.kind in "iu" and dtype.itemsize == 8


def _narrow_sums_exact(grid: PatchGrid) -> bool:
    """Whether float32 sums give the mean of float32 values exactly where they all agree.

    Checked for every float32 in [1, 2) (so for all but overflowing values): adding ``c``
    copies of a value one after another and dividing by ``c`` gives it back for c = 1, 2, 4,
    and not for 3, 5, 6, 7 or 8. Coverage counts are products of per-axis counts.
    """
    counts = {1}
    for c in grid.coverage_1d():
        counts = {a * int(b) for a in counts for b in np.unique(c)}
    return counts <= {0, 1, 2, 4}



class NumpyMerger:
    """Streaming accumulator: add pieces of a patch stack in order, then take the result.

    Pieces are ``(b, g0, *grid_shape[1:], *patch_size, C)`` arrays covering images
    ``[b0, b0 + b)`` and grid rows ``[row0, row0 + g0)``; rows of one image must come in
    ascending order. This is the one engine behind :func:`merge_patches` and the streaming
    :func:`patch_viewer.process`.
    """

    def __init__(self, grid: PatchGrid, n_images: int, n_channels: int, dtype, *,
                 window="uniform", reduce="mean", window_params=None, narrow=False):
        if reduce not in REDUCTIONS:
            raise ValueError(f"`reduce` must be one of {REDUCTIONS}, got {reduce!r}")
        params = dict(window_params or {})
        is_tile = isinstance(window, str) and window == "overlap-tile"
        self.window = make_window(window, grid.patch_size, **params)
        if reduce != "mean" and (self.window is not None or is_tile):
            raise ValueError(
                f"`window` must be 'uniform' with reduce={reduce!r}; windows weight the mean only"
            )
        self.grid = grid
        self.mode = "pick" if is_tile else reduce
        self.work = work_dtype(dtype)
        self._window_spec = (window, params)
        nd = grid.ndim
        extent = tuple(n + s for n, s in zip(grid.padded_shape, grid.stride))
        shape = (n_images,) + extent + (n_channels,)
        self.acc_dtype, self.anchor = _accumulation(dtype, self.work, self.window is None,
                                                    grid.coverage_range()[1])
        # ``narrow``: float32 patches may be summed in float32 where that is exact for the
        # grid's coverage counts (see _narrow_sums_exact), at the risk of overflowing where
        # float64 would not: merge_banded then raises FloatingPointError (merge_patches
        # starts again in float64).
        self.narrow = (narrow and reduce == "mean" and self.window is None and not is_tile
                       and not self.anchor and self.acc_dtype != self.work
                       and np.dtype(dtype) == np.float32 and _narrow_sums_exact(grid))
        wide = np.dtype(dtype) if _is_wide_int(dtype) else None  # exact in their own dtype
        if reduce != "mean" or self.narrow:
            self.acc_dtype = wide if wide is not None and reduce != "mean" else self.work
        if self._uses_ref:
            # every covered pixel is owned once
            self.ref = np.zeros(shape, self.work if wide is None else wide)  # no garbage NaN
            rule = "first" if self.mode == "mean" else "centre"
            self._owned = [owned_segments(o, p, rule) for o, p in zip(grid.origins, grid.patch_size)]
        if self.mode != "pick":
            fill = {"mean": 0.0, "max": -np.inf, "min": np.inf}[self.mode]
            if self.acc_dtype.kind in "iu":
                info = np.iinfo(self.acc_dtype)
                fill = {"max": info.min, "min": info.max}[self.mode]
            self._identity = fill
            self._acc_shape = shape
            self._acc = None
            self._op = {"mean": np.add, "max": np.maximum, "min": np.minimum}[self.mode]
        self._runs = [split_regular(o, s) for o, s in zip(grid.origins, grid.stride)]
        self._win = None if self.window is None else self.window[..., None].astype(self.work)
        self._nd = nd
        self._buffers: dict = {}
        rows_first = stack_order(grid) == ROWS_FIRST_ORDER
        self._piece_bytes = _ROWS_FIRST_PIECE_BYTES if rows_first else _PIECE_BYTES

    # -- adding ---------------------------------------------------------------------------
    def _parts(self, piece: np.ndarray, b0: int, row0: int, min_parts: int = 1):
        """Split a piece into cache-sized parts ``(part, first image, first row)``; an image's
        rows go in even parts, at least ``min_parts`` of them (one per thread)."""
        b, g0 = piece.shape[:2]
        row_bytes = n_elements(piece.shape[2:]) * self.work.itemsize
        rows = max(1, self._piece_bytes // max(row_bytes, 1))
        if rows >= g0 and b > 1:
            per = max(1, rows // g0)
            for i in range(0, b, per):
                yield piece[i:i + per], b0 + i, row0
            return
        n = min(g0, max(-(-g0 // rows), min_parts if b == 1 else 1))
        rows = -(-g0 // n)
        for bi in range(b):
            for r in range(0, g0, rows):
                yield piece[bi:bi + 1, r:r + rows], b0 + bi, row0 + r

    @property
    def acc(self) -> np.ndarray:
        """The accumulation canvas (made on first use: the banded merge never needs it)."""
        if self._acc is None:
            self._acc = np.full(self._acc_shape, self._identity, self.acc_dtype)
        return self._acc

    @property
    def canvas_bytes(self) -> int:
        return 0 if self.mode == "pick" else n_elements(self._acc_shape) * self.acc_dtype.itemsize

    @property
    def _uses_ref(self) -> bool:
        return self.mode == "pick" or (self.mode == "mean" and self.anchor)

    def add(self, piece: np.ndarray, b0: int = 0, row0: int = 0) -> None:
        """Add a piece of patches (see the class docstring); splits it into cache-sized parts."""
        for part, b, r in self._parts(piece, b0, row0):
            if self._uses_ref:
                self._set_ref(part, slice(b, b + part.shape[0]), r)
            if self.mode != "pick":
                self._accumulate(part, b, r, self.acc, self._buffers)

    def add_all(self, stack: np.ndarray, workers: int = 1) -> None:
        """Add a whole stack at once, accumulating on ``workers`` threads (NumPy releases the
        GIL). Each thread sums a contiguous block into its own canvas; the canvases are then
        combined in a fixed order, so the result does not depend on thread timing."""
        parts = list(self._parts(stack, 0, 0, workers))
        if self._uses_ref:
            for part, b, r in parts:
                self._set_ref(part, slice(b, b + part.shape[0]), r)
        if self.mode == "pick":
            return
        workers = max(1, min(workers, len(parts)))
        if workers == 1:
            for part, b, r in parts:
                self._accumulate(part, b, r, self.acc, self._buffers)
            return
        bounds = np.linspace(0, len(parts), workers + 1).round().astype(int)
        accs = [self.acc] + [np.full_like(self.acc, self._identity) for _ in range(workers - 1)]

        def job(k):
            buffers: dict = {}
            for part, b, r in parts[bounds[k]:bounds[k + 1]]:
                self._accumulate(part, b, r, accs[k], buffers)

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(job, range(workers)))
        for extra in accs[1:]:
            self._op(self.acc, extra, out=self.acc)

    def _accumulate(self, part: np.ndarray, b0: int, row0: int, acc: np.ndarray,
                    buffers: dict) -> None:
        with short_buffers(self.grid, part.shape[-1]):
            self._accumulate_in(part, b0, row0, acc, buffers)

    def _accumulate_in(self, part: np.ndarray, b0: int, row0: int, acc: np.ndarray,
                       buffers: dict) -> None:
        b, g0 = part.shape[:2]
        images = slice(b0, b0 + b)
        grid = self.grid
        runs0 = [(max(a, row0), min(z, row0 + g0)) for a, z in self._runs[0]]
        runs = [[r for r in runs0 if r[0] < r[1]]] + self._runs[1:]
        acc = acc[images]
        for combo in itertools.product(*runs):
            sub = part[(slice(None), slice(combo[0][0] - row0, combo[0][1] - row0))
                       + tuple(slice(a, z) for a, z in combo[1:])]
            origin = tuple(int(o[a]) for o, (a, _) in zip(grid.origins, combo))
            sub, padded = self._prepared(sub, images, origin, buffers)
            overlap_add(acc, sub, origin, grid.stride, self._op, self._identity, padded)

    def _prepared(self, sub: np.ndarray, images: slice, origin, buffers: dict):
        """``(sub - ref) * window`` (as far as the mode needs) in the work dtype, laid out so
        that the overlap-add reads contiguous memory. Returns ``(patches, padded)``.

        For a cascade (deep overlap, e.g. stride 1) the data go into a reused buffer in the
        interleaved layout, last axis in-patch offset first, with identity margins: ``padded``
        for :func:`_antidiagonal_reduce`. For the rows-first path nothing is copied: ``padded``
        is ``"rows-first"``, or the function that prepares one row offset at a time.
        """
        nd = self._nd
        stride = self.grid.stride
        g, p = sub.shape[1:1 + nd], sub.shape[1 + nd:1 + 2 * nd]
        depth = [-(-pk // sk) for pk, sk in zip(p, stride)]
        anchor = self.mode == "mean" and self.anchor
        padded = None
        cascade = math.prod(depth) > DIRECT_MAX_STEPS
        as_is = cascade and not anchor and self._win is None  # the values need no preparing
        rows_first = cascade and nd == 2 and stride[0] == 1
        if as_is and rows_first:
            return sub, "rows-first"
        if as_is and nd > 1 and stride[-1] == 1:
            # The cascade reads the stack as it is (in the sum's dtype: one streaming pass when
            # the stack is element-major, and no casting in the many small border steps).
            return sub.astype(self.acc_dtype, order="K", copy=False), "unit"
        if rows_first:  # anchored or weighed one row offset at a time (see _rows_first)
            return sub, self._row_offset_preparer(sub, images, origin, anchor, buffers)
        if cascade and depth[-1] > 1 and g[-1] >= depth[-1]:
            d, s = depth[-1], stride[-1]
            logical = [sub.shape[0]] + [x for k in range(nd) for x in (g[k], p[k])] + [sub.shape[-1]]
            logical[-3:-1] = [g[-1] + 2 * (d - 1), d * s]
            memory = logical[:-3] + [logical[-2], logical[-3], logical[-1]]
            key = tuple(memory)
            buf = buffers.get(key)
            if buf is None:
                buf = buffers[key] = np.full(memory, self._identity, self.work)
            n = len(memory)
            padded = buf.transpose(list(range(n - 3)) + [n - 2, n - 3, n - 1])
            data = padded[(slice(None),) * (n - 3) + (slice(d - 1, d - 1 + g[-1]), slice(0, p[-1]))]
            order = [0] + [1 + 2 * k for k in range(nd)] + [2 + 2 * k for k in range(nd)] + [n - 1]
            out = data.transpose(order)  # back to (b, *G, *p, C)
        elif anchor or self._win is not None:
            out = np.empty(sub.shape, self.work)
        else:
            return sub, None
        # Iterate in the output's memory order (numpy then streams the writes).
        mem = np.argsort([-x for x in out.strides], kind="stable")
        if anchor:
            ref = self.ref[images]
            view = np.lib.stride_tricks.sliding_window_view(
                ref, self.grid.patch_size, axis=tuple(range(1, nd + 1)), writeable=False
            )
            view = np.moveaxis(view, nd + 1, -1)[(slice(None),) + tuple(
                slice(o, o + (gk - 1) * sk + 1, sk) for o, gk, sk in zip(origin, g, stride)
            )]
            np.subtract(sub.transpose(mem), view.transpose(mem), out=out.transpose(mem))
        else:
            np.copyto(out.transpose(mem), sub.transpose(mem))
        if self._win is not None:
            win = np.broadcast_to(self._win, out.shape).transpose(mem)
            np.multiply(out.transpose(mem), win, out=out.transpose(mem))
        return out, padded

    def _row_offset_preparer(self, sub, images, origin, anchor, buffers):
        """For a stride-1 2-D part (see :func:`_rows_first`): a function giving
        ``(values - ref) * window`` of one row offset, ``(g0, b, g1, p1, C)``.

        The pixels the patch rows of row offset ``e`` anchor to are image rows ``e .. e + g0``
        cut into overlapping windows: that cut (``lines``) is made once per part, so each
        offset is one subtraction (and one product) into a buffer that stays in the cache,
        with no part-sized copy of prepared values (and its page faults). Where the stack is
        offset-major (:data:`ROWS_FIRST_ORDER`, as :func:`process` and
        ``extract_patches(layout="merge")`` make it) each offset's values are one contiguous
        block, so those steps run long inner loops.
        """
        s_mem = sub.transpose(ROWS_FIRST_ORDER)  # (p0, g0, b, g1, p1, C)
        b, g0, g1, p0, p1, c = sub.shape
        y0, x0 = origin
        s1 = self.grid.stride[1]
        lines = tiled = None
        if anchor:
            ref = self.ref[images, y0:y0 + g0 + p0 - 1]
            cut = np.lib.stride_tricks.sliding_window_view(ref, p1, axis=2, writeable=False)
            cut = np.moveaxis(cut, -1, 3)[:, :, x0:x0 + (g1 - 1) * s1 + 1:s1]
            lines = np.ascontiguousarray(cut.transpose(1, 0, 2, 3, 4))  # (rows, b, g1, p1, C)
        if self._win is not None:
            key = ("window rows", g1, c)
            tiled = buffers.get(key)
            if tiled is None:  # the window's row e, repeated for every patch of a grid row
                tiled = buffers[key] = np.ascontiguousarray(
                    np.broadcast_to(self._win[:, None], (p0, g1, p1, c)))
        key = ("offset block", g0, b, g1, p1, c)
        out = buffers.get(key)
        if out is None:
            out = buffers[key] = np.empty((g0, b, g1, p1, c), self.work)

        def prepare(e):
            if anchor:
                np.subtract(s_mem[e], lines[e:e + g0], out=out)
            else:
                np.copyto(out, s_mem[e])
            if tiled is not None:
                np.multiply(out, tiled[e], out=out)
            return out

        return prepare

    def _set_ref(self, part: np.ndarray, images: slice, row0: int) -> None:
        """Copy into ``ref`` the pixels that the patches of this part own (a partition, so no
        pixel is written twice across parts)."""
        g0 = part.shape[1]
        rows = []
        for i0, i1, a, w, pitch in self._owned[0]:
            lo, hi = max(i0, row0), min(i1, row0 + g0)
            if lo < hi:
                rows.append((lo - row0, hi - row0, a, w, pitch, lo))
        ref = self.ref[images]
        origins = self.grid.origins
        for combo in itertools.product(rows, *[
            [(i0, i1, a, w, pitch, i0) for i0, i1, a, w, pitch in runs] for runs in self._owned[1:]
        ]):
            sub = part[(slice(None),) + tuple(slice(c[0], c[1]) for c in combo)
                       + tuple(slice(c[2], c[2] + c[3]) for c in combo)]
            start = tuple(int(o[c[5]]) + c[2] for o, c in zip(origins, combo))
            region = ref[(slice(None),) + tuple(slice(x, None) for x in start)]
            ola(region, interleave(sub, self._nd), list(range(1, self._nd + 1)),
                 [c[4] for c in combo], assign)

    def _weigh(self, region: np.ndarray, dst: np.ndarray, rows: slice = slice(None)) -> None:
        """``dst = region / weights`` for image rows ``rows``; ``region`` may be overwritten.

        Separable windows go one axis at a time (no image-sized weight map). Where the sums
        are kept in float64 for a float32 result, each step multiplies by the reciprocal: the
        result is within a few float64 ulps of the quotient, so it rounds to the same float32
        (the identity round trip stays exact) at a fraction of a division's cost. Where the
        sums are in the result's own dtype each step divides out one exact factor, so an exact
        multiple of the weights comes back exactly.
        """
        window, params = self._window_spec
        factors = self._weight_factors()
        if factors is None:
            w = weights_in(self.grid, window, params, self.acc_dtype)[rows]
            np.divide(region, w[None, ..., None], out=dst)
            return
        recip = self.acc_dtype.itemsize > self.work.itemsize
        op = np.multiply if recip else np.divide
        last = len(factors) - 1
        for k, (w, inv) in enumerate(factors):
            f = inv if recip else w
            f = f[rows] if k == 0 else f
            target = dst if k == last else region
            if k == last:
                # Spread the last axis' factor over the channels, so that the inner loop runs
                # along whole rows instead of the channel axis (a factor broadcast over it).
                a, t = _fuse_last(region), _fuse_last(target)
                if a is not None and t is not None:
                    op(a, np.repeat(f, region.shape[-1]), out=t)
                    return
            shape = [1] * region.ndim
            shape[1 + k] = len(f)
            op(region, f.reshape(shape), out=target)
            region = target

    def _weight_factors(self):
        """Per-axis weight sums and their reciprocals (in the sums' dtype), or None when the
        window does not separate."""
        if not hasattr(self, "_factors"):
            window, params = self._window_spec
            is_tile = isinstance(window, str) and window == "overlap-tile"
            sums = None if is_tile else weight_sums(self.grid, window, params)
            if sums is not None:
                with np.errstate(divide="ignore"):
                    sums = [(w.astype(self.acc_dtype), (1.0 / w).astype(self.acc_dtype))
                            for w in sums]
            self._factors = sums
        return self._factors

    # -- the banded merge of a whole stack -------------------------------------------------
    @property
    def bandable(self) -> bool:
        """Whether :meth:`merge_banded` applies: shallow overlaps (the direct path's few block
        offsets) and plain sums (no anchor, no pick: those need a whole reference image)."""
        return not self._uses_ref and is_direct(self.grid)

    def merge_banded(self, stack: np.ndarray, workers: int = 1) -> np.ndarray:
        """Merge a whole canonical stack band by band: the result in the work dtype.

        The image is cut into bands of rows (or groups of whole images) whose sums fit the
        cache; each band adds every patch row that touches it (clipped to the band), then is
        weighed and written to the result at once. Only the stack is read from memory and only
        the result written: no image-sized canvas is filled, summed into, divided and copied.
        Bands are independent, so ``workers`` threads each take a contiguous run of them.
        Per pixel the patches are added in the same order as :meth:`add`.
        """
        grid = self.grid
        nd = self._nd
        b = stack.shape[0]
        n0, s0, p0 = grid.spatial_shape[0], grid.stride[0], grid.patch_size[0]
        kind = self.work if self.mode == "mean" else self.acc_dtype  # max, min: exact
        out = np.empty((b,) + grid.spatial_shape + (stack.shape[-1],), kind)
        rest = self._acc_shape[2:]  # (*extent[1:], C)
        row_bytes = n_elements(rest) * self.acc_dtype.itemsize
        if row_bytes * n0 <= _BAND_BYTES:
            per = max(1, _BAND_BYTES // (row_bytes * n0))
            bands = [(i, min(b, i + per), 0, n0) for i in range(0, b, per)]
        else:
            h = max(1, _BAND_BYTES // row_bytes // s0) * s0
            bands = [(i, i + 1, y, min(n0, y + h)) for i in range(b) for y in range(0, n0, h)]
        shape = (max(c[1] - c[0] for c in bands), max(c[3] - c[2] for c in bands))
        o0 = grid.origins[0]
        crop = tuple(slice(0, n) for n in grid.spatial_shape[1:])
        stride_rest = tuple(grid.stride[1:])
        combos = list(itertools.product(*self._runs[1:]))
        starts = [tuple(int(o[a]) for o, (a, _) in zip(grid.origins[1:], c)) for c in combos]
        self._weight_factors()

        # Patches of one grid row are staged (copied) in groups of columns that fit the cache
        # beside the band: the band's rows of a patch are one contiguous run, read at full
        # memory speed, while the overlap-add reads short blocks of every patch in turn (a
        # pattern the prefetchers do not follow: measured 2x slower from memory than from cache).
        column_bytes = (n_elements(stack.shape[3:]) // p0 * min(p0, shape[1])
                        * stack.dtype.itemsize)
        staged = max(1, _STAGE_BYTES // max(column_bytes, 1)) if nd > 1 else 0
        if staged < _STAGE_MIN_COLUMNS:  # few long blocks per patch: prefetchers keep up
            staged = 0

        def run(chunk):
            # float32 sums that overflow must stop the merge (see merge_patches); otherwise
            # the caller's own error handling applies, as everywhere else
            overflow = np.errstate(over="raise") if self.narrow else contextlib.nullcontext()
            with short_buffers(grid, stack.shape[-1]), overflow:
                scratch = np.empty(shape[0] * staged * column_bytes // stack.dtype.itemsize,
                                   stack.dtype)
                _bands(chunk, np.empty(shape + rest, self.acc_dtype), scratch)

        def _bands(chunk, buf, scratch):
            for b0, b1, y0, y1 in chunk:
                canvas = buf[:b1 - b0, :y1 - y0]
                canvas.fill(self._identity)
                first = int(np.searchsorted(o0 + p0, y0, side="right"))
                stop = int(np.searchsorted(o0, y1, side="left"))
                for i in range(first, stop):  # ascending patch rows
                    o = int(o0[i])
                    lo, hi = max(y0, o), min(y1, o + p0)
                    patch_rows = (slice(None),) * (1 + nd) + (slice(lo - o, hi - o),)
                    slab = stack[b0:b1, i:i + 1][patch_rows]
                    for combo, start in zip(combos, starts):
                        sub = slab[(slice(None), slice(None))
                                   + tuple(slice(a, z) for a, z in combo)]
                        step = staged or sub.shape[2]
                        for g in range(0, sub.shape[2], step):
                            part = sub[:, :, g:g + step]
                            if staged:
                                copy = scratch[:part.size].reshape(part.shape)
                                np.copyto(copy, part)
                                part = copy
                            origin = (lo - y0,) + start
                            if g:
                                origin = origin[:1] + (start[0] + g * stride_rest[0],) + start[1:]
                            overlap_add(canvas, part, origin, (hi - lo,) + stride_rest,
                                        self._op, self._identity)
                region = canvas[(slice(None), slice(None)) + crop]
                dst = out[b0:b1, y0:y1]
                if self.mode == "mean":
                    with np.errstate(divide="ignore", invalid="ignore"):
                        self._weigh(region, dst, slice(y0, y1))
                else:
                    np.copyto(dst, region, casting="unsafe")

        workers = max(1, min(workers, len(bands)))
        if workers == 1:
            run(bands)
        else:
            bounds = np.linspace(0, len(bands), workers + 1).round().astype(int)
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(run, [bands[bounds[k]:bounds[k + 1]] for k in range(workers)]))
        return out

    # -- result ----------------------------------------------------------------------------
    def result(self, dtype=None, fill_value=None) -> np.ndarray:
        """The merged images, canonical ``(b, *spatial, C)``, uncovered pixels set to fill.

        Finishes in place, and returns a view of the merger's canvas where the sums are kept
        in the result's dtype (no image-sized copy), so call it once, after the last :meth:`add`.
        """
        grid = self.grid
        crop = (slice(None),) + tuple(slice(0, n) for n in grid.spatial_shape)
        if self.mode == "pick":
            out = self.ref[crop]
        else:
            out = self.acc[crop]
        if self.mode == "mean":
            dst = out if out.dtype == self.work else np.empty(out.shape, self.work)
            # Uncovered pixels (0/0, and an anchor never written) are replaced by the fill.
            with np.errstate(divide="ignore", invalid="ignore"):
                self._weigh(out, dst)
            if self.anchor:
                return anchored_finish(self.ref[crop], dst, self._covered(), dtype, fill_value,
                                       self.work)
            out = dst
        return self.finish(out, dtype, fill_value)

    def _covered(self):
        """Covered pixels (by a positive window weight), or None where all are."""
        window, params = self._window_spec
        if self.window is not None and separable_factors(window, self.grid.patch_size,
                                                         **params) is None:
            return (weights_in(self.grid, window, params, np.float64) > 0)[None, ..., None]
        return None if self.grid.is_covering else coverage_mask(self.grid)[None, ..., None]

    def finish(self, out: np.ndarray, dtype=None, fill_value=None) -> np.ndarray:
        """Mark the uncovered pixels of a merged result and convert it to ``dtype``."""
        return finish(out, self._covered(), dtype, fill_value, self.work)


def _fuse_last(a: np.ndarray):
    """View ``(..., W, C)`` as ``(..., W * C)`` where memory allows it, else None."""
    if a.strides[-2] != a.strides[-1] * a.shape[-1]:
        return None
    return np.lib.stride_tricks.as_strided(a, a.shape[:-2] + (a.shape[-2] * a.shape[-1],),
                                           a.strides[:-2] + a.strides[-1:],
                                           writeable=a.flags.writeable)



def merge_numpy(canon: np.ndarray, grid: PatchGrid, workers: int | None, dtype, fill_value,
                **options) -> np.ndarray:
    """Merge a whole canonical stack on the NumPy engine: canonical ``(b, *spatial, C)``.

    Threads run only where the result cannot depend on them: the banded merge (each band is
    summed whole by one thread), and plain sums that are exact (integers, float32 in float64)
    or max/min. Anchored and weighted sums stay on one thread.
    """
    def new_merger(narrow):
        return NumpyMerger(grid, canon.shape[0], canon.shape[-1], canon.dtype, narrow=narrow,
                           **options)

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
            merged = merger.merge_banded(canon, workers)
        except FloatingPointError:  # float32 sums overflowed (values near the float32 limit)
            merger = new_merger(narrow=False)
            merged = merger.merge_banded(canon, workers)
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
        out = split_mean(hi, lo, count, target if target.kind in "biu" else np.float64,
                         self.unsigned)
        return self._hi.finish(out, dtype, fill_value)


def numpy_merger(grid: PatchGrid, n_images: int, n_channels: int, dtype, *, window="uniform",
                 reduce="mean", window_params=None):
    """The NumPy engine's streaming accumulator for these options."""
    if _is_wide_int(dtype) and reduce == "mean" and isinstance(window, str) and \
            window == "uniform":
        return SplitMerger(grid, n_images, n_channels, dtype)
    return NumpyMerger(grid, n_images, n_channels, dtype, window=window, reduce=reduce,
                       window_params=window_params)
