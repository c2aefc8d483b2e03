"""Checking what an :class:`~patch_viewer.core.accumulator.Accumulator` is given.

Its options (``scale`` as exact per-axis fractions, ``channels``, a window that applies to
patches at any origins) and each batch :meth:`~.accumulator.Accumulator.add` takes: the patch
indices or origins (checked against the grid, then mapped to output pixels) and the patch
array (image patches or one vector per patch, channels last or first). Every check runs
before anything is added, so a refused batch leaves the accumulator as it was; each message
names the argument. The predictors (:mod:`.predict`) parse a declared ``scale`` here too.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from .checks import check_flat_indices, positive_int
from .grid import PatchGrid

__all__ = [
    "as_numpy",
    "check_channels",
    "check_window",
    "input_origins",
    "int_array",
    "output_origins",
    "parse_scale",
    "patch_array",
    "scaled_size",
]


def parse_scale(scale, ndim: int, name: str = "scale") -> tuple[Fraction, ...]:
    """``scale`` (a number, a ``"1/2"`` string, a Fraction, or one per spatial axis) as exact
    per-axis fractions. Floats are read as the nearest fraction with a denominator up to 64.

    Examples
    --------
    >>> parse_scale(0.5, 2)
    (Fraction(1, 2), Fraction(1, 2))
    >>> parse_scale((2, "1/4"), 2)
    (Fraction(2, 1), Fraction(1, 4))
    """
    values = scale if isinstance(scale, (tuple, list)) else (scale,) * ndim
    if len(values) != ndim:
        raise ValueError(f"`{name}` must have one entry per spatial axis ({ndim}), got {scale!r}")
    out = []
    for v in values:
        try:
            f = Fraction(v) if not isinstance(v, float) else Fraction(v).limit_denominator(64)
        except (TypeError, ValueError):
            raise TypeError(f"`{name}` entries must be positive numbers, got {scale!r}") from None
        if isinstance(v, float) and not math.isclose(float(f), v, rel_tol=1e-9):
            raise ValueError(f"`{name}` must be a ratio of small integers, got {v!r}")
        if f <= 0:
            raise ValueError(f"`{name}` must be > 0 on every axis, got {scale!r}")
        out.append(f)
    return tuple(out)


def scaled_size(n: int, f: Fraction, what: str, axis: int) -> int:
    """``n`` pixels (the ``what`` on spatial ``axis``) at scale ``f``, refused unless whole.

    Examples
    --------
    >>> scaled_size(8, Fraction(1, 2), "patch size", 0)
    4
    """
    v = n * f
    if v.denominator != 1:
        raise ValueError(
            f"scale {f} does not map the {what} ({n} pixels) on spatial axis {axis} to whole "
            f"pixels ({float(v):g}); choose a scale or a {what} for which it does"
        )
    return int(v)


def check_window(window) -> None:
    """Refuse ``"overlap-tile"``: it picks each pixel by grid position, which patches added at
    any origins (or only some of them) do not have."""
    if isinstance(window, str) and window == "overlap-tile":
        raise ValueError(
            "`window` 'overlap-tile' picks each pixel by its place in a whole grid "
            "and does not apply to an Accumulator, a predictor or chosen patches; "
            "use 'uniform', 'triangular', 'hann', 'gaussian' or an array"
        )


def check_channels(channels, grid: PatchGrid):
    """The output channels ``channels`` asks for: ``"same"`` as the grid's image, an int, or
    None (no channel axis)."""
    if isinstance(channels, str):
        if channels != "same":
            raise ValueError(f"`channels` must be an int >= 1, None or 'same', got {channels!r}")
        return grid.n_channels
    if channels is None:
        return None
    return positive_int(channels, "channels", "an int >= 1, None or 'same'")


def int_array(values, name: str) -> np.ndarray:
    """``values`` as an int64 array (whole floats accepted), refused otherwise."""
    a = np.asarray(values)
    if a.size == 0:
        return a.astype(np.int64).reshape(a.shape if a.ndim else (0,))
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise TypeError(f"`{name}` must be integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def as_numpy(patches) -> np.ndarray:
    """A NumPy array of ``patches`` (a CPU torch tensor is detached and converted)."""
    if type(patches).__module__.startswith("torch"):
        patches = patches.detach().cpu().numpy()
    return np.asarray(patches)


def input_origins(grid: PatchGrid, indices, origins) -> np.ndarray:
    """Where a batch goes, checked against ``grid``: flat patch indices ``(N,)`` (as given, or
    of grid indices ``(N, ndim)``), or the ``origins`` ``(N, ndim)`` in input pixels."""
    nd = grid.ndim
    if (indices is None) == (origins is None):
        raise TypeError(
            "pass exactly one of `indices` (patch indices into the grid) and "
            "`origins` (spatial origins in pixels)"
        )
    if indices is not None:
        idx = int_array(indices, "indices")
        if idx.ndim == 1:
            check_flat_indices(idx, grid)
            return idx
        if idx.ndim != 2 or idx.shape[1] != nd:
            raise ValueError(
                f"`indices` must be flat (N,) or grid indices (N, {nd}), got shape {idx.shape}"
            )
        outside = ((idx < 0) | (idx >= np.array(grid.grid_shape))).any(axis=1)
        if outside.any():
            raise IndexError(
                f"`indices` must lie within grid_shape {grid.grid_shape}, "
                f"got {idx[outside][:5].tolist()}"
            )
        return np.ravel_multi_index(tuple(idx.T), grid.grid_shape).astype(np.int64)
    org = int_array(origins, "origins")
    if org.ndim != 2 or org.shape[1] != nd:
        raise ValueError(f"`origins` must have shape (N, {nd}), got {org.shape}")
    top = np.array([m - p for m, p in zip(grid.padded_shape, grid.patch_size)])
    beyond = ((org < 0) | (org > top)).any(axis=1)
    if beyond.any():
        raise IndexError(
            f"`origins` must place whole patches of {grid.patch_size} inside the image "
            f"(origins {' x '.join(f'0..{t}' for t in top.tolist())}), got "
            f"{org[beyond][:5].tolist()}"
        )
    return org


def output_origins(org: np.ndarray, scale) -> np.ndarray:
    """Origins ``(N, ndim)`` in input pixels mapped to output pixels at ``scale`` (refused
    where one falls between output pixels)."""
    out = np.empty(org.shape, np.int64)
    for ax, f in enumerate(scale):
        v = org[:, ax] * f.numerator
        if f.denominator != 1 and (v % f.denominator).any():
            raise ValueError(
                f"origins {org[v % f.denominator != 0][:3].tolist()} do not "
                f"map to whole output pixels at scale {f} on axis {ax}"
            )
        out[:, ax] = v // f.denominator
    return out


def patch_array(
    patches, n: int, patch_size: tuple[int, ...], channels: int | None, channels_first: bool
) -> np.ndarray:
    """``patches`` for ``n`` indices or origins as ``(n, *patch_size[, channels])``: image
    patches (moved to channels last), or one vector per patch broadcast over the footprint."""
    a = as_numpy(patches)
    k = channels
    patch_shape = patch_size + (() if k is None else (k,))
    image_like = (n,) + patch_shape
    if channels_first and k is not None and a.ndim == len(image_like):
        a = np.moveaxis(a, 1, -1)
    if a.shape == image_like:
        return a
    vector = (n,) if k is None else (n, k)
    if a.shape == vector:
        shape = (n,) + patch_size + (() if k is None else (k,))
        index = (slice(None),) + (None,) * len(patch_size)
        return np.broadcast_to(a[index], shape)
    first = channels_first and k is not None
    layout = "(N, K, *patch)" if first else "(N, *patch, K)"
    want = (n, k) + patch_size if first else (n,) + patch_shape
    raise ValueError(
        f"patches of shape {tuple(np.shape(patches))} do not fit this accumulator: it takes "
        f"{layout} = {want} or one vector per patch {vector} (N = {n} indices or origins "
        f"given, output patch {patch_size}, channels {k})"
    )
