"""The runs :func:`patch_viewer.iter_process` hands a checked call to.

:func:`run_filter` is the streamed filter run in memory (extract, filter and merge batch by
batch, then the reference, the error, the metrics and the weights); a predictor, or chosen
patches, runs through :func:`.inference.predict_run` in memory once :func:`model_options` has
checked what it adds, and through :func:`lazy_predictor_run` on dask arrays
(:mod:`.chunked_predict`). The in-memory runs are generators that yield ``(patches_done,
patches_total)`` and return the :class:`Result`; a lazy (dask) result is made at once, and
:func:`lazy_result` gives it the same generator form.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ._layout import canonical_into, from_canonical, to_canonical
from .chunked import reference_axes
from .merge import weight_map
from .merge.plan import backend, check_reduce
from .metrics import METRICS, compute_metrics, error_dtype, error_map
from .stream import Result, merge_stream
from .windows import make_window

#: The results :func:`iter_process` can write into a caller's ``buffers``: the names of
#: :class:`Result`'s fields (a contract of their own; two happen to be layer names too).
BUFFER_NAMES = ("merged", "error", "weights")
_MERGED, _ERROR, _WEIGHTS = BUFFER_NAMES

__all__ = ["BUFFER_NAMES", "lazy_predictor_run", "lazy_result", "model_options", "run_filter"]


def model_options(filt, params, grid, window, indices, uncovered):
    """What a run of a predictor (or of chosen patches) checks beyond a filter's run, in memory
    or on dask: ``(model, indices)``."""
    from .accumulator_args import check_window
    from .batches import flat_indices
    from .inference import UNCOVERED, as_predictor

    if uncovered not in UNCOVERED:
        raise ValueError(f"`uncovered` must be one of {UNCOVERED}, got {uncovered!r}")
    check_window(window)
    if indices is not None:
        indices = flat_indices(indices, grid)
    return as_predictor(filt, params, grid), indices


def lazy_predictor_run(
    image,
    grid,
    filt,
    filter_params,
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
    """A predictor, or chosen patches, on a dask image (:mod:`.chunked_predict`): its
    arguments checked as the in-memory run checks them, then a lazy :class:`Result`."""
    from .chunked_predict import chunked_predict

    params = filt.validate(filter_params) if filt.params or filter_params else {}
    make_window(window, grid.patch_size, **(window_params or {}))  # validates
    check_reduce(reduce)
    model, chosen = model_options(filt, params, grid, window, indices, uncovered)
    return chunked_predict(
        image,
        grid,
        model,
        params,
        window=window,
        window_params=dict(window_params or {}),
        reduce=reduce,
        reference=reference,
        dtype=dtype,
        fill_value=fill_value,
        indices=chosen,
        uncovered=uncovered,
        ssim=ssim,
    )


def lazy_result(result):
    """A generator that yields nothing and returns ``result`` (a lazy run's, made at once)."""
    return result
    yield  # a generator that returns at once


def run_filter(
    image,
    grid,
    filt,
    params,
    window,
    window_params,
    reduce,
    reference,
    dtype,
    batched,
    plan,
    ssim=True,
    metrics=True,
    buffers=None,
):
    """The streamed run of a filter in memory: batches of patches -> filter -> merge, then
    the reference, error, metrics and weights. ``dtype`` is ``(dtype, fill_value)``;
    ``buffers`` (checked) may hold arrays for the merged image, the error and the weights
    (used if they fit)."""
    buffers = buffers or {}
    start = time.perf_counter()
    dtype, fill_value = dtype
    canon = to_canonical(image, grid, batched)
    merger = yield from merge_stream(
        canon,
        grid,
        filt,
        params,
        window,
        window_params,
        reduce,
        plan.rows_per_batch,
        plan.n_patches,
    )
    into = _merged_buffer(buffers.get(_MERGED), image, grid, batched, merger)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite pixels: NaN, no warning
        merged = from_canonical(merger.result(dtype, fill_value, **into), grid, batched)
    if reference == "filter":  # plane by plane where patches are one plane thick
        ref = np.asarray(filt(canon, reference_axes(grid), **params))
        ref = from_canonical(ref, grid, batched)
    else:
        ref = image
    out = _fitting(buffers.get(_ERROR), merged.shape, error_dtype(merged, ref))
    error = error_map(merged, ref, out=out)
    channel_axis = None if grid.channel_axis is None else grid.channel_axis + int(batched)
    if metrics:
        metrics = compute_metrics(merged, ref, channel_axis=channel_axis, ssim=ssim, error=error)
    else:
        metrics = dict.fromkeys(METRICS + ("covered",), math.nan)
    w = buffers.get(_WEIGHTS)
    w = w if w is not None and w.shape == grid.spatial_shape and w.dtype.kind == "f" else None
    weights = weight_map(grid, window, out=w, **window_params)
    return Result(merged, weights, ref, error, metrics, grid, plan, time.perf_counter() - start)


def _merged_buffer(buffer, image, grid, batched, merger) -> dict:
    """``{"into": canonical view}`` of a ``merged`` buffer the compiled merger can weigh
    into (the image's shape, C-contiguous with any channel axis last), else ``{}``; the
    merger still writes it only where its dtype is the result's."""
    if buffer is None or buffer.shape != image.shape or backend() != "numba":
        return {}
    from .merge.accumulate import NumbaMerger  # numba is there

    into = canonical_into(buffer, grid, batched) if isinstance(merger, NumbaMerger) else None
    return {} if into is None else {"into": into}


def _fitting(buffer, shape, dtype):
    """``buffer`` if it has this shape and dtype, else None (a new array is made)."""
    if buffer is not None and buffer.shape == tuple(shape) and buffer.dtype == dtype:
        return buffer
    return None
