"""The whole flow, streamed: image -> patches -> per-patch filter -> merge -> weights -> error.

Patches are materialised only a batch of patch rows at a time (filters need real arrays), and
each batch is overlap-added as soon as it is filtered, so memory is O(image + batch) however
many patches there are. This module checks a call and chooses its route; the runs it hands
over to are in :mod:`.pipeline_runs`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ._layout import check_bytes, is_batched, is_lazy
from .checks import (
    check_dtype,
    check_fill_value,
    check_finite_for_integer,
    check_grid,
    check_image,
    check_out,
    check_progress,
    check_reduce_window,
    parse_max_bytes,
)
from .chunked import chunked_process
from .filter_registry import PatchFilter, get_filter
from .grid import PatchGrid
from .merge.plan import check_reduce
from .pipeline_runs import (
    BUFFER_NAMES,
    lazy_predictor_run,
    lazy_result,
    model_options,
    run_filter,
)
from .predict import Predictor
from .stream import REFERENCES, Plan, Result, make_plan, merge_stream
from .windows import make_window

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, DTypeLike

__all__ = [
    "BUFFER_NAMES",
    "REFERENCES",
    "Plan",
    "Result",
    "iter_process",
    "make_plan",
    "merge_stream",
    "process",
]


def iter_process(
    image: ArrayLike,
    grid: PatchGrid,
    patch_filter: str | PatchFilter | Predictor | Callable[..., Any] = "identity",
    *,
    filter_params: Mapping[str, float] | None = None,
    window: str | ArrayLike = "uniform",
    window_params: Mapping[str, float] | None = None,
    reduce: str = "mean",
    reference: str = "input",
    dtype: DTypeLike | None = None,
    fill_value: float | None = None,
    batch_bytes: int | None = None,
    max_bytes: int | str | None = None,
    ssim: bool = True,
    metrics: bool = True,
    indices: ArrayLike | None = None,
    uncovered: str = "fill",
    buffers: Mapping[str, np.ndarray] | None = None,
) -> Generator[tuple[int, int], None, Result]:
    """Generator form of :func:`process`: yields ``(patches_done, patches_total)`` after each
    batch and returns the :class:`Result` (``StopIteration.value``; napari's ``thread_worker``
    emits it as ``returned``). Closing the generator cancels the run.

    All arguments are validated before the generator is returned. A dask or zarr ``image``
    gives a lazy :class:`Result` at once (see :func:`process`).

    ``buffers`` lets a caller that runs again and again (the Patch Explorer) skip the page
    faults of new image-sized arrays: ``{"merged": m, "error": a, "weights": w}``, any key
    optional. An in-memory filter run on the compiled backend weighs the merged image into
    ``m`` when ``m`` has the image's shape and the result's dtype (C-contiguous, any channel
    axis last) and the merge weighs its sums straight into that dtype (uniform and named-window
    means of float32 and small-integer results); it writes ``error`` into ``a`` when ``a`` has
    the error's shape and dtype, and the weights into ``w`` (rounded once to its float dtype)
    when ``w`` has the grid's spatial shape; an array that does not fit is not used, and
    nothing else is written. They must be C-contiguous, writeable, and share no memory
    with ``image`` or with each other.
    """
    check_grid(grid)
    max_bytes = parse_max_bytes(max_bytes)
    dtype = check_dtype(dtype)
    fill_value = check_fill_value(fill_value, dtype)
    lazy_filt = get_filter(patch_filter) if is_lazy(image) else None
    if lazy_filt is not None and (
        isinstance(lazy_filt, Predictor) or indices is not None or uncovered != "fill"
    ):
        return lazy_result(
            lazy_predictor_run(
                image,
                grid,
                lazy_filt,
                filter_params,
                window=window,
                window_params=window_params,
                reduce=reduce,
                reference=reference,
                dtype=dtype,
                fill_value=fill_value,
                indices=indices,
                uncovered=uncovered,
                ssim=ssim,
            )
        )
    if lazy_filt is not None:
        return lazy_result(
            chunked_process(
                image,
                grid,
                patch_filter,
                filter_params=filter_params,
                window=window,
                window_params=window_params,
                reduce=reduce,
                reference=reference,
                dtype=dtype,
                fill_value=fill_value,
                batch_bytes=batch_bytes,
                ssim=ssim,
            )
        )
    image = check_image(image, grid)
    batched = is_batched(image.shape, grid)
    filt = get_filter(patch_filter)
    params = filt.validate(filter_params) if filt.params or filter_params else {}
    if reference not in REFERENCES:
        raise ValueError(f"`reference` must be one of {REFERENCES}, got {reference!r}")
    check_reduce(reduce)
    make_window(window, grid.patch_size, **(window_params or {}))  # validates
    check_reduce_window(reduce, window)
    check_finite_for_integer(image, dtype)
    buffers = check_buffers(buffers, image)
    if isinstance(filt, Predictor) or indices is not None or uncovered != "fill":
        from .inference import predict_run

        model, chosen = model_options(filt, params, grid, window, indices, uncovered)
        return predict_run(
            image,
            grid,
            model,
            params,
            batched=batched,
            indices=chosen,
            uncovered=uncovered,
            window=window,
            window_params=dict(window_params or {}),
            reduce=reduce,
            reference=reference,
            dtype=dtype,
            fill_value=fill_value,
            max_bytes=max_bytes,
            batch_bytes=batch_bytes,
            ssim=ssim,
            metrics=metrics,
            filt=filt,
        )
    n_images = image.shape[0] if batched else 1
    probe = filt(
        np.zeros((1,) + grid.patch_shape, image.dtype), tuple(range(1, grid.ndim + 1)), **params
    )
    plan = make_plan(
        grid,
        n_images,
        batch_bytes=batch_bytes,
        dtype=image.dtype,
        window=window,
        reduce=reduce,
        reference=reference,
        filter_dtype=np.asarray(probe).dtype,
        out_dtype=dtype,
        metrics=metrics,
        ssim=ssim,
    )
    check_bytes(
        plan.peak_bytes,
        "this run",
        max_bytes,
        "use a smaller batch_bytes, or the dask path for images larger than memory",
    )
    return run_filter(
        image,
        grid,
        filt,
        params,
        window,
        dict(window_params or {}),
        reduce,
        reference,
        (dtype, fill_value),
        batched,
        plan,
        ssim,
        metrics,
        buffers,
    )


def check_buffers(buffers, image: np.ndarray) -> dict:
    """``buffers`` as a dict: known names, writeable C-contiguous arrays, no shared memory."""
    if buffers is None:
        return {}
    buffers = dict(buffers)
    unknown = set(buffers) - set(BUFFER_NAMES)
    if unknown:
        raise ValueError(f"`buffers` takes the keys {BUFFER_NAMES}, got {sorted(unknown)}")
    seen: list = [image]
    for name, a in buffers.items():
        if not isinstance(a, np.ndarray):
            raise TypeError(f"`buffers[{name!r}]` must be a NumPy array, got {type(a).__name__}")
        check_out(a, a.shape, a.dtype, seen, name=f"buffers[{name!r}]")
        seen.append(a)
    return buffers


def process(
    image: ArrayLike,
    grid: PatchGrid,
    patch_filter: str | PatchFilter | Predictor | Callable[..., Any] = "identity",
    *,
    filter_params: Mapping[str, float] | None = None,
    window: str | ArrayLike = "uniform",
    window_params: Mapping[str, float] | None = None,
    reduce: str = "mean",
    reference: str = "input",
    dtype: DTypeLike | None = None,
    fill_value: float | None = None,
    batch_bytes: int | None = None,
    max_bytes: int | str | None = None,
    progress: Callable[[int, int], object] | None = None,
    ssim: bool = True,
    metrics: bool = True,
    indices: ArrayLike | None = None,
    uncovered: str = "fill",
    buffers: Mapping[str, np.ndarray] | None = None,
) -> Result:
    """Cut ``image`` into patches, filter each patch, merge them back and measure the error.

    Parameters
    ----------
    image : array_like, dask array or zarr array
        An image of shape ``grid.image_shape``, or a batch of them (leading axis). A dask or
        zarr array is processed lazily, chunk by chunk (see Notes).
    grid : PatchGrid
        The patch geometry.
    patch_filter : str, PatchFilter, Predictor or callable, optional
        A name from ``patch_viewer.FILTERS`` (default ``"identity"``), a batched callable
        ``f(stack, spatial_axes, **params)``, or a :class:`Predictor` (a model whose output
        may have other channels, dtype or resolution, or be a vector per patch: ``merged``
        then has the output's shape, and ``outputs`` every output by name).
    filter_params : dict, optional
        Filter parameters, checked against the filter's declared ranges.
    window, window_params, reduce, dtype, fill_value
        As in :func:`merge_patches`. Without ``dtype`` the result is float: float32 for
        float32/float16 images and integers up to 16 bits, float64 otherwise (the command line
        keeps the input's dtype instead, see its ``--dtype``). An integer ``dtype`` refuses
        images with NaN or inf pixels.
    reference : {"input", "filter"}, optional
        What the error is measured against: the input image, or the same filter applied to the
        whole image (that shows the seams patch-wise processing leaves). Along axes where the
        patch is one pixel thick the filter runs plane by plane, as it does on the patches.
    batch_bytes : int, optional
        Size of one streamed batch of filtered patches (default 8 MiB; 16 MiB for 2-D grids
        with stride 1 along the rows, which merge fastest in larger batches).
    max_bytes : int or str, optional
        Refuse runs whose planned peak memory (``result.plan.peak_bytes``, the metrics and
        SSIM included) exceeds this: bytes, or a size such as ``"1GB"`` (default 4 GiB).
    progress : callable, optional
        Called as ``progress(patches_done, patches_total)`` after every batch.
    ssim : bool, optional
        Compute SSIM (the costly metric); False leaves ``metrics["ssim"]`` NaN.
    metrics : bool, optional
        Compute the metrics at all; False leaves every one NaN (an interactive caller shows
        the images first and computes them after, with :func:`compute_metrics`).
    indices : array_like of int, optional
        Process only these patches (flat indices, e.g. from :func:`select_patches`); merged
        through an :class:`Accumulator`.
    uncovered : {"fill", "input"}, optional
        What pixels no chosen patch covers get: ``fill_value`` (default), or the input's
        value (outputs of the input's shape only).
    buffers : dict, optional
        Arrays to write ``merged``, ``error`` and ``weights`` into instead of new ones (see
        :func:`iter_process`).

    Returns
    -------
    Result
        ``merged``, ``weights``, ``reference``, ``error``, ``metrics`` (max_abs, rmse, psnr,
        ssim, covered), ``grid``, ``plan`` and ``elapsed`` seconds.

    Notes
    -----
    For a dask or zarr image nothing is computed here: ``merged``, ``weights``, ``reference``
    and ``error`` are dask arrays and ``metrics`` holds 0-d dask arrays (evaluate them together
    with ``dask.compute(result.merged, result.metrics)``). Each output chunk is computed from
    its input chunk plus a halo of ``patch - 1``, from exactly the global grid's patches that
    touch it, so the result equals the in-memory one (up to the rounding of the summation
    order) whatever the chunking, and runs unchanged on ``dask.distributed``. ``progress``
    and ``max_bytes`` do not apply (use dask's own progress bars and memory limits).

    Examples
    --------
    >>> image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    >>> r = process(image, PatchGrid(image.shape, 16, stride=8), "gaussian",
    ...             filter_params={"sigma": 1.0}, reference="filter")
    >>> r.merged.shape, r.metrics["max_abs"] > 0
    ((64, 64), True)
    """
    check_progress(progress)
    gen = iter_process(
        image,
        grid,
        patch_filter,
        filter_params=filter_params,
        window=window,
        window_params=window_params,
        reduce=reduce,
        reference=reference,
        dtype=dtype,
        fill_value=fill_value,
        batch_bytes=batch_bytes,
        max_bytes=max_bytes,
        ssim=ssim,
        metrics=metrics,
        indices=indices,
        uncovered=uncovered,
        buffers=buffers,
    )
    while True:
        try:
            done, total = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(done, total)
