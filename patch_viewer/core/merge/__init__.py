"""Merging patches back into an image: validate -> plan -> run kernels -> finish.

:func:`merge_patches` decides once (:func:`.plan.make_merge_plan`: dtype rules, anchor,
kernel, threads; the decision table is in :mod:`.plan`), then runs the compiled kernels of
:mod:`.kernels_numba` band by band (:mod:`.accumulate`), or, where numba is missing or
``PATCH_VIEWER_BACKEND=numpy``, the vectorised NumPy engine (:mod:`.numpy_engine`, the test
oracle). :mod:`.precision` turns sums into the output dtype; :mod:`.weights` gives the
overlap weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..checks import check_grid, check_out
from ..grid import PatchGrid
from .plan import BACKENDS, REDUCTIONS, backend, default_workers, make_merge_plan
from .precision import check_dtype, work_dtype
from .weights import max_weight, weight_map

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import ArrayLike, DTypeLike

    from .accumulate import NumbaMerger

__all__ = [
    "BACKENDS",
    "REDUCTIONS",
    "Merger",
    "backend",
    "max_weight",
    "merge_patches",
    "merge_state_bytes",
    "weight_map",
    "work_dtype",
]


def Merger(
    grid: PatchGrid,
    n_images: int,
    n_channels: int,
    dtype: DTypeLike,
    *,
    window: str | ArrayLike = "uniform",
    reduce: str = "mean",
    window_params: Mapping[str, float] | None = None,
) -> NumbaMerger | Any:
    """A streaming accumulator on the active backend: ``add(piece, b0, row0)`` pieces of
    canonical patches ``(b, g0, *grid_shape[1:], *patch_size, C)`` (rows of an image in
    ascending order), then ``result(dtype, fill_value)``, canonical ``(b, *spatial, C)``."""
    options = {"window": window, "reduce": reduce, "window_params": window_params}
    if backend() == "numba":
        from .accumulate import NumbaMerger

        plan = make_merge_plan(grid, dtype, n_channels, **options)
        return NumbaMerger(grid, n_images, n_channels, plan)
    from .numpy_engine import numpy_merger

    return numpy_merger(grid, n_images, n_channels, dtype, **options)


def merge_patches(
    patches: ArrayLike,
    grid: PatchGrid,
    *,
    window: str | ArrayLike = "uniform",
    reduce: str = "mean",
    dtype: DTypeLike | None = None,
    fill_value: float | None = None,
    workers: int | None = None,
    out: np.ndarray | None = None,
    **window_params: float,
) -> np.ndarray:
    """Merge a patch stack back into an image, blending where patches overlap.

    Parameters
    ----------
    patches : array_like
        ``(*grid.grid_shape, *grid.patch_shape)`` as returned by :func:`extract_patches`, or the
        flat ``(grid.n_patches, *grid.patch_shape)``; either with a leading batch axis to merge
        many images at once. Any memory order.
    grid : PatchGrid
        The geometry the patches were cut with.
    window : str or array_like, optional
        ``"uniform"`` (default), ``"triangular"``, ``"hann"``, ``"gaussian"`` (``sigma=`` as a
        fraction of the patch size, default 0.125), ``"overlap-tile"`` (each pixel from the
        patch whose centre is nearest), or a non-negative array of the patch's spatial shape.
    reduce : {"mean", "max", "min"}, optional
        How overlapping values combine; ``mean`` is weighted by the window.
    dtype : dtype, optional
        Output dtype. Default: float32 for float32/16 and integer patches up to 16 bits,
        float64 otherwise. Integer dtypes are rounded half to even and saturate at the dtype's
        limits (never wrap), so integer round trips are exact.
    fill_value : scalar, optional
        Value for pixels no patch covers (``edge="drop"``, or stride > patch size), or that
        only zero window weights cover. Default NaN; required for an integer ``dtype`` when
        such pixels exist.
    workers : int, optional
        Threads to merge on. Default: every core for stacks of 8 MiB and more, one below.
        The result does not depend on it.
    out : ndarray, optional
        A writeable array of the result's shape and dtype to write the result into, and
        return. Merging many images into one kept array skips the page faults of a
        new image-sized array's first touch (a third of a W3-sized merge on these machines).
        Where the sums are weighed straight into the output dtype (uniform or named-window
        means of integer and float32 stacks into their default float32) and ``out`` is
        C-contiguous with any channel axis last, the kernels write into it; otherwise the
        result is copied in. Its contents are unspecified if the merge raises.

    Returns
    -------
    ndarray
        Shape ``grid.image_shape`` (with the batch axis first if given); ``out`` if given.

    Notes
    -----
    Sums are exact where they can be (integers in integers, float32 in float64), so identity
    round trips are bit-exact for every dtype, window and edge mode; float32 and integer means
    are correctly rounded. float64 means are anchored at the first covering patch's value (see
    :mod:`patch_viewer.core.merge.precision`). The compiled backend (numba) and the NumPy one
    agree bit for bit on identity round trips and to a few ulp elsewhere.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.random.default_rng(0).random((100, 100))
    >>> grid = PatchGrid(image.shape, 39, stride=1)
    >>> from patch_viewer import extract_patches
    >>> merged = merge_patches(extract_patches(image, grid), grid)
    >>> bool(np.array_equal(merged, image))
    True
    """
    import numpy as np

    from .._layout import canonical_into, from_canonical, is_lazy, patches_to_canonical
    from .precision import checked_fill

    check_grid(grid)
    if is_lazy(patches):
        raise TypeError(
            "`patches` must be an in-memory array: a patch stack is many times larger than its "
            "image; for images larger than memory pass the dask or zarr image to "
            "patch_viewer.process(), which cuts, filters and merges chunk by chunk"
        )
    if isinstance(patches, np.ma.MaskedArray):
        raise TypeError(
            "`patches` must not be a masked array: its mask would be ignored; "
            "fill the masked values, or merge the mask as a second stack"
        )
    patches = np.asanyarray(patches)
    canon, batched = patches_to_canonical(patches, grid)
    work_dtype(canon.dtype)  # refuses non-numeric patches
    if dtype is not None:
        check_dtype(dtype)
    if fill_value is not None:
        checked_fill(
            fill_value, np.dtype(dtype if dtype is not None else work_dtype(canon.dtype)), False
        )
    if out is not None:
        target = np.dtype(dtype) if dtype is not None else work_dtype(canon.dtype)
        shape = ((canon.shape[0],) if batched else ()) + grid.image_shape
        check_out(out, shape, target, (patches,), what="`patches`", contiguous=False)
    if workers is not None and not (
        isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1
    ):
        raise ValueError(f"`workers` must be an int >= 1 or None, got {workers!r}")
    options = {"window": window, "reduce": reduce, "window_params": window_params}
    if backend() == "numba":
        from .accumulate import merge_bands

        plan = make_merge_plan(grid, canon.dtype, canon.shape[-1], **options)
        n = default_workers(canon.nbytes) if workers is None else workers
        into = None if out is None else canonical_into(out, grid, batched)
        merged = merge_bands(canon, grid, plan, n, dtype, fill_value, into)
    else:
        from .numpy_engine import merge_numpy

        merged = merge_numpy(canon, grid, workers, dtype, fill_value, **options)
    merged = from_canonical(merged, grid, batched)
    if out is None:
        return merged
    if not np.may_share_memory(merged, out):  # not written in place: copied in
        np.copyto(out, merged)
    return out


def merge_state_bytes(
    grid: PatchGrid, n_images: int, dtype, window="uniform", reduce="mean"
) -> tuple[int, int]:
    """``(canvas bytes, result bytes)`` a streaming :func:`Merger` holds on the active
    backend: its sums (and anchors) over the padded images, and the image-sized arrays its
    result is finished through. For memory plans (see :func:`patch_viewer.make_plan`)."""
    import math

    import numpy as np

    dtype = np.dtype(dtype)
    channels = grid.n_channels or 1
    work = work_dtype(dtype)
    pixels = n_images * channels * math.prod(grid.spatial_shape)
    tile = isinstance(window, str) and window == "overlap-tile"
    if backend() == "numba":
        plan = make_merge_plan(grid, dtype, channels, window=window, reduce=reduce)
        extent = (
            n_images
            * channels
            * math.prod(
                max(n, int(o[-1]) + p)
                for n, o, p in zip(grid.spatial_shape, grid.origins, grid.patch_size)
            )
        )
        canvas = extent * (
            plan.acc.itemsize
            + plan.data.itemsize * (plan.mode in ("anchored", "pick"))
            + 8 * (plan.mode == "split")
        )
        result = pixels * (8 if plan.mode in ("anchored", "split") else work.itemsize)
        return canvas, result
    from .precision import accumulation

    extent = n_images * channels * math.prod(n + s for n, s in zip(grid.padded_shape, grid.stride))
    uniform = isinstance(window, str) and window == "uniform"
    acc, anchor = accumulation(dtype, work, uniform, grid.coverage_range()[1])
    if reduce != "mean" or tile:
        acc, anchor = work, tile
    canvas = (0 if tile else extent * acc.itemsize) + (extent * work.itemsize if anchor else 0)
    # the finish makes one image-sized array: the cast out of wider sums, or anchor + delta
    return canvas, pixels * work.itemsize * (acc != work or bool(anchor))
