"""The same flow on dask arrays: lazy in, lazy out, equal to the in-memory result.

Each output chunk is computed from its input chunk plus a halo of ``patch - 1`` pixels
(``dask.array.overlap``), from exactly the patches of the GLOBAL grid that touch the chunk. Those
patches are re-gridded locally (same stride, same shifted last patch) and run through the
in-memory engine, so every pixel sees the same patches, the same window weights and the same
anchor as in memory; the result does not depend on the chunking. Only chunks that are computed
read their input, so napari can display the merged image of a whole-slide scan lazily, and
``dask.distributed`` runs the graph on a cluster unchanged (everything here pickles).

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
from .filters import PatchFilter, get_filter
from .grid import PatchGrid
from .merge.precision import work_dtype
from .merge.weights import weights_in
from .metrics import dtype_range, error_summary, error_sums, ssim_clean, ssim_window

#: Chunk edge (pixels per spatial axis) used for arrays that come without useful chunks.
DEFAULT_CHUNK = 2048


def as_dask(array):
    """A dask array for a dask, zarr or NumPy array (zarr keeps its on-disk chunks)."""
    import dask.array as da

    if isinstance(array, da.Array):
        return array
    chunks = getattr(array, "chunks", None)
    if not isinstance(chunks, tuple) or not all(isinstance(c, int) for c in chunks):
        chunks = tuple(min(n, DEFAULT_CHUNK) for n in np.shape(array))
    return da.from_array(array, chunks=chunks)


def pad_lazy(canon, grid: PatchGrid):
    """Pad the far side of each spatial axis to ``grid.padded_shape`` exactly as ``np.pad``
    does (dask's own reflect/wrap differ from NumPy's once the pad is wider than the image)."""
    import dask.array as da

    for ax, (n, m) in enumerate(zip(grid.spatial_shape, grid.padded_shape), start=1):
        if m == n:
            continue
        if grid.pad_mode == "constant":
            widths = [(0, 0)] * canon.ndim
            widths[ax] = (0, m - n)
            from ._layout import pad_constant

            canon = da.pad(
                canon, widths, mode="constant", constant_values=pad_constant(grid, canon)
            )
        else:
            # reflect/edge/wrap only move pixels: pad the indices, then gather them.
            index = np.pad(np.arange(n), (0, m - n), mode=grid.pad_mode)[n:]
            tail = da.take(canon, index, axis=ax)
            canon = da.concatenate([canon, tail], axis=ax)
    return canon


def min_chunks(canon, depth: tuple[int, ...]):
    """Rechunk so that every spatial chunk is at least as wide as its halo."""
    from dask.array.overlap import ensure_minimum_chunksize

    chunks = list(canon.chunks)
    for ax, d in enumerate(depth, start=1):
        chunks[ax] = ensure_minimum_chunksize(max(d, 1), chunks[ax])
    return canon.rechunk(tuple(chunks)) if tuple(chunks) != canon.chunks else canon


def chunk_starts(chunks) -> list[np.ndarray]:
    return [np.concatenate([[0], np.cumsum(c)]) for c in chunks]


def block_grid(grid: PatchGrid, starts, block_id, depth):
    """For the spatial block ``block_id``: which part of the halo'd block holds the patches of
    the global grid touching the block's core, and where their merge lands in the core.

    Returns ``(local_grid, in_block, from_local, to_core, first)`` (slices per spatial axis;
    ``first``: the global grid index of the local grid's first patch per axis), or None when
    no patch touches the core (every core pixel is uncovered).
    """
    in_block, from_local, to_core, shape, first = [], [], [], [], []
    for ax, i in enumerate(block_id):
        s, e = int(starts[ax][i]), int(starts[ax][i + 1])
        halo_before = 0 if i == 0 else depth[ax]
        o, p = grid.origins[ax], grid.patch_size[ax]
        k0 = int(np.searchsorted(o, s - p + 1))  # first origin with o + p > s
        k1 = int(np.searchsorted(o, e))  # origins before the core's end
        if k0 >= k1:
            return None
        first.append(k0)
        a, z = int(o[k0]), int(o[k1 - 1]) + p
        in_block.append(slice(a - s + halo_before, z - s + halo_before))
        lo, hi = max(s, a), min(e, z)
        from_local.append(slice(lo - a, hi - a))
        to_core.append(slice(lo - s, hi - s))
        shape.append(z - a)
    # The touching origins are a run of the global ones; re-gridding the region they span with
    # edge="shift" gives back exactly that run (including a shifted last patch).
    local = PatchGrid(tuple(shape), grid.patch_size, grid.stride, edge="shift")
    return local, tuple(in_block), tuple(from_local), tuple(to_core), tuple(first)


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


def _ssim_block(ref, merged, dr, *, channel, win):
    from skimage.metrics import structural_similarity

    ref, merged = ssim_clean(ref.astype(np.float64), merged.astype(np.float64))
    _, full = structural_similarity(
        ref,
        merged,
        data_range=float(np.ravel(dr)[0]),
        win_size=win,
        full=True,
        channel_axis=-1 if channel else None,
    )
    return full


def chunked_error(merged, reference):
    """Lazy :func:`patch_viewer.error_map`: ``merged - reference`` in the same dtype."""
    err_dtype = np.result_type(merged.dtype, reference.dtype, np.float32)
    return merged.astype(err_dtype) - reference.astype(err_dtype)


def chunked_metrics(merged, reference, *, error=None, channel_axis=None, ssim=True) -> dict:
    """Lazy metrics (0-d dask arrays), equal to :func:`patch_viewer.compute_metrics`.
    ``error``, when the caller has it already, is :func:`chunked_error` of the two.

    Each chunk is reduced to a few partial sums in one task (one chunk-sized temporary), so a
    metrics pass costs little memory beside the merge. SSIM is computed from per-chunk SSIM
    maps (a halo of half the 7-pixel window), cropped as skimage crops the whole image, so it
    equals the whole-image value.
    """
    import dask.array as da

    fixed = dtype_range(reference.dtype)  # the rule of metrics.data_range_of
    merged = merged.rechunk(reference.chunks)
    error = chunked_error(merged, reference) if error is None else error
    parts = da.map_blocks(
        _partials,
        error.rechunk(reference.chunks),
        reference,
        dtype=np.float64,
        new_axis=error.ndim,
        chunks=(1,) * error.ndim + (5,),
        meta=np.empty((0,) * (error.ndim + 1), np.float64),
    )
    n, sum_sq = parts[..., 0].sum(), parts[..., 1].sum()
    max_abs = parts[..., 2].max()
    if fixed is not None:
        dr = da.from_array(np.float64(fixed))
    else:
        span = parts[..., 4].max() - parts[..., 3].min()
        dr = da.where(da.isfinite(span) & (span > 0), span, 1.0)
    summary = da.map_blocks(
        _summary,
        n,
        sum_sq,
        max_abs,
        dr,
        dtype=np.float64,
        new_axis=0,
        chunks=((3,),),
        meta=np.empty(0, np.float64),
    )
    return {
        "max_abs": summary[0],
        "rmse": summary[1],
        "psnr": summary[2],
        "ssim": _chunked_ssim(merged, reference, dr, channel_axis)
        if ssim
        else da.from_array(np.float64(np.nan)),
        "covered": n / max(merged.size, 1),
    }


def _partials(err, reference):
    """One chunk's ``[count, sum of squares, max |err|, ref min, ref max]`` over the pixels
    where the error is finite (the reference's range over its finite pixels)."""
    count, sum_sq, max_abs = error_sums(err)
    ref = reference if reference.dtype.kind != "f" else reference[np.isfinite(reference)]
    lo = float(ref.min()) if ref.size else np.inf
    hi = float(ref.max()) if ref.size else -np.inf
    out = np.array([count, sum_sq, max_abs, lo, hi], np.float64)
    return out.reshape((1,) * err.ndim + (5,))


def _summary(n, sum_sq, max_abs, dr):
    """max-abs, RMSE and PSNR from the reductions (0-d arrays), as one array."""
    return np.array(error_summary(float(n), float(sum_sq), float(max_abs), float(dr)), np.float64)


def _chunked_ssim(merged, reference, dr, channel_axis):
    import dask.array as da

    channel = channel_axis is not None
    if channel:
        merged = da.moveaxis(merged, channel_axis, -1)
        reference = da.moveaxis(reference, channel_axis, -1)
    spatial = reference.shape[:-1] if channel else reference.shape
    win = ssim_window(reference.shape, -1 if channel else None)
    if win < 3:
        return da.from_array(np.float64(np.nan))
    pad = (win - 1) // 2
    nd = len(spatial)
    depth = {ax: pad for ax in range(nd)}
    if channel:
        reference = reference.rechunk({nd: -1})
        merged = merged.rechunk({nd: -1})
        depth[nd] = 0
    from dask.array.overlap import ensure_minimum_chunksize

    chunks = tuple(
        ensure_minimum_chunksize(max(pad, 1), c) if ax < nd else c
        for ax, c in enumerate(reference.chunks)
    )
    reference, merged = reference.rechunk(chunks), merged.rechunk(chunks)
    dr_block = dr.reshape((1,) * reference.ndim)
    smap = da.map_overlap(
        partial(_ssim_block, channel=channel, win=win),
        reference,
        merged,
        dr_block,
        depth=[depth, depth, {ax: 0 for ax in range(reference.ndim)}],
        boundary="none",
        trim=True,
        allow_rechunk=False,
        align_arrays=False,
        dtype=np.float64,
        meta=np.empty((0,) * reference.ndim, np.float64),
    )
    crop = tuple(slice(pad, n - pad) for n in spatial)
    return smap[crop].mean()


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
