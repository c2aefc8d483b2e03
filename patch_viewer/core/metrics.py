"""Reconstruction error: a signed error map and summary metrics (thin over skimage.metrics)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from skimage.metrics import structural_similarity

from .checks import check_out

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = [
    "METRICS",
    "REDUCE_ELEMENTS",
    "compute_metrics",
    "data_range_of",
    "dtype_range",
    "error_dtype",
    "error_map",
    "error_summary",
    "error_sums",
    "iter_ssim",
    "reduce_bands",
    "ssim_bytes",
    "ssim_clean",
    "ssim_of",
    "ssim_window",
]

METRICS = ("max_abs", "rmse", "psnr", "ssim")

__all__ = [
    "METRICS",
    "compute_metrics",
    "data_range_of",
    "dtype_range",
    "error_map",
    "error_summary",
    "error_sums",
    "iter_ssim",
    "ssim_bytes",
    "ssim_of",
    "ssim_window",
]


def error_dtype(merged, reference) -> np.dtype:
    """The dtype of :func:`error_map` (and of its lazy twin): both inputs' and float32's.
    Both are arrays (NumPy or dask: only their dtypes are read, nothing is computed).

    Examples
    --------
    >>> error_dtype(np.zeros(2, np.float32), np.zeros(2, np.uint8))
    dtype('float32')
    """
    return np.result_type(merged.dtype, reference.dtype, np.float32)


def error_map(
    merged: ArrayLike, reference: ArrayLike, *, out: np.ndarray | None = None
) -> np.ndarray:
    """Signed error ``merged - reference`` as float (NaN where ``merged`` is uncovered).

    ``out``, if given, receives it: an array of the error's shape and dtype (the result type of
    both inputs and float32), C-contiguous, writeable, sharing no memory with the inputs.

    Examples
    --------
    >>> error_map(np.array([1.0, 2.0]), np.array([1, 3])).tolist()
    [0.0, -1.0]
    """
    merged = np.asarray(merged)
    reference = np.asarray(reference)
    if merged.shape != reference.shape:
        raise ValueError(
            f"`merged` shape {merged.shape} differs from `reference` shape {reference.shape}"
        )
    dtype = error_dtype(merged, reference)
    if out is not None:
        check_out(out, merged.shape, dtype, (merged, reference))
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN: not a warning
        return np.subtract(merged, reference, dtype=dtype, out=out)


#: Integer dtypes up to this many bytes measure PSNR/SSIM against their full range (0..255
#: for uint8); wider ones (int32, int64) against the data's range, since a 64-bit range says
#: nothing about the image (int64 reported 149.8 dB with an error of 1.28e12).
MAX_RANGE_ITEMSIZE = 2


def dtype_range(dtype) -> float | None:
    """The data range a dtype fixes for PSNR/SSIM: 1 for bool, the full range of integers up
    to 16 bits; None (use the data's range) for wider integers and floats.

    Examples
    --------
    >>> dtype_range(np.uint8), dtype_range(np.int16), dtype_range(np.int64)
    (255.0, 65535.0, None)
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return 1.0
    if dtype.kind in "iu" and dtype.itemsize <= MAX_RANGE_ITEMSIZE:
        info = np.iinfo(dtype)
        return float(info.max) - float(min(info.min, 0))
    return None


def data_range_of(reference) -> float:
    """Value range used for PSNR/SSIM: :func:`dtype_range` of the reference's dtype where
    that is meaningful, else the reference's finite ``max - min`` (1 when that is 0 or there
    is none). The lazy path applies the same rule chunk by chunk."""
    reference = np.asarray(reference)
    fixed = dtype_range(reference.dtype)
    if fixed is not None:
        return fixed
    lo, hi = np.inf, -np.inf
    for part in reduce_bands(reference):
        finite = part if part.dtype.kind != "f" else part[np.isfinite(part)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    span = hi - lo
    return span if math.isfinite(span) and span > 0 else 1.0


#: Elements per step of the whole-image reductions (error sums, data range): their
#: temporaries stay a few MiB whatever the image size.
REDUCE_ELEMENTS = 2**20


def reduce_bands(a: np.ndarray):
    """Views of ``a`` along its first axis, about :data:`REDUCE_ELEMENTS` elements each."""
    if a.ndim == 0 or a.size <= REDUCE_ELEMENTS:
        yield a
        return
    step = max(1, REDUCE_ELEMENTS // max(a.size // a.shape[0], 1))
    for i in range(0, a.shape[0], step):
        yield a[i : i + step]


def error_sums(err) -> tuple[int, float, float]:
    """``(count, sum of squares, max |err|)`` over the finite pixels of an error map: the
    reductions behind max-abs, RMSE and PSNR, whole-image or per chunk (see
    :func:`error_summary`). Reduced in bands of :data:`REDUCE_ELEMENTS`, so the float64
    squares never take an image-sized temporary; summed without ``np.dot``, whose BLAS threads
    would oversubscribe worker processes and dask's threads."""
    count, sum_sq, max_abs = 0, 0.0, -math.inf
    for part in reduce_bands(np.asarray(err)):
        finite = np.isfinite(part)
        e = part if finite.all() else part[finite]
        if e.size:
            count += e.size
            sum_sq += float(np.square(e, dtype=np.float64).sum())
            max_abs = max(max_abs, float(np.abs(e).max()))
    return count, sum_sq, max_abs


def error_summary(n, sum_sq, max_abs, data_range) -> tuple[float, float, float]:
    """``(max_abs, rmse, psnr)`` from :func:`error_sums` (added up over chunks if need be).
    PSNR is skimage's ``peak_signal_noise_ratio`` formula on this MSE (calling it would take
    two more image-sized float64 copies); a test checks that the two agree."""
    if n == 0:
        return math.nan, math.nan, math.nan
    mse = sum_sq / n
    psnr = 10 * math.log10(data_range * data_range / mse) if mse > 0 else math.inf
    return max_abs, math.sqrt(mse), psnr


def compute_metrics(
    merged: ArrayLike,
    reference: ArrayLike,
    *,
    channel_axis: int | None = None,
    data_range: float | None = None,
    ssim: bool = True,
    error: np.ndarray | None = None,
) -> dict[str, float]:
    """Max-abs error, RMSE, PSNR (dB) and SSIM of ``merged`` against ``reference``.

    Pixels where either image is not finite (pixels no patch covers are NaN) are left out of
    max-abs, RMSE and PSNR; for SSIM they take the reference's value (zero error there).
    ``covered`` in the result is the fraction of pixels that count. SSIM is the costly one
    (about 0.2 µs per pixel); ``ssim=False`` leaves it NaN, to be computed later with
    :func:`ssim_of`. ``error``, when the caller has it already, is :func:`error_map` of the
    two (it is not computed again).

    Examples
    --------
    >>> m = compute_metrics(np.ones((8, 8)), np.ones((8, 8)))
    >>> m["max_abs"], m["rmse"], m["psnr"], m["ssim"]
    (0.0, 0.0, inf, 1.0)
    """
    merged = np.asarray(merged)
    reference = np.asarray(reference)
    err = error_map(merged, reference) if error is None else np.asarray(error)
    n, sum_sq, max_abs = error_sums(err)
    covered = n / err.size if err.size else 0.0
    dr = data_range_of(reference) if data_range is None else float(data_range)
    if not (dr > 0 and math.isfinite(dr)):
        raise ValueError(f"`data_range` must be a positive finite number, got {data_range!r}")
    if n == 0:
        return {
            "max_abs": math.nan,
            "rmse": math.nan,
            "psnr": math.nan,
            "ssim": math.nan,
            "covered": covered,
        }
    max_abs, rmse, psnr = error_summary(n, sum_sq, max_abs, dr)
    return {
        "max_abs": max_abs,
        "rmse": rmse,
        "psnr": psnr,
        "ssim": ssim_of(merged, reference, channel_axis=channel_axis, data_range=dr)
        if ssim
        else math.nan,
        "covered": covered,
    }


#: Pixels per SSIM band: skimage's SSIM holds about 14 float64 copies of what it is given
#: (112 bytes a pixel), so a band of 2**18 pixels peaks near 30 MiB whatever the image size,
#: and runs ~2.5x faster than one whole-image call (fewer page faults).
SSIM_BAND_ELEMENTS = 2**18
#: Bytes per band pixel at the peak of one SSIM band (skimage's 14 copies, the two float64
#: inputs and the settling temporaries), for memory plans.
SSIM_BYTES_PER_PIXEL = 160


def ssim_bytes(shape, channel_axis=None) -> int:
    """Peak memory of :func:`ssim_of` on an image of ``shape`` (one band and its halo)."""
    rows, row_elems, _ = _band_rows(shape, channel_axis, None)
    return SSIM_BYTES_PER_PIXEL * (rows + 6) * row_elems


def _band_rows(shape, channel_axis, band):
    """``(rows per band, elements per row, banded axis)`` for SSIM on ``shape``."""
    ch = None if channel_axis is None else channel_axis % len(shape)
    ax = next(i for i in range(len(shape)) if i != ch)
    row_elems = max(1, math.prod(shape) // shape[ax])
    if band is None:
        band = max(16, SSIM_BAND_ELEMENTS // row_elems)
    return int(band), row_elems, ax


def ssim_of(merged, reference, *, channel_axis=None, data_range=None) -> float:
    """SSIM of ``merged`` against ``reference``, as in :func:`compute_metrics` (pixels where
    either is not finite take the reference's value). Computed in bands of rows (see
    :func:`iter_ssim`), so memory stays :func:`ssim_bytes` whatever the image size."""
    gen = iter_ssim(merged, reference, channel_axis=channel_axis, data_range=data_range)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def ssim_clean(ref64, merged64):
    """The non-finite rule of :func:`ssim_of` on float64 arrays (also per chunk, lazily)."""
    merged64 = np.where(np.isfinite(merged64) & np.isfinite(ref64), merged64, ref64)
    ref64 = np.where(np.isfinite(ref64), ref64, 0.0)
    return ref64, np.where(np.isfinite(merged64), merged64, ref64)


def _settled(merged, reference, take):
    """One band of both images in float64, non-finite pixels settled by :func:`ssim_clean`."""
    return ssim_clean(
        np.asarray(reference[take], dtype=np.float64), np.asarray(merged[take], dtype=np.float64)
    )


def ssim_window(shape, channel_axis) -> int:
    """skimage's default SSIM window (7), shrunk to the smallest spatial side and kept odd;
    below 3 there is nothing structural to compare."""
    spatial = [
        n for i, n in enumerate(shape) if channel_axis is None or i != channel_axis % len(shape)
    ]
    win = min(7, *spatial)
    return win - (1 - win % 2)


def iter_ssim(merged, reference, *, channel_axis=None, data_range=None, band=None):
    """Generator form of :func:`ssim_of`: computes the SSIM map in bands of ``band`` rows
    (default: about :data:`SSIM_BAND_ELEMENTS` pixels; each band with a halo of half the
    window, so every value is the whole-image one), yields after each band and returns the
    same value as :func:`ssim_of` (``StopIteration.value``). Closing the generator stops the
    work between bands (a GUI cancels a stale run that way).

    Examples
    --------
    >>> a = np.random.default_rng(0).random((300, 40))
    >>> b = a + 0.1
    >>> g = iter_ssim(a, b, band=64)
    >>> while True:
    ...     try:
    ...         _ = next(g)
    ...     except StopIteration as stop:
    ...         value = stop.value
    ...         break
    >>> bool(np.isclose(value, ssim_of(a, b)))
    True
    """
    merged, reference = np.asarray(merged), np.asarray(reference)
    dr = data_range_of(reference) if data_range is None else float(data_range)
    win = ssim_window(reference.shape, channel_axis)
    if win < 3:
        return math.nan
    band, _, ax = _band_rows(reference.shape, channel_axis, band)
    ch = None if channel_axis is None else channel_axis % reference.ndim
    spatial_axes = [i for i in range(reference.ndim) if i != ch]
    pad = (win - 1) // 2
    n = reference.shape[ax]
    if n <= band + 2 * pad:
        return _ssim(*_settled(merged, reference, ...), channel_axis, dr)
    total, count = 0.0, 0
    for a in range(pad, n - pad, band):  # the rows skimage keeps: [pad, n - pad)
        z = min(a + band, n - pad)
        lo, hi = max(0, a - pad), min(n, z + pad)
        take = [slice(None)] * reference.ndim
        take[ax] = slice(lo, hi)
        ref64, merged64 = _settled(merged, reference, tuple(take))
        _, smap = structural_similarity(
            ref64, merged64, data_range=dr, channel_axis=channel_axis, win_size=win, full=True
        )
        del ref64, merged64
        keep = [
            slice(pad, m - pad) if i in spatial_axes else slice(None)
            for i, m in enumerate(smap.shape)
        ]
        keep[ax] = slice(a - lo, z - lo)
        part = smap[tuple(keep)]
        total += float(part.sum(dtype=np.float64))
        count += part.size
        yield a
    return total / count


def _ssim(ref, merged, channel_axis, dr) -> float:
    """SSIM of images already settled by :func:`ssim_clean`."""
    win = ssim_window(ref.shape, channel_axis)
    if win < 3:
        return math.nan  # too small for a structural comparison
    return float(
        structural_similarity(ref, merged, data_range=dr, channel_axis=channel_axis, win_size=win)
    )
