"""Predictors on dask arrays: a lazy (multi-channel, rescaled) result equal to the in-memory one.

As for filters (:mod:`.chunked`), each output chunk is computed from its input chunk plus a
halo of ``patch - 1``, from exactly the patches of the global grid that touch it (and, with
``indices``, only the chosen ones), merged by an :class:`~.accumulator.Accumulator` in the
global grid's patch order: every output pixel sees the same patches, weights and anchor as in
memory. Output chunks are the input's, scaled; with a fractional scale the input is rechunked
so that every chunk boundary maps to a whole output pixel.

Several outputs run the model once per output and chunk (one dask graph each).
"""

from __future__ import annotations

import math
import time
from fractions import Fraction
from functools import partial

import numpy as np

from ._layout import is_batched, to_canonical
from .accumulator import Accumulator
from .batches import flat_indices, iter_batches
from .chunked_layout import as_dask, block_grid, chunk_starts, min_chunks, pad_lazy
from .chunked_metrics import chunked_error, chunked_metrics
from .grid import PatchGrid
from .merge.precision import work_dtype
from .metrics import METRICS
from .predict import Predictor

__all__ = ["chunked_predict"]


def _whole(value: Fraction, what: str) -> int:
    if value.denominator != 1:
        raise ValueError(f"{what} does not map to a whole output pixel ({float(value):g})")
    return int(value)


def _scale_chunks(canon, scale, nd):
    """Rechunk so that every spatial chunk boundary times ``scale`` is a whole pixel."""
    chunks = list(canon.chunks)
    changed = False
    for ax, f in enumerate(scale, start=1):
        d = f.denominator
        if d > 1 and any(c % d for c in chunks[ax][:-1]):
            size = max(d, max(chunks[ax]) // d * d)
            n = sum(chunks[ax])
            chunks[ax] = tuple(min(size, n - k) for k in range(0, n, size))
            changed = True
    return canon.rechunk(tuple(chunks)) if changed else canon


def _core_shape(starts, ids, scale) -> tuple[list[tuple[int, int]], tuple[int, ...]]:
    """The block's core in input pixels, and its shape in output pixels."""
    core = [(int(st[i]), int(st[i + 1])) for st, i in zip(starts, ids)]
    shape = tuple(
        _whole(e * f, "a chunk boundary") - _whole(s * f, "a chunk boundary")
        for (s, e), f in zip(core, scale)
    )
    return core, shape


def _chosen(selected, grid: PatchGrid, local: PatchGrid, first) -> np.ndarray | None:
    """The chosen global patches that lie in the local grid, as local flat indices."""
    if selected is None:
        return None
    idx = np.stack(np.unravel_index(selected, grid.grid_shape), -1) - np.array(first)
    inside = ((idx >= 0) & (idx < np.array(local.grid_shape))).all(axis=1)
    return np.ravel_multi_index(tuple(idx[inside].T), local.grid_shape)


def _scaled(slices, scale) -> tuple[slice, ...]:
    return tuple(
        slice(_whole(sl.start * f, "a patch"), _whole(sl.stop * f, "a patch"))
        for sl, f in zip(slices, scale)
    )


def _merge_image(image, lgrid, chosen, model, params, merge, spec, specs, where):
    """One image's region through the model into an Accumulator (global patch order)."""
    acc = Accumulator(lgrid, channels=spec.channels, scale=spec.scale, **merge)
    acc._stream(whole_grid=chosen is None)  # the weights as in memory (per-axis sums)
    if chosen is not None and not len(chosen):
        return acc
    for batch in iter_batches(
        image, lgrid, model.batch_size, indices=chosen, channels_first=model.channels_first
    ):
        res = model.run(batch.patches, params, where)
        model.check(res, specs, lgrid, len(batch.indices), where)
        acc.add(res[spec.name], batch.indices, channels_first=model.channels_first)
    return acc


def _predicted_block(
    block,
    *,
    grid,
    starts,
    depth,
    model,
    params,
    merge,
    spec,
    specs,
    dtype,
    fill,
    selected,
    keep_input,
    c_in,
    block_id=None,
):
    ids = block_id[1 : grid.ndim + 1]
    core, shape_out = _core_shape(starts, ids, spec.scale)
    out = np.full((block.shape[0],) + shape_out + (spec.channels or 1,), fill, dtype)
    halo = [0 if i == 0 else d for i, d in zip(ids, depth)]
    core_in = block[(slice(None),) + tuple(slice(h, h + e - s) for h, (s, e) in zip(halo, core))]
    found = block_grid(grid, starts, ids, depth)
    if found is None:
        if keep_input:
            out[...] = core_in
        return out
    local, in_block, from_local, to_core, first = found
    chosen = _chosen(selected, grid, local, first)
    with_c = grid.channel_axis is not None
    lgrid = PatchGrid(
        local.image_shape + ((c_in,) if with_c else ()),
        grid.patch_size,
        grid.stride,
        edge="shift",
        channel_axis=-1 if with_c else None,
    )
    src, dst = _scaled(from_local, spec.scale), _scaled(to_core, spec.scale)
    for b in range(block.shape[0]):
        image = block[(b,) + in_block]
        acc = _merge_image(
            image if with_c else image[..., 0],
            lgrid,
            chosen,
            model,
            params,
            merge,
            spec,
            specs,
            f"chunk {tuple(block_id)}",
        )
        merged = acc.result(dtype, fill)
        merged = (merged[..., None] if spec.channels is None else merged)[src]
        if keep_input:
            merged = np.where((acc.count[src] > 0)[..., None], merged, core_in[b][dst])
        out[(b,) + dst] = merged
    return out


def _weights_block(*, grid, starts, depth, spec, merge, selected, block_id=None):
    _, shape_out = _core_shape(starts, block_id, spec.scale)
    out = np.zeros(shape_out, np.float64)
    found = block_grid(grid, starts, block_id, depth)
    if found is None:
        return out
    local, _, from_local, to_core, first = found
    chosen = _chosen(selected, grid, local, first)
    acc = Accumulator(local, channels=None, scale=spec.scale, **merge)
    acc._stream(whole_grid=chosen is None)
    acc._footprints(np.arange(local.n_patches) if chosen is None else chosen)
    out[_scaled(to_core, spec.scale)] = acc.weights()[_scaled(from_local, spec.scale)]
    return out


def _out_chunks(starts, scale) -> tuple[tuple[int, ...], ...]:
    return tuple(
        tuple(np.diff([math.ceil(s * f) for s in st]).tolist()) for st, f in zip(starts, scale)
    )


def _fill(spec, dtype, fill_value, covering: bool, uncovered: str):
    out_dtype = np.dtype(dtype) if dtype is not None else work_dtype(spec.dtype)
    if fill_value is None and out_dtype.kind != "f" and not covering and uncovered == "fill":
        raise ValueError(
            "some pixels are covered by no patch: pass `fill_value` to mark "
            f"them in an integer output dtype ({out_dtype})"
        )
    fill = fill_value if fill_value is not None else (np.nan if out_dtype.kind == "f" else 0)
    return out_dtype, fill


def _output_graph(ov, canon, grid, spec, block_args, batched):
    """The lazy merged output ``spec`` in the image's layout (channels where the
    accumulator puts them)."""
    import dask.array as da

    acc = Accumulator(grid, channels=spec.channels, scale=spec.scale, **block_args["merge"])
    if block_args["keep_input"] and acc.shape != grid.image_shape:
        raise ValueError(
            f"uncovered='input' needs outputs of the input's shape "
            f"{grid.image_shape}; output {spec.name!r} has {acc.shape}"
        )
    starts = block_args["starts"]
    dtype = block_args["dtype"]
    chunks = (canon.chunks[0],) + _out_chunks(starts, spec.scale) + ((spec.channels or 1,),)
    lazy = da.map_blocks(
        partial(_predicted_block, spec=spec, **block_args),
        ov,
        chunks=chunks,
        dtype=dtype,
        meta=np.empty((0,) * canon.ndim, dtype),
        token=f"patch-predict-{spec.name}",
    )
    lazy = lazy[(slice(None),) + tuple(slice(0, n) for n in acc.spatial_shape)]
    lazy = lazy[..., 0] if spec.channels is None else da.moveaxis(lazy, -1, acc.channel_axis + 1)
    return (lazy if batched else lazy[0]), acc


def chunked_predict(
    image,
    grid: PatchGrid,
    model: Predictor,
    params: dict,
    *,
    window,
    window_params,
    reduce,
    reference,
    dtype,
    fill_value,
    indices,
    uncovered,
    ssim,
):
    """:func:`patch_viewer.process` with a predictor (or chosen patches) on a dask/zarr image:
    every array of the :class:`~.stream.Result` is lazy."""
    import dask.array as da

    from .stream import Result, make_plan

    start = time.perf_counter()
    if reference != "input":
        raise ValueError(
            f"reference={reference!r} with predictor {model.name!r} on a dask image: the "
            "whole-image run is in memory only; use reference='input', or load the image"
        )
    image = as_dask(image)
    batched = is_batched(image.shape, grid)
    nd = grid.ndim
    specs = model.probe(grid, image.dtype, params)
    selected = None if indices is None else flat_indices(indices, grid)
    merge = {"window": window, "window_params": window_params, "reduce": reduce}
    canon = pad_lazy(to_canonical(image, grid, batched).rechunk({nd + 1: -1}), grid)
    for spec in specs:
        canon = _scale_chunks(canon, spec.scale, nd)
    depth = tuple(p - 1 for p in grid.patch_size)
    canon = min_chunks(canon, depth)
    starts = chunk_starts(canon.chunks[1 : nd + 1])
    ov = da.overlap.overlap(
        canon,
        depth={ax: d for ax, d in enumerate(depth, start=1)},
        boundary="none",
        allow_rechunk=False,
    )
    covering = selected is None and grid.is_covering
    outputs, accs = {}, []
    for spec in specs:
        out_dtype, fill = _fill(spec, dtype, fill_value, covering, uncovered)
        args = {
            "grid": grid,
            "starts": starts,
            "depth": depth,
            "model": model,
            "params": params,
            "merge": merge,
            "specs": specs,
            "dtype": out_dtype,
            "fill": fill,
            "selected": selected,
            "keep_input": uncovered == "input",
            "c_in": canon.shape[-1],
        }
        outputs[spec.name], acc = _output_graph(ov, canon, grid, spec, args, batched)
        accs.append(acc)
    weights = da.map_blocks(
        partial(
            _weights_block,
            grid=grid,
            starts=starts,
            depth=depth,
            spec=specs[0],
            merge=merge,
            selected=selected,
        ),
        chunks=_out_chunks(starts, specs[0].scale),
        dtype=np.float64,
        meta=np.empty((0,) * nd, np.float64),
        token="patch-predict-weights",
    )[tuple(slice(0, n) for n in accs[0].spatial_shape)]
    merged = next(iter(outputs.values()))
    error, metrics = _lazy_metrics(merged, image, grid, batched, ssim)
    plan = make_plan(grid, image.shape[0] if batched else 1)
    return Result(
        merged, weights, image, error, metrics, grid, plan, time.perf_counter() - start, outputs
    )


def _lazy_metrics(merged, image, grid, batched, ssim):
    import dask.array as da

    if merged.shape != image.shape:
        return None, {k: da.from_array(np.float64(np.nan)) for k in METRICS + ("covered",)}
    error = chunked_error(merged, image)
    channel_axis = None if grid.channel_axis is None else grid.channel_axis + int(batched)
    return error, chunked_metrics(merged, image, error=error, channel_axis=channel_axis, ssim=ssim)
