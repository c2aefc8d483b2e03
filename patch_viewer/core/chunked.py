"""The same flow on dask arrays: lazy in, lazy out, equal to the in-memory result.

Each output chunk is computed from its input chunk plus a halo of ``patch - 1`` pixels
(``dask.array.overlap``), from exactly the patches of the GLOBAL grid that touch the chunk. Those
patches are re-gridded locally (same stride, same shifted last patch) and run through the
in-memory engine, so every pixel sees the same patches, the same window weights and the same
anchor as in memory; the result does not depend on the chunking. Only chunks that are computed
read their input, so napari can display the merged image of a whole-slide scan lazily, and
``dask.distributed`` runs the graph on a cluster unchanged (everything here pickles).
Which patches each block takes is decided in :mod:`.chunked_layout`; the lazy error and
metrics are in :mod:`.chunked_metrics`.

Notes
-----
- Patches are counted in every chunk they touch, so work grows by about
  ``(chunk + patch - stride) / chunk`` per axis: use chunks several patches wide.
- ``reference="filter"`` needs filters that declare their reach (``PatchFilter.halo``);
  whole-image statistics (invert, zscore, minmax, otsu) cannot be computed chunk by chunk.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np

from ._layout import from_canonical, to_canonical
from .checks import check_reduce_window
from .chunked_layout import as_dask, block_grid, chunk_starts, min_chunks, pad_lazy
from .chunked_metrics import chunked_error, chunked_metrics
from .filter_registry import PatchFilter, get_filter
from .grid import PatchGrid
from .merge.precision import work_dtype
from .merge.weights import weights_in


def _merged_block(
    block,
    *,
    grid,
    starts,
    depth,
    filt,
    params,
    window,
    window_params,
    reduce,
    dtype,
    fill,
    batch_bytes,
    block_id=None,
):
    from .stream import make_plan, merge_stream

    nd = grid.ndim
    core = (
        (block.shape[0],)
        + tuple(int(starts[ax][i + 1] - starts[ax][i]) for ax, i in enumerate(block_id[1 : nd + 1]))
        + block.shape[-1:]
    )
    out = np.full(core, fill, dtype)
    found = block_grid(grid, starts, block_id[1 : nd + 1], depth)
    if found is None:
        return out
    local, in_block, from_local, to_core, _ = found
    sub = block[(slice(None),) + in_block]
    rows = make_plan(local, batch_bytes=batch_bytes).rows_per_batch
    gen = merge_stream(sub, local, filt, params, window, window_params, reduce, rows, 0)
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        merger = stop.value
    merged = merger.result(dtype, fill)
    out[(slice(None),) + to_core] = merged[(slice(None),) + from_local]
    return out


def _weights_block(*, grid, starts, depth, window, window_params, block_id=None):
    core = tuple(int(st[i + 1] - st[i]) for st, i in zip(starts, block_id))
    out = np.zeros(core, np.float64)
    found = block_grid(grid, starts, block_id, depth)
    if found is not None:
        local, _, from_local, to_core, _ = found
        out[to_core] = weights_in(local, window, window_params, np.float64)[from_local]
    return out


def _filter_only(spec) -> PatchFilter:
    """The filter ``spec`` names (predictors take :mod:`.chunked_predict`'s path)."""
    filt = get_filter(spec)
    if not isinstance(filt, PatchFilter):
        raise TypeError(
            f"predictor {filt.name!r} runs on dask arrays through process(), not chunked_merge"
        )
    return filt


def _filter_block(block, *, filt, params, axes):
    return np.asarray(filt(block, axes, **params))


def reference_axes(grid: PatchGrid) -> tuple[int, ...]:
    """The canonical ``(batch, *spatial, C)`` axes a whole-image reference filter runs over:
    the spatial axes along which patches are wider than one pixel. Patches one plane thick
    (``(1, 64, 64)`` on a volume) are filtered plane by plane, so the reference is too, and no
    seam shows where none can be."""
    return tuple(1 + ax for ax, p in enumerate(grid.patch_size) if p > 1)


def chunked_merge(
    image,
    grid: PatchGrid,
    patch_filter="identity",
    *,
    filter_params=None,
    window="uniform",
    window_params=None,
    reduce="mean",
    dtype=None,
    fill_value=None,
    batch_bytes=None,
):
    """Lazily cut a dask (or zarr) image into patches, filter them and merge them back.

    The dask counterpart of the streamed :func:`patch_viewer.process` merge; see the module
    docstring for how chunks stay equal to the in-memory result.

    Returns
    -------
    (merged, weights) : tuple of dask arrays
        ``merged`` in the image's layout (with a leading batch axis if the image had one) and
        the weight map over the spatial axes (float64).

    Examples
    --------
    >>> import dask.array as da
    >>> image = da.random.default_rng(0).random((300, 300), chunks=100)
    >>> grid = PatchGrid(image.shape, 39, stride=8)
    >>> merged, weights = chunked_merge(image, grid)
    >>> bool(np.array_equal(merged.compute(), image.compute()))
    True
    """
    import dask.array as da

    from ._layout import is_batched
    from .windows import make_window

    image = as_dask(image)
    if image.dtype.kind not in "biuf":
        raise TypeError(f"`image` must hold real numbers, got dtype {image.dtype}")
    batched = is_batched(image.shape, grid)
    filt = _filter_only(patch_filter)
    params = filt.validate(filter_params) if filt.params or filter_params else {}
    window_params = dict(window_params or {})
    make_window(window, grid.patch_size, **window_params)  # validates
    nd = grid.ndim
    canon = to_canonical(image, grid, batched)
    # Chunk only the spatial axes; channels stay whole (filters see every channel of a patch).
    canon = canon.rechunk({nd + 1: -1})
    depth = tuple(p - 1 for p in grid.patch_size)
    canon = min_chunks(pad_lazy(canon, grid), depth)
    chunks = canon.chunks
    starts = chunk_starts(chunks[1 : nd + 1])

    probe = np.asarray(
        filt(
            np.zeros((1, 1) + grid.patch_size + (canon.shape[-1],), image.dtype),
            tuple(range(2, nd + 2)),
            **params,
        )
    )
    out_dtype = np.dtype(dtype) if dtype is not None else work_dtype(probe.dtype)
    if not grid.is_covering and fill_value is None and out_dtype.kind != "f":
        raise ValueError(
            "some pixels are covered by no patch (edge='drop' or stride > patch_size): "
            f"pass `fill_value` to mark them in an integer output dtype ({out_dtype})"
        )
    # NaN marks uncovered pixels; integer outputs here have none (checked above)
    fill = fill_value if fill_value is not None else (np.nan if out_dtype.kind == "f" else 0)

    ov = da.overlap.overlap(
        canon,
        depth={ax: d for ax, d in enumerate(depth, start=1)},
        boundary="none",
        allow_rechunk=False,
    )
    merged = da.map_blocks(
        partial(
            _merged_block,
            grid=grid,
            starts=starts,
            depth=depth,
            filt=filt,
            params=params,
            window=window,
            window_params=window_params,
            reduce=reduce,
            dtype=out_dtype,
            fill=fill,
            batch_bytes=batch_bytes,
        ),
        ov,
        chunks=chunks,
        dtype=out_dtype,
        meta=np.empty((0,) * canon.ndim, out_dtype),
        token="patch-merge",
    )
    crop = (slice(None),) + tuple(slice(0, n) for n in grid.spatial_shape)
    merged = from_canonical(merged[crop], grid, batched)
    weights = da.map_blocks(
        partial(
            _weights_block,
            grid=grid,
            starts=starts,
            depth=depth,
            window=window,
            window_params=window_params,
        ),
        chunks=chunks[1 : nd + 1],
        dtype=np.float64,
        meta=np.empty((0,) * nd, np.float64),
        token="patch-weights",
    )[crop[1:]]
    return merged, weights


def chunked_reference(image, grid: PatchGrid, patch_filter, filter_params=None):
    """The filter applied to the whole (dask) image, chunk by chunk with the filter's halo."""
    from ._layout import is_batched

    image = as_dask(image)
    batched = is_batched(image.shape, grid)
    filt = _filter_only(patch_filter)
    params = filt.validate(filter_params) if filt.params or filter_params else {}
    if filt.halo is None:
        raise ValueError(
            f"reference='filter' with filter {filt.name!r} needs the whole image at once (the "
            f"filter declares no halo); on the chunked path use reference='input', or a filter "
            f"with a bounded reach"
        )
    reach = int(filt.halo(**params))
    nd = grid.ndim
    axes = reference_axes(grid)
    depth = tuple(reach if ax in axes else 0 for ax in range(1, nd + 1))
    canon = to_canonical(image, grid, batched).rechunk({nd + 1: -1})
    canon = min_chunks(canon, depth)
    probe = np.asarray(
        filt(np.zeros((1,) + grid.patch_size + canon.shape[-1:], image.dtype), axes, **params)
    )  # the dtype the in-memory reference has
    ref = canon.map_overlap(
        partial(_filter_block, filt=filt, params=params, axes=axes),
        depth=dict(enumerate(depth, start=1)),
        boundary="none",
        trim=True,
        allow_rechunk=False,
        dtype=probe.dtype,
        meta=np.empty((0,) * canon.ndim, probe.dtype),
    )
    return from_canonical(ref, grid, batched)


def chunked_process(
    image,
    grid: PatchGrid,
    patch_filter="identity",
    *,
    filter_params=None,
    window="uniform",
    window_params=None,
    reduce="mean",
    reference="input",
    dtype=None,
    fill_value=None,
    batch_bytes=None,
    ssim=True,
):
    """:func:`patch_viewer.process` for dask/zarr images: every array in the result is lazy,
    and ``metrics`` holds 0-d dask arrays (``dask.compute(result.metrics)`` evaluates them)."""
    from .stream import REFERENCES, Result, make_plan

    start = time.perf_counter()
    if reference not in REFERENCES:
        raise ValueError(f"`reference` must be one of {REFERENCES}, got {reference!r}")
    image = as_dask(image)
    merged, weights = chunked_merge(
        image,
        grid,
        patch_filter,
        filter_params=filter_params,
        window=window,
        window_params=window_params,
        reduce=reduce,
        dtype=dtype,
        fill_value=fill_value,
        batch_bytes=batch_bytes,
    )
    check_reduce_window(reduce, window)
    if reference == "filter":
        ref = chunked_reference(image, grid, patch_filter, filter_params)
    else:
        ref = image
    error = chunked_error(merged, ref)
    batched = image.ndim == len(grid.image_shape) + 1
    channel_axis = None if grid.channel_axis is None else grid.channel_axis + int(batched)
    metrics = chunked_metrics(merged, ref, error=error, channel_axis=channel_axis, ssim=ssim)
    n_images = image.shape[0] if batched else 1
    plan = make_plan(grid, n_images, batch_bytes=batch_bytes)
    return Result(merged, weights, ref, error, metrics, grid, plan, time.perf_counter() - start)


# The block layout (chunked_layout) and the lazy metrics (chunked_metrics) have their own
# modules; what this module exported from them stays importable from here.
__all__ = [
    "block_grid",
    "chunk_starts",
    "chunked_error",
    "chunked_merge",
    "chunked_metrics",
    "chunked_process",
    "chunked_reference",
    "min_chunks",
    "pad_lazy",
]
