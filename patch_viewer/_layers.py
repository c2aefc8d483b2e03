"""Core results -> napari layer data and styling (the one module that knows how layers look).

Pure NumPy: it builds ``(data, kwargs, layer_type)`` tuples; the widget applies them.
"""

from __future__ import annotations

import math

import numpy as np

from .core import PatchGrid, sliding_patches

#: The one source of the names of the layers the explorer maintains (a contract: scripts
#: find the results by these names). Everywhere else uses the constants below.
LAYER_NAMES = (
    "patch grid",
    "overlap weights",
    "patches",
    "filtered patches",
    "merged",
    "error",
    "tile labels",
)
GRID, WEIGHTS, PATCHES, FILTERED, MERGED, ERROR, LABELS = LAYER_NAMES
#: Layers shown only for some runs: the argmax of a predictor's channels.
OPTIONAL_LAYER_NAMES = ("classes",)
(CLASSES,) = OPTIONAL_LAYER_NAMES

GRID_COLOR = (0.0, 0.9, 1.0, 0.35)
SELECTED_COLOR = (1.0, 0.85, 0.0, 1.0)
#: Outlines drawn per axis at most; denser grids are thinned (every k-th patch outlined).
MAX_OUTLINES_PER_AXIS = 48
#: Smallest spacing of grid outlines on screen, in screen pixels (the grid thins by zoom).
MIN_SCREEN_SPACING = 12


def outlines_for_zoom(grid: PatchGrid, zoom: float) -> int:
    """Outlines per axis that keep :data:`MIN_SCREEN_SPACING` at ``zoom`` (screen px per
    image px), so that a stride-1 grid is not a mesh hiding the image."""
    on_screen = max(grid.spatial_shape) * max(zoom, 1e-9)
    return int(min(MAX_OUTLINES_PER_AXIS, max(2, on_screen // MIN_SCREEN_SPACING)))


def thinning(grid: PatchGrid, max_per_axis: int = MAX_OUTLINES_PER_AXIS) -> tuple[int, ...]:
    """Step between outlined patches along each spatial axis."""
    return tuple(max(1, math.ceil(g / max_per_axis)) for g in grid.grid_shape)


def grid_lines(
    grid: PatchGrid,
    selected=None,
    *,
    planes: int | None = None,
    max_per_axis: int = MAX_OUTLINES_PER_AXIS,
):
    """Patch outlines as napari Vectors data: ``(vectors, colors)``.

    Outlines are drawn in the last two spatial axes as full-length lines at the start and end
    of every k-th patch (k from :func:`thinning`), so a grid of 10^5 patches costs a few hundred
    segments. The selected patch (grid index) gets its own four edges in a highlight colour.
    For 3-D patches the outlines are repeated on every plane (``planes`` images for a stack of
    2-D images); returns ``(N, 2, D)`` start/direction pairs and ``(N, 4)`` RGBA colours.
    """
    h_axis, w_axis = grid.ndim - 2, grid.ndim - 1
    if grid.ndim == 1:
        return np.zeros((0, 2, 1)), np.zeros((0, 4))
    steps = thinning(grid, max_per_axis)
    (h, w) = grid.spatial_shape[h_axis], grid.spatial_shape[w_axis]
    ys = _edges(grid.origins[h_axis][:: steps[h_axis]], grid.patch_size[h_axis], h)
    xs = _edges(grid.origins[w_axis][:: steps[w_axis]], grid.patch_size[w_axis], w)
    segs = [((y, -0.5), (0.0, w)) for y in ys] + [((-0.5, x), (h, 0.0)) for x in xs]
    colors = [GRID_COLOR] * len(segs)
    if selected is not None:
        origin = grid.patch_origin(selected)
        y0, x0 = origin[h_axis] - 0.5, origin[w_axis] - 0.5
        ph, pw = grid.patch_size[h_axis], grid.patch_size[w_axis]
        # Three parallel lines per edge: the selection is thicker than the grid.
        d = line_width((h, w))
        for e in (-d, 0.0, d):
            segs += [
                ((y0 + e, x0 - d), (0.0, pw + 2 * d)),
                ((y0 + ph + e, x0 - d), (0.0, pw + 2 * d)),
                ((y0 - d, x0 + e), (ph + 2 * d, 0.0)),
                ((y0 - d, x0 + pw + e), (ph + 2 * d, 0.0)),
            ]
        colors += [SELECTED_COLOR] * SELECTION_SEGMENTS
    vec = np.array(segs, dtype=np.float64).reshape(-1, 2, 2)
    col = np.array(colors)
    n_planes = planes if planes is not None else (grid.spatial_shape[0] if grid.ndim == 3 else None)
    if n_planes is None:
        return vec, col
    # Repeat on every plane; the selected patch only on the planes it covers.
    z = np.repeat(np.arange(n_planes, dtype=np.float64), len(vec))
    out = np.zeros((n_planes * len(vec), 2, 3))
    out[:, 0, 0] = z
    out[:, :, 1:] = np.tile(vec, (n_planes, 1, 1))
    colors = np.tile(col, (n_planes, 1))
    if selected is not None and grid.ndim == 3:
        z0, pz = grid.patch_origin(selected)[0], grid.patch_size[0]
        per = len(vec)
        keep = np.ones(len(out), bool)
        for k in range(n_planes):
            if not z0 <= k < z0 + pz:
                keep[k * per + per - SELECTION_SEGMENTS : (k + 1) * per] = False
        out, colors = out[keep], colors[keep]
    return out, colors


def _as_index(pick):
    """Window positions as an int, a slice (evenly spaced, ascending) or an index array."""
    if np.ndim(pick) == 0:
        return int(pick)
    pick = np.asarray(pick)
    if len(pick) == 0:
        return slice(0, 0)
    step = int(pick[1] - pick[0]) if len(pick) > 1 else 1
    if step > 0 and np.all(np.diff(pick) == step):
        return slice(int(pick[0]), int(pick[-1]) + 1, step)
    return pick


SELECTION_SEGMENTS = 12


def _edges(origins: np.ndarray, p: int, n: int) -> np.ndarray:
    """Outline positions: each outlined patch's start, its end where the next patch does not
    start there (gaps between patches), and the image's far edge."""
    ends = origins + p
    gaps = ends[:-1][ends[:-1] < origins[1:]] if len(origins) > 1 else ends
    return (
        np.unique(np.concatenate([origins, gaps, [min(int(ends[-1]), n)]])).astype(np.float64) - 0.5
    )


class PatchStack:
    """Lazy ``(*grid_shape, *[batch], *patch_shape)`` array of an image's patches.

    napari slices it one patch at a time, so even an irregular (``edge="shift"``) grid of
    millions of patches costs nothing until a patch is looked at. For a batch of images (a
    stack of planes) the batch axis comes right before the patch axes, so that napari, which
    aligns layers by their trailing axes, shows each plane's patches on that plane's slider.
    """

    def __init__(self, image: np.ndarray, grid: PatchGrid, batched: bool = False):
        self._view = sliding_patches(image, grid, batched)  # (b, *positions, *patch, C)
        self._grid = grid
        self._batched = batched
        self._channels = grid.channel_axis is not None
        lead = (self._view.shape[0],) if batched else ()
        nd = grid.ndim
        self.shape = grid.patches_shape[:nd] + lead + grid.patches_shape[nd:]
        self.dtype = image.dtype
        self.ndim = len(self.shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        ellipsis = [n for n, k in enumerate(key) if k is Ellipsis]
        if ellipsis:
            i = ellipsis[0]
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        b = 1 if self._batched else 0
        nd = self._grid.ndim
        if b:  # public order (*grid, batch, *patch) -> internal (batch, *grid, *patch)
            key = (key[nd],) + key[:nd] + key[nd + 1 :]
        # Grid indices -> window positions: ints and regular runs become basic (view) indexing;
        # only an irregular selection (a shifted last patch inside a range) is gathered.
        picks = [_as_index(origins[k]) for k, origins in zip(key[b : b + nd], self._grid.origins)]
        basic = tuple(slice(None) if isinstance(p, np.ndarray) else p for p in picks)
        out = self._view[(key[0] if b else 0,) + basic]  # (*[b], *kept positions, *patch, C)
        axis = 1 if b and not isinstance(key[0], (int, np.integer)) else 0  # batch axis kept?
        for p in picks:
            if isinstance(p, np.ndarray):
                out = np.take(out, p, axis=axis)
            if not isinstance(p, int):
                axis += 1
        if not self._channels:
            out = out[..., 0]
        rest = key[b + nd :]
        out = out[(slice(None),) * (out.ndim - len(rest)) + tuple(rest)]
        if b and not isinstance(key[0], (int, np.integer)):  # batch kept: move it after the grid
            out = np.moveaxis(out, 0, axis - 1)
        return np.asarray(out)

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)


class LazyPatchStack:
    """:class:`PatchStack` over a dask or zarr image: each patch napari looks at is read (and
    padded as the grid pads) on demand, so nothing image-sized is ever loaded."""

    def __init__(self, image, grid: PatchGrid, batched: bool = False):
        self._image, self._grid, self._batched = image, grid, batched
        nd = grid.ndim
        lead = (image.shape[0],) if batched else ()
        self.shape = grid.patches_shape[:nd] + lead + grid.patches_shape[nd:]
        self.dtype = np.dtype(image.dtype)
        self.ndim = len(self.shape)
        # Per spatial axis: padded coordinate -> image coordinate (-1: constant padding).
        self._index = []
        for n, m in zip(grid.spatial_shape, grid.padded_shape):
            mode = grid.pad_mode if m > n else "edge"
            extra = {"constant_values": -1} if mode == "constant" else {}
            self._index.append(np.pad(np.arange(n), (0, m - n), mode=mode, **extra))

    def __len__(self):
        return self.shape[0]

    def _patch(self, index: tuple, b) -> np.ndarray:
        """One patch ``(*patch_size[, C])`` of image ``b`` (None: a single image)."""
        grid = self._grid
        image = self._image if b is None else self._image[b]
        spatial = [
            ax
            for ax in range(image.ndim)
            if grid.channel_axis is None or ax != grid.channel_axis % len(grid.image_shape)
        ]
        picks = [
            self._index[k][o : o + p]
            for k, (o, p) in enumerate(zip(grid.patch_origin(index), grid.patch_size))
        ]
        lo = [int(np.clip(pk, 0, None).min()) for pk in picks]
        hi = [int(pk.max()) + 1 for pk in picks]
        region = [slice(None)] * image.ndim
        for ax, a, z in zip(spatial, lo, hi):
            region[ax] = slice(a, z)
        block = np.asarray(image[tuple(region)])  # the bounding box: one small read
        for ax, pk, a in zip(spatial, picks, lo):
            block = np.take(block, np.clip(pk, 0, None) - a, axis=ax)
            if (pk < 0).any():  # constant padding
                shape = [1] * block.ndim
                shape[ax] = len(pk)
                block = np.where((pk >= 0).reshape(shape), block, 0).astype(block.dtype)
        if grid.channel_axis is not None:
            block = np.moveaxis(block, grid.channel_axis % len(grid.image_shape), -1)
        return block

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        nd, b = self._grid.ndim, int(self._batched)
        lead = key[: nd + b]
        ranges = [np.arange(n)[k] for n, k in zip(self.shape[: nd + b], lead)]
        picked = np.empty([np.size(r) for r in ranges] + list(self.shape[nd + b :]), self.dtype)
        for pos in np.ndindex(*[np.size(r) for r in ranges]):
            at = tuple(int(np.ravel(r)[i]) for r, i in zip(ranges, pos))
            picked[pos] = self._patch(at[:nd], at[nd] if b else None)
        drop = tuple(0 if np.ndim(r) == 0 else slice(None) for r in ranges)
        return picked[drop][(Ellipsis,) + tuple(key[nd + b :])]

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)


class FilteredPatchStack:
    """A patch stack (:class:`PatchStack` or :class:`LazyPatchStack`) with the run's filter
    applied to each patch napari looks at: the "after" beside the "before"."""

    def __init__(self, stack, grid: PatchGrid, batched: bool, patch_filter, filter_params):
        from .core import Predictor, get_filter

        self._stack, self._grid = stack, grid
        self._lead = grid.ndim + int(batched)
        self._filter = get_filter(patch_filter)
        self._params = dict(filter_params or {})
        self.shape, self.ndim = stack.shape, stack.ndim
        self.rgb = None  # shown as the input is; a predictor's other output decides below
        self._model = self._filter if isinstance(self._filter, Predictor) else None
        probe = self._run(np.zeros((1, *grid.patch_shape), stack.dtype))
        self.dtype = probe.dtype
        if self._model is not None and probe.shape[1:] != grid.patch_shape:
            # a predictor's other output: shown as channels_display shows it
            self.rgb = probe.ndim == 1 + grid.ndim + 1
            self.shape = stack.shape[: self._lead] + probe.shape[1:]
            self.ndim = len(self.shape)

    def _run(self, flat: np.ndarray) -> np.ndarray:
        """The filter (or the predictor, its first output for display) on ``flat`` patches."""
        if self._model is None:
            return np.asarray(self._filter(flat, self._spatial(flat.ndim), **self._params))
        batch = flat  # (N, *patch[, C]): what iter_batches gives the model
        if self._model.channels_first:
            batch = (
                np.moveaxis(batch, -1, 1) if self._grid.channel_axis is not None else batch[:, None]
            )
        out = next(iter(self._model.run(batch, self._params, "the selected patch").values()))
        if self._model.channels_first and out.ndim == 2 + self._grid.ndim:
            out = np.moveaxis(out, 1, -1)
        size = self._grid.patch_size
        shown = [channels_display(o, size)[0] for o in out]
        return np.stack(shown) if shown else np.zeros((0,) + size, np.float32)

    def _spatial(self, ndim: int) -> tuple:
        ch = int(self._grid.channel_axis is not None)
        return tuple(range(ndim - ch - self._grid.ndim, ndim - ch))

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1 :]
        key = key + (slice(None),) * (self.ndim - len(key))
        whole = np.asarray(self._stack[key[: self._lead]])  # whole patches: filter, then slice
        patch_shape = self._grid.patch_shape
        flat = whole.reshape((-1, *patch_shape))
        out = self._run(flat)
        lead = whole.shape[: whole.ndim - len(patch_shape)]
        return out.reshape(lead + out.shape[1:])[(Ellipsis,) + tuple(key[self._lead :])]

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)


# ------------------------------------------------------------------------- predictor outputs
def channels_display(out: np.ndarray, spatial_shape) -> tuple[np.ndarray, bool, np.ndarray | None]:
    """A predictor's output (channels last, ``spatial_shape`` first) as the explorer shows it:
    ``(data, rgb, classes)``. One channel: grey. Two or three (class probabilities): an RGB
    composite of the channels (two: red and green). More: the first three as RGB. ``classes``
    is the argmax over the channels (1-based, a Labels image) for two or more channels."""
    out = np.asarray(out)
    spatial_shape = tuple(spatial_shape)
    if out.shape[: len(spatial_shape)] != spatial_shape:  # another resolution: nearest pixels
        out = _resample(out, spatial_shape)
    if out.ndim == len(spatial_shape):
        return out, False, None
    k = out.shape[-1]
    if k == 1:
        return out[..., 0], False, None
    classes = (np.argmax(np.nan_to_num(out, nan=-np.inf), axis=-1) + 1).astype(np.uint16)
    rgb = np.zeros(out.shape[:-1] + (3,), np.float32)
    rgb[..., : min(k, 3)] = out[..., :3]
    return rgb, True, classes


def _resample(out: np.ndarray, spatial_shape) -> np.ndarray:
    index = tuple(
        np.minimum((np.arange(n) * m) // n, m - 1) for n, m in zip(spatial_shape, out.shape)
    )
    return (
        out[np.ix_(*index)]
        if out.ndim == len(spatial_shape)
        else out[np.ix_(*index, np.arange(out.shape[-1]))]
    )


def rgb_limits(data: np.ndarray) -> tuple[float, float]:
    """Limits of a float composite: (0, 1) for probabilities, else the data's range."""
    finite = data[np.isfinite(data)]
    if not finite.size:
        return (0.0, 1.0)
    lo, hi = float(finite.min()), float(finite.max())
    return (0.0, 1.0) if lo >= 0 and hi <= 1 else (lo, hi if hi > lo else lo + 1)


# ------------------------------------------------------------------------- layer styling
#: Where each result sits beside the source image: (row, column) tiles in one canvas.
TILES = {MERGED: (0, 1), ERROR: (0, 2), WEIGHTS: (1, 0), PATCHES: (1, 1)}


#: What each tile shows, as its caption on the canvas.
TILE_CAPTIONS = {
    "input": "input + patch grid",
    WEIGHTS: WEIGHTS,
    MERGED: MERGED,
    ERROR: "error (merged − reference)",
    PATCHES: "selected patch: before | after",
}


def tile_gap(image_hw) -> float:
    """Space between tiles, with room for a caption above each."""
    return max(8.0, 0.12 * max(image_hw))


def tile_offset(name: str, image_hw, ndim: int, patch_hw=(0, 0)) -> tuple:
    """Translate placing layer ``name`` in its tile (last two axes), for a layer of ``ndim``.
    ``image_hw`` is the tile size (the image's, or a larger padded patch's); the filtered
    patch sits right of the raw one (``patch_hw``)."""
    h, w = image_hw
    gap = tile_gap(image_hw)
    if name == FILTERED:
        row, col = TILES[PATCHES]
        return (0.0,) * (ndim - 2) + (row * (h + gap), col * (w + gap) + patch_hw[1] + gap / 2)
    row, col = TILES[name]
    return (0.0,) * (ndim - 2) + (row * (h + gap), col * (w + gap))


#: Room right of the last tile column, as a fraction of a tile's width: the captions are drawn
#: in screen pixels from each tile's left edge, and the view that fits the layers must not
#: clip the rightmost one ("error (merged − reference)", about 180 px wide).
CAPTION_MARGIN = 0.6


def caption_size(image_hw, zoom: float) -> int:
    """Caption font size for tiles of ``image_hw`` pixels at ``zoom`` (screen px per image px).
    A size ``s`` draws about ``0.85 s`` px per character: "input + patch grid" then fits over
    its tile and gap, and "error (merged − reference)" over its tile and
    :data:`CAPTION_MARGIN`; from 6 to 14."""
    tile = max(image_hw) * max(zoom, 1e-9)
    return int(min(14, max(6, tile // 16)))


def caption_points(image_hw) -> tuple[np.ndarray, list[str]]:
    """Where each tile's caption sits (just above its top-left corner) and its text; a last,
    empty caption right of the tiles keeps room for the rightmost caption's text."""
    h, w = image_hw
    gap = tile_gap(image_hw)
    pts, text = [], []
    for name, caption in TILE_CAPTIONS.items():
        row, col = (0, 0) if name == "input" else TILES[name]
        pts.append((row * (h + gap) - 0.5 - gap * 0.9, col * (w + gap) - 0.5))
        text.append(caption)
    right = max(col for _, col in TILES.values()) + 1
    pts.append((-0.5 - gap * 0.9, right * (w + gap) - gap - 0.5 + CAPTION_MARGIN * w))
    text.append("")
    return np.array(pts), text


def axis_labels(grid: PatchGrid, ndim: int) -> tuple[str, ...]:
    """Names for the viewer's axes when the patch stack (grid axes first) is shown."""
    grid_names = ("patch plane", "patch row", "patch column")[3 - grid.ndim :]
    spatial = ("z", "y", "x")[3 - min(grid.ndim, 3) :]
    rest = ndim - len(grid_names)
    tail = spatial[-rest:] if rest <= len(spatial) else ("plane",) * (rest - len(spatial)) + spatial
    return tuple(grid_names) + tuple(tail)


def line_width(image_hw) -> float:
    """Outline width in pixels: visible at full view whatever the image size."""
    return max(0.5, max(image_hw) / 300)


def weights_kwargs(hi: float) -> dict:
    """Perceptual colormap from 0 to the largest weight ``hi`` (see ``max_weight``)."""
    return dict(
        colormap="viridis",
        contrast_limits=(0.0, hi if hi > 0 else 1.0),
        blending="translucent",
        opacity=1.0,
    )


def error_data(error: np.ndarray, rgb: bool) -> np.ndarray:
    """Signed error for display: per pixel, averaged over RGB channels."""
    return error.mean(axis=-1) if rgb else error


#: The error's display limits are ``±`` this percentile of ``|error|``: a few outliers must
#: not wash the seams out.
ERROR_PERCENTILE = 99.5


def error_limit(error: np.ndarray) -> float:
    """The :data:`ERROR_PERCENTILE`-th percentile of the finite ``|error|`` as displayed (see
    :func:`error_data`), or its max when that percentile is 0 but the error is not."""
    finite = np.abs(error[np.isfinite(error)])
    if not finite.size:
        return 0.0
    hi = float(np.percentile(finite, ERROR_PERCENTILE))
    return hi if hi > 0 else float(finite.max())


#: Diverging, dark in the middle: on napari's dark canvas a zero error is quiet and seams glow
#: (magenta: merged below the reference; green: above).
ERROR_COLORMAP = {
    "name": "error: magenta - black - green",
    "colors": [[1.0, 0.25, 0.85, 1.0], [0.0, 0.0, 0.0, 1.0], [0.3, 1.0, 0.35, 1.0]],
}


def error_kwargs(max_abs: float, value_range: float = 1.0) -> dict:
    """Diverging colormap with symmetric limits ``±max_abs``. An error that is exactly zero
    gets ``±1e-3`` of the value range, so it shows as the colormap's neutral middle."""
    m = max_abs if max_abs > 0 and math.isfinite(max_abs) else 1e-3 * max(value_range, 1e-9)
    return dict(colormap=ERROR_COLORMAP, contrast_limits=(-m, m))


#: The error in the 3-D view: a maximum-intensity projection of a signed error would show only
#: its positive half (and 'minip' only its negative one), so the 3-D view projects ``|error|``
#: with a sequential colormap, dark at zero like :data:`ERROR_COLORMAP`'s middle.
ABS_ERROR_COLORMAP = "magma"
ABS_ERROR_CAPTION = "|error| (max projection)"


def abs_error_kwargs(max_abs: float, value_range: float = 1.0) -> dict:
    """Sequential colormap from 0 to ``max_abs`` (see :func:`error_kwargs`) for ``|error|``
    drawn as a maximum-intensity projection."""
    m = error_kwargs(max_abs, value_range)["contrast_limits"][1]
    return dict(colormap=ABS_ERROR_COLORMAP, contrast_limits=(0.0, m), rendering="mip")


def image_kwargs(source_limits, rgb: bool) -> dict:
    """Grey image with the given limits; RGB data is shown as RGB (limits from its own data)."""
    kw = dict(contrast_limits=tuple(source_limits))
    if rgb:
        kw["rgb"] = True
    else:
        kw["colormap"] = "gray"
    return kw
