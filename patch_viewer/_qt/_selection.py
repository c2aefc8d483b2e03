"""Which patch is selected: click (nearest centre), the index box, the sliders, the zoom."""

from __future__ import annotations

import contextlib

import numpy as np

from .. import _controller as ctl


class Selection:
    """Keeps the selected patch, the index box, the patch sliders and the outline in step."""

    def __init__(self, explorer):
        self.explorer = explorer
        self.viewer = explorer.viewer
        self.canvas = explorer.canvas
        self._syncing = False
        explorer.index.changed.connect(self._on_index)
        self.viewer.mouse_drag_callbacks.append(self._on_click)
        self.viewer.dims.events.current_step.connect(self._on_dims)
        self.viewer.scene.camera.events.zoom.connect(self._on_zoom)
        self.viewer.dims.events.ndisplay.connect(self._on_ndisplay)
        self.viewer.layers.events.inserted.connect(self._refresh_images)
        self.viewer.layers.events.removed.connect(self._refresh_images)

    def teardown(self):
        steps = [
            lambda: self.viewer.mouse_drag_callbacks.remove(self._on_click),
            lambda: self.viewer.dims.events.current_step.disconnect(self._on_dims),
            lambda: self.viewer.scene.camera.events.zoom.disconnect(self._on_zoom),
            lambda: self.viewer.dims.events.ndisplay.disconnect(self._on_ndisplay),
            lambda: self.viewer.layers.events.inserted.disconnect(self._refresh_images),
            lambda: self.viewer.layers.events.removed.disconnect(self._refresh_images),
        ]
        for step in steps:  # an exception escaping a Qt slot aborts PyQt5
            with contextlib.suppress(RuntimeError, ValueError):
                step()

    def _refresh_images(self, *_):
        self.explorer.image.reset_choices()

    def show(self, job, shown):
        """A run's results arrived: update the layers, keep the selected patch's position."""
        old_grid, old_index = self.canvas.grid, self.canvas.selected
        self._syncing = True
        try:
            self.canvas.update(job, shown)
            self._refresh_images()  # our layers are not inputs
            self.canvas.set_zoom(self.viewer.scene.camera.zoom)
            index = ctl.keep_position(old_grid, old_index, job.grid)
            box = self.explorer.index
            box.max = job.grid.n_patches - 1
            box.value = int(np.ravel_multi_index(index, job.grid.grid_shape))
            self.canvas.select(index, follow=old_index is None)
            self.canvas.finish()
        finally:
            self._syncing = False

    def select(self, index: tuple, follow: bool = True):
        was, self._syncing = self._syncing, True
        try:
            flat = int(np.ravel_multi_index(index, self.canvas.grid.grid_shape))
            self.explorer.index.value = flat
            self.canvas.select(index, follow=follow)
        finally:
            self._syncing = was

    def _on_index(self, value):
        if not self._syncing and self.canvas.grid is not None:
            self.select(self.canvas.grid.patch_index(value))

    def _on_click(self, viewer, event):
        try:
            layer = self.explorer.image.value
            grid = self.canvas.grid
            if grid is None or layer is None or layer not in viewer.layers:
                return
            coords = layer.world_to_data(event.position)
            index = ctl.patch_near(grid, coords[-grid.ndim :])
            if index is not None:
                self.select(index)
        except RuntimeError:  # the widget was closed: stop listening
            if self._on_click in viewer.mouse_drag_callbacks:
                viewer.mouse_drag_callbacks.remove(self._on_click)

    def _on_dims(self, event):
        if self._syncing:
            return
        step = self.canvas.grid_step()
        if step is not None and step != self.canvas.selected:
            self.select(step, follow=False)  # the user browses: never move the z slider

    def _on_ndisplay(self, event):
        self.canvas.set_ndisplay(self.viewer.dims.ndisplay)

    def _on_zoom(self, event):
        if not self._syncing and self.canvas.grid is not None:
            self.canvas.set_zoom(self.viewer.scene.camera.zoom)
