"""The NumPy merge kernels: a vectorised overlap-add (the fallback where numba is missing, and
the oracle the compiled kernels are tested against).

No loop runs over patches. The output is viewed as blocks of ``stride`` pixels, and a whole slab
of the patch stack (one block offset inside every patch at once) is added per step, so the Python
loop runs ``ceil(patch / stride)`` times per axis. Where that product is large (stride 1), the
axes are merged one after another (a cascade: ``sum(ceil(p/s))`` steps instead of the product),
and 2-D stride-1 grids reduce the row offsets first (see :func:`_rows_first`).
"""

from __future__ import annotations

import contextlib
import itertools
import math

import numpy as np

from .._layout import DIRECT_MAX_STEPS, ROWS_FIRST_ORDER, block_depths, ceil_div, is_direct
from ..grid import PatchGrid

__all__ = [
    "assign",
    "interleave",
    "ola",
    "overlap_add",
    "owned_segments",
    "row_offset_preparer",
    "short_buffers",
]


def _block_view(region: np.ndarray, axes, strides) -> np.ndarray:
    """Split each axis ``axes[j]`` of ``region`` into ``(blocks, strides[j])`` (a writeable
    view)."""
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


def ola(out: np.ndarray, a: np.ndarray, axes: list[int], strides: list[int], op) -> None:
    """``out[..., y_j, ...] op= a[..., g_j, e_j, ...]`` with ``y_j = g_j * s_j + e_j``.

    ``axes`` are positions in ``out`` (ascending); axis ``axes[j]`` of ``out`` corresponds to
    the pair of axes ``axes[j] + j`` (grid index) and ``axes[j] + j + 1`` (in-patch offset) of
    ``a``. ``out`` may extend past ``(G + ceil(p/s) - 1) * s`` along those axes.
    """
    sizes = []
    sl = [slice(None)] * out.ndim
    for j, (ax, s) in enumerate(zip(axes, strides)):
        g, p = a.shape[ax + j], a.shape[ax + j + 1]
        d = ceil_div(p, s)
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


@contextlib.contextmanager
def short_buffers(grid: PatchGrid, channels: int):
    """NumPy buffer size for the direct overlap-add's steps, a few blocks long.

    NumPy buffers strided operands that need a cast (patches are summed in a wider dtype) in
    chunks of its buffer size (8192 elements); where a step's contiguous blocks are short,
    gathering whole buffers of them costs more than the sum. Measured: 2x faster steps at
    32-pixel blocks, neutral at long ones; the deep (cascade) paths gain nothing, so they
    keep NumPy's default.
    """
    if not is_direct(grid):
        yield
        return
    block = grid.stride[-1] * channels
    old = np.setbufsize(int(min(max(8 * block, 128), 8192)) // 16 * 16)  # multiples of 16
    try:
        yield
    finally:
        np.setbufsize(old)


def interleave(a: np.ndarray, nd: int) -> np.ndarray:
    """``(b, *G, *p, C)`` -> ``(b, G0, p0, G1, p1, ..., C)`` (a view)."""
    order = [0] + [x for k in range(nd) for x in (1 + k, 1 + nd + k)] + [2 * nd + 1]
    return a.transpose(order)


def _ola_1d(out: np.ndarray, a: np.ndarray, ax: int, s: int, op) -> None:
    """One axis of :func:`ola`, looping over whichever is fewer: patches or overlap depth."""
    g, p = a.shape[ax], a.shape[ax + 1]
    if g >= ceil_div(p, s):
        ola(out, a, [ax], [s], op)
        return
    lead = (slice(None),) * ax
    for i in range(g):  # ascending patch order, each adding its whole extent at once
        target = out[lead + (slice(i * s, i * s + p),)]
        op(target, a[lead + (i,)], out=target)


def _antidiagonal_reduce(
    padded: np.ndarray, ax: int, g: int, d: int, s: int, ufunc, out: np.ndarray
) -> None:
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
    shape = padded.shape[:ax] + (q, s) + padded.shape[ax + 2 :] + (d,)
    strides = st[:ax] + (sj, se) + st[ax + 2 :] + (s * se - sj,)
    view = np.lib.stride_tricks.as_strided(base, shape, strides, writeable=False)
    ufunc.reduce(view, axis=-1, out=_block_view(out, [ax], [s]))


def _antidiagonal_reduce_unit(
    t: np.ndarray, ax: int, ufunc, identity: float, out: np.ndarray, offsets_last: bool = True
) -> None:
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
            shape = t.shape[:ax] + (g - p + 1,) + t.shape[ax + 2 :] + (p,)
            strides = st[:ax] + (st[ax],) + st[ax + 2 :] + (step,)
            axis = -1
        else:
            shape = t.shape[:ax] + (g - p + 1, p) + t.shape[ax + 2 :]
            strides = st[:ax] + (st[ax], step) + st[ax + 2 :]
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


def _rows_first(
    canvas: np.ndarray, a: np.ndarray, origin, stride, op, identity: float, prepare=None
) -> None:
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
        _antidiagonal_reduce_unit(
            a.transpose(1, 3, 0, 2, 4, 5), 0, op, identity, by_row, offsets_last=False
        )
    else:
        by_row[...] = identity
        for e in range(p0):  # ascending offsets at every pixel, as the reduce adds them
            target = by_row[e : e + g0]
            op(target, prepare(e), out=target)
    y0, x0 = origin
    if stride[1] == 1:  # every image at once: one strided reduce along the anti-diagonals
        summed = np.empty((b, g0 + p0 - 1, g1 + p1 - 1, c), canvas.dtype)
        _antidiagonal_reduce_unit(rows, 2, op, identity, summed)
        target = canvas[:, y0 : y0 + g0 + p0 - 1, x0 : x0 + g1 + p1 - 1]
        op(target, summed, out=target)
        return
    for bi in range(b):  # each image's rows are a batch of 1-D patch rows
        overlap_add(canvas[bi, y0 : y0 + g0 + p0 - 1], rows[bi], (x0,), (stride[1],), op, identity)


def overlap_add(
    canvas: np.ndarray,
    a: np.ndarray,
    origin,
    stride,
    op,
    identity: float,
    padded: np.ndarray | None = None,
) -> None:
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
    p = a.shape[1 + nd : 1 + 2 * nd]
    depth = block_depths(p, stride)
    t = interleave(a, nd)
    region = canvas[(slice(None),) + tuple(slice(o, None) for o in origin)]
    if math.prod(depth) <= DIRECT_MAX_STEPS:
        ola(region, t, list(range(1, nd + 1)), list(stride), op)
        return
    # Cascade: merge the last spatial axis first, then the next, each into a small buffer.
    for j in range(nd - 1, 0, -1):
        ax = 1 + 2 * j
        shape = list(t.shape)
        g = shape[ax]
        shape[ax : ax + 2] = [(g + depth[j] - 1) * stride[j]]
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


def owned_segments(origins: np.ndarray, p: int, rule: str) -> list[tuple[int, int, int, int, int]]:
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


def assign(target, value, out):  # an overlap-add "op" that assigns
    np.copyto(out, value)


def row_offset_preparer(sub, origin, ref, win, s1, work, buffers):
    """For a stride-1 2-D part (see :func:`_rows_first`): a function giving
    ``(values - ref) * win`` of one row offset, ``(g0, b, g1, p1, C)`` (``ref``: the anchor
    images, or None; ``win``: the window with a channel axis, or None; ``s1``: the stride
    along the columns; ``work``: the dtype).

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
    lines = tiled = None
    if ref is not None:
        rows = ref[:, y0 : y0 + g0 + p0 - 1]
        cut = np.lib.stride_tricks.sliding_window_view(rows, p1, axis=2, writeable=False)
        cut = np.moveaxis(cut, -1, 3)[:, :, x0 : x0 + (g1 - 1) * s1 + 1 : s1]
        lines = np.ascontiguousarray(cut.transpose(1, 0, 2, 3, 4))  # (rows, b, g1, p1, C)
    if win is not None:
        key = ("window rows", g1, c)
        tiled = buffers.get(key)
        if tiled is None:  # the window's row e, repeated for every patch of a grid row
            tiled = buffers[key] = np.ascontiguousarray(
                np.broadcast_to(win[:, None], (p0, g1, p1, c))
            )
    key = ("offset block", g0, b, g1, p1, c)
    out = buffers.get(key)
    if out is None:
        out = buffers[key] = np.empty((g0, b, g1, p1, c), work)

    def prepare(e):
        if lines is not None:
            np.subtract(s_mem[e], lines[e : e + g0], out=out, dtype=out.dtype)  # never wraps
        else:
            np.copyto(out, s_mem[e])
        if tiled is not None:
            np.multiply(out, tiled[e], out=out)
        return out

    return prepare
