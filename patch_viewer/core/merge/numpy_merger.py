"""The NumPy streaming accumulator (:class:`NumpyMerger`): the fallback engine where numba is
missing, and the oracle of the compiled one. Its whole-stack entry points are in
:mod:`.numpy_engine`."""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._layout import (
    DIRECT_MAX_STEPS,
    ROWS_FIRST_ORDER,
    block_depths,
    ceil_div,
    is_direct,
    n_elements,
    split_regular,
    stack_order,
)
from ..grid import PatchGrid
from ..windows import make_window, separable_factors
from .kernels_numpy import (
    assign,
    interleave,
    ola,
    overlap_add,
    owned_segments,
    row_offset_preparer,
    short_buffers,
)
from .plan import REDUCTIONS
from .precision import (
    accumulation,
    anchored_finish,
    finish,
    is_wide_int,
    narrow_sums_exact,
    work_dtype,
)
from .weights import coverage_mask, weight_sums, weights_in

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
        for combo in itertools.product(*runs):
            sub = part[
                (slice(None), slice(combo[0][0] - row0, combo[0][1] - row0))
                + tuple(slice(a, z) for a, z in combo[1:])
            ]
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
        g, p = sub.shape[1 : 1 + nd], sub.shape[1 + nd : 1 + 2 * nd]
        depth = block_depths(p, stride)
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
            ref = self.ref[images] if anchor else None
            return sub, row_offset_preparer(
                sub, origin, ref, self._win, self.grid.stride[1], self.work, buffers
            )
        if cascade and depth[-1] > 1 and g[-1] >= depth[-1]:
            out, padded = self._interleaved(sub, g, p, depth[-1], buffers)
        elif anchor or self._win is not None:
            out = np.empty(sub.shape, self.work)
        else:
            return sub, None
        self._fill_prepared(out, sub, images, origin, anchor)
        return out, padded

    def _interleaved(self, sub, g, p, d, buffers):
        """A reused buffer for a cascade's prepared values, in the interleaved layout (last
        axis in-patch offset first) with identity margins: ``(view of sub's shape, padded)``."""
        nd, s = self._nd, self.grid.stride[-1]
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
        return data.transpose(order), padded  # back to (b, *G, *p, C)

    def _fill_prepared(self, out, sub, images, origin, anchor) -> None:
        """``out = (sub - ref) * window``, as far as the mode needs, iterating in ``out``'s
        memory order (numpy then streams the writes)."""
        nd, stride = self._nd, self.grid.stride
        g = sub.shape[1 : 1 + nd]
        mem = np.argsort([-x for x in out.strides], kind="stable")
        if anchor:
            ref = self.ref[images]
            view = np.lib.stride_tricks.sliding_window_view(
                ref, self.grid.patch_size, axis=tuple(range(1, nd + 1)), writeable=False
            )
            view = np.moveaxis(view, nd + 1, -1)[
                (slice(None),)
                + tuple(slice(o, o + (gk - 1) * sk + 1, sk) for o, gk, sk in zip(origin, g, stride))
            ]
            # in the work dtype, as the compiled kernels do: integer operands would wrap
            np.subtract(
                sub.transpose(mem), view.transpose(mem), out=out.transpose(mem), dtype=out.dtype
            )
        else:
            np.copyto(out.transpose(mem), sub.transpose(mem))
        if self._win is not None:
            win = np.broadcast_to(self._win, out.shape).transpose(mem)
            np.multiply(out.transpose(mem), win, out=out.transpose(mem))

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
                # reciprocals serve float sums only (see _weigh); an integer sum's would be
                # 1/0 cast to an integer where a pixel is uncovered
                floats = self.acc_dtype.kind == "f"
                with np.errstate(divide="ignore"):
                    sums = [
                        (
                            w.astype(self.acc_dtype),
                            (1.0 / w).astype(self.acc_dtype) if floats else None,
                        )
                        for w in sums
                    ]
            self._factors = sums
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


def _fuse_last(a: np.ndarray):
    """View ``(..., W, C)`` as ``(..., W * C)`` where memory allows it, else None."""
    if a.strides[-2] != a.strides[-1] * a.shape[-1]:
        return None
    return np.lib.stride_tricks.as_strided(
        a,
        a.shape[:-2] + (a.shape[-2] * a.shape[-1],),
        a.strides[:-2] + a.strides[-1:],
        writeable=a.flags.writeable,
    )
