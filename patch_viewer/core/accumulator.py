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
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import cast

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from .checks import check_grid, positive_int
from .grid import PatchGrid
from .merge.plan import backend
from .merge.precision import finish, work_dtype
from .merge.scatter import Sums
from .windows import make_window, window_factors

__all__ = ["Accumulator", "check_window", "parse_scale"]

_REDUCE = ("mean", "max", "min")


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


def _scaled(n: int, f: Fraction, what: str, axis: int) -> int:
    v = n * f
    if v.denominator != 1:
        raise ValueError(
            f"scale {f} does not map the {what} ({n} pixels) on spatial axis {axis} to whole "
            f"pixels ({float(v):g}); choose a scale or a {what} for which it does"
        )
    return int(v)


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
        if reduce not in _REDUCE:
            raise ValueError(f"`reduce` must be one of {_REDUCE}, got {reduce!r}")
        check_window(window)
        self.grid = grid
        self.scale = parse_scale(scale, grid.ndim)
        nd = grid.ndim
        self.patch_size = tuple(
            _scaled(p, f, "patch size", ax)
            for ax, (p, f) in enumerate(zip(grid.patch_size, self.scale))
        )
        self.spatial_shape = tuple(
            _scaled(n, f, "image size", ax)
            for ax, (n, f) in enumerate(zip(grid.spatial_shape, self.scale))
        )
        self._extent = tuple(
            max(n, math.ceil(m * f))
            for n, m, f in zip(self.spatial_shape, grid.padded_shape, self.scale)
        )
        self.channels = _channels(channels, grid)
        self.reduce = reduce
        win = make_window(window, self.patch_size, **dict(window_params or {}))
        if win is not None and reduce != "mean":
            raise ValueError(
                f"`window` must be 'uniform' with reduce={reduce!r}; windows weight the mean only"
            )
        self._win = win
        self._origins: list[np.ndarray] = []
        # the origins sorted by row, for the weights of a band of rows
        self._sorted: np.ndarray | None = None
        # per-axis weights (window sums, counts) of a whole grid streamed in order
        self._factors: tuple[list, list] | None = None
        self._batches = 0
        self._window = (window, dict(window_params or {}))
        self._table = None
        self._compiled = backend() == "numba"  # decided once
        self._state: Sums | None = None
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
        org = self._origins_of(indices, origins)
        data = self._patch_array(patches, len(org), channels_first)
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
        state.check_rows(org)
        state.add(data, org)
        if self._factors is None:  # a whole grid in order needs no origins (see _stream)
            self._origins.append(org)
            self._sorted = None
        self._batches += 1
        self.n_added += len(org)

    def _footprints(self, indices) -> None:
        """Count patches at ``indices`` in the weights without adding values (the chunked
        path's weight map)."""
        org = self._origins_of(np.asarray(indices, np.int64), None)
        if len(org):
            self._origins.append(org)

    @property
    def n_batches(self) -> int:
        """Batches added so far."""
        return self._batches

    def _origins_of(self, indices, origins) -> np.ndarray:
        grid, nd = self.grid, self._nd
        if (indices is None) == (origins is None):
            raise TypeError(
                "pass exactly one of `indices` (patch indices into the grid) and "
                "`origins` (spatial origins in pixels)"
            )
        if indices is not None:
            idx = _int_array(indices, "indices")
            if idx.ndim == 1:
                if len(idx) and (idx.min() < 0 or idx.max() >= grid.n_patches):
                    bad = (idx < 0) | (idx >= grid.n_patches)
                    raise IndexError(
                        f"`indices` must be in 0..{grid.n_patches - 1} (grid "
                        f"{grid.grid_shape}), got {idx[bad][:5].tolist()}"
                    )
                return self._grid_origins(idx)
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
            org = (
                np.stack([o[idx[:, ax]] for ax, o in enumerate(grid.origins)], axis=-1)
                if len(idx)
                else np.zeros((0, nd), np.int64)
            )
        else:
            org = _int_array(origins, "origins")
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
        out = np.empty(org.shape, np.int64)
        for ax, f in enumerate(self.scale):
            v = org[:, ax] * f.numerator
            if f.denominator != 1 and (v % f.denominator).any():
                raise ValueError(
                    f"origins {org[v % f.denominator != 0][:3].tolist()} do not "
                    f"map to whole output pixels at scale {f} on axis {ax}"
                )
            out[:, ax] = v // f.denominator
        return self._as3(out)

    def _grid_origins(self, idx: np.ndarray) -> np.ndarray:
        """Output origins ``(N, ndim)`` of flat grid indices (checked by the caller)."""
        tables = self._tables()
        if self._compiled and len(idx) > 16:
            from .merge.kernels_scatter import grid_origins

            o3 = np.empty((len(idx), 3), np.int64)
            grid_origins(idx, *tables, o3)
            return o3
        ij = np.unravel_index(idx, self.grid.grid_shape)
        return self._as3(np.stack([t[i] for t, i in zip(self._scaled_origins, ij)], axis=-1))

    def _as3(self, org: np.ndarray) -> np.ndarray:
        """``(N, ndim)`` origins on the kernels' three axes ``(N, 3)`` (zeros elsewhere)."""
        o3 = np.zeros((len(org), 3), np.int64)
        o3[:, list(_AXES3[self._nd])] = org
        return o3

    def _spatial(self, o3: np.ndarray) -> np.ndarray:
        return o3[:, list(_AXES3[self._nd])]

    def _tables(self):
        """``(g3, o0, o1, o2)``: grid counts and scaled origins on the kernels' three axes."""
        if self._table is None:
            self._scaled_origins = [
                (np.asarray(o, np.int64) * f.numerator) // f.denominator
                for o, f in zip(self.grid.origins, self.scale)
            ]
            for o, f in zip(self.grid.origins, self.scale):
                if f.denominator != 1 and (np.asarray(o) * f.numerator % f.denominator).any():
                    bad = np.asarray(o)[np.asarray(o) * f.numerator % f.denominator != 0]
                    raise ValueError(
                        f"origins {bad[:3].tolist()} do not map to whole output pixels at scale {f}"
                    )
            zero = np.zeros(1, np.int64)
            o3 = _three(self._scaled_origins, self._nd, zero)
            g3 = np.array(_three(self.grid.grid_shape, self._nd, 1), np.int64)
            self._table = (g3, *[np.ascontiguousarray(o) for o in o3])
        return self._table

    def _patch_array(self, patches, n: int, channels_first: bool) -> np.ndarray:
        a = _as_numpy(patches)
        k = self.channels
        image_like = (n,) + self.patch_shape
        if channels_first and k is not None and a.ndim == len(image_like):
            a = np.moveaxis(a, 1, -1)
        if a.shape == image_like:
            return a
        vector = (n,) if k is None else (n, k)
        if a.shape == vector:
            shape = (n,) + self.patch_size + (() if k is None else (k,))
            index = (slice(None),) + (None,) * self._nd
            return np.broadcast_to(a[index], shape)
        first = channels_first and k is not None
        layout = "(N, K, *patch)" if first else "(N, *patch, K)"
        want = (n, k) + self.patch_size if first else (n,) + self.patch_shape
        raise ValueError(
            f"patches of shape {tuple(np.shape(patches))} do not fit this accumulator: it takes "
            f"{layout} = {want} or one vector per patch {vector} (N = {n} indices or origins "
            f"given, output patch {self.patch_size}, channels {k})"
        )

    # ------------------------------------------------------------------ results
    @property
    def count(self) -> np.ndarray:
        """How many added patches cover each output pixel (int64, spatial shape)."""
        if self._factors is not None:
            counts = self._outer(self._factors[1])
            return counts[tuple(slice(0, n) for n in self.spatial_shape)].astype(np.int64)
        return self._counts()[tuple(slice(0, n) for n in self.spatial_shape)]

    def _outer(self, per_axis) -> np.ndarray:
        out = per_axis[0]
        for f in per_axis[1:]:
            out = np.multiply.outer(out, f)
        return out

    def _counts(self) -> np.ndarray:
        """:attr:`count` over the whole canvas (padding included), from a difference array:
        O(patches + image)."""
        org = (
            self._spatial(np.concatenate(self._origins))
            if self._origins
            else np.zeros((0, self._nd), np.int64)
        )
        return _box_counts(org, self.patch_size, self._extent)

    def weights(self) -> np.ndarray:
        """The sum of the window over the added patches at each output pixel (float64;
        the coverage count for the uniform window)."""
        if self._win is None or self.reduce != "mean":
            return self.count.astype(np.float64)
        if self._factors is not None:
            return self._outer(self._factors[0])[tuple(slice(0, n) for n in self.spatial_shape)]
        return self._window_sums()[tuple(slice(0, n) for n in self.spatial_shape)]

    def _window_sums(self) -> np.ndarray:
        out = np.zeros(self._extent, np.float64)
        if self._origins and self._win is not None:
            _add_windows(out, self._win, self._spatial(np.concatenate(self._origins)))
        return out

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
        return tuple(_three(values, self._nd, 1))

    # ------------------------------------------------------------------ streaming in order
    def _stream(self, whole_grid: bool) -> None:
        """Promise that patches arrive in grid order (rows never go back), so that
        :meth:`_release` may finish the rows above and recycle their memory. For a whole grid
        with a separable window the weights come from per-axis sums, and no origin is kept:
        memory is then independent of the number of patches (10^8 patches of process)."""
        if self._state is not None:
            raise RuntimeError("_stream() goes before the first add()")
        if not whole_grid or not (self._win is None or isinstance(self._window[0], str)):
            return
        name, params = self._window
        sums, counts = [], []
        for ax, (o, f, p, n) in enumerate(
            zip(self.grid.origins, self.scale, self.patch_size, self._extent)
        ):
            w = (
                np.ones(p)
                if self._win is None
                else window_factors(cast(str, name), self.patch_size, **params)[ax]
            )
            starts = (np.asarray(o, np.int64) * f.numerator) // f.denominator
            idx = (starts[:, None] + np.arange(p)[None, :]).ravel()
            sums.append(np.bincount(idx, np.tile(w, len(starts)), minlength=n)[:n])
            counts.append(np.bincount(idx, minlength=n)[:n].astype(np.float64))
        self._factors = (sums, counts)

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
        e = self._three(self._extent)
        if self._factors is not None:
            per_axis = (
                self._factors[1] if self._win is None or self.reduce != "mean" else self._factors[0]
            )
            f3 = _three(per_axis, self._nd, np.ones(1))
            return f3[0][y0:y1, None, None] * f3[1][None, :, None] * f3[2][None, None, :]
        if self._sorted is None:
            org = np.concatenate(self._origins) if self._origins else np.zeros((0, 3), np.int64)
            order = np.argsort(org[:, 0], kind="stable")
            self._sorted = org[order]
        org = self._sorted
        p3 = self._three(self.patch_size)
        lo = np.searchsorted(org[:, 0], y0 - p3[0] + 1)
        hi = np.searchsorted(org[:, 0], y1)
        near = org[lo:hi].copy()
        near[:, 0] += p3[0] - y0  # into a buffer with p0 rows of margin on each side
        shape = (y1 - y0 + 2 * p3[0], e[1], e[2])
        if (self._win is None or self.reduce != "mean") and self._nd >= 2:  # counts: a
            ax = list(_AXES3[self._nd])  # difference array over the spatial axes
            counts = _box_counts(near[:, ax], [p3[a] for a in ax], [shape[a] for a in ax])
            return counts.reshape(shape)[p3[0] : p3[0] + y1 - y0].astype(np.float64)
        buf = np.zeros(shape)
        win = np.ones(p3) if self._win is None or self.reduce != "mean" else self._win.reshape(p3)
        _add_windows(buf, win, near, three=True)
        return buf[p3[0] : p3[0] + y1 - y0]


def check_window(window) -> None:
    """Refuse ``"overlap-tile"``: it picks each pixel by grid position, which patches added at
    any origins (or only some of them) do not have."""
    if isinstance(window, str) and window == "overlap-tile":
        raise ValueError(
            "`window` 'overlap-tile' picks each pixel by its place in a whole grid "
            "and does not apply to an Accumulator, a predictor or chosen patches; "
            "use 'uniform', 'triangular', 'hann', 'gaussian' or an array"
        )


def _channels(channels, grid: PatchGrid):
    if isinstance(channels, str):
        if channels != "same":
            raise ValueError(f"`channels` must be an int >= 1, None or 'same', got {channels!r}")
        return grid.n_channels
    if channels is None:
        return None
    return positive_int(channels, "channels", "an int >= 1, None or 'same'")


def _int_array(values, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.size == 0:
        return a.astype(np.int64).reshape(a.shape if a.ndim else (0,))
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise TypeError(f"`{name}` must be integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _as_numpy(patches) -> np.ndarray:
    if type(patches).__module__.startswith("torch"):
        patches = patches.detach().cpu().numpy()
    return np.asarray(patches)


_AXES3 = {1: (2,), 2: (0, 2), 3: (0, 1, 2)}


def _three(values, nd: int, fill) -> list:
    out = [fill] * 3
    for v, ax in zip(values, _AXES3[nd]):
        out[ax] = v
    return out


def _box_counts(org: np.ndarray, patch, shape) -> np.ndarray:
    """How many boxes of ``patch`` at ``org`` (all inside ``shape``) cover each pixel, as
    float64: one weighted bincount of the corners, then a cumulative sum per axis."""
    big = tuple(n + 1 for n in shape)
    counts = np.zeros(math.prod(big), np.int64)
    if len(org):
        p = np.array(patch)
        corners = [np.array(c) for c in itertools.product((0, 1), repeat=len(shape))]
        flat = np.concatenate([np.ravel_multi_index(tuple((org + c * p).T), big) for c in corners])
        sign = np.repeat([(-1.0) ** int(c.sum()) for c in corners], len(org))
        counts += np.bincount(flat, sign, minlength=counts.size).astype(np.int64)
    counts = counts.reshape(big)
    for ax in range(len(shape)):
        np.cumsum(counts, axis=ax, out=counts)
    return counts[tuple(slice(0, n) for n in shape)]


def _add_windows(out: np.ndarray, win: np.ndarray, org: np.ndarray, three=False) -> None:
    """``win`` added to ``out`` at every origin (the weight map of the added patches);
    ``three``: ``out``, ``win`` and ``org`` are on the kernels' three axes already."""
    nd = 3 if three else org.shape[1]
    if backend() == "numba":
        from .merge.kernels_scatter import scatter_window

        o3 = np.ascontiguousarray(org, np.int64)
        if not three:
            o3 = np.zeros((len(org), 3), np.int64)
            for ax, a3 in enumerate(_AXES3[nd]):
                o3[:, a3] = org[:, ax]
        p3 = win.shape if three else _three(win.shape, nd, 1)
        n3 = out.shape if three else _three(out.shape, nd, 1)
        geo = np.array([p3[0], p3[1], p3[2], n3[1], n3[2]], np.int64)
        scatter_window(np.ascontiguousarray(win, np.float64).reshape(-1), o3, geo, out.reshape(-1))
        return
    for o in org:
        out[tuple(slice(a, a + p) for a, p in zip(o, win.shape))] += win
