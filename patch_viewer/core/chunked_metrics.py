"""Lazy error map and metrics of the chunked path, equal to the in-memory ones.

:func:`chunked_error` is the lazy :func:`patch_viewer.error_map`; :func:`chunked_metrics`
reduces each chunk to a few partial sums in one task (count, sum of squares, max |error|, the
reference's range), so a metrics pass costs little memory beside the merge, and computes SSIM
from per-chunk SSIM maps with a halo of half the window, cropped as skimage crops the whole
image. The filter path (:mod:`.chunked`) and the predictor path (:mod:`.chunked_predict`)
both measure through it.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from .metrics import dtype_range, error_dtype, error_summary, error_sums, ssim_clean, ssim_window

__all__ = ["chunked_error", "chunked_metrics"]


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
    err_dtype = error_dtype(merged, reference)
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
