"""Merging patches computed anywhere: added batch by batch, in any order, at any origins.

:class:`Accumulator` is the public streaming merge for patch-wise inference: a model runs on
batches (maybe on another device, maybe only on some patches), and each batch of outputs is
added with its patch indices, or with the origins of patches that sit anywhere on the image.
Outputs may have another number of channels, another dtype, another resolution (a whole
multiple or fraction of the input patch per axis) or be one vector per patch.

Sums follow the merge's dtype rules (:mod:`patch_viewer.core.merge.precision`): integers in
int64 (64-bit integers as two exact halves), float32 in float64, float64 anchored at the value
the first added patch gave each pixel, so identity round trips are bit-exact in any order, and
float32 and integer means are correctly rounded. Compiled kernels (numba) run where numba
imports; otherwise a NumPy loop computes the same sums in the same order.

What it is given is checked in :mod:`.accumulator_args`; the weights it divides by come from
:mod:`.accumulator_weights`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import cast

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from .accumulator_args import (
    check_channels,
    check_window,
    input_origins,
    int_array,
    output_origins,
    parse_scale,
    patch_array,
    scaled_size,
)
from .accumulator_weights import (
    Placements,
    add_windows,
    axis_sums,
    band_weights,
    box_counts,
    on_three_axes,
    origin_tables,
)
from .checks import check_flat_indices, check_grid
from .grid import PatchGrid
from .merge.plan import AXES3, backend, check_reduce
from .merge.precision import finish, work_dtype
from .merge.scatter import Sums
from .merge.weights import outer
from .windows import make_window

# parse_scale and check_window moved to .accumulator_args; still importable from here
__all__ = ["Accumulator", "check_window", "parse_scale"]


class Accumulator:
    """Merge patches produced elsewhere: add batches with their indices or origins, in any
    order, then read the merged image and its weights.

    Parameters
    ----------
    grid : PatchGrid
        The geometry the patches were cut with: image shape, patch size and edge handling
        (for ``origins``, only the image shape and patch size matter).
    channels : int, None or "same", optional
        Channels of the patches added: ``"same"`` (default) as the image (``grid.n_channels``),
        an int K (e.g. class probabilities; the channel axis is the image's, or last), or
        None for outputs without a channel axis.
    scale : number, str or tuple, optional
        Output resolution per spatial axis, relative to the input patch (``2``: each output
        patch is twice as large, ``"1/4"``: a quarter). Patch sizes, origins and the image
        must map to whole output pixels.
    window, window_params, reduce
        As in :func:`patch_viewer.merge_patches` (``"overlap-tile"`` picks by grid position
        and does not apply to patches at arbitrary origins).

    Notes
    -----
    A patch index added twice counts twice (as MONAI's mergers do): :attr:`count` shows how
    many patches covered each pixel. A batch is checked whole before any of it is added, so a
    refused batch leaves the accumulator as it was. Memory: the sums (8 bytes per output
    element, 16 for float64 and 64-bit integer means) plus the batch being added.

    Examples
    --------
    >>> from patch_viewer import extract_patches
    >>> image = np.arange(48.0).reshape(6, 8)
    >>> grid = PatchGrid(image.shape, 4, stride=2)
    >>> patches = extract_patches(image, grid).reshape(grid.n_patches, 4, 4)
    >>> acc = Accumulator(grid)
    >>> for idx in np.random.default_rng(0).permutation(grid.n_patches).reshape(-1, 2):
    ...     acc.add(patches[idx], idx)
    >>> bool(np.array_equal(acc.result(), image))
    True
    >>> prob = Accumulator(grid, channels=3)  # a classifier's 3 class probabilities
    >>> prob.add(np.full((2, 4, 4, 3), 1 / 3, np.float32), [0, 1])
    >>> prob.result().shape
    (6, 8, 3)
    """

    def __init__(
        self,
        grid: PatchGrid,
        *,
        channels: int | str | None = "same",
        scale: float | Fraction | Sequence[float | Fraction] = 1,
        window: str | ArrayLike = "uniform",
        window_params: Mapping[str, float] | None = None,
        reduce: str = "mean",
    ) -> None:
        check_grid(grid)
        check_reduce(reduce)
        check_window(window)
        self.grid = grid
        self.scale = parse_scale(scale, grid.ndim)
        nd = grid.ndim
        self.patch_size = tuple(
            scaled_size(p, f, "patch size", ax)
            for ax, (p, f) in enumerate(zip(grid.patch_size, self.scale))
        )
        self.spatial_shape = tuple(
            scaled_size(n, f, "image size", ax)
            for ax, (n, f) in enumerate(zip(grid.spatial_shape, self.scale))
        )
        self._extent = tuple(
            max(n, math.ceil(m * f))
            for n, m, f in zip(self.spatial_shape, grid.padded_shape, self.scale)
        )
        self.channels = check_channels(channels, grid)
        self.reduce = reduce
        win = make_window(window, self.patch_size, **dict(window_params or {}))
        check_reduce(reduce, weighted=win is not None)
        self._win = win
        # where the added patches went (the weights are computed from it)
        self._places = Placements(
            grid.n_patches,
            lambda idx: self._grid_origins(idx)[0],
            lambda: axis_sums(grid, self.scale, self.patch_size, self._extent, None)[1],
        )
        # per-axis weights (window sums, counts) of a whole grid streamed in order (then
        # nothing else is kept)
        self._factors: tuple[list, list] | None = None
        self._batches = 0
        self._window = (window, dict(window_params or {}))
        self._table = None
        self._compiled = backend() == "numba"  # decided once
        self._state: Sums | None = None
        self._hold = False  # batches may be held (see _stream)
        self.dtype: np.dtype | None = None  # of the patches, fixed by the first batch
        self.n_added = 0
        self._nd = nd

    # ------------------------------------------------------------------ shapes
    @property
    def channel_axis(self) -> int | None:
        """Axis of the result holding the output channels (None: no channel axis)."""
        if self.channels is None:
            return None
        return self.grid.channel_axis if self.grid.channel_axis is not None else self._nd

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of :meth:`result`."""
        shape = list(self.spatial_shape)
        if self.channel_axis is not None:
            shape.insert(self.channel_axis, self.channels)
        return tuple(shape)

    @property
    def patch_shape(self) -> tuple[int, ...]:
        """Shape of one output patch as :meth:`add` takes it (channels last)."""
        return self.patch_size + (() if self.channels is None else (self.channels,))

    # ------------------------------------------------------------------ adding
    def add(
        self,
        patches: ArrayLike,
        indices: ArrayLike | None = None,
        *,
        origins: ArrayLike | None = None,
        channels_first: bool = False,
    ) -> None:
        """Add a batch of output patches.

        Parameters
        ----------
        patches : array_like
            ``(N, *patch_size, K)`` (or ``(N, *patch_size)`` without channels), ``(N, K,
            *patch_size)`` with ``channels_first``, or one vector per patch ``(N, K)``
            (``(N,)`` without channels), which counts over the patch's whole footprint.
            Sizes are the output's (``scale`` applied). torch tensors on the CPU work too.
        indices : array_like of int, optional
            Flat patch indices ``(N,)`` into ``grid`` (C order), or grid indices ``(N, ndim)``.
        origins : array_like of int, optional
            Instead of ``indices``: the patches' spatial origins in input pixels, ``(N,
            ndim)``, anywhere a whole patch fits in the (padded) image.
        channels_first : bool, optional
            Whether the channel axis follows the batch axis, as torch models return it.
        """
        org, idx, (lo, hi) = self._origins_of(indices, origins)
        data = patch_array(patches, len(org), self.patch_size, self.channels, channels_first)
        if self.dtype is None:
            if data.dtype.kind not in "biuf":
                raise TypeError(f"patches must hold real numbers, got dtype {data.dtype}")
        elif data.dtype != self.dtype:
            raise TypeError(
                f"batch {self.n_batches} has dtype {data.dtype}, but the patches added before "
                f"were {self.dtype}: convert it first (one accumulator sums one dtype)"
            )
        if not len(org):
            return
        state = self._state
        if state is None:
            self.dtype = data.dtype
            state = self._state = Sums(
                data.dtype,
                self.reduce,
                self._win,
                self._three(self._extent),
                self._three(self.spatial_shape),
                self._three(self.patch_size),
                self.channels or 1,
            )
            if self._hold and self._holds(data.dtype):
                state.hold()
        state.check_rows(lo)
        state.add(data, org, lo, hi)
        if self._factors is None:  # (a whole grid streamed in order needs nothing kept)
            self._places.record(org, idx)
        self._batches += 1
        self.n_added += len(org)

    def _footprints(self, indices) -> None:
        """Count patches at ``indices`` in the weights without adding values (the chunked
        path's weight map)."""
        org, idx, _ = self._origins_of(np.asarray(indices, np.int64), None)
        if len(org):
            self._places.record(org, idx)

    @property
    def n_batches(self) -> int:
        """Batches added so far."""
        return self._batches

    def _origins_of(self, indices, origins) -> tuple[np.ndarray, np.ndarray | None, tuple]:
        """A batch's output origins ``(N, 3)`` (checked), its flat grid indices (None for
        ``origins``), and the least and greatest origin on the first kernel axis."""
        org = int_array(indices, "indices") if origins is None and indices is not None else None
        if org is None or org.ndim != 1:  # (grid indices come back flat)
            org = input_origins(self.grid, indices, origins)
        if org.ndim == 1:  # flat patch indices: range-checked with their origins
            o3, rows = self._grid_origins(org)
            return o3, org, rows
        o3 = self._as3(output_origins(org, self.scale))
        return o3, None, _row_span(o3)

    def _grid_origins(self, idx: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """Output origins ``(N, 3)`` of flat grid indices, and their least and greatest on
        the first kernel axis (indices outside the grid are refused)."""
        tables = self._tables()
        if self._compiled and len(idx) > 16:
            from .merge.kernels_scatter import grid_origins

            o3 = np.empty((len(idx), 3), np.int64)
            ok, lo, hi = grid_origins(idx, self.grid.n_patches, *tables, o3)
            if not ok:
                check_flat_indices(idx, self.grid)  # raises, naming the indices
            return o3, (int(lo), int(hi))
        check_flat_indices(idx, self.grid)
        ij = np.unravel_index(idx, self.grid.grid_shape)
        o3 = self._as3(np.stack([t[i] for t, i in zip(self._scaled_origins, ij)], axis=-1))
        return o3, _row_span(o3)

    def _as3(self, org: np.ndarray) -> np.ndarray:
        """``(N, ndim)`` origins on the kernels' three axes ``(N, 3)`` (zeros elsewhere)."""
        o3 = np.zeros((len(org), 3), np.int64)
        o3[:, list(AXES3[self._nd])] = org
        return o3

    def _spatial(self, o3: np.ndarray) -> np.ndarray:
        return o3[:, list(AXES3[self._nd])]

    def _tables(self):
        """``(g3, o0, o1, o2)``: grid counts and scaled origins on the kernels' three axes."""
        if self._table is None:
            self._scaled_origins, self._table = origin_tables(self.grid, self.scale)
        return self._table

    # ------------------------------------------------------------------ results
    @property
    def count(self) -> np.ndarray:
        """How many added patches cover each output pixel (int64, spatial shape)."""
        crop = tuple(slice(0, n) for n in self.spatial_shape)
        per_axis = self._separable()
        if per_axis is not None:
            return outer(per_axis[1], np.multiply)[crop].astype(np.int64)
        org, mult = self._places.placed()
        return box_counts(self._spatial(org), self.patch_size, self._extent, mult)[crop]

    @property
    def _counted(self) -> bool:
        """Whether the weights are the coverage counts (the uniform window, or max/min)."""
        return self._win is None or self.reduce != "mean"

    def weights(self) -> np.ndarray:
        """The sum of the window over the added patches at each output pixel (float64;
        the coverage count for the uniform window)."""
        crop = tuple(slice(0, n) for n in self.spatial_shape)
        per_axis = self._separable()
        if per_axis is not None:  # (float64 counts are exact)
            return np.ascontiguousarray(
                outer(per_axis[1 if self._counted else 0], np.multiply)[crop]
            )
        if self._win is None or self._counted:
            return self.count.astype(np.float64)
        out = np.zeros(self._extent, np.float64)
        org, mult = self._places.placed()
        add_windows(out, self._win, self._spatial(org), mult=mult)
        return out[crop]

    def _separable(self) -> tuple[list, list] | None:
        """Per-axis ``(window sums, counts)`` whose outer products are the weights, where
        they separate: a whole grid streamed in order, or, for counts, every grid patch added
        equally often (in any order) and none off the grid. None otherwise. (Window sums of
        patches added in any order are summed, never multiplied: rows finished early in a
        stream must get the same bits as at the end.)"""
        if self._factors is not None:
            return self._factors
        if not self._counted:
            return None
        counts = self._places.uniform_counts()
        return None if counts is None else (counts, counts)

    def result(self, dtype: DTypeLike | None = None, fill_value: float | None = None) -> np.ndarray:
        """The merged image, of :attr:`shape`; pixels no patch covers (or only zero weights
        do) get ``fill_value`` (default NaN; required for an integer ``dtype``). The
        accumulator stays usable: add more and call again."""
        if self._state is None:
            work = np.dtype(np.float64) if dtype is None else np.dtype(dtype)
            out = finish(
                np.zeros(self._canon_shape(), np.float64),
                np.zeros(self._canon_shape()[:-1] + (1,), bool),
                dtype,
                fill_value,
                work,
            )
        else:
            out = self._state.result(self._den_rows, dtype, fill_value, work_dtype(self.dtype))
            out = out.reshape(self._canon_shape())
        axis = self.channel_axis
        return out[..., 0] if axis is None else np.moveaxis(out, -1, axis)

    def _canon_shape(self) -> tuple[int, ...]:
        return self.spatial_shape + (self.channels or 1,)

    def _three(self, values) -> tuple[int, ...]:
        return tuple(on_three_axes(values, self._nd, 1))

    # ------------------------------------------------------------------ streaming in order
    def _stream(self, whole_grid: bool, hold: bool = False) -> None:
        """Promise that patches arrive in grid order (rows never go back), so that
        :meth:`_release` may finish the rows above and recycle their memory. For a whole grid
        with a separable window the weights come from per-axis sums, and no origin is kept:
        memory is then independent of the number of patches (10^8 patches of process).
        ``hold``: batches added never change after, so they may be held (:mod:`.merge.held`)."""
        if self._state is not None:
            raise RuntimeError("_stream() goes before the first add()")
        self._hold = hold and self._nd > 1
        if not whole_grid or not (self._win is None or isinstance(self._window[0], str)):
            return
        name, params = self._window
        window = None if self._win is None else (cast(str, name), params)
        self._factors = axis_sums(self.grid, self.scale, self.patch_size, self._extent, window)

    def _holds_batches(self) -> bool:
        """Whether batches added may be held (then they must not change after)."""
        return self._hold and (self._state is None or self._state.held is not None)

    def _holds(self, dtype: np.dtype) -> bool:
        """Whether holding ``dtype`` batches takes no more memory than the sums."""
        from .merge.held import holds

        o0, c = self._tables()[1], self.channels or 1
        return holds(o0, self.patch_size, self.grid.grid_shape, c, dtype.itemsize, self._extent)

    def _release(self, below: int, dtype, fill_value) -> None:
        """Finish the output rows above ``below`` (first spatial axis, output pixels) into
        ``dtype`` and recycle their sums (a stream in grid order only; see :meth:`_stream`)."""
        if self._state is None or self._nd == 1:
            return
        work = work_dtype(self.dtype)
        self._state.release(
            below, self._den_rows, np.dtype(work if dtype is None else dtype), fill_value, work
        )

    def _den_rows(self, y0: int, y1: int) -> np.ndarray:
        """The weights of canvas rows ``y0 .. y1`` on the kernels' three axes (float64)."""
        counts = self._counted
        per_axis = self._separable()
        if per_axis is not None:
            f3 = on_three_axes(per_axis[1 if counts else 0], self._nd, np.ones(1))
            return f3[0][y0:y1, None, None] * f3[1][None, :, None] * f3[2][None, None, :]
        org, mult = self._places.placed()
        p3, e3 = self._three(self.patch_size), self._three(self._extent)
        win = None if counts else self._win
        return band_weights(org, mult, y0, y1, p3, e3, win, self._nd)


def _row_span(o3: np.ndarray) -> tuple[int, int]:
    """The least and greatest origin of ``o3`` on the first kernel axis ((0, 0) if none)."""
    return (int(o3[:, 0].min()), int(o3[:, 0].max())) if len(o3) else (0, 0)
