"""The NumPy streaming accumulator (:class:`NumpyMerger`): the fallback engine where numba is
missing, and the oracle of the compiled one. Its whole-stack entry points are in
:mod:`.numpy_engine`; the patch values it adds are prepared in :mod:`.numpy_prepare`, and its
sums are divided by their weights in :mod:`.numpy_weigh`."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._layout import ROWS_FIRST_ORDER, ceil_div, is_direct, n_elements, split_regular, stack_order
from ..grid import PatchGrid
from ..windows import make_window, separable_factors
from .kernels_numpy import assign, interleave, ola, overlap_add, owned_segments, short_buffers
from .numpy_prepare import prepare_patches
from .numpy_weigh import divide_separable, weight_factors
from .plan import check_reduce
from .precision import (
    accumulation,
    anchored_finish,
    finish,
    is_wide_int,
    narrow_sums_exact,
    work_dtype,
)
from .weights import coverage_mask, weights_in

__all__ = ["NumpyMerger"]

# Target size of one piece of the patch stack processed at a time (fits the L2/L3 caches).
PIECE_BYTES = 2 * 2**20
# ... and for the rows-first path (its steps move whole blocks, and its bulk is one strided
# reduce over the rows of a part: tall parts pay; measured best at 32-64 MiB; see _rows_first).
ROWS_FIRST_PIECE_BYTES = 48 * 2**20
#: The value sums start from, per reduction.
_IDENTITY = {"mean": 0.0, "max": -np.inf, "min": np.inf}


class NumpyMerger:
    """Streaming accumulator: add pieces of a patch stack in order, then take the result.

    Pieces are ``(b, g0, *grid_shape[1:], *patch_size, C)`` arrays covering images
    ``[b0, b0 + b)`` and grid rows ``[row0, row0 + g0)``; rows of one image must come in
    ascending order. This is the one engine behind :func:`merge_patches` and the streaming
    :func:`patch_viewer.process`.
    """

    def __init__(
        self,
        grid: PatchGrid,
        n_images: int,
        n_channels: int,
        dtype,
        *,
        window="uniform",
        reduce="mean",
        window_params=None,
        narrow=False,
    ):
        check_reduce(reduce)
        params = dict(window_params or {})
        is_tile = isinstance(window, str) and window == "overlap-tile"
        self.window = make_window(window, grid.patch_size, **params)
        check_reduce(reduce, weighted=self.window is not None or is_tile)
        self.grid = grid
        self.mode = "pick" if is_tile else reduce
        self.work = work_dtype(dtype)
        self._window_spec = (window, params)
        extent = tuple(n + s for n, s in zip(grid.padded_shape, grid.stride))
        shape = (n_images,) + extent + (n_channels,)
        self._choose_sums(np.dtype(dtype), narrow)
        wide = np.dtype(dtype) if is_wide_int(dtype) else None  # exact in their own dtype
        if self._uses_ref:
            # every covered pixel is owned once
            self.ref = np.zeros(shape, self.work if wide is None else wide)  # no garbage NaN
            rule = "first" if self.mode == "mean" else "centre"
            self._owned = [
                owned_segments(o, p, rule) for o, p in zip(grid.origins, grid.patch_size)
            ]
        if self.mode != "pick":
            self._identity = self._start_value()
            self._acc_shape = shape
            self._acc: np.ndarray | None = None
            self._op = {"mean": np.add, "max": np.maximum, "min": np.minimum}[self.mode]
        self._runs = [split_regular(o, s) for o, s in zip(grid.origins, grid.stride)]
        self._win = None if self.window is None else self.window[..., None].astype(self.work)
        self._nd = grid.ndim
        self._buffers: dict = {}
        rows_first = stack_order(grid) == ROWS_FIRST_ORDER
        self._piece_bytes = ROWS_FIRST_PIECE_BYTES if rows_first else PIECE_BYTES

    def _choose_sums(self, dtype: np.dtype, narrow: bool) -> None:
        """``acc_dtype``, ``anchor`` and ``narrow``: what the sums are kept in.

        ``narrow``: float32 patches may be summed in float32 where that is exact for the
        grid's coverage counts (see :func:`.precision.narrow_sums_exact`), at the risk of
        overflowing where float64 would not: the banded merge then raises FloatingPointError
        (:func:`.numpy_engine.merge_numpy` starts again in float64).
        """
        self.acc_dtype, self.anchor = accumulation(
            dtype, self.work, self.window is None, self.grid.coverage_range()[1]
        )
        self.narrow = (
            narrow
            and self.mode == "mean"
            and self.window is None
            and not self.anchor
            and self.acc_dtype != self.work
            and dtype.newbyteorder("=") == np.float32
            and narrow_sums_exact(self.grid)
        )
        if self.mode in ("max", "min"):
            self.acc_dtype = dtype if is_wide_int(dtype) else self.work
        elif self.narrow:
            self.acc_dtype = self.work

    def _start_value(self):
        """The value a pixel's sum starts from (the identity of the reduction)."""
        if self.acc_dtype.kind in "iu" and self.mode != "mean":
            info = np.iinfo(self.acc_dtype)
            return info.min if self.mode == "max" else info.max
        return _IDENTITY[self.mode]

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
                yield piece[i : i + per], b0 + i, row0
            return
        n = min(g0, max(ceil_div(g0, rows), min_parts if b == 1 else 1))
        rows = ceil_div(g0, n)
        for bi in range(b):
            for r in range(0, g0, rows):
                yield piece[bi : bi + 1, r : r + rows], b0 + bi, row0 + r

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
            for part, b, r in parts[bounds[k] : bounds[k + 1]]:
                self._accumulate(part, b, r, accs[k], buffers)

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(job, range(workers)))
        for extra in accs[1:]:
            self._op(self.acc, extra, out=self.acc)

    def _accumulate(
        self, part: np.ndarray, b0: int, row0: int, acc: np.ndarray, buffers: dict
    ) -> None:
        with short_buffers(self.grid, part.shape[-1]):
            self._accumulate_in(part, b0, row0, acc, buffers)

    def _accumulate_in(
        self, part: np.ndarray, b0: int, row0: int, acc: np.ndarray, buffers: dict
    ) -> None:
        b, g0 = part.shape[:2]
        images = slice(b0, b0 + b)
        grid = self.grid
        runs0 = [(max(a, row0), min(z, row0 + g0)) for a, z in self._runs[0]]
        runs = [[r for r in runs0 if r[0] < r[1]]] + self._runs[1:]
        acc = acc[images]
        ref = self.ref[images] if self.mode == "mean" and self.anchor else None
        options = (grid, self._win, self.acc_dtype, self.work, self._identity, buffers)
        for combo in itertools.product(*runs):
            sub = part[
                (slice(None), slice(combo[0][0] - row0, combo[0][1] - row0))
                + tuple(slice(a, z) for a, z in combo[1:])
            ]
            origin = tuple(int(o[a]) for o, (a, _) in zip(grid.origins, combo))
            sub, padded = prepare_patches(sub, ref, origin, *options)
            overlap_add(acc, sub, origin, grid.stride, self._op, self._identity, padded)

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
        for combo in itertools.product(
            rows,
            *[
                [(i0, i1, a, w, pitch, i0) for i0, i1, a, w, pitch in runs]
                for runs in self._owned[1:]
            ],
        ):
            sub = part[
                (slice(None),)
                + tuple(slice(c[0], c[1]) for c in combo)
                + tuple(slice(c[2], c[2] + c[3]) for c in combo)
            ]
            start = tuple(int(o[c[5]]) + c[2] for o, c in zip(origins, combo))
            region = ref[(slice(None),) + tuple(slice(x, None) for x in start)]
            ola(
                region,
                interleave(sub, self._nd),
                list(range(1, self._nd + 1)),
                [c[4] for c in combo],
                assign,
            )

    def _weigh(self, region: np.ndarray, dst: np.ndarray, rows: slice = slice(None)) -> None:
        """``dst = region / weights`` for image rows ``rows``; ``region`` may be overwritten.

        Separable windows go one axis at a time (no image-sized weight map; with reciprocals
        where the sums are wider than the result, see :func:`.numpy_weigh.divide_separable`).
        """
        factors = self._weight_factors()
        if factors is None:
            window, params = self._window_spec
            w = weights_in(self.grid, window, params, self.acc_dtype)[rows]
            np.divide(region, w[None, ..., None], out=dst)
            return
        recip = self.acc_dtype.itemsize > self.work.itemsize
        divide_separable(region, dst, factors, rows, recip)

    def _weight_factors(self):
        """Per-axis weight sums and their reciprocals (in the sums' dtype), or None when the
        window does not separate (see :func:`.numpy_weigh.weight_factors`)."""
        if not hasattr(self, "_factors"):
            window, params = self._window_spec
            self._factors = weight_factors(self.grid, window, params, self.acc_dtype)
        return self._factors

    # -- the banded merge of a whole stack -------------------------------------------------
    @property
    def bandable(self) -> bool:
        """Whether :meth:`merge_banded` applies: shallow overlaps (the direct path's few block
        offsets) and plain sums (no anchor, no pick: those need a whole reference image)."""
        return not self._uses_ref and is_direct(self.grid)

    def merge_banded(self, stack: np.ndarray, workers: int = 1) -> np.ndarray:
        """See :func:`.numpy_engine.merge_banded`."""
        from .numpy_engine import merge_banded

        return merge_banded(self, stack, workers)

    # -- result ----------------------------------------------------------------------------
    def result(self, dtype=None, fill_value=None) -> np.ndarray:
        """The merged images, canonical ``(b, *spatial, C)``, uncovered pixels set to fill.

        Finishes in place, and returns a view of the merger's canvas where the sums are kept
        in the result's dtype (no image-sized copy), so call it once, after the last :meth:`add`.
        """
        grid = self.grid
        crop = (slice(None),) + tuple(slice(0, n) for n in grid.spatial_shape)
        out = self.ref[crop] if self.mode == "pick" else self.acc[crop]
        if self.mode == "mean":
            dst = out if out.dtype == self.work else np.empty(out.shape, self.work)
            # Uncovered pixels (0/0, and an anchor never written) are replaced by the fill.
            with np.errstate(divide="ignore", invalid="ignore"):
                self._weigh(out, dst)
            if self.anchor:
                return anchored_finish(
                    self.ref[crop], dst, self._covered(), dtype, fill_value, self.work
                )
            out = dst
        return self.finish(out, dtype, fill_value)

    def _covered(self):
        """Covered pixels (by a positive window weight), or None where all are."""
        window, params = self._window_spec
        if (
            self.window is not None
            and separable_factors(window, self.grid.patch_size, **params) is None
        ):
            return (weights_in(self.grid, window, params, np.float64) > 0)[None, ..., None]
        return None if self.grid.is_covering else coverage_mask(self.grid)[None, ..., None]

    def finish(self, out: np.ndarray, dtype=None, fill_value=None) -> np.ndarray:
        """Mark the uncovered pixels of a merged result and convert it to ``dtype``."""
        return finish(out, self._covered(), dtype, fill_value, self.work)
