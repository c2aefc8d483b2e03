"""Reconstruction error: a signed error map and summary metrics (thin over skimage.metrics)."""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import structural_similarity

METRICS = ("max_abs", "rmse", "psnr", "ssim")


def error_map(merged, reference) -> np.ndarray:
    """Signed error ``merged - reference`` as float (NaN where ``merged`` is uncovered).

    Examples
    --------
    >>> error_map(np.array([1.0, 2.0]), np.array([1, 3])).tolist()
    [0.0, -1.0]
    """
    merged = np.asarray(merged)
    reference = np.asarray(reference)
    if merged.shape != reference.shape:
        raise ValueError(f"`merged` shape {merged.shape} differs from `reference` shape {reference.shape}")
    dtype = np.result_type(merged.dtype, reference.dtype, np.float32)
    return np.subtract(merged, reference, dtype=dtype)


def data_range_of(reference) -> float:
    """Value range used for PSNR/SSIM: the dtype range for integers, else max - min (>0)."""
    reference = np.asarray(reference)
    if reference.dtype.kind in "iu":
        info = np.iinfo(reference.dtype)
        return float(info.max) - float(min(info.min, 0))
    if reference.dtype.kind == "b":
        return 1.0
    ok = np.isfinite(reference)
    finite = reference if ok.all() else reference[ok]
    if finite.size == 0:
        return 1.0
    span = float(finite.max()) - float(finite.min())
    return span if span > 0 else 1.0


def error_sums(err) -> tuple[int, float, float]:
    """``(count, sum of squares, max |err|)`` over the finite pixels of an error map: the
    reductions behind max-abs, RMSE and PSNR, whole-image or per chunk (see
    :func:`error_summary`). No gather when every pixel is finite; the squares are summed in
    float64 without ``np.dot``, whose BLAS threads would oversubscribe worker processes and
    dask's threads."""
    finite = np.isfinite(err)
    e = err if finite.all() else err[finite]
    if e.size == 0:
        return 0, 0.0, -math.inf
    return e.size, float(np.square(e, dtype=np.float64).sum()), float(np.abs(e).max())


def error_summary(n, sum_sq, max_abs, data_range) -> tuple[float, float, float]:
    """``(max_abs, rmse, psnr)`` from :func:`error_sums` (added up over chunks if need be).
    PSNR is skimage's ``peak_signal_noise_ratio`` formula on this MSE (calling it would take
    two more image-sized float64 copies); a test checks that the two agree."""
    if n == 0:
        return math.nan, math.nan, math.nan
    mse = sum_sq / n
    psnr = 10 * math.log10(data_range * data_range / mse) if mse > 0 else math.inf
    return max_abs, math.sqrt(mse), psnr


def compute_metrics(merged, reference, *, channel_axis=None, data_range=None,
                    ssim: bool = True, error=None) -> dict:
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
        return {"max_abs": math.nan, "rmse": math.nan, "psnr": math.nan, "ssim": math.nan,
                "covered": covered}
    max_abs, rmse, psnr = error_summary(n, sum_sq, max_abs, dr)
    return {"max_abs": max_abs, "rmse": rmse, "psnr": psnr,
            "ssim": ssim_of(merged, reference, channel_axis=channel_axis, data_range=dr)
            if ssim else math.nan,
            "covered": covered}


def ssim_of(merged, reference, *, channel_axis=None, data_range=None) -> float:
    """SSIM of ``merged`` against ``reference``, as in :func:`compute_metrics` (pixels where
    either is not finite take the reference's value)."""
    ref64, merged64, dr = _ssim_inputs(merged, reference, data_range)
    return _ssim(ref64, merged64, channel_axis, dr)


def _ssim_inputs(merged, reference, data_range):
    """Both images in float64 with non-finite pixels settled (the reference's missing ones
    become 0, the merged image's take the reference's value), and the data range."""
    dr = data_range_of(reference) if data_range is None else float(data_range)
    ref64, merged64 = ssim_clean(np.asarray(reference).astype(np.float64),
                                 np.asarray(merged).astype(np.float64))
    return ref64, merged64, dr


def ssim_clean(ref64, merged64):
    """The non-finite rule of :func:`ssim_of` on float64 arrays (also per chunk, lazily)."""
    merged64 = np.where(np.isfinite(merged64) & np.isfinite(ref64), merged64, ref64)
    ref64 = np.where(np.isfinite(ref64), ref64, 0.0)
    return ref64, np.where(np.isfinite(merged64), merged64, ref64)


def ssim_window(shape, channel_axis) -> int:
    """skimage's default SSIM window (7), shrunk to the smallest spatial side and kept odd;
    below 3 there is nothing structural to compare."""
    spatial = [n for i, n in enumerate(shape)
               if channel_axis is None or i != channel_axis % len(shape)]
    win = min(7, min(spatial))
    return win - (1 - win % 2)


def iter_ssim(merged, reference, *, channel_axis=None, data_range=None, band=128):
    """Generator form of :func:`ssim_of`: computes the SSIM map in bands of ``band`` rows
    (each with a halo of half the window, so every value is the whole-image one), yields after
    each band and returns the same value as :func:`ssim_of` (``StopIteration.value``).
    Closing the generator stops the work between bands (a GUI cancels a stale run that way).

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
    ref64, merged64, dr = _ssim_inputs(merged, reference, data_range)
    ch = None if channel_axis is None else channel_axis % ref64.ndim
    spatial_axes = [i for i in range(ref64.ndim) if i != ch]
    win = ssim_window(ref64.shape, channel_axis)
    if win < 3:
        return math.nan
    pad = (win - 1) // 2
    ax = spatial_axes[0]
    n = ref64.shape[ax]
    if n <= band + 2 * pad:
        return _ssim(ref64, merged64, channel_axis, dr)
    total, count = 0.0, 0
    for a in range(pad, n - pad, band):  # the rows skimage keeps: [pad, n - pad)
        z = min(a + band, n - pad)
        lo, hi = max(0, a - pad), min(n, z + pad)
        take = [slice(None)] * ref64.ndim
        take[ax] = slice(lo, hi)
        _, smap = structural_similarity(ref64[tuple(take)], merged64[tuple(take)],
                                        data_range=dr, channel_axis=channel_axis,
                                        win_size=win, full=True)
        keep = [slice(pad, m - pad) if i in spatial_axes else slice(None)
                for i, m in enumerate(smap.shape)]
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
    return float(structural_similarity(ref, merged, data_range=dr, channel_axis=channel_axis,
                                       win_size=win))
