"""Patch geometry: where every patch of an image starts, and nothing about pixels."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import numpy as np
from numpy.typing import DTypeLike

__all__ = ["EDGE_MODES", "PAD_MODES", "PatchGrid"]

EDGE_MODES = ("shift", "drop", "pad")
PAD_MODES = ("reflect", "constant", "edge", "wrap")
#: A pad mode, as ``numpy.pad`` names it.
PadMode = Literal["reflect", "constant", "edge", "wrap"]


def _positive_ints(value, name: str, ndim: int) -> tuple[int, ...]:
    """Normalise an int or per-axis sequence of ints to a tuple of length ``ndim``."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be an int or a tuple of {ndim} ints, got a bool")
    try:
        values = (operator.index(value),) * ndim
    except TypeError:
        try:
            values = tuple(value)
        except TypeError:
            raise TypeError(
                f"`{name}` must be an int or a tuple of {ndim} ints, got {value!r}"
            ) from None
        if len(values) != ndim:
            raise ValueError(
                f"`{name}` must have one entry per spatial axis ({ndim}), got {len(values)}: "
                f"{value!r}"
            ) from None
        if any(isinstance(v, (bool, np.bool_)) for v in values):
            raise TypeError(f"`{name}` entries must be integers, got {value!r}") from None
        try:
            values = tuple(operator.index(v) for v in values)
        except TypeError:
            raise TypeError(f"`{name}` entries must be integers, got {value!r}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"`{name}` must be >= 1 on every axis, got {value!r}")
    return values


@dataclass(frozen=True, init=False)
class PatchGrid:
    """Geometry of overlapping patches over an image: origins, counts and edge handling.

    Parameters
    ----------
    image_shape : tuple of int
        Shape of the image, including the channel axis if there is one.
    patch_size : int or tuple of int
        Patch extent per spatial axis (an int applies to all spatial axes).
    stride : int or tuple of int, optional
        Step between neighbouring patch origins per spatial axis. Default 1.
    edge : {"shift", "drop", "pad"}, optional
        What happens where patches do not tile the image exactly. ``"shift"`` (default) moves
        the last patch on each axis flush with the border; ``"drop"`` keeps only whole patches
        (pixels past the last one are left uncovered); ``"pad"`` pads the far side of each axis
        with ``pad_mode`` so that the grid covers the whole image, and merging crops it back.
    pad_mode : {"reflect", "constant", "edge", "wrap"}, optional
        ``numpy.pad`` mode used when ``edge="pad"``. Default ``"reflect"``.
    channel_axis : int or None, optional
        Axis of ``image_shape`` holding channels; it is never patched.
    pad_value : float, optional
        The value ``pad_mode="constant"`` pads with (default 0), as tiler's
        ``constant_value`` and MONAI's ``cval``; it must fit the image's dtype when patches
        are extracted.

    Examples
    --------
    >>> grid = PatchGrid((100, 100), 39, stride=1)
    >>> grid.grid_shape, grid.n_patches
    ((62, 62), 3844)
    >>> PatchGrid((10,), 4, stride=3).origins[0].tolist()
    [0, 3, 6]
    """

    # The fields hold normalised values (tuples, a non-negative channel axis); __init__ takes
    # what users pass (an int for every axis, a negative axis) and normalises it.
    image_shape: tuple[int, ...]
    patch_size: tuple[int, ...]
    stride: tuple[int, ...]
    edge: str
    pad_mode: PadMode
    channel_axis: int | None
    pad_value: float
    # Derived in __init__.
    grid_shape: tuple[int, ...] = field(init=False)
    padded_shape: tuple[int, ...] = field(init=False)
    origins: tuple[np.ndarray, ...] = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        image_shape: Sequence[int],
        patch_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        edge: str = "shift",
        pad_mode: str = "reflect",
        channel_axis: int | None = None,
        pad_value: float = 0,
    ) -> None:
        shape = _image_shape(image_shape)
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("image_shape", shape)
        set_("edge", edge)
        set_("pad_mode", pad_mode)
        channel_axis = _normalise_channel_axis(channel_axis, len(shape))
        set_("channel_axis", channel_axis)
        spatial = tuple(n for i, n in enumerate(shape) if i != channel_axis)
        if not 1 <= len(spatial) <= 3:
            raise ValueError(
                f"the image must have 1 to 3 spatial axes (plus an optional channel axis), "
                f"got image_shape={shape} with channel_axis={channel_axis}"
            )
        if self.edge not in EDGE_MODES:
            raise ValueError(f"`edge` must be one of {EDGE_MODES}, got {self.edge!r}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"`pad_mode` must be one of {PAD_MODES}, got {self.pad_mode!r}")
        set_("pad_value", _pad_value(pad_value))
        patch = _positive_ints(patch_size, "patch_size", len(spatial))
        steps = _positive_ints(stride, "stride", len(spatial))
        set_("patch_size", patch)
        set_("stride", steps)
        counts, origins, padded = [], [], []
        for ax, (n, p, s) in enumerate(zip(spatial, patch, steps)):
            if p > n and self.edge != "pad":
                raise ValueError(
                    f"`patch_size` {p} is larger than the image ({n} pixels) on spatial axis {ax}; "
                    f"the allowed range is 1..{n}, or use edge='pad'"
                    + _rgb_hint(shape, channel_axis)
                )
            g = (n - p) // s + 1 if self.edge == "drop" else math.ceil(max(n - p, 0) / s) + 1
            o = np.arange(g, dtype=np.intp) * s
            if self.edge == "shift":
                o[-1] = min(o[-1], n - p)
            o.setflags(write=False)
            counts.append(g)
            origins.append(o)
            padded.append(max(n, int(o[-1]) + p))
        set_("grid_shape", tuple(counts))
        set_("origins", tuple(origins))
        set_("padded_shape", tuple(padded))

    # ------------------------------------------------------------------ shapes
    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.patch_size)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Image shape without the channel axis."""
        return tuple(n for i, n in enumerate(self.image_shape) if i != self.channel_axis)

    @property
    def n_channels(self) -> int | None:
        """Number of channels, or None for an image without a channel axis."""
        return None if self.channel_axis is None else self.image_shape[self.channel_axis]

    @property
    def n_patches(self) -> int:
        """Total number of patches."""
        return math.prod(self.grid_shape)

    @property
    def patch_shape(self) -> tuple[int, ...]:
        """Shape of one patch: spatial patch size, then channels if any."""
        c = self.n_channels
        return self.patch_size + (() if c is None else (c,))

    @property
    def patches_shape(self) -> tuple[int, ...]:
        """Shape returned by :func:`extract_patches`: ``(*grid_shape, *patch_shape)``."""
        return self.grid_shape + self.patch_shape

    @property
    def is_regular(self) -> bool:
        """True when every origin is a multiple of the stride (patches are a strided view)."""
        return all(o[-1] == (len(o) - 1) * s for o, s in zip(self.origins, self.stride))

    @property
    def is_covering(self) -> bool:
        """True when every image pixel is covered by at least one patch."""
        return all(c.min() > 0 for c in self.coverage_1d())

    def nbytes(self, dtype: DTypeLike = np.float32) -> int:
        """Bytes a materialised patch stack of ``dtype`` would take."""
        return self.n_patches * math.prod(self.patch_shape) * np.dtype(dtype).itemsize

    # -------------------------------------------------------------- geometry
    def coverage_1d(self) -> list[np.ndarray]:
        """Per spatial axis, how many patches cover each pixel (int64 arrays).

        The coverage count of a pixel is the product of its per-axis counts. The arrays are
        read-only (computed once per grid: every merge asks for them).
        """
        cached = self.__dict__.get("_coverage")
        if cached is None:
            cached = []
            for n, o, p in zip(self.spatial_shape, self.origins, self.patch_size):
                c = np.zeros(max(n, int(o[-1]) + p) + 1, dtype=np.int64)
                np.add.at(c, o, 1)
                np.add.at(c, o + p, -1)
                counts = np.cumsum(c)[:n]
                counts.setflags(write=False)
                cached.append(counts)
            object.__setattr__(self, "_coverage", tuple(cached))  # a cache, not a field
        return list(cached)

    def coverage_range(self) -> tuple[int, int]:
        """Fewest and most patches covering any one pixel (products of the per-axis counts)."""
        cov = self.coverage_1d()
        return math.prod(int(c.min()) for c in cov), math.prod(int(c.max()) for c in cov)

    def patch_index(self, flat_index: int) -> tuple[int, ...]:
        """Grid index ``(i, j, ...)`` of the patch with the given flat (C-order) index."""
        n = self.n_patches
        k = operator.index(flat_index)
        if not 0 <= k < n:
            raise ValueError(f"`flat_index` must be in 0..{n - 1}, got {flat_index}")
        return tuple(int(v) for v in np.unravel_index(k, self.grid_shape))

    def patch_origin(self, index: int | Sequence[int]) -> tuple[int, ...]:
        """Spatial origin of the patch at grid index ``index`` (a tuple, or a flat int)."""
        if np.ndim(index) == 0:
            index = self.patch_index(cast(int, index))
        index = tuple(cast(Sequence[int], index))
        if len(index) != self.ndim or not all(0 <= i < g for i, g in zip(index, self.grid_shape)):
            raise ValueError(f"`index` must be within grid_shape {self.grid_shape}, got {index}")
        return tuple(int(o[i]) for o, i in zip(self.origins, index))

    def patch_at(self, point: Sequence[float]) -> tuple[int, ...] | None:
        """Grid index of the patch covering ``point`` whose origin is nearest to it.

        ``point`` is a spatial coordinate (floats are floored). Returns None when no patch
        covers the point (outside the image, or in a gap left by ``edge="drop"`` or by a
        stride larger than the patch).

        Examples
        --------
        >>> PatchGrid((10,), 4, stride=2).patch_at((5.5,))  # origins 2 and 4 cover it
        (2,)
        """
        point = tuple(point)
        if len(point) != self.ndim:
            raise ValueError(f"`point` must have {self.ndim} coordinates, got {point}")
        index = []
        for coord, n, o, p in zip(point, self.spatial_shape, self.origins, self.patch_size):
            x = math.floor(coord)
            if not 0 <= x < n:
                return None
            # Patches covering x have o <= x < o + p; the one with the largest origin is nearest.
            i = int(np.searchsorted(o, x, side="right")) - 1
            if i < 0 or x >= o[i] + p:
                return None
            index.append(i)
        return tuple(index)


def _rgb_hint(shape, channel_axis) -> str:
    """A hint for the usual mistake: an RGB(A) image gridded without its channel axis."""
    if channel_axis is None and len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) > 4:
        return "; for an RGB(A) image set channel_axis=-1"
    return ""


def _pad_value(value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"`pad_value` must be a number, got {value!r}")
    value = value.item() if isinstance(value, np.generic) else value
    if math.isnan(value):
        raise ValueError(
            "`pad_value` must not be NaN (a padded pixel would poison every mean "
            "it enters); use a finite number"
        )
    return value


def _image_shape(shape) -> tuple[int, ...]:
    try:
        shape = tuple(operator.index(n) for n in shape)
    except TypeError:
        raise TypeError(f"`image_shape` must be a tuple of ints, got {shape!r}") from None
    if not shape:
        raise ValueError("`image_shape` must have at least one axis; a 0-d image has no patches")
    if any(n < 1 for n in shape):
        raise ValueError(f"`image_shape` must be >= 1 on every axis (no empty images), got {shape}")
    return shape


def _normalise_channel_axis(axis, ndim: int) -> int | None:
    """``channel_axis`` checked and made non-negative (None stays None)."""
    if axis is None:
        return None
    if isinstance(axis, (bool, np.bool_)):  # True is an int to operator.index: never mean 1
        raise TypeError(f"`channel_axis` must be an int or None, got {axis!r}")
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"`channel_axis` must be an int or None, got {axis!r}") from None
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"`channel_axis` must be in {-ndim}..{ndim - 1} for a {ndim}-d image, got {axis}"
        )
    return axis % ndim
