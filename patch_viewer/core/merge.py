"""Merging patches back into an image: a vectorised overlap-add.

How it is fast
--------------
No loop runs over patches. The output is viewed as blocks of ``stride`` pixels, and a whole slab
of the patch stack (one block offset inside every patch at once) is added per step, so the Python
loop runs ``ceil(patch / stride)`` times per axis. Where that product is large (stride 1), the
axes are merged one after another (a cascade: ``sum(ceil(p/s))`` steps instead of the product).
The stack is processed in cache-sized pieces of patch rows, so each piece is read from memory
once and every further step hits the cache.

How it is exact
---------------
For ``reduce="mean"`` each pixel accumulates ``w * (v - ref)``, where ``ref`` is the value the
first patch covering that pixel gives it, and the result is ``ref + sum / weights``. Where all
contributions agree (the identity round trip) every term is exactly zero, so the image comes
back bit for bit, whatever the dtype, window or number of overlaps; otherwise the anchored sum
is also more accurate than a plain one.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._layout import (
    from_canonical,
    is_lazy,
    n_elements,
    patches_to_canonical,
    split_regular,
)
from .grid import PatchGrid
from .windows import make_window, separable_factors

REDUCTIONS = ("mean", "max", "min")

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
# Use one product loop over all block offsets when it has at most this many steps.
_DIRECT_MAX_STEPS = 8


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


def work_dtype(dtype) -> np.dtype:
    """Float dtype results are computed in: float32 for float32/16 and integers up to 16 bits,
    float64 otherwise."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.dtype(np.float32 if dtype.itemsize <= 4 else np.float64)
    if dtype.kind in "biu":
        return np.dtype(np.float32 if dtype.itemsize <= 2 else np.float64)
    raise TypeError(f"patches must be real numbers (bool, int or float), got dtype {dtype}")


# --------------------------------------------------------------------------- overlap-add kernel
def _block_view(region: np.ndarray, axes, strides) -> np.ndarray:
    """Split each axis ``axes[j]`` of ``region`` into ``(blocks, strides[j])`` (a writeable view)."""
    shape, st = [], []
    for i, (n, t) in enumerate(zip(region.shape, region.strides)):
        if i in axes:
            s = strides[axes.index(i)]
            shape += [n // s, s]
            st += [t * s, t]
        else:
            shape.append(n)
            st.append(t)
    return np.lib.stride_tricks.as_strided(region, shape, st, writeable=True)


def _ola(out: np.ndarray, a: np.ndarray, axes: list[int], strides: list[int], op) -> None:
    """``out[..., y_j, ...] op= a[..., g_j, e_j, ...]`` with ``y_j = g_j * s_j + e_j``.

    ``axes`` are positions in ``out`` (ascending); axis ``axes[j]`` of ``out`` corresponds to
    the pair of axes ``axes[j] + j`` (grid index) and ``axes[j] + j + 1`` (in-patch offset) of
    ``a``. ``out`` may extend past ``(G + ceil(p/s) - 1) * s`` along those axes.
    """
    sizes = []
    sl = [slice(None)] * out.ndim
    for j, (ax, s) in enumerate(zip(axes, strides)):
        g, p = a.shape[ax + j], a.shape[ax + j + 1]
        d = -(-p // s)
        sizes.append((g, p, s, d))
        sl[ax] = slice(0, (g + d - 1) * s)
    ov = _block_view(out[tuple(sl)], axes, strides)
    # Offsets run from the last block down so that, at every pixel, contributions are added in
    # ascending patch order (the same order whatever the piece size).
    for ks in itertools.product(*[range(d - 1, -1, -1) for (_, _, _, d) in sizes]):
        oi: list = [slice(None)] * ov.ndim
        ai: list = [slice(None)] * a.ndim
        for j, (ax, k, (g, p, s, _)) in enumerate(zip(axes, ks, sizes)):
            w = min(s, p - k * s)
            oi[ax + j] = slice(k, k + g)
            oi[ax + j + 1] = slice(0, w)
            ai[ax + j + 1] = slice(k * s, k * s + w)
        target = ov[tuple(oi)]
        op(target, a[tuple(ai)], out=target)


def _depth(grid: PatchGrid) -> list[int]:
    """Block offsets per axis: how many stride blocks one patch spans."""
    return [-(-p // s) for p, s in zip(grid.patch_size, grid.stride)]


def _is_direct(grid: PatchGrid) -> bool:
    """Whether the grid's overlap is shallow enough for one product loop over all block
    offsets (otherwise the axes are merged one after another, a cascade)."""
    return math.prod(_depth(grid)) <= _DIRECT_MAX_STEPS


@contextlib.contextmanager
def _short_buffers(grid: PatchGrid, channels: int):
    """NumPy buffer size for the direct overlap-add's steps, a few blocks long.

    NumPy buffers strided operands that need a cast (patches are summed in a wider dtype) in
    chunks of its buffer size (8192 elements); where a step's contiguous blocks are short,
    gathering whole buffers of them costs more than the sum. Measured: 2x faster steps at
    32-pixel blocks, neutral at long ones; the deep (cascade) paths gain nothing, so they
    keep NumPy's default.
    """
    if not _is_direct(grid):
        yield
        return
    block = grid.stride[-1] * channels
    old = np.setbufsize(int(min(max(8 * block, 128), 8192)) // 16 * 16)  # multiples of 16
    try:
        yield
    finally:
        np.setbufsize(old)


def _interleave(a: np.ndarray, nd: int) -> np.ndarray:
    """``(b, *G, *p, C)`` -> ``(b, G0, p0, G1, p1, ..., C)`` (a view)."""
    order = [0] + [x for k in range(nd) for x in (1 + k, 1 + nd + k)] + [2 * nd + 1]
    return a.transpose(order)


def _ola_1d(out: np.ndarray, a: np.ndarray, ax: int, s: int, op) -> None:
    """One axis of :func:`_ola`, looping over whichever is fewer: patches or overlap depth."""
    g, p = a.shape[ax], a.shape[ax + 1]
    if g >= -(-p // s):
        _ola(out, a, [ax], [s], op)
        return
    lead = (slice(None),) * ax
    for i in range(g):  # ascending patch order, each adding its whole extent at once
        target = out[lead + (slice(i * s, i * s + p),)]
        op(target, a[lead + (i,)], out=target)


def _antidiagonal_reduce(padded: np.ndarray, ax: int, g: int, d: int, s: int, ufunc,
                         out: np.ndarray) -> None:
    """``out[..., y, ...] = ufunc.reduce`` over all ``(j, e)`` with ``j * s + e = y``, in ONE call.

    ``padded`` is ``(..., G + 2(d-1), d*s, ...)`` (grid axis at ``ax``, in-patch offset at
    ``ax + 1``) holding the patches at grid positions ``d-1 .. d-1+G`` and ``ufunc``'s identity
    elsewhere (margins, and offsets past the patch). A strided view then lines up the ``d``
    terms of every output pixel along a last axis, so the sum stays in registers.
    """
    st = padded.strides
    sj, se = st[ax], st[ax + 1]
    q = g + d - 1
    base = padded[(slice(None),) * ax + (slice(d - 1, None),)]
    shape = padded.shape[:ax] + (q, s) + padded.shape[ax + 2:] + (d,)
    strides = st[:ax] + (sj, se) + st[ax + 2:] + (s * se - sj,)
    view = np.lib.stride_tricks.as_strided(base, shape, strides, writeable=False)
    ufunc.reduce(view, axis=-1, out=_block_view(out, [ax], [s]))


def _antidiagonal_reduce_unit(t: np.ndarray, ax: int, ufunc, identity: float,
                              out: np.ndarray, offsets_last: bool = True) -> None:
    """Stride-1 form of :func:`_antidiagonal_reduce` that needs no identity margins, so it
    reads the patches where they are (no copy): ``out[..., x, ...]`` reduces
    ``t[..., x - e, e, ...]`` over the valid ``e``, in ascending ``e`` everywhere.

    Where all ``p`` terms exist (``p - 1 <= x < g``) one strided ``ufunc.reduce`` does it; the
    two borders add one in-patch offset at a time. The reduce runs over a last axis of offsets
    (``offsets_last``: the terms of a pixel are summed in registers), or over the offsets
    where they are, so that NumPy's inner loops run along the axes after them (long when those
    are contiguous blocks, as in an offset-major stack: see :func:`_rows_first`).
    """
    g, p = t.shape[ax], t.shape[ax + 1]
    lead = (slice(None),) * ax
    borders = [(0, g + p - 1)]
    if g >= p:
        st = t.strides
        base = t[lead + (slice(p - 1, None),)]
        step = st[ax + 1] - st[ax]  # from term e to e + 1 of one pixel
        if offsets_last:
            shape = t.shape[:ax] + (g - p + 1,) + t.shape[ax + 2:] + (p,)
            strides = st[:ax] + (st[ax],) + st[ax + 2:] + (step,)
            axis = -1
        else:
            shape = t.shape[:ax] + (g - p + 1, p) + t.shape[ax + 2:]
            strides = st[:ax] + (st[ax], step) + st[ax + 2:]
            axis = ax + 1
        view = np.lib.stride_tricks.as_strided(base, shape, strides, writeable=False)
        ufunc.reduce(view, axis=axis, out=out[lead + (slice(p - 1, g),)])
        borders = [(0, p - 1), (g, g + p - 1)]
    for a, z in borders:
        out[lead + (slice(a, z),)] = identity
        for e in range(p):
            lo, hi = max(a, e), min(z, g + e)  # pixels x with a valid patch x - e
            if lo < hi:
                target = out[lead + (slice(lo, hi),)]
                ufunc(target, t[lead + (slice(lo - e, hi - e), e)], out=target)


def _rows_first(canvas: np.ndarray, a: np.ndarray, origin, stride, op, identity: float,
                prepare=None) -> None:
    """2-D overlap-add with stride 1 along the rows: reduce the row offsets first (the bulk of
    the work, on whole contiguous blocks when ``a`` is offset-major, see :func:`stack_order`),
    then overlap-add the rows that result along the columns.

    ``prepare(e)``, when given, returns the values to add for row offset ``e`` (anchored or
    weighed, ``(g0, b, g1, p1, C)``) in place of ``a``'s: they are added one offset at a time,
    in the same order as the reduce, so no prepared copy of the whole part is ever made.
    """
    b, g0, g1, p0, p1, c = a.shape
    rows = np.empty((b, g0 + p0 - 1, g1, p1, c), canvas.dtype)
    by_row = rows.transpose(1, 0, 2, 3, 4)  # (y, b, g1, p1, C)
    if prepare is None:
        # (g0, p0, b, g1, p1, C): each step moves whole (b, g1, p1, C) blocks, contiguous when
        # the stack is offset-major
        _antidiagonal_reduce_unit(a.transpose(1, 3, 0, 2, 4, 5), 0, op, identity, by_row,
                                  offsets_last=False)
    else:
        by_row[...] = identity
        for e in range(p0):  # ascending offsets at every pixel, as the reduce adds them
            target = by_row[e:e + g0]
            op(target, prepare(e), out=target)
    y0, x0 = origin
    if stride[1] == 1:  # every image at once: one strided reduce along the anti-diagonals
        summed = np.empty((b, g0 + p0 - 1, g1 + p1 - 1, c), canvas.dtype)
        _antidiagonal_reduce_unit(rows, 2, op, identity, summed)
        target = canvas[:, y0:y0 + g0 + p0 - 1, x0:x0 + g1 + p1 - 1]
        op(target, summed, out=target)
        return
    for bi in range(b):  # each image's rows are a batch of 1-D patch rows
        overlap_add(canvas[bi, y0:y0 + g0 + p0 - 1], rows[bi], (x0,), (stride[1],), op, identity)


def overlap_add(canvas: np.ndarray, a: np.ndarray, origin, stride, op, identity: float,
                padded: np.ndarray | None = None) -> None:
    """Overlap-add a regular sub-grid of patches ``a`` (``(b, *G, *p, C)``) into ``canvas``.

    ``canvas`` is ``(b, *extent, C)``; patch ``(i, j, ...)`` lands at
    ``origin + (i, j, ...) * stride``. ``canvas`` must extend ``stride`` past the last patch.
    ``padded``, when given, is the same data in the interleaved layout with identity margins
    on the last spatial axis (see :func:`_antidiagonal_reduce`), used for deep overlaps; or
    ``"rows-first"``, or a callable that prepares the values of one row offset (both: see
    :func:`_rows_first`).
    """
    nd = len(stride)
    if isinstance(padded, str) and padded == "rows-first":
        _rows_first(canvas, a, origin, stride, op, identity)
        return
    if callable(padded):  # rows-first, with the values prepared one row offset at a time
        _rows_first(canvas, a, origin, stride, op, identity, prepare=padded)
        return
    p = a.shape[1 + nd: 1 + 2 * nd]
    depth = [-(-pk // sk) for pk, sk in zip(p, stride)]
    t = _interleave(a, nd)
    region = canvas[(slice(None),) + tuple(slice(o, None) for o in origin)]
    if math.prod(depth) <= _DIRECT_MAX_STEPS:
        _ola(region, t, list(range(1, nd + 1)), list(stride), op)
        return
    # Cascade: merge the last spatial axis first, then the next, each into a small buffer.
    for j in range(nd - 1, 0, -1):
        ax = 1 + 2 * j
        shape = list(t.shape)
        g = shape[ax]
        shape[ax: ax + 2] = [(g + depth[j] - 1) * stride[j]]
        if isinstance(padded, str) and j == nd - 1:  # "unit": stride 1, read t as it is
            nxt = np.empty(shape, dtype=canvas.dtype)
            _antidiagonal_reduce_unit(t, ax, op, identity, nxt)
        elif padded is not None and j == nd - 1:
            nxt = np.empty(shape, dtype=canvas.dtype)
            _antidiagonal_reduce(padded, ax, g, depth[j], stride[j], op, nxt)
        else:
            nxt = np.full(shape, identity, dtype=canvas.dtype)
            _ola_1d(nxt, t, ax, stride[j], op)
        t = nxt
    rest = tuple(slice(0, n) for n in t.shape[3:-1])
    _ola_1d(region[(slice(None), slice(None)) + rest], t, 1, stride[0], op)


# --------------------------------------------------------------------------- choosing one patch
def _owned_segments(origins: np.ndarray, p: int, rule: str) -> list[tuple[int, int, int, int, int]]:
    """Which pixels of one axis each patch *owns* under ``rule``, grouped into regular runs.

    ``rule="first"``: a pixel belongs to the first patch covering it; ``"centre"``: to the
    covering patch whose centre is nearest. Owned ranges partition the covered pixels. Returns
    runs ``(i0, i1, a, w, pitch)``: patches ``i0..i1-1`` each own offsets ``[a, a + w)``, and
    consecutive patches are ``pitch`` pixels apart.
    """
    o = origins.astype(np.int64)
    ends = o + p
    if rule == "first":
        starts = np.concatenate([[o[0]], np.maximum(o[1:], ends[:-1])])
        stops = ends
    else:
        mids = (o[:-1] + o[1:] + p - 1) // 2  # last pixel nearer the left centre (ties: left)
        starts = np.concatenate([[o[0]], np.maximum(o[1:], mids + 1)])
        stops = np.concatenate([np.minimum(ends[:-1], mids + 1), [ends[-1]]])
    runs: list[tuple[int, int, int, int, int]] = []
    for i in range(len(o)):
        a, w = int(starts[i] - o[i]), int(stops[i] - starts[i])
        if w <= 0:
            continue
        if runs:
            i0, i1, a0, w0, pitch = runs[-1]
            step = int(o[i] - o[i1 - 1])
            if i1 == i and (a0, w0) == (a, w) and (pitch == step or i1 - i0 == 1):
                runs[-1] = (i0, i + 1, a, w, step)
                continue
        runs.append((i, i + 1, a, w, max(w, 1)))
    return runs


#: Memory order of a 2-D stack ``(b, g0, g1, p0, p1, C)`` for :func:`_rows_first`: row offset,
#: grid row, image, then each patch row's column data.
ROWS_FIRST_ORDER = (3, 1, 0, 2, 4, 5)


def stack_order(grid: PatchGrid) -> tuple[int, ...] | None:
    """Memory order (axes of a canonical ``(b, *G, *p, C)`` stack, outermost first) in which
    the merge reads a stack fastest, or None where the plain patch-major order is best.

    Deep overlaps (stride 1) are merged by a cascade that reads the last axis' in-patch offset
    before its grid index (element-major, as ``torch.unfold`` lays patches out); a stack made
    in that order is merged without a transpose. The streaming pipeline extracts patches that
    way, and element-wise filters keep the order.
    """
    nd = grid.ndim
    if _is_direct(grid):
        return None
    if nd == 2 and grid.stride[0] == 1:  # offset-major rows, see _rows_first
        return ROWS_FIRST_ORDER
    if _depth(grid)[-1] <= 1:
        return None
    order = [0]
    for k in range(nd - 1):
        order += [1 + k, 1 + nd + k]
    return tuple(order + [2 * nd, nd, 2 * nd + 1])


def empty_in_order(shape, order, dtype) -> np.ndarray:
    """An uninitialised array of ``shape`` whose memory runs in ``order`` (see
    :func:`stack_order`)."""
    mem = np.empty([shape[a] for a in order], dtype)
    return mem.transpose(np.argsort(order))


def _copy(target, value, out):  # an overlap-add "op" that assigns
    np.copyto(out, value)


class Merger:
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
        if reduce != "mean" or self.narrow:
            self.acc_dtype = self.work
        if self._uses_ref:
            self.ref = np.empty(shape, self.work)  # every covered pixel is owned once
            rule = "first" if self.mode == "mean" else "centre"
            self._owned = [_owned_segments(o, p, rule) for o, p in zip(grid.origins, grid.patch_size)]
        if self.mode != "pick":
            fill = {"mean": 0.0, "max": -np.inf, "min": np.inf}[self.mode]
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
        with _short_buffers(self.grid, part.shape[-1]):
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
        cascade = math.prod(depth) > _DIRECT_MAX_STEPS
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
            _ola(region, _interleave(sub, self._nd), list(range(1, self._nd + 1)),
                 [c[4] for c in combo], _copy)

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
            w = _weights(self.grid, window, params, self.acc_dtype)[rows]
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
            sums = None if is_tile else _weight_sums(self.grid, window, params)
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
        return not self._uses_ref and _is_direct(self.grid)

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
        out = np.empty((b,) + grid.spatial_shape + (stack.shape[-1],), self.work)
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
            with _short_buffers(grid, stack.shape[-1]), overflow:
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
                    dst += self.ref[crop]
            out = dst
        return self.finish(out, dtype, fill_value)

    def finish(self, out: np.ndarray, dtype=None, fill_value=None) -> np.ndarray:
        """Mark the uncovered pixels of a merged result and convert it to ``dtype``."""
        covered = None if self.grid.is_covering else _coverage_mask(self.grid)[None, ..., None]
        return _finish(out, covered, dtype, fill_value, self.work)


def _fuse_last(a: np.ndarray):
    """View ``(..., W, C)`` as ``(..., W * C)`` where memory allows it, else None."""
    if a.strides[-2] != a.strides[-1] * a.shape[-1]:
        return None
    return np.lib.stride_tricks.as_strided(a, a.shape[:-2] + (a.shape[-2] * a.shape[-1],),
                                           a.strides[:-2] + a.strides[-1:],
                                           writeable=a.flags.writeable)


def _outer(factors, ufunc) -> np.ndarray:
    """``ufunc.outer`` over a list of 1-D arrays: the nD map of a separable quantity."""
    out = factors[0]
    for f in factors[1:]:
        out = ufunc.outer(out, f)
    return out


def _coverage_mask(grid: PatchGrid) -> np.ndarray:
    return _outer([c > 0 for c in grid.coverage_1d()], np.logical_and)


def _finish(out, covered, dtype, fill_value, work):
    """Mark uncovered pixels and convert to the requested dtype (integers rounded and clipped)."""
    if dtype is None:
        dtype = work
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise TypeError(f"`dtype` must be a real numeric dtype, got {dtype}")
    if covered is not None:
        if fill_value is None:
            if dtype.kind != "f":
                raise ValueError(
                    "some pixels are covered by no patch (edge='drop' or stride > patch_size): "
                    f"pass `fill_value` to mark them in an integer output dtype ({dtype})"
                )
            fill_value = np.nan
        np.copyto(out, np.asarray(fill_value, dtype=out.dtype),
                  where=np.broadcast_to(~covered, out.shape))
    if dtype.kind in "biu":
        info = np.iinfo(dtype) if dtype.kind != "b" else None
        np.rint(out, out=out)
        if info is not None:
            np.clip(out, info.min, info.max, out=out)
        return out.astype(dtype)
    return out.astype(dtype, copy=False)


# --------------------------------------------------------------------------- public functions
def merge_patches(patches, grid: PatchGrid, *, window="uniform", reduce="mean", dtype=None,
                  fill_value=None, workers=None, **window_params):
    """Merge a patch stack back into an image, blending where patches overlap.

    Parameters
    ----------
    patches : array_like
        ``(*grid.grid_shape, *grid.patch_shape)`` as returned by :func:`extract_patches`, or the
        flat ``(grid.n_patches, *grid.patch_shape)``; either with a leading batch axis to merge
        many images at once.
    grid : PatchGrid
        The geometry the patches were cut with.
    window : str or array_like, optional
        ``"uniform"`` (default), ``"triangular"``, ``"hann"``, ``"gaussian"`` (``sigma=`` as a
        fraction of the patch size, default 0.125), ``"overlap-tile"`` (each pixel from the
        patch whose centre is nearest), or a non-negative array of the patch's spatial shape.
    reduce : {"mean", "max", "min"}, optional
        How overlapping values combine; ``mean`` is weighted by the window.
    dtype : dtype, optional
        Output dtype. Default: float32 for float32 and integer patches up to 16 bits, float64
        otherwise. Integer dtypes are rounded and clipped, so a uint8 round trip is exact.
    fill_value : scalar, optional
        Value for pixels no patch covers (``edge="drop"``, or stride > patch size). Default NaN;
        required for an integer ``dtype`` when such pixels exist.
    workers : int, optional
        Threads to accumulate on (NumPy releases the GIL). Default: all cores for stacks of
        8 MiB and more, one below. Results are deterministic for a given number of workers.

    Returns
    -------
    ndarray
        Shape ``grid.image_shape`` (with the batch axis first if given).

    Notes
    -----
    Any memory order is accepted; a stack laid out as
    ``extract_patches(..., copy=True, layout="merge")`` lays it out (what :func:`process`
    streams) merges fastest: 2-5x faster at stride 1 than a C-order stack.

    float32 patches on a grid that covers every pixel 1, 2 or 4 times with the uniform window
    are summed in float32 (exact for equal values, so round trips stay exact); elsewhere, and
    in :func:`process`, float32 patches are summed in float64. The two can differ in the last
    bit or two where overlapping values disagree.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.random.default_rng(0).random((100, 100))
    >>> grid = PatchGrid(image.shape, 39, stride=1)
    >>> from patch_viewer import extract_patches
    >>> merged = merge_patches(extract_patches(image, grid), grid)
    >>> bool(np.array_equal(merged, image))
    True
    """
    if not isinstance(grid, PatchGrid):
        raise TypeError(f"`grid` must be a PatchGrid, got {type(grid).__name__}")
    if is_lazy(patches):
        raise TypeError(
            "`patches` must be an in-memory array: a patch stack is many times larger than its "
            "image; for images larger than memory pass the dask or zarr image to "
            "patch_viewer.process(), which cuts, filters and merges chunk by chunk"
        )
    patches = np.asanyarray(patches)
    canon, batched = patches_to_canonical(patches, grid)
    def new_merger(narrow):
        return Merger(grid, canon.shape[0], canon.shape[-1], canon.dtype, window=window,
                      reduce=reduce, window_params=window_params, narrow=narrow)

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
    elif not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"`workers` must be an int >= 1 or None, got {workers!r}")
    if merger.bandable:
        try:
            merged = merger.merge_banded(canon, workers)
        except FloatingPointError:  # float32 sums overflowed (values near the float32 limit)
            merger = new_merger(narrow=False)
            merged = merger.merge_banded(canon, workers)
        merged = merger.finish(merged, dtype, fill_value)
    else:
        merger.add_all(canon, workers)
        merged = merger.result(dtype, fill_value)
    return from_canonical(merged, grid, batched)


def weight_map(grid: PatchGrid, window="uniform", **window_params) -> np.ndarray:
    """Sum of the window weights of all patches covering each pixel.

    With the uniform window this is the coverage count. Separable windows cost O(H + W): the
    map is an outer product of 1-D sums. ``"overlap-tile"`` gives 1 where covered, else 0.

    Returns
    -------
    ndarray
        float64, of the grid's spatial shape (no channel axis).

    Examples
    --------
    >>> weight_map(PatchGrid((6,), 4, stride=2)).tolist()
    [1.0, 1.0, 2.0, 2.0, 1.0, 1.0]
    """
    if not isinstance(grid, PatchGrid):
        raise TypeError(f"`grid` must be a PatchGrid, got {type(grid).__name__}")
    return _weights(grid, window, window_params, np.float64)


def _weight_sums(grid: PatchGrid, window, window_params: dict):
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


def max_weight(grid: PatchGrid, window="uniform", **window_params) -> float:
    """The largest value of :func:`weight_map`, in O(H + W) for the named windows (no map is
    made): the contrast limit of a weight heatmap that is computed lazily.

    Examples
    --------
    >>> max_weight(PatchGrid((100, 100), 39, stride=1))
    1521.0
    """
    if isinstance(window, str) and window == "overlap-tile":
        return 1.0
    sums = _weight_sums(grid, window, window_params)
    if sums is None:
        return float(weight_map(grid, window, **window_params).max())
    return float(math.prod(float(w.max()) for w in sums))


def _weights(grid: PatchGrid, window, window_params: dict, dtype) -> np.ndarray:
    """:func:`weight_map` computed in ``dtype``."""
    if isinstance(window, str) and window == "overlap-tile":
        if window_params:
            raise TypeError("window 'overlap-tile' takes no parameters")
        return _coverage_mask(grid).astype(dtype)
    sums = _weight_sums(grid, window, window_params)
    if sums is not None:
        return _outer([w.astype(dtype) for w in sums], np.multiply)
    win = make_window(window, grid.patch_size, **window_params)
    extent = tuple(n + s for n, s in zip(grid.padded_shape, grid.stride))
    acc = np.zeros((1,) + extent + (1,), dtype)
    runs = [split_regular(o, s) for o, s in zip(grid.origins, grid.stride)]
    for combo in itertools.product(*runs):
        g = tuple(z - a for a, z in combo)
        a = np.broadcast_to(win[..., None], (1,) + g + win.shape + (1,))
        origin = tuple(int(o[a0]) for o, (a0, _) in zip(grid.origins, combo))
        overlap_add(acc, a, origin, grid.stride, np.add, 0.0)
    return acc[(0,) + tuple(slice(0, n) for n in grid.spatial_shape) + (0,)]
