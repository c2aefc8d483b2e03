"""The layers the Patch Explorer maintains: one result's tiles, the grid, captions, selection.

Runs on the main thread only; the data arrives prepared by the worker (see ``_controller``).
"""

from __future__ import annotations

import numpy as np

from .. import _layers
from .._layers import (
    CLASSES,
    ERROR,
    FILTERED,
    GRID,
    LABELS,
    LAYER_NAMES,
    MERGED,
    OPTIONAL_LAYER_NAMES,
    PATCHES,
    WEIGHTS,
)
from ..core import max_weight

#: Bottom to top; the input image stays below all of them.
ORDER = (WEIGHTS, MERGED, CLASSES, ERROR, PATCHES, FILTERED, GRID, LABELS)
assert set(ORDER) == set(LAYER_NAMES + OPTIONAL_LAYER_NAMES)


class Canvas:
    """Adds and updates the explorer's layers in place."""

    def __init__(self, viewer):
        self.viewer = viewer
        self.layers: dict = {}
        self.grid = None
        self.shown = None  # (grid, batched, planes)
        self.hw = (1, 1)
        self.patch_hw = (1, 1)
        self.selected = None
        self._max_outlines = _layers.MAX_OUTLINES_PER_AXIS
        self._inputs: dict = {}  # layer name -> what its data was made from
        self._error = None  # the signed error on screen, its |error| (made on demand), limits
        self._abs = None
        self._error_style = (0.0, 1.0)

    def alive(self, name):
        layer = self.layers.get(name)
        return layer if layer is not None and layer in self.viewer.layers else None

    def arrays(self) -> list:
        """Every array the layers show or may show again (the signed error behind the 3-D
        view's ``|error|``): a run must not write into any of them."""
        shown = [layer.data for layer in self.layers.values() if layer in self.viewer.layers]
        return [a for a in (*shown, self._error, self._abs) if isinstance(a, np.ndarray)]

    # ------------------------------------------------------------------ results
    def update(self, job, shown, error_limit=None):
        """Show a run's results (a :class:`~patch_viewer._controller.Shown`)."""
        grid = job.grid
        self.grid = grid
        planes = job.image.shape[0] if job.batched else None
        self.shown = (grid, job.batched, planes)
        img_hw = grid.spatial_shape[-2:] if grid.ndim >= 2 else (1, grid.spatial_shape[0])
        self.patch_hw = tuple(grid.patch_size[-2:]) if grid.ndim >= 2 else (1, grid.patch_size[0])
        # A padded patch larger than the image must not spill into the next tile.
        self.hw = tuple(max(a, b) for a, b in zip(img_hw, self.patch_hw))
        kw = job.kwargs
        weights_kw = _layers.weights_kwargs(max_weight(grid, kw["window"], **kw["window_params"]))
        old = self.alive(ERROR)
        span = abs(job.limits[1] - job.limits[0])
        limit = (
            error_limit
            if error_limit is not None
            else (float(old.contrast_limits[1]) if old is not None else 0.05 * span)
        )
        after = _layers.FilteredPatchStack(
            shown.stack, grid, job.batched, kw["patch_filter"], kw["filter_params"]
        )
        source = (id(job.image), grid, job.batched)
        inputs = {
            WEIGHTS: (grid, kw["window"], tuple(kw["window_params"].items())),
            PATCHES: source,
            FILTERED: (source, kw["patch_filter"], tuple(kw["filter_params"].items())),
        }
        merged_rgb = job.rgb if shown.rgb is None else shown.rgb
        after_rgb = job.rgb if after.rgb is None else after.rgb
        after_limits = shown.merged_limits if after_rgb == merged_rgb else (0.0, 1.0)
        for name, data, kwargs in [
            (WEIGHTS, shown.weights, weights_kw),
            (MERGED, shown.merged, _layers.image_kwargs(shown.merged_limits, merged_rgb)),
            (ERROR, *self._error_display(shown.error, limit, span)),
            (PATCHES, shown.stack, _layers.image_kwargs(job.limits, job.rgb)),
            (FILTERED, after, _layers.image_kwargs(after_limits, after_rgb)),
        ]:
            ndim = np.ndim(data) if not hasattr(data, "ndim") else data.ndim
            ndim -= 1 if kwargs.get("rgb") else 0
            offset = _layers.tile_offset(name, self.hw, ndim, self.patch_hw)
            key = inputs.get(name)
            if key is not None and self._inputs.get(name) == key and self.alive(name):
                continue  # its inputs did not change (the weights do not depend on the filter)
            self._show(name, data, dict(kwargs, translate=offset))
            self._inputs[name] = key
        self._classes(shown.classes)
        self._restyle_error()
        self.layers[WEIGHTS].colorbar.visible = True
        self.layers[ERROR].colorbar.visible = shown.comparable
        self._error_na = not shown.comparable  # the caption says why the tile is empty
        labels = _layers.axis_labels(grid, self.viewer.dims.ndim)
        if tuple(self.viewer.dims.axis_labels) != labels:
            self.viewer.dims.axis_labels = labels

    def _classes(self, classes):
        """The argmax of a predictor's channels as a Labels layer over the merged tile."""
        layer = self.alive(CLASSES)
        if classes is None:
            if layer is not None:
                self.viewer.layers.remove(layer)
            return
        offset = _layers.tile_offset(MERGED, self.hw, classes.ndim, self.patch_hw)
        if layer is not None and layer.ndim == classes.ndim:
            layer.data = classes
            layer.translate = offset
            return
        if layer is not None:
            self.viewer.layers.remove(layer)
        self.layers[CLASSES] = self.viewer.add_labels(
            classes, name=CLASSES, translate=offset, opacity=0.45
        )

    def set_error_limit(self, limit, span):
        err = self.alive(ERROR)
        self._error_style = (limit, span)
        if err is not None:
            limits = self._error_display(self._error, limit, span)[1]["contrast_limits"]
            if not np.allclose(err.contrast_limits, limits):
                err.contrast_limits = limits
        self._error_zero = limit == 0  # a zero error is dark: the caption says so
        self._captions()

    # ------------------------------------------------------------------ the error in 3-D
    @property
    def error_projected(self) -> bool:
        """Whether the error tile shows ``|error|`` (the 3-D view's maximum-intensity
        projection) rather than the signed error (the 2-D view)."""
        return self.viewer.dims.ndisplay == 3

    def _error_display(self, error, limit, span):
        """The error tile's data and styling for the current view: signed with a diverging
        colormap in 2-D; ``|error|`` with a sequential one in 3-D, where a maximum-intensity
        projection of the signed error would hide its negative half."""
        self._error_style = (limit, span)
        if error is not self._error:
            self._error, self._abs = error, None
        if not self.error_projected:
            return error, _layers.error_kwargs(limit, span)
        if self._abs is None:
            self._abs = np.abs(error)  # a dask error stays lazy
        return self._abs, _layers.abs_error_kwargs(limit, span)

    def _restyle_error(self):
        layer = self.alive(ERROR)
        if layer is None or self._error is None:
            return
        data, kwargs = self._error_display(self._error, *self._error_style)
        if layer.data is not data:
            layer.data = data
        if (layer.colormap.name == _layers.ABS_ERROR_COLORMAP) != self.error_projected:
            layer.colormap = kwargs["colormap"]  # only on a change of view: a user's own stays
        if not np.allclose(layer.contrast_limits, kwargs["contrast_limits"]):
            layer.contrast_limits = kwargs["contrast_limits"]
        if layer.rendering != "mip":
            layer.rendering = "mip"

    def set_ndisplay(self, ndisplay: int):
        """The viewer switched between the 2-D and the 3-D view: restyle the error tile."""
        self._restyle_error()
        if self.alive(LABELS) is not None:
            self._captions()
            self.viewer.reset_view()  # the other view's camera does not frame the tiles
            self.set_zoom(self.viewer.scene.camera.zoom)

    def _show(self, name, data, kwargs):
        layer = self.alive(name)
        if (
            layer is not None
            and layer.rgb == kwargs.get("rgb", False)
            and layer.ndim == (data.ndim - (1 if kwargs.get("rgb") else 0))
        ):
            layer.data = data  # styling is set once, so a user's own colormap choice stays
            for key in ("contrast_limits", "translate"):
                if key in kwargs and not np.allclose(getattr(layer, key), kwargs[key]):
                    setattr(layer, key, kwargs[key])
            return
        if layer is not None:
            self.viewer.layers.remove(layer)
        self.layers[name] = self.viewer.add_image(data, name=name, **kwargs)

    def finish(self):
        """After the selection is drawn: captions on top, layers in :data:`ORDER`."""
        self._captions()
        self._order()

    def _captions(self):
        pts, text = _layers.caption_points(self.hw)
        k = list(_layers.TILE_CAPTIONS).index(ERROR)
        if getattr(self, "_error_na", False):
            text[k] = "error: n/a (the output is not like the input)"
        elif getattr(self, "_error_zero", False):
            text[k] = "error: 0 everywhere"
        elif self.error_projected:
            k = list(_layers.TILE_CAPTIONS).index(ERROR)
            text[k] = _layers.ABS_ERROR_CAPTION
        layer = self.alive(LABELS)
        size = _layers.caption_size(self.hw, self.viewer.scene.camera.zoom)
        if layer is None:
            self.layers[LABELS] = self.viewer.add_points(
                pts,
                name=LABELS,
                size=0.01,
                face_color="transparent",
                border_width=0,
                features={"caption": text},
                text={
                    "string": "{caption}",
                    "color": "white",
                    "size": size,
                    "anchor": "lower_left",
                },
            )
            # The first results: fit the view to every tile with its caption (napari fitted
            # it to the first layers only, and cut the rightmost caption).
            self.viewer.reset_view()
            self.set_zoom(self.viewer.scene.camera.zoom)
            return
        # Unchanged captions are not set again: each set re-lays the text out (~20 ms).
        if layer.data.shape != pts.shape or not np.array_equal(layer.data, pts):
            layer.data = pts
        if list(layer.features["caption"]) != text:
            layer.features = {"caption": text}

    def _order(self):
        ours = [self.layers[n] for n in ORDER if self.alive(n) is not None]
        indices = [self.viewer.layers.index(layer) for layer in ours]
        if indices != sorted(indices) or indices[-1] != len(self.viewer.layers) - 1:
            for layer in ours:
                self.viewer.layers.move(self.viewer.layers.index(layer), len(self.viewer.layers))

    # ------------------------------------------------------------------ grid and selection
    def set_zoom(self, zoom: float) -> bool:
        """Thin the grid for ``zoom``; True when the outlines changed."""
        if self.grid is None:
            return False
        labels = self.alive(LABELS)
        size = _layers.caption_size(self.hw, zoom)
        if labels is not None and labels.text.size != size:
            labels.text.size = size  # captions are in screen px: they follow the tiles
        n = _layers.outlines_for_zoom(self.grid, zoom)
        changed, self._max_outlines = n != self._max_outlines, n
        if changed and self.selected is not None:
            self._draw_grid(self.selected)
        return changed

    def select(self, index: tuple, follow: bool = True):
        """Outline patch ``index`` and show it in the patch tiles. ``follow``: also move the z
        slider into a 3-D patch (a click or the index box, not the user's own z browsing)."""
        self.selected = index
        self._draw_grid(index)
        grid, _batched, planes = self.shown
        stacks = [s for s in (self.alive(PATCHES), self.alive(FILTERED)) if s]
        if not stacks:
            return
        step = list(self.viewer.dims.current_step)
        first = self.viewer.dims.ndim - stacks[0].ndim  # grid axes lead the stack
        for k, i in enumerate(index):
            step[first + k] = i
        if grid.ndim == 3 and planes is None:
            # The stack's patch-z axis shares the image's z slider: place it at the patch.
            z0, pz = grid.patch_origin(index)[0], grid.patch_size[0]
            for stack in stacks:
                translate = list(stack.translate)
                if translate[-3] != z0:
                    translate[-3] = z0
                    stack.translate = translate
            z = self.viewer.dims.ndim - 3
            if follow and not z0 <= step[z] < z0 + pz:
                step[z] = z0 + pz // 2
        if tuple(step) != tuple(self.viewer.dims.current_step):
            self.viewer.dims.current_step = tuple(step)

    def _draw_grid(self, index):
        grid, _, planes = self.shown
        vectors, colors = _layers.grid_lines(
            grid, index, planes=planes, max_per_axis=self._max_outlines
        )
        layer = self.alive(GRID)
        width = _layers.line_width(self.hw)
        if layer is None or layer.data.shape[-1] != vectors.shape[-1]:
            if layer is not None:
                self.viewer.layers.remove(layer)
            self.layers[GRID] = self.viewer.add_vectors(
                vectors, edge_color=colors, vector_style="line", edge_width=width, name=GRID
            )
        else:
            layer.data = vectors
            layer.edge_color = colors
            if layer.edge_width != width:
                layer.edge_width = width

    def grid_step(self):
        """The patch-grid position of the sliders, or None."""
        stack = self.alive(PATCHES)
        if self.grid is None or stack is None:
            return None
        first = self.viewer.dims.ndim - stack.ndim
        step = tuple(self.viewer.dims.current_step[first : first + self.grid.ndim])
        ok = len(step) == self.grid.ndim and all(
            0 <= i < g for i, g in zip(step, self.grid.grid_shape)
        )
        return step if ok else None
