"""The streaming loop and its plan: patches cut a batch of patch rows at a time, filtered and
overlap-added at once, so memory is O(image + batch) however many patches there are.

:func:`merge_stream` is the one loop behind :func:`patch_viewer.process` and the chunked (dask)
path; :func:`make_plan` says before any pixel is touched how many batches a run takes and how
much memory it needs. (Its own module so that the chunked path and the pipeline both use it
without importing each other.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ._layout import ROWS_FIRST_ORDER, empty_in_order, pad_canonical, stack_order, window_view
from .extract import extract_rows
from .fused import PatchStats, fused_form
from .grid import PatchGrid
from .merge import Merger, backend, merge_state_bytes
from .merge.plan import image_source

__all__ = [
    "DEFAULT_BATCH_BYTES",
    "PLAN_SLACK",
    "REFERENCES",
    "Plan",
    "Result",
    "make_plan",
    "merge_stream",
]

REFERENCES = ("input", "filter")

#: Fraction added to the itemised memory plan for allocator slack (measured peak RSS came
#: within 2% of the itemised sum for 1-9 Mpx images; tests/test_memory_plan.py checks it).
PLAN_SLACK = 0.04

#: Default size of one streamed batch of filtered patches.
DEFAULT_BATCH_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Plan:
    """What a run will do: patch count, batches and memory, known before any pixel is touched.

    Memory is counted beyond the input image (which the caller holds): ``merge_bytes`` while
    patches stream into the merge, ``finish_bytes`` once the merge is done and the reference,
    error map, metrics (SSIM in bands) and weights are made beside it. ``peak_bytes`` is the
    larger; a test measures peak RSS against it.
    """

    n_images: int
    n_patches: int
    rows_per_batch: int
    n_batches: int
    batch_bytes: int
    image_bytes: int
    stack_bytes: int  # what materialising every patch at once would take (float32)
    merge_bytes: int = 0
    finish_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        """Planned peak memory of the run, beyond its input: the larger phase, plus
        :data:`PLAN_SLACK` for the allocator and small temporaries."""
        return int(max(self.merge_bytes, self.finish_bytes) * (1 + PLAN_SLACK)) + 2 * 2**20


def make_plan(
    grid: PatchGrid,
    n_images: int = 1,
    *,
    batch_bytes: int | None = None,
    dtype: DTypeLike = np.float32,
    window: str | ArrayLike = "uniform",
    reduce: str = "mean",
    reference: str = "input",
    filter_dtype: DTypeLike | None = None,
    out_dtype: DTypeLike | None = None,
    metrics: bool = True,
    ssim: bool = True,
) -> Plan:
    """Plan a streamed run over ``n_images`` images of ``grid`` (batches counted as float32).

    The memory plan (``peak_bytes``) needs what the run will do: the images' ``dtype``, the
    ``window`` and ``reduce`` of the merge, the ``reference``, the dtype the filter returns
    (``filter_dtype``, default ``dtype``), the output dtype (``out_dtype``, default the
    merge's float) and whether ``metrics`` and ``ssim`` are computed.

    Examples
    --------
    >>> p = make_plan(PatchGrid((100, 100), 39))
    >>> p.n_patches, p.rows_per_batch, p.n_batches
    (3844, 31, 2)
    """
    if batch_bytes is None:
        # Offset-major stacks merge fastest in larger batches (see merge.stack_order).
        rows_first = stack_order(grid) == ROWS_FIRST_ORDER
        batch_bytes = 2 * DEFAULT_BATCH_BYTES if rows_first else DEFAULT_BATCH_BYTES
    batch_bytes = int(batch_bytes)
    if batch_bytes < 1:
        raise ValueError(f"`batch_bytes` must be >= 1, got {batch_bytes}")
    item = 4
    row_bytes = math.prod(grid.grid_shape[1:]) * math.prod(grid.patch_shape) * item
    rows = max(1, min(grid.grid_shape[0], batch_bytes // row_bytes))
    rows = math.ceil(grid.grid_shape[0] / math.ceil(grid.grid_shape[0] / rows))  # even batches
    n_batches = n_images * math.ceil(grid.grid_shape[0] / rows)
    image_bytes = n_images * math.prod(grid.padded_shape) * (grid.n_channels or 1) * 8
    options = {
        "window": window,
        "reduce": reduce,
        "reference": reference,
        "filter_dtype": filter_dtype,
        "out_dtype": out_dtype,
        "metrics": metrics,
        "ssim": ssim,
    }
    merge, finish = _memory(grid, n_images, np.dtype(dtype), rows * row_bytes // item, options)
    return Plan(
        n_images,
        n_images * grid.n_patches,
        rows,
        n_batches,
        rows * row_bytes,
        image_bytes,
        n_images * grid.nbytes(np.float32),
        merge,
        finish,
    )


def _memory(grid, n_images, dtype, batch_elems, options):
    """``(merge_bytes, finish_bytes)`` of :class:`Plan` for images of ``dtype``."""
    from .merge.precision import work_dtype
    from .metrics import REDUCE_ELEMENTS, ssim_bytes

    channels = grid.n_channels or 1
    pixels = n_images * channels * math.prod(grid.spatial_shape)
    padded = n_images * channels * math.prod(grid.padded_shape)
    canvas, result = merge_state_bytes(grid, n_images, dtype, options["window"], options["reduce"])
    filtered = np.dtype(options["filter_dtype"] or dtype)
    converts = filtered != dtype  # the filter computes on a converted copy
    pad = padded * dtype.itemsize if padded != pixels else 0
    merge = canvas + pad + batch_elems * (dtype.itemsize + converts * 2 * filtered.itemsize)
    ref = 0
    if options["reference"] == "filter":  # the whole-image filter, and its converted input
        ref = pixels * filtered.itemsize * (1 + 2 * converts)
    out = np.dtype(options["out_dtype"] or work_dtype(filtered))
    error = pixels * np.result_type(out, filtered, np.float32).itemsize
    copy = pixels * out.itemsize * (out != work_dtype(filtered))
    spatial = grid.spatial_shape
    after = 0
    if options["metrics"]:
        after = min(pixels, REDUCE_ELEMENTS) * 24  # isfinite, squares, |e| of one band
        if options["ssim"]:
            shape = (n_images * spatial[0],) + spatial[1:] + (channels,)  # bands of rows
            after = max(after, ssim_bytes(shape, -1))
    weights = 8 * math.prod(spatial)
    finish = canvas + result + copy + ref + error + max(after, weights)
    return merge, finish


@dataclass(frozen=True)
class Result:
    """Everything a run produces (arrays in the input's layout).

    For a predictor whose output is not comparable with the input (other channels, scale or
    a vector per patch) and ``reference="input"``, ``error`` is None and the metrics NaN;
    ``weights`` are then in the output's pixels."""

    merged: np.ndarray
    weights: np.ndarray
    reference: np.ndarray
    error: np.ndarray | None
    metrics: dict
    grid: PatchGrid
    plan: Plan
    elapsed: float
    #: Every output of a predictor by name (``merged`` is the first); None for filters.
    outputs: dict | None = None


def merge_stream(canon, grid, filt, params, window, window_params, reduce, rows, total):
    """Generator: filter and overlap-add the patches of canonical images ``(b, *spatial, C)``,
    ``rows`` patch rows at a time; yields ``(patches_done, total)`` after each batch and
    returns the filled :class:`Merger`. The one streaming loop behind :func:`process` and the
    chunked path."""
    if backend() == "numba":
        return (
            yield from _compiled_stream(
                canon, grid, filt, params, window, window_params, reduce, rows, total
            )
        )
    nd = grid.ndim
    padded = pad_canonical(canon, grid)
    view = window_view(padded, grid)
    spatial_axes = tuple(range(2 + nd - 1, 2 + 2 * nd - 1))
    g0 = grid.grid_shape[0]
    rest = tuple(
        slice(int(o[0]), int(o[-1]) + 1, s) if grid.is_regular else o
        for o, s in zip(grid.origins[1:], grid.stride[1:])
    )
    merger = None
    done = 0
    order = stack_order(grid)
    for b in range(canon.shape[0]):
        for r0 in range(0, g0, rows):
            o0 = grid.origins[0][r0 : r0 + rows]
            if order == ROWS_FIRST_ORDER:  # extract in the order the merge reads
                batch = _offset_major_rows(padded, b, o0, rest[0], grid)
            elif grid.is_regular:
                batch = view[
                    (slice(b, b + 1), slice(int(o0[0]), int(o0[-1]) + 1, grid.stride[0])) + rest
                ]
            else:
                batch = view[(slice(b, b + 1),) + np.ix_(o0, *rest)]
            if order is not None and order != ROWS_FIRST_ORDER:
                batch = _copy_in_order(batch, order)
            out = np.asarray(filt(batch, spatial_axes, **params))
            if merger is None:
                merger = Merger(
                    grid,
                    canon.shape[0],
                    canon.shape[-1],
                    out.dtype,
                    window=window,
                    reduce=reduce,
                    window_params=window_params,
                )
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, no warning
                merger.add(out, b, r0)
            done += out.shape[1] * math.prod(grid.grid_shape[1:])
            yield done, total
    return merger


def _compiled_stream(canon, grid, filt, params, window, window_params, reduce, rows, total):
    """:func:`merge_stream` on the compiled kernels. Patches are read where they lie in the
    (padded) image: filters with a fused form (:mod:`.fused`) run inside the merge and no
    patch is stored; others get each batch copied out by a compiled kernel, in C order."""
    padded = pad_canonical(canon, grid)
    b, c = canon.shape[0], canon.shape[-1]
    fused = fused_form(filt, params, canon.dtype, c)
    merger = None
    if fused is not None:
        merger = Merger(
            grid, b, c, fused.dtype, window=window, reduce=reduce, window_params=window_params
        )
        if not merger.fuses(fused):
            merger = fused = None
    source = None
    done = 0
    per_row = math.prod(grid.grid_shape[1:])
    for bi in range(b):
        if fused is not None:
            image = padded[bi : bi + 1]
            source = image_source(image, grid, fused.dtype)
            stats = PatchStats(fused, image, grid) if fused.rule is not None else None
        for r0 in range(0, grid.grid_shape[0], rows):
            n = min(rows, grid.grid_shape[0] - r0)
            if fused is not None:
                merger.add_fused(source.rows(grid, r0, n), bi, r0, n, fused, stats)
            else:
                batch = extract_rows(padded[bi : bi + 1], grid, r0, n)
                out = np.asarray(
                    filt(batch, tuple(range(2 + grid.ndim - 1, 1 + 2 * grid.ndim)), **params)
                )
                if merger is None:
                    merger = Merger(
                        grid,
                        b,
                        c,
                        out.dtype,
                        window=window,
                        reduce=reduce,
                        window_params=window_params,
                    )
                merger.add(out, bi, r0)
            done += n * per_row
            yield done, total
    return merger


def _offset_major_rows(padded, b, rows, cols, grid):
    """The patches of grid rows ``rows`` (consecutive origins, stride 1) of image ``b``, in
    :data:`ROWS_FIRST_ORDER` memory: for each row offset ``e``, the patch rows of image rows
    ``rows + e``. Every patch row of an image row is cut once (a small sliding-window copy);
    the stack is then ``p0`` contiguous block copies."""
    p0, p1 = grid.patch_size
    n = len(rows)
    y0 = int(rows[0])
    lines = np.lib.stride_tricks.sliding_window_view(
        padded[b : b + 1, y0 : y0 + n + p0 - 1], p1, axis=2, writeable=False
    )[:, :, cols]
    lines = np.ascontiguousarray(np.moveaxis(lines, 3, -1).transpose(1, 0, 2, 3, 4))
    out = empty_in_order(
        (1, n) + lines.shape[2:3] + (p0,) + lines.shape[3:], ROWS_FIRST_ORDER, padded.dtype
    )
    mem = out.transpose(ROWS_FIRST_ORDER)  # (p0, n, 1, g1, p1, C), contiguous
    for e in range(p0):
        mem[e] = lines[e : e + n]
    return out


def _copy_in_order(batch, order):
    out = empty_in_order(batch.shape, order, batch.dtype)
    np.copyto(out, batch)
    return out
