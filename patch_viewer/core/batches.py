"""Feeding a model: batches of patches cut from an image, and the patches worth running.

:func:`iter_batches` cuts an image's patches (all, or chosen ones, in the order given) into
fresh batches with their flat indices and origins, laid out as the model takes them;
:func:`select_patches` chooses the patches worth running (by a mask's coverage through a
summed-area table, by a predicate on their pixels, or by index); :func:`flat_indices` checks
the indices every entry point takes. The predictors that consume the batches are in
:mod:`.predict`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ._layout import pad_canonical, to_canonical, window_view
from .checks import check_flat_indices, check_grid, positive_int
from .grid import PatchGrid

__all__ = ["PatchBatch", "flat_indices", "iter_batches", "mask_fraction", "select_patches"]


class PatchBatch(NamedTuple):
    """One batch of patches: ``patches`` (``(N, *patch_size[, C])``, or ``(N, C, *patch_size)``
    channels-first), their flat ``indices`` into the grid and their spatial ``origins``."""

    patches: np.ndarray
    indices: np.ndarray
    origins: np.ndarray


def iter_batches(
    image: ArrayLike,
    grid: PatchGrid,
    batch_size: int = 64,
    *,
    indices: ArrayLike | None = None,
    channels_first: bool = False,
) -> Iterator[PatchBatch]:
    """Batches of patches of ``image`` with their indices, to feed a model.

    Parameters
    ----------
    image : array_like
        One image of ``grid.image_shape``.
    grid : PatchGrid
        The patch geometry (``edge="pad"`` pads as the grid says, with ``pad_value``).
    batch_size : int, optional
        Patches per batch (the last may be smaller).
    indices : array_like of int, optional
        Flat patch indices to yield, in this order (e.g. from :func:`select_patches`).
        Default: every patch, in C order.
    channels_first : bool, optional
        ``(N, C, *patch_size)`` (C = 1 for images without a channel axis) as torch and MONAI
        expect, instead of ``(N, *patch_size[, C])``.

    Yields
    ------
    PatchBatch
        ``(patches, indices, origins)``; ``patches`` is a fresh C-contiguous array the model
        may keep or modify.

    Examples
    --------
    >>> grid = PatchGrid((6, 8), 4, stride=2)
    >>> [b.patches.shape for b in iter_batches(np.zeros((6, 8)), grid, 4)]
    [(4, 4, 4), (2, 4, 4)]
    >>> next(iter_batches(np.zeros((6, 8)), grid, 4, channels_first=True)).patches.shape
    (4, 1, 4, 4)
    """
    from .checks import check_image

    check_grid(grid)
    batch_size = positive_int(batch_size, "batch_size")
    image = check_image(image, grid)
    if image.shape != grid.image_shape:
        raise ValueError(
            f"`image` must have the grid's image_shape {grid.image_shape} (one "
            f"image), got {image.shape}"
        )
    order = np.arange(grid.n_patches) if indices is None else flat_indices(indices, grid)
    return _batches(image, grid, batch_size, order, channels_first)


def _batches(image, grid, batch_size, order, channels_first):
    view = window_view(pad_canonical(to_canonical(image, grid, False), grid), grid)[0]
    nd = grid.ndim
    origins = (
        np.stack([o[i] for o, i in zip(grid.origins, np.unravel_index(order, grid.grid_shape))], -1)
        if len(order)
        else np.zeros((0, nd), np.int64)
    )
    for start in range(0, len(order), batch_size):
        org = origins[start : start + batch_size]
        patches = view[tuple(org.T)]  # (N, *patch, C): a gathered copy
        if channels_first:
            patches = np.ascontiguousarray(np.moveaxis(patches, -1, 1))
        elif grid.channel_axis is None:
            patches = patches[..., 0]
        yield PatchBatch(patches, order[start : start + batch_size].copy(), org.copy())


def flat_indices(indices, grid: PatchGrid) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.size == 0:
        return np.zeros(0, np.int64)
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise TypeError(
            f"`indices` must be a 1-D array of flat patch indices (ints), got "
            f"shape {idx.shape} dtype {idx.dtype}"
        )
    check_flat_indices(idx, grid)
    return idx.astype(np.int64)


# --------------------------------------------------------------------------- selection
def select_patches(
    grid: PatchGrid,
    *,
    mask: ArrayLike | None = None,
    min_fraction: float = 0.5,
    image: ArrayLike | None = None,
    predicate: Callable | None = None,
    indices: ArrayLike | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Flat indices of the patches worth processing (sorted, unique).

    Every criterion given must hold (they combine with "and"):

    - ``mask`` (the image's spatial shape, truthy where the tissue, cell, ... is): the
      patch's fraction of mask pixels is at least ``min_fraction`` (padding counts as not
      masked);
    - ``predicate(patches) -> bool array (N,)``, called on batches of ``image``'s patches
      (as :func:`iter_batches` yields them);
    - ``indices``: a list of flat indices.

    Examples
    --------
    >>> grid = PatchGrid((8, 8), 4, stride=4)
    >>> mask = np.zeros((8, 8), bool); mask[:4, :3] = True
    >>> select_patches(grid, mask=mask, min_fraction=0.5).tolist()
    [0]
    >>> image = np.arange(64.0).reshape(8, 8)
    >>> select_patches(grid, image=image, predicate=lambda p: p.mean(axis=(1, 2)) > 30).tolist()
    [2, 3]
    """
    check_grid(grid)
    if mask is None and predicate is None and indices is None:
        raise TypeError("select_patches needs at least one of `mask`, `predicate`, `indices`")
    keep = np.ones(grid.n_patches, bool)
    if indices is not None:
        chosen = np.zeros(grid.n_patches, bool)
        chosen[flat_indices(indices, grid)] = True
        keep &= chosen
    if mask is not None:
        keep &= mask_fraction(mask, grid) >= _fraction(min_fraction)
    if predicate is not None:
        if image is None:
            raise TypeError("`predicate` needs the `image` whose patches it judges")
        if not callable(predicate):
            raise TypeError(f"`predicate` must be callable, got {predicate!r}")
        candidates = np.flatnonzero(keep)
        for batch in iter_batches(image, grid, batch_size, indices=candidates):
            verdict = np.asarray(predicate(batch.patches))
            if verdict.shape != batch.indices.shape:
                raise ValueError(
                    f"`predicate` must return one bool per patch, shape "
                    f"{batch.indices.shape}, got shape {verdict.shape}"
                )
            keep[batch.indices] = verdict.astype(bool)
    return np.flatnonzero(keep)


def _fraction(value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.number))
        or not 0 <= value <= 1
    ):
        raise ValueError(f"`min_fraction` must be a number in [0, 1], got {value!r}")
    return float(value)


def mask_fraction(mask, grid: PatchGrid) -> np.ndarray:
    """Per patch (flat, C order), the fraction of its pixels where ``mask`` is true, from a
    summed-area table: O(image + patches) whatever the patch size."""
    mask = np.asarray(mask)
    if mask.shape != grid.spatial_shape:
        raise ValueError(
            f"`mask` must have the image's spatial shape {grid.spatial_shape}, got {mask.shape}"
        )
    nd = grid.ndim
    table = np.zeros(tuple(m + 1 for m in grid.padded_shape), np.int64)
    table[tuple(slice(1, n + 1) for n in grid.spatial_shape)] = mask.astype(bool)
    for ax in range(nd):
        np.cumsum(table, axis=ax, out=table)
    origins = np.meshgrid(*grid.origins, indexing="ij")
    total = np.zeros(grid.grid_shape, np.int64)
    for corner in np.ndindex((2,) * nd):
        at = tuple(o + c * p for o, c, p in zip(origins, corner, grid.patch_size))
        total += (-1) ** (nd - sum(corner)) * table[at]
    return (total / math.prod(grid.patch_size)).ravel()
