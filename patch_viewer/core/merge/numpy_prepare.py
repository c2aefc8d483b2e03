"""Patch values made ready for the NumPy overlap-add: ``(sub - ref) * window``, laid out so
that :func:`.kernels_numpy.overlap_add` reads contiguous memory.

:class:`.numpy_merger.NumpyMerger` hands each part of a patch stack to :func:`prepare_patches`,
which decides once per part what the kernel gets: the stack as it is (plain sums), a copy in
the work dtype with the anchor subtracted and the window applied (in the copy's memory
order, :func:`fill_prepared`), the interleaved layout with identity margins that a cascade
reads (:func:`interleaved_buffer`), or, for 2-D stride-1 rows, a function that prepares one
row offset at a time (:func:`.kernels_numpy.row_offset_preparer`).
"""

from __future__ import annotations

import math

import numpy as np

from .._layout import DIRECT_MAX_STEPS, block_depths
from ..grid import PatchGrid
from .kernels_numpy import row_offset_preparer

__all__ = ["fill_prepared", "interleaved_buffer", "prepare_patches"]


def prepare_patches(
    sub: np.ndarray,
    ref: np.ndarray | None,
    origin,
    grid: PatchGrid,
    win: np.ndarray | None,
    acc_dtype: np.dtype,
    work: np.dtype,
    identity,
    buffers: dict,
):
    """``(sub - ref) * window`` (as far as the mode needs) in the work dtype, laid out so
    that the overlap-add reads contiguous memory. Returns ``(patches, padded)``.

    ``ref``: the anchor images (a mean anchored at the first covering patch), or None;
    ``win``: the window ``(*patch, 1)`` in the work dtype, or None (uniform); ``identity``:
    the reduction's start value; ``buffers``: reused buffers, by layout.

    For a cascade (deep overlap, e.g. stride 1) the data go into a reused buffer in the
    interleaved layout, last axis in-patch offset first, with identity margins: ``padded``
    for :func:`_antidiagonal_reduce`. For the rows-first path nothing is copied: ``padded``
    is ``"rows-first"``, or the function that prepares one row offset at a time.
    """
    nd = grid.ndim
    stride = grid.stride
    g, p = sub.shape[1 : 1 + nd], sub.shape[1 + nd : 1 + 2 * nd]
    depth = block_depths(p, stride)
    anchor = ref is not None
    padded = None
    cascade = math.prod(depth) > DIRECT_MAX_STEPS
    as_is = cascade and not anchor and win is None  # the values need no preparing
    rows_first = cascade and nd == 2 and stride[0] == 1
    if as_is and rows_first:
        return sub, "rows-first"
    if as_is and nd > 1 and stride[-1] == 1:
        # The cascade reads the stack as it is (in the sum's dtype: one streaming pass when
        # the stack is element-major, and no casting in the many small border steps).
        return sub.astype(acc_dtype, order="K", copy=False), "unit"
    if rows_first:  # anchored or weighed one row offset at a time (see _rows_first)
        return sub, row_offset_preparer(sub, origin, ref, win, grid.stride[1], work, buffers)
    if cascade and depth[-1] > 1 and g[-1] >= depth[-1]:
        out, padded = interleaved_buffer(sub, g, p, depth[-1], stride[-1], identity, work, buffers)
    elif anchor or win is not None:
        out = np.empty(sub.shape, work)
    else:
        return sub, None
    fill_prepared(out, sub, ref, origin, grid, win)
    return out, padded


def interleaved_buffer(sub, g, p, d, s, identity, work, buffers):
    """A reused buffer for a cascade's prepared values, in the interleaved layout (last
    axis in-patch offset first) with identity margins: ``(view of sub's shape, padded)``."""
    nd = len(g)
    logical = [sub.shape[0]] + [x for k in range(nd) for x in (g[k], p[k])] + [sub.shape[-1]]
    logical[-3:-1] = [g[-1] + 2 * (d - 1), d * s]
    memory = logical[:-3] + [logical[-2], logical[-3], logical[-1]]
    key = tuple(memory)
    buf = buffers.get(key)
    if buf is None:
        buf = buffers[key] = np.full(memory, identity, work)
    n = len(memory)
    padded = buf.transpose(list(range(n - 3)) + [n - 2, n - 3, n - 1])
    data = padded[(slice(None),) * (n - 3) + (slice(d - 1, d - 1 + g[-1]), slice(0, p[-1]))]
    order = [0] + [1 + 2 * k for k in range(nd)] + [2 + 2 * k for k in range(nd)] + [n - 1]
    return data.transpose(order), padded  # back to (b, *G, *p, C)


def fill_prepared(out, sub, ref, origin, grid: PatchGrid, win) -> None:
    """``out = (sub - ref) * window``, as far as the mode needs (``ref``, ``win`` None: not
    needed), iterating in ``out``'s memory order (numpy then streams the writes)."""
    nd, stride = grid.ndim, grid.stride
    g = sub.shape[1 : 1 + nd]
    mem = np.argsort([-x for x in out.strides], kind="stable")
    if ref is not None:
        view = np.lib.stride_tricks.sliding_window_view(
            ref, grid.patch_size, axis=tuple(range(1, nd + 1)), writeable=False
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
    if win is not None:
        win = np.broadcast_to(win, out.shape).transpose(mem)
        np.multiply(out.transpose(mem), win, out=out.transpose(mem))
