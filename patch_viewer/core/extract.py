"""Patch extraction: a zero-copy strided view wherever the grid allows it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ._layout import (
    check_bytes,
    empty_in_order,
    is_batched,
    pad_canonical,
    regular_slices,
    stack_order,
    to_canonical,
    window_view,
)
from .checks import check_grid, check_out
from .grid import PatchGrid
from .merge.plan import backend

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = ["LAYOUTS", "extract_patches", "extract_rows"]


LAYOUTS = ("C", "merge")

__all__ = ["LAYOUTS", "extract_patches", "extract_rows", "sliding_patches"]


def extract_patches(
    image: ArrayLike,
    grid: PatchGrid,
    *,
    copy: bool = False,
    layout: str = "C",
    max_bytes: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Cut ``image`` into the patches of ``grid``.

    Parameters
    ----------
    image : array_like
        An image of shape ``grid.image_shape``, or a batch of them with a leading batch axis.
    grid : PatchGrid
        The patch geometry.
    copy : bool, optional
        Return a writeable copy instead of a read-only view.
    layout : {"C", "merge"}, optional
        Memory order of a copy (the shape is the same either way). ``"C"`` (default):
        C-contiguous, patch after patch. ``"merge"``: the order :func:`merge_patches` reads
        fastest for this grid, which :func:`process` uses too: at stride 1, row offset first
        (as ``torch.unfold`` lays patches out), 2-5x faster to merge; C order where the
        overlap is shallow. Element-wise operations and ``np.empty_like`` keep the order, so
        patches processed that way merge at that speed.
    max_bytes : int, optional
        Refuse (``MemoryError``) to materialise a patch stack larger than this; default 4 GiB.
    out : ndarray, optional
        With ``copy=True`` (C layout): write the copy into this C-contiguous, writeable array
        of the result's shape and the image's dtype, and return it. Reusing one buffer for
        many images saves the page faults of a new array's first touch (for a large stack,
        most of a copy's time).

    Returns
    -------
    patches : ndarray
        Shape ``(*grid.grid_shape, *grid.patch_shape)`` (with the batch axis first if given).
        A read-only view of the image (of its padded copy for ``edge="pad"``) when the grid is
        regular and ``copy`` is False; otherwise a new array.

    Notes
    -----
    The view costs microseconds whatever the image size, but it overlaps itself: with stride 1
    and 39x39 patches it addresses 1,521 times the image's memory. Copying it (``copy=True``,
    ``np.array(view)``, or many filters) materialises all of that. Use :func:`process` to
    filter and merge in bounded-memory batches instead.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.arange(16).reshape(4, 4)
    >>> p = extract_patches(image, PatchGrid(image.shape, 2, stride=2))
    >>> p.shape
    (2, 2, 2, 2)
    >>> p[1, 0].tolist()
    [[8, 9], [12, 13]]
    """
    check_grid(grid)
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}")
    if layout != "C" and not copy:
        raise ValueError(
            "`layout` applies to a copy: pass copy=True with layout='merge' "
            "(a view keeps the image's memory order)"
        )
    image = np.asanyarray(image)
    batched = is_batched(image.shape, grid)
    if out is not None:
        _check_out(out, image, grid, batched, copy, layout)
    if grid.is_regular and not copy and grid.padded_shape == grid.spatial_shape:
        return _regular_view(image, grid, batched)
    canon = pad_canonical(to_canonical(image, grid, batched), grid)
    if copy and layout == "C":  # one compiled pass, any grid
        if out is not None:
            extract_rows(canon, grid, out=out)
            return out
        nbytes = canon.shape[0] * grid.n_patches * math.prod(grid.patch_shape) * canon.itemsize
        check_bytes(
            nbytes,
            "the patch stack",
            max_bytes,
            "use the read-only view (copy=False) or patch_viewer.process",
        )
        patches = extract_rows(canon, grid)
    else:
        patches = _from_view(canon, grid, copy, layout, max_bytes)
    if grid.channel_axis is None:
        patches = patches[..., 0]
    return patches if batched else patches[0]


def _from_view(canon: np.ndarray, grid: PatchGrid, copy: bool, layout: str, max_bytes):
    """The patches of a padded canonical image from its window view: a read-only view (or,
    for irregular grids, a read-only copy), or a copy in ``layout``; canonical."""
    nd = grid.ndim
    view = window_view(canon, grid)
    if grid.is_regular:
        patches = view[
            (slice(None),) + tuple(regular_slices(o, s) for o, s in zip(grid.origins, grid.stride))
        ]
        if copy:
            check_bytes(
                patches.size * patches.itemsize,
                "the patch stack",
                max_bytes,
                "use the read-only view (copy=False) or patch_viewer.process",
            )
            patches = _copy_in_layout(patches, grid, layout)
    else:
        shape = (canon.shape[0],) + grid.patches_shape[:nd] + grid.patch_size + (canon.shape[-1],)
        check_bytes(
            int(np.prod(shape)) * canon.itemsize,
            "the patch stack (edge='shift' makes the grid irregular, so it is copied)",
            max_bytes,
            "use edge='pad' or 'drop' for a zero-copy view, or patch_viewer.process",
        )
        index = np.ix_(*grid.origins)
        patches = view[(slice(None),) + index]
        if not copy:
            patches.flags.writeable = False
        elif layout != "C":
            patches = _copy_in_layout(patches, grid, layout)
    return patches


def _check_out(out, image: np.ndarray, grid: PatchGrid, batched: bool, copy: bool, layout: str):
    """``out`` must be able to take the C-ordered copy of ``image``'s patches."""
    if not copy or layout != "C":
        raise ValueError("`out` takes a copy: pass copy=True (with layout='C') to fill it")
    shape = ((image.shape[0],) if batched else ()) + grid.grid_shape + grid.patch_shape
    check_out(out, shape, image.dtype, (image,), what="the image")


def extract_rows(
    padded: np.ndarray,
    grid: PatchGrid,
    row0: int = 0,
    rows: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """A C-ordered copy of the patches of grid rows ``row0 .. row0 + rows`` of a padded
    canonical image ``(b, *padded_shape, C)``: canonical ``(b, rows, *G[1:], *p, C)``,
    written into ``out`` if given (C-contiguous, that many elements of that dtype, in any
    shape: it is filled through a reshaped view).

    One compiled pass that reads each patch where it lies (any grid, shifted last patches
    included), or NumPy's copy of the window view where numba is missing.
    """
    rows = grid.grid_shape[0] - row0 if rows is None else rows
    b, c = padded.shape[0], padded.shape[-1]
    shape = (b, rows) + grid.grid_shape[1:] + grid.patch_size + (c,)
    out = np.empty(shape, padded.dtype) if out is None else out.reshape(shape)
    if backend() == "numba" and padded.dtype.itemsize in (1, 2, 4, 8):
        from .merge import kernels_fused as K
        from .merge.plan import image_source, three_axes

        bits = np.dtype(f"u{padded.dtype.itemsize}")  # a copy moves bits: any dtype will do
        src = image_source(padded.view(bits), grid, bits).rows(grid, row0, rows)
        p = three_axes(grid.patch_size, grid, 1)
        geo = np.array([p[0], p[1], p[2] * c, len(src[3]), len(src[4])], np.int64)
        K.copy_patches(*src, geo, b, out.view(bits).reshape(-1))
        return out
    view = window_view(padded, grid)
    index: list = [slice(None)] + [np.asarray(o) for o in grid.origins]
    index[1] = index[1][row0 : row0 + rows]
    np.copyto(out, view[(index[0],) + np.ix_(*index[1:])])
    return out


def _copy_in_layout(patches: np.ndarray, grid: PatchGrid, layout: str) -> np.ndarray:
    """A copy of a canonical ``(b, *G, *p, C)`` stack, C-contiguous or in the merge's order."""
    order = stack_order(grid) if layout == "merge" else None
    if order is None:
        return patches.copy(order="C")  # a copy even where the view is contiguous already
    out = empty_in_order(patches.shape, order, patches.dtype)
    np.copyto(out, patches)
    return out


def _regular_view(image: np.ndarray, grid: PatchGrid, batched: bool) -> np.ndarray:
    """The read-only strided view of a regular grid, built in one ``as_strided`` call."""
    st = image.strides
    lead = 1 if batched else 0
    axes = [i + lead for i in range(len(grid.image_shape)) if i != grid.channel_axis]
    shape = image.shape[:lead] + grid.grid_shape + grid.patch_size
    strides = st[:lead] + tuple(st[a] * s for a, s in zip(axes, grid.stride))
    strides += tuple(st[a] for a in axes)
    if grid.channel_axis is not None:
        shape += (image.shape[grid.channel_axis + lead],)
        strides += (st[grid.channel_axis + lead],)
    return np.lib.stride_tricks.as_strided(image, shape, strides, writeable=False)


def sliding_patches(image: np.ndarray, grid: PatchGrid, batched: bool = False) -> np.ndarray:
    """Read-only view of the patch at *every* position of the (padded) image, not only at the
    grid's origins: shape ``(b, *positions, *patch_size, C)``, with a batch axis ``b`` (1 for
    one image) and a channel axis ``C`` (1 without channels).

    Index it with ``grid.origins`` to read any patch of the grid without copying, including the
    shifted last patch of an irregular (``edge="shift"``) grid. Only ``edge="pad"`` copies the
    image (once, to pad it).

    Examples
    --------
    >>> grid = PatchGrid((5, 6), 4, stride=2)
    >>> view = sliding_patches(np.arange(30.0).reshape(5, 6), grid)
    >>> view.shape
    (1, 2, 3, 4, 4, 1)
    >>> float(view[0, grid.origins[0][1], grid.origins[1][1], 0, 0, 0])  # the shifted last row
    8.0
    """
    return window_view(pad_canonical(to_canonical(image, grid, batched), grid), grid)
