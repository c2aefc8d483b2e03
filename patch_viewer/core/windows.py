"""Blending windows: how much each pixel of a patch counts when overlapping patches are merged.

Every named window is separable (an outer product of 1-D windows from ``scipy.signal.windows``)
and strictly positive, so no pixel that a patch covers ever gets zero weight: unlike a plain Hann
or Bartlett window, the image border is never zeroed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .checks import check_number

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = ["WINDOWS", "WINDOW_PARAMS", "make_window", "separable_factors", "window_factors"]

#: Named windows. ``"overlap-tile"`` is not a weighting: each pixel is taken from the one patch
#: whose centre is nearest to it (the U-Net overlap-tile strategy).
WINDOWS = ("uniform", "triangular", "hann", "gaussian", "overlap-tile")

#: Parameters of the named windows: name -> (default, min, max).
WINDOW_PARAMS = {"gaussian": {"sigma": (0.125, 0.01, 10.0)}}


def _sw():
    """``scipy.signal.windows``, imported on first use: importing ``scipy.signal`` takes
    0.6-0.8 s (it pulls in scipy.stats), most of ``import patch_viewer``'s time."""
    from scipy.signal import windows

    return windows


def _uniform(p, **_):
    return np.ones(p)


def _triangular(p, **_):
    return _sw().triang(p)


def _hann(p, **_):
    # Drop the two zero end points of an (p + 2)-point Hann window: strictly positive.
    return _sw().hann(p + 2, sym=True)[1:-1]


def _gaussian(p, *, sigma=0.125):
    return _sw().gaussian(p, std=sigma * p)


_FACTORS = {"uniform": _uniform, "triangular": _triangular, "hann": _hann, "gaussian": _gaussian}


def window_factors(window: str, patch_size, **params) -> list[np.ndarray]:
    """The 1-D factors of a named separable window, one per spatial axis.

    Examples
    --------
    >>> window_factors("triangular", (3,))[0].tolist()
    [0.5, 1.0, 0.5]
    """
    if window not in _FACTORS:
        raise ValueError(
            f"`window` must be one of {tuple(_FACTORS)} for a separable window, got {window!r}"
        )
    allowed = WINDOW_PARAMS.get(window, {})
    for key, value in params.items():
        if key not in allowed:
            raise TypeError(
                f"window {window!r} takes no parameter {key!r}; it takes {tuple(allowed)}"
            )
        _, lo, hi = allowed[key]
        check_number(value, f"window parameter `{key}`", lo, hi)
    params = {k: float(v) for k, v in params.items()}
    return [_FACTORS[window](int(p), **params) for p in patch_size]


def make_window(
    window: str | ArrayLike, patch_size: Sequence[int], **params: float
) -> np.ndarray | None:
    """The window as an array of the patch's spatial shape (float64, strictly positive).

    Parameters
    ----------
    window : str or array_like
        A name from :data:`WINDOWS`, or an array of shape ``patch_size`` with non-negative finite
        values (zeros allowed; a pixel whose every covering weight is zero counts as uncovered).
    patch_size : tuple of int
        Spatial patch shape.
    **params
        Window parameters (``sigma`` for ``"gaussian"``, as a fraction of the patch size).

    Returns
    -------
    ndarray or None
        None for ``"uniform"`` (all ones: callers skip the multiplication) and for
        ``"overlap-tile"`` (not a weighting).

    Examples
    --------
    >>> make_window("hann", (3,)).round(3).tolist()
    [0.5, 1.0, 0.5]
    """
    patch_size = tuple(patch_size)
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"`window` must be one of {WINDOWS} or an array, got {window!r}")
        if window in ("uniform", "overlap-tile"):
            if params:
                raise TypeError(f"window {window!r} takes no parameters, got {tuple(params)}")
            return None
        factors = window_factors(window, patch_size, **params)
        out = factors[0]
        for f in factors[1:]:
            out = np.multiply.outer(out, f)
        return out
    if params:
        raise TypeError("window parameters apply to named windows only")
    arr = np.asarray(window)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"`window` array must be numeric, got dtype {arr.dtype}")
    if arr.shape != patch_size:
        raise ValueError(
            f"`window` array must have the patch's spatial shape {patch_size}, got {arr.shape}"
        )
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or arr.min() < 0:
        raise ValueError("`window` array values must be finite and >= 0")
    if arr.max() == 0:
        raise ValueError("`window` array must have at least one positive value")
    return arr


def separable_factors(window, patch_size, **params) -> list[np.ndarray] | None:
    """1-D factors when ``window`` is a named separable window (or uniform), else None."""
    if isinstance(window, str) and window in _FACTORS:
        return window_factors(window, patch_size, **params)
    return None
