"""The merge plan: every decision made once per call, before any kernel runs.

Which kernel runs (compiled backend; the NumPy backend follows the same dtype rules):

=====================  ==========================  ===========================================
reduce / window        patches                     kernel (sums in, see :mod:`.precision`)
=====================  ==========================  ===========================================
mean, uniform          bool, ints up to 32 bits    ``band_sum`` (int32 or int64)
mean, uniform          float16/32                  ``band_sum`` (float64)
mean, uniform          int64, uint64               ``band_sum_split`` (two int64 halves)
mean, uniform          float64                     ``band_anchored_plain`` (float64, anchored)
mean, named or array   float16/32, ints to 16 bit  ``band_weighted`` (float64)
mean, named or array   float64, ints of 32/64 bit  ``band_anchored`` (float64, anchored)
max / min              any                         ``band_max`` / ``band_min`` (own dtype)
overlap-tile           any                         ``band_gather`` (the nearest centre's value)
=====================  ==========================  ===========================================

The same table holds for 1-, 2- and 3-D grids, with or without channels, and for every edge
mode: kernels see one canonical source of patches, so the loop nests never branch on
the grid (:func:`stack_source`, or :func:`image_source` to read patches from the image
itself). Bands of output rows go to threads; each pixel is summed in patch order within its
band, so results do not depend on the number of threads.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..grid import PatchGrid
from ..windows import make_window
from .precision import kernel_data, sum_dtype, work_dtype

__all__ = [
    "BACKENDS",
    "REDUCTIONS",
    "MergePlan",
    "Source",
    "backend",
    "check_reduce",
    "image_source",
    "make_merge_plan",
    "stack_source",
]

REDUCTIONS = ("mean", "max", "min")
BACKENDS = ("auto", "numba", "numpy")
BACKEND_ENV = "PATCH_VIEWER_BACKEND"

#: Bytes of sums one band keeps (fits the L2 cache beside the patch rows it reads).
BAND_BYTES = 1 << 20
#: Stacks smaller than this merge on one thread (measured: two threads gained nothing on a
#: 5.6 MiB stack, W1-u8; the hand-off costs about what they save).
THREAD_MIN_BYTES = 8 << 20


def backend() -> str:
    """The merge backend in use: ``"numba"`` (compiled kernels) or ``"numpy"``.

    ``PATCH_VIEWER_BACKEND=numpy|numba|auto`` (default ``auto``: numba where it can be
    imported) chooses; asking for numba where it is missing raises ImportError.

    Examples
    --------
    >>> backend() in ("numba", "numpy")
    True
    """
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {choice!r}")
    if choice == "numpy":
        return "numpy"
    error = _numba_error()
    if error is None:
        return "numba"
    if choice == "numba":
        raise ImportError(
            f"{BACKEND_ENV}=numba, but numba cannot be imported ({error}); "
            "install it with `pip install numba`, or unset the variable"
        )
    return "numpy"


_NUMBA_ERROR: list = []


def _numba_error() -> str | None:
    if not _NUMBA_ERROR:
        try:
            from . import kernels_numba  # noqa: F401  (compiles nothing until a kernel runs)

            _NUMBA_ERROR.append(None)
        except ImportError as exc:
            _NUMBA_ERROR.append(str(exc))
    return _NUMBA_ERROR[0]


@dataclass(frozen=True)
class MergePlan:
    """How one merge runs: decided once, from the grid, the dtype and the options."""

    mode: str  # "sum", "split", "weighted", "anchored", "max", "min" or "pick"
    data: np.dtype  # what the kernels read (float16 is widened to float32, bool to uint8)
    acc: np.dtype  # what they sum or compare in
    work: np.dtype  # the default output dtype
    window: np.ndarray | None  # the window over (p0, p1, L) for weighted modes, float64
    # (None for the uniform window's anchored sums)
    factors: tuple | None  # per-axis weight sums (separable windows), else None
    weights: np.ndarray | None  # the whole weight map (windows that do not separate)


def check_reduce(reduce: str, *, weighted: bool = False) -> None:
    """``reduce`` must be one of :data:`REDUCTIONS`; a window other than the uniform one
    (``weighted``) goes with the mean only."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"`reduce` must be one of {REDUCTIONS}, got {reduce!r}")
    if weighted and reduce != "mean":
        raise ValueError(
            f"`window` must be 'uniform' with reduce={reduce!r}; windows weight the mean only"
        )


def make_merge_plan(
    grid: PatchGrid, dtype, n_channels: int, *, window="uniform", reduce="mean", window_params=None
) -> MergePlan:
    """Validate the options and decide the kernel and dtypes (see the module docstring).
    Plans of named windows are kept on the grid (a few per grid): a small merge's plan costs
    about as much as its kernel's start."""
    params = dict(window_params or {})
    key = None
    if isinstance(window, str):
        key = (np.dtype(dtype).str, n_channels, window, reduce, tuple(sorted(params.items())))
        plans = grid.__dict__.get("_plans")
        if plans is not None and key in plans:
            return plans[key]
    plan = _make_merge_plan(grid, dtype, n_channels, window, reduce, params)
    if key is not None:
        plans = grid.__dict__.setdefault("_plans", {})  # a cache, not a field
        if len(plans) >= 8:
            plans.pop(next(iter(plans)))
        plans[key] = plan
    return plan


def _make_merge_plan(grid, dtype, n_channels, window, reduce, params) -> MergePlan:
    check_reduce(reduce)
    pick = isinstance(window, str) and window == "overlap-tile"
    win = make_window(window, grid.patch_size, **params)
    check_reduce(reduce, weighted=win is not None or pick)
    dtype = np.dtype(dtype)
    work = work_dtype(dtype)
    data = kernel_data(dtype)
    if pick or reduce != "mean":
        return MergePlan("pick" if pick else reduce, data, data, work, None, None, None)
    acc, how = sum_dtype(dtype, win is None, grid.coverage_range()[1])
    from .weights import weight_sums, weights_in  # (weights imports the NumPy kernels)

    sums = weight_sums(grid, window, params)
    factors = None if sums is None else tuple(sums)
    full = None if sums is not None else weights_in(grid, window, params, np.float64)
    if how != "plain" or win is None:
        mode = {"plain": "sum", "split": "split", "anchored": "anchored"}[how]
    else:
        mode = "weighted"
    kwin = None if win is None else _fused_window(win, grid, n_channels)
    return MergePlan(mode, data, acc, work, kwin, factors, full)


def _fused_window(win: np.ndarray, grid: PatchGrid, c: int) -> np.ndarray:
    """The window as the kernels read it: flat ``(p0, p1, p_last * C)``, float64."""
    w = win.reshape(three_axes(win.shape, grid, 1))
    return np.ascontiguousarray(np.repeat(w, c, axis=2), dtype=np.float64).ravel()


def default_workers(nbytes: int) -> int:
    """Threads for a merge reading ``nbytes`` of patches: every core the process may use for
    large stacks, one for small ones (the result is the same either way)."""
    if nbytes < THREAD_MIN_BYTES:
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- canonical stacks
#: Where a grid's spatial axes go among the kernels' three: 2-D grids get a size-1 middle
#: axis (bands run along the rows), 1-D grids two leading ones (the last axis stays last,
#: fused with the channels).
AXES3 = {1: (2,), 2: (0, 2), 3: (0, 1, 2)}


def three_axes(values, grid: PatchGrid, fill):
    """Per-axis ``values`` of the grid spread over the kernels' three axes (``fill`` elsewhere)."""
    out = [fill] * 3
    for v, ax in zip(values, AXES3[grid.ndim]):
        out[ax] = v
    return out


class Source(tuple):
    """Where the kernels read patches: ``(flat, st, f0, f1, f2)`` (see
    :mod:`.kernels_numba`)."""

    __slots__ = ()

    def rows(self, grid: PatchGrid, row0: int, rows: int) -> Source:
        """The same source restricted to the grid rows ``row0 .. row0 + rows`` (the grid's
        first axis)."""
        parts = list(self)
        ax = 2 + AXES3[grid.ndim][0]
        parts[ax] = parts[ax][row0 : row0 + rows].copy()
        return Source(parts)


def _flat(a: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """``a``'s memory as a read-only 1-D array from its first element, and its strides in
    elements (0 on length-1 axes)."""
    item = a.itemsize
    st = [0 if n == 1 else s // item for n, s in zip(a.shape, a.strides)]
    span = 1 + sum((n - 1) * s for n, s in zip(a.shape, st))
    if a.flags.c_contiguous and span == a.size:  # the common case: a view, made in ~1 µs
        flat = a.reshape(-1)
        flat.flags.writeable = False
        return flat, st
    return np.lib.stride_tricks.as_strided(a, (span,), (item,), writeable=False), st


def _as_data(a: np.ndarray, data: np.dtype) -> np.ndarray:
    """``a`` in the kernels' dtype and a layout they can read (copied only where needed:
    another dtype, negative or unaligned strides, a last axis not contiguous with the
    channels)."""
    if a.dtype != data:
        a = a.view(np.uint8) if a.dtype.kind == "b" else a.astype(data)
    return a if _viewable(a) else np.ascontiguousarray(a)


def stack_source(canon: np.ndarray, grid: PatchGrid, data: np.dtype) -> Source:
    """A canonical stack ``(b, *G, *p, C)`` (any memory order) as a kernel :class:`Source`."""
    nd = grid.ndim
    b, c = canon.shape[0], canon.shape[-1]
    g = canon.shape[1 : 1 + nd]
    p = canon.shape[1 + nd : 1 + 2 * nd]
    canon = _as_data(canon, data)
    a = canon.reshape((b, *three_axes(g, grid, 1), *three_axes(p, grid, 1), c))
    flat, st = _flat(a)
    f = [np.arange(n, dtype=np.int64) * s for n, s in zip(a.shape[1:4], st[1:4])]
    return Source((flat, np.array([st[0], st[4], st[5]], np.int64), *f))


def image_source(canon: np.ndarray, grid: PatchGrid, data: np.dtype) -> Source:
    """A canonical image ``(b, *padded spatial, C)`` as a kernel :class:`Source`: the grid's
    patches are read where they lie (any grid, shifted last patches included; no copy)."""
    b, c = canon.shape[0], canon.shape[-1]
    canon = _as_data(canon, data)
    a = canon.reshape((b, *three_axes(canon.shape[1:-1], grid, 1), c))
    flat, st = _flat(a)
    origins = three_axes(grid.origins, grid, np.zeros(1, np.int64))
    f = [np.asarray(o, np.int64) * s for o, s in zip(origins, (st[1], st[2], c))]
    return Source((flat, np.array([st[0], st[1], st[2]], np.int64), *f))


def _viewable(a: np.ndarray) -> bool:
    item = a.itemsize
    sizes, strides = a.shape, a.strides
    if any(s < 0 or s % item for n, s in zip(sizes, strides) if n > 1):
        return False
    p_last, c = sizes[-2], sizes[-1]
    c_ok = c == 1 or strides[-1] == item
    p_ok = p_last == 1 or strides[-2] == c * item
    return bool(c_ok and p_ok and a.dtype.isnative)


def band_rows(extent_row_bytes: int, n0: int, images: int, workers: int) -> int:
    """Rows per band: the band's sums fit :data:`BAND_BYTES`, and there are at least as many
    bands as threads."""
    rows = max(1, BAND_BYTES // max(extent_row_bytes, 1))
    if images < workers:
        rows = min(rows, max(1, math.ceil(n0 * images / workers)))
    return min(rows, n0)
