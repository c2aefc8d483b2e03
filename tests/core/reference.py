"""Brute-force references: the obvious, slow way, one patch and one pixel at a time."""

import numpy as np

from patch_viewer import PatchGrid
from patch_viewer.core.windows import make_window


def canonical_image(image, grid):
    """(spatial..., C) float64 copy, padded like the grid pads."""
    img = np.asarray(image, dtype=np.float64)
    img = img[..., None] if grid.channel_axis is None else np.moveaxis(img, grid.channel_axis, -1)
    extra = [(0, p - n) for p, n in zip(grid.padded_shape, grid.spatial_shape)] + [(0, 0)]
    if not any(w[1] for w in extra):
        return img
    if grid.pad_mode == "constant":
        return np.pad(img, extra, mode="constant", constant_values=grid.pad_value)
    return np.pad(img, extra, mode=grid.pad_mode)


def brute_patches(image, grid: PatchGrid):
    """Patch stack (*grid_shape, *patch_size, C) by slicing each patch out in a loop."""
    img = canonical_image(image, grid)
    out = np.empty(grid.grid_shape + grid.patch_size + (img.shape[-1],))
    for idx in np.ndindex(grid.grid_shape):
        o = grid.patch_origin(idx)
        out[idx] = img[tuple(slice(a, a + p) for a, p in zip(o, grid.patch_size))]
    return out


def brute_coverage(grid: PatchGrid):
    cov = np.zeros(grid.padded_shape, dtype=np.int64)
    for idx in np.ndindex(grid.grid_shape):
        o = grid.patch_origin(idx)
        cov[tuple(slice(a, a + p) for a, p in zip(o, grid.patch_size))] += 1
    return cov[tuple(slice(0, n) for n in grid.spatial_shape)]


def brute_merge(patches, grid: PatchGrid, window="uniform", reduce="mean", **params):
    """Merge canonical patches (*grid_shape, *patch_size, C) pixel by pixel, float64.

    Returns (spatial..., C) with NaN where nothing covers.
    """
    patches = np.asarray(patches, dtype=np.float64)
    c = patches.shape[-1]
    shape = grid.padded_shape + (c,)
    if isinstance(window, str) and window == "overlap-tile":
        out = np.full(shape, np.nan)
        for x in np.ndindex(grid.padded_shape):
            idx, off = [], []
            for xk, o, p in zip(x, grid.origins, grid.patch_size):
                cands = [i for i, oi in enumerate(o) if oi <= xk < oi + p]
                if not cands:
                    break
                centre = (p - 1) / 2
                best = min(cands, key=lambda i: (abs(xk - (o[i] + centre)), i))
                idx.append(best)
                off.append(xk - o[best])
            else:
                out[x] = patches[tuple(idx) + tuple(off)]
        return out[tuple(slice(0, n) for n in grid.spatial_shape)]
    w = make_window(window, grid.patch_size, **params)
    w = np.ones(grid.patch_size) if w is None else w
    if reduce == "mean":
        acc = np.zeros(shape)
        wsum = np.zeros(grid.padded_shape)
    else:
        acc = np.full(shape, -np.inf if reduce == "max" else np.inf)
        wsum = np.zeros(grid.padded_shape)
    for idx in np.ndindex(grid.grid_shape):
        o = grid.patch_origin(idx)
        sl = tuple(slice(a, a + p) for a, p in zip(o, grid.patch_size))
        if reduce == "mean":
            acc[sl] += patches[idx] * w[..., None]
        elif reduce == "max":
            acc[sl] = np.maximum(acc[sl], patches[idx])
        else:
            acc[sl] = np.minimum(acc[sl], patches[idx])
        wsum[sl] += w
    crop = tuple(slice(0, n) for n in grid.spatial_shape)
    acc, wsum = acc[crop], wsum[crop]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = acc / wsum[..., None] if reduce == "mean" else acc
    out[wsum == 0] = np.nan
    return out


def to_user_layout(canon, grid):
    """(spatial..., C) -> the grid's image layout."""
    return canon[..., 0] if grid.channel_axis is None else np.moveaxis(canon, -1, grid.channel_axis)
