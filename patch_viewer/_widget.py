"""Patch Explorer: a magicgui Container that wires parameters to the core and results to layers.

All numerics live in :mod:`patch_viewer.core`; layer data and styling in :mod:`._layers`. Work
runs in a napari thread worker; results land on the main thread, and only the newest run's.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from functools import partial

import napari
import numpy as np
from magicgui.widgets import (CheckBox, ComboBox, Container, FloatSpinBox, Label, ProgressBar,
                              PushButton, SpinBox)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import QSizePolicy

from . import _layers
from .core import EDGE_MODES, FILTERS, PAD_MODES, REDUCTIONS, WINDOWS, PatchGrid, iter_process
from .core._layout import _fmt_bytes, is_lazy
from .core.merge import max_weight
from .core.metrics import compute_metrics, iter_ssim

LAYER_NAMES = ("patch grid", "overlap weights", "patches", "merged", "error")
VOLUME_MODES = ("3-D patches", "2-D patches per plane")
#: The GUI refuses runs whose estimated peak memory exceeds this.
GUI_MAX_BYTES = 2 * 2**30


class AxisInts(Container):
    """One spin box per spatial axis, with a toggle that links them."""

    def __init__(self, label: str, value: int, minimum: int = 1):
        self.boxes = [SpinBox(value=value, min=minimum, max=100_000, label=a) for a in "zyx"]
        self.linked = CheckBox(value=True, text="linked")
        super().__init__(widgets=[*self.boxes, self.linked], layout="horizontal", label=label,
                         labels=False)
        for box in self.boxes:
            box.changed.connect(partial(self._on_box, box))
        self.set_axes(2)

    def set_axes(self, n: int):
        for i, box in enumerate(self.boxes):
            box.visible = i >= 3 - n
        self._n = n

    @property
    def n_axes(self) -> int:
        return self._n

    def set_value(self, values) -> None:
        """Set one value for every axis, or one per axis (which unlinks them)."""
        values = [int(v) for v in values]
        if len(values) not in (1, self._n):
            raise ValueError(f"`{self.label}` takes 1 or {self._n} values (one per spatial "
                             f"axis), got {values}")
        self.linked.value = len(values) == 1
        for box, v in zip(self.boxes[3 - self._n:], values * self._n if len(values) == 1 else values):
            box.value = v

    def _on_box(self, source, value):
        if self.linked.value:
            for box in self.boxes:
                if box is not source and box.value != value:
                    box.value = value

    @property
    def value(self) -> tuple[int, ...]:
        return tuple(b.value for b in self.boxes[3 - self._n:])


class ExplorerSignals(QObject):
    """``computed(result)`` once the layers show a run's results, ``ssim_computed(value)`` when
    the slower SSIM follows; ``failed(message)``."""

    computed = Signal(object)
    ssim_computed = Signal(float)
    failed = Signal(str)


@dataclass(frozen=True)
class Job:
    """Everything a run needs, read from the widgets on the main thread."""

    image: np.ndarray
    grid: PatchGrid
    batched: bool
    rgb: bool
    kwargs: dict
    limits: tuple
    lazy: bool = False  # a dask/zarr image: results stay lazy, napari computes what it shows
    cancel: threading.Event = field(default_factory=threading.Event)


class PatchExplorer(Container):
    """Dock widget: patch size/stride, edge, window, filter -> grid, weights, merged, error."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        self.viewer = napari_viewer
        self._layers: dict = {}
        self.image = ComboBox(choices=self._image_choices, label="image")
        self.patch_size = AxisInts("patch size", 32)
        self.stride = AxisInts("stride", 16)
        self.edge = ComboBox(choices=EDGE_MODES, value="shift", label="edge")
        self.pad_mode = ComboBox(choices=PAD_MODES, value="reflect", label="pad mode")
        self.volume_mode = ComboBox(choices=VOLUME_MODES, value=VOLUME_MODES[0], label="3-D")
        self.window = ComboBox(choices=WINDOWS, value="uniform", label="window")
        self.sigma = FloatSpinBox(value=0.125, min=0.01, max=10.0, step=0.025, label="sigma")
        self.reduce = ComboBox(choices=REDUCTIONS, value="mean", label="reduce")
        self.filter = ComboBox(choices=list(FILTERS), value="identity", label="filter")
        self.filter_params = Container(labels=True)
        self.reference = ComboBox(choices=[("input image", "input"),
                                           ("filter on whole image", "filter")],
                                  value="input", label="error vs")
        self.live = CheckBox(value=True, text="live preview")
        self.run_button = PushButton(text="Run")
        self.index = SpinBox(value=0, min=0, max=0, label="patch index")
        self.progress = ProgressBar(value=0, min=0, max=1, label="progress")
        self.readout = Label(value="Pick an image layer.")
        super().__init__(widgets=[
            self.image, self.patch_size, self.stride, self.edge, self.pad_mode,
            self.volume_mode, self.window, self.sigma, self.reduce, self.filter,
            self.filter_params, self.reference, self.live, self.run_button, self.index,
            self.progress, self.readout])
        # magicgui fixes a Label's size; the read-out must grow with its lines.
        self.readout.native.setSizePolicy(QSizePolicy.Policy.Expanding,
                                          QSizePolicy.Policy.Minimum)
        self.readout.native.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.readout.native.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.readout.native.setMinimumHeight(6 * self.readout.native.fontMetrics().lineSpacing())
        self.signals = ExplorerSignals()
        self._generation = 0
        self._worker = None
        self._grid = None
        self._shown = None  # (grid, batched, planes) of the layers on screen
        self._hw = (1, 1)  # the image's last two spatial sizes, for the layout
        self._readout_lines: list[str] = []
        self._job_running = None
        self._syncing = False
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(150)
        self._timer.timeout.connect(self.run)
        for w in (self.patch_size, self.stride, self.edge, self.pad_mode, self.window,
                  self.sigma, self.reduce, self.reference):
            w.changed.connect(self._on_param)
        self.volume_mode.changed.connect(self._on_image)  # changes the number of axes
        self.filter.changed.connect(self._on_filter)
        self.image.changed.connect(self._on_image)
        self.run_button.changed.connect(self.run)
        self.index.changed.connect(self._on_index)
        self.live.changed.connect(self._on_live)
        self.viewer.mouse_drag_callbacks.append(self._on_click)
        self.viewer.dims.events.current_step.connect(self._on_dims)
        self.viewer.layers.events.inserted.connect(self._refresh_images)
        self.viewer.layers.events.removed.connect(self._refresh_images)
        self.native.destroyed.connect(self._teardown)
        self._on_filter()
        self._on_image()

    def _teardown(self, *_):
        """The dock was closed: drop pending work and stop listening to the viewer."""
        self._generation += 1  # whatever is still running is now stale
        # Qt may already have deleted parts of us (or of the viewer) when this runs; an
        # exception escaping a Qt slot aborts PyQt5, so each step is allowed to fail alone.
        steps = [self._timer.stop,
                 lambda: self._worker is not None and self._worker.quit(),
                 lambda: self.viewer.mouse_drag_callbacks.remove(self._on_click),
                 lambda: self.viewer.dims.events.current_step.disconnect(self._on_dims),
                 lambda: self.viewer.layers.events.inserted.disconnect(self._refresh_images),
                 lambda: self.viewer.layers.events.removed.disconnect(self._refresh_images)]
        for step in steps:
            try:
                step()
            except (RuntimeError, ValueError):
                pass

    def _refresh_images(self, *_):
        self.image.reset_choices()

    def _image_choices(self, _widget=None):
        """The viewer's image layers, less the ones this widget made."""
        # napari hands plugins proxies (new objects on every access): compare stable ids.
        ours = {layer.unique_id for layer in self._layers.values()}
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, napari.layers.Image) and layer.unique_id not in ours]

    # ------------------------------------------------------------------ parameters
    def _on_live(self, value):
        if value:
            self._timer.start()
        else:
            self._timer.stop()

    def _on_param(self, *_):
        self.pad_mode.visible = self.edge.value == "pad"
        self.sigma.visible = self.window.value == "gaussian"
        if self.live.value:
            self._timer.start()

    def _on_filter(self, *_):
        self.filter_params.clear()
        for name, p in FILTERS[self.filter.value].params.items():
            cls = SpinBox if p.kind is int else FloatSpinBox
            w = cls(value=p.default, min=p.min, max=p.max, label=name, tooltip=p.doc)
            w.changed.connect(self._on_param)
            self.filter_params.append(w)
        self.filter_params.visible = len(self.filter_params) > 0
        self._on_param()

    def _on_image(self, *_):
        layer = self.image.value
        if layer is not None:
            nd = layer.data.ndim - (1 if layer.rgb else 0)
            self.volume_mode.visible = nd == 3
            spatial = 2 if nd == 3 and self.volume_mode.value != VOLUME_MODES[0] else min(nd, 3)
            self.patch_size.set_axes(spatial)
            self.stride.set_axes(spatial)
        self._on_param()

    def _job(self) -> Job:
        layer = self.image.value
        if layer is None:
            raise ValueError("pick an image layer first")
        data = layer.data[0] if layer.multiscale else layer.data  # full resolution
        lazy = is_lazy(data)
        if not lazy:
            data = np.asarray(data)
        rgb = bool(layer.rgb)
        per_plane = data.ndim - rgb == 3 and self.volume_mode.value == VOLUME_MODES[1]
        shape = data.shape[1:] if per_plane else data.shape
        grid = PatchGrid(shape, self.patch_size.value, self.stride.value, edge=self.edge.value,
                         pad_mode=self.pad_mode.value, channel_axis=-1 if rgb else None)
        params = {w.label: w.value for w in self.filter_params}
        window_params = {"sigma": self.sigma.value} if self.window.value == "gaussian" else {}
        kwargs = dict(patch_filter=self.filter.value, filter_params=params,
                      window=self.window.value, window_params=window_params,
                      reduce=self.reduce.value, reference=self.reference.value,
                      max_bytes=GUI_MAX_BYTES)
        return Job(data, grid, per_plane, rgb, kwargs, tuple(layer.contrast_limits), lazy)

    # ------------------------------------------------------------------ running
    def run(self, *_):
        """Start a run with the current parameters; a newer run makes older results stale."""
        try:
            job = self._job()
            # validates everything; SSIM (the slow metric) follows once the layers are shown
            # Lazy runs compute every metric in one pass after the layers show; in-memory runs
            # show the layers first, then the metrics, then SSIM (see _compute).
            gen = iter_process(job.image, job.grid, ssim=job.lazy, metrics=job.lazy,
                               **job.kwargs)
        except (ValueError, TypeError, MemoryError) as exc:
            self._fail(str(exc))
            return
        self._generation += 1
        if self._job_running is not None:
            self._job_running.cancel.set()  # stops a lazy metrics pass at its next task
        self._job_running = job
        if self._worker is not None:
            self._worker.quit()
        self.progress.max, self.progress.value = 1000, 0  # per mille of patches done
        # Progress shows in the widget's own bar (napari's activity-dialog bar re-enters the
        # event loop when several runs start back to back).
        worker = create_worker(_compute, gen, job, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(partial(self._on_progress, self._generation, job))
        worker.returned.connect(partial(self._on_ssim, self._generation))
        worker.errored.connect(partial(self._on_error, self._generation))
        self._worker = worker
        worker.start()

    def _on_progress(self, generation, job, value):
        if generation != self._generation or not isinstance(value, tuple):
            return  # stale, or an SSIM band done
        if value[0] == "layers":
            self.progress.value = self.progress.max  # a lazy run yields no batches
            self._on_result(generation, job, value[1:])
            return
        if value[0] == "metrics":
            self._on_metrics(*value[1:])
            return
        done, total = value
        self.progress.value = int(1000 * done / max(total, 1))

    def _on_metrics(self, m: dict, limit: float, ssim: bool = False):
        """Metrics arrived (after the layers): the read-out, and the error layer's symmetric
        limits ``±limit`` (max |error| as displayed: RGB errors are shown channel-averaged)."""
        if not self._readout_lines:
            return
        self._readout_lines[-2:] = _metric_lines(m, ssim=ssim)
        self.readout.value = "\n".join(self._readout_lines)
        err = self._layers.get("error")
        if err is not None and err in self.viewer.layers:
            err.contrast_limits = _layers.error_kwargs(limit)["contrast_limits"]

    def _on_ssim(self, generation, value):
        if generation != self._generation or not self._readout_lines or value is None:
            return
        if isinstance(value, dict):  # a lazy run: every metric arrives now
            self._on_metrics(value, value["max_abs"], ssim=True)
            value = value["ssim"]
        else:
            self._readout_lines[-1] = self._readout_lines[-1].replace("SSIM: …",
                                                                      f"SSIM: {value:.4f}")
        self.readout.value = "\n".join(self._readout_lines)
        self.signals.ssim_computed.emit(value)

    def _on_error(self, generation, exc):
        if generation == self._generation:
            self._fail(f"{type(exc).__name__}: {exc}")

    def _fail(self, message: str):
        self.readout.value = f"⚠ {message}"
        self.readout.native.setStyleSheet("color: #ff7070")
        show_error(f"Patch Explorer: {message}")
        self.signals.failed.emit(message)

    def _on_result(self, generation, job: Job, payload):
        if generation != self._generation:
            return  # a newer run is under way: never show stale results
        # Adding layers changes the viewer's dims; don't let that re-enter selection midway.
        self._syncing = True
        try:
            self._update_layers(job, *payload)
        finally:
            self._syncing = False
        self.signals.computed.emit(payload[0])

    def _update_layers(self, job: Job, result, stack, w, err):
        """Show a run's results: ``w`` and ``err`` are the weights and the error as displayed
        (see :func:`_compute`)."""
        self._grid = job.grid
        planes = job.image.shape[0] if job.batched else None
        self._shown = (job.grid, job.batched, planes)
        hw = job.grid.spatial_shape[-2:] if job.grid.ndim >= 2 else (1, job.grid.spatial_shape[0])
        self._hw = hw
        # Limits without a pass over the images: the weights' from the grid, the error's
        # (symmetric, max |error|) follow with the metrics; until then the last run's stay.
        kw = job.kwargs
        weights_kw = _layers.weights_kwargs(max_weight(job.grid, kw["window"],
                                                       **kw["window_params"]))
        old = self._layers.get("error")
        if old is not None and old in self.viewer.layers:
            error_kw = _layers.error_kwargs(float(old.contrast_limits[1]))
        else:
            error_kw = _layers.error_kwargs(0.05 * abs(job.limits[1] - job.limits[0]))
        for name, data, kwargs in [
            ("overlap weights", w, weights_kw),
            ("merged", result.merged, _layers.image_kwargs(job.limits, job.rgb)),
            ("error", err, error_kw),
            ("patches", stack, _layers.image_kwargs(job.limits, job.rgb)),
        ]:
            ndim = np.ndim(data) - (1 if kwargs.get("rgb") else 0)
            self._show(name, data, dict(kwargs, translate=_layers.tile_offset(name, hw, ndim)))
        self._layers["overlap weights"].colorbar.visible = True
        n = job.grid.n_patches
        self.index.max = n - 1
        self.index.value = min(self.index.value, n - 1)
        self._select(job.grid.patch_index(self.index.value))
        cmin, cmax = job.grid.coverage_range()
        self.readout.native.setStyleSheet("")
        self._readout_lines = [
            f"patches: {result.plan.n_patches:,}   grid: {' x '.join(map(str, job.grid.grid_shape))}",
            f"coverage: {cmin}–{cmax}   est. memory: {_fmt_bytes(result.plan.peak_bytes)}",
            f"compute time: {result.elapsed * 1e3:.0f} ms"
            + ("  (lazy)" if job.lazy else ""),
            "max |err|: …   RMSE: …", "PSNR: …   SSIM: …"]
        self.readout.value = "\n".join(self._readout_lines)

    def _show(self, name, data, kwargs):
        layer = self._layers.get(name)
        alive = layer is not None and layer in self.viewer.layers
        if alive and layer.rgb == kwargs.get("rgb", False) and np.ndim(layer.data) == np.ndim(data):
            # Every attribute set re-slices and redraws the layer: set data, and only what
            # changed of the limits and placement. Styling is set once, so a user's own
            # colormap choice stays.
            layer.data = data
            for key in ("contrast_limits", "translate"):
                if key in kwargs and not np.allclose(getattr(layer, key), kwargs[key]):
                    setattr(layer, key, kwargs[key])
            return
        if alive:
            self.viewer.layers.remove(layer)
        self._layers[name] = self.viewer.add_image(data, name=name, **kwargs)
        self._refresh_images()  # our layers are not inputs

    # ------------------------------------------------------------------ selection
    def _select(self, index: tuple):
        was, self._syncing = self._syncing, True
        try:
            self._draw_selection(index)
        finally:
            self._syncing = was

    def _draw_selection(self, index: tuple):
        grid, batched, planes = self._shown
        vectors, colors = _layers.grid_lines(grid, index, planes=planes)
        layer = self._layers.get("patch grid")
        if layer is None or layer not in self.viewer.layers or layer.data.shape[-1] != vectors.shape[-1]:
            if layer is not None and layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
            layer = self.viewer.add_vectors(vectors, edge_color=colors, vector_style="line",
                                            edge_width=_layers.line_width(self._hw),
                                            name="patch grid")
            self._layers["patch grid"] = layer
        else:
            layer.data = vectors
            layer.edge_color = colors
            layer.edge_width = _layers.line_width(self._hw)
        stack = self._layers.get("patches")
        if stack is not None and stack in self.viewer.layers:
            step = list(self.viewer.dims.current_step)
            first = self.viewer.dims.ndim - stack.ndim  # grid axes lead the stack
            for k, i in enumerate(index):
                step[first + k] = i
            if grid.ndim == 3 and planes is None:
                # 3-D patches: the stack's patch-z axis shares the image's z slider; move it to
                # the selected patch's planes so the tile shows the patch, not empty space.
                z0, pz = grid.patch_origin(index)[0], grid.patch_size[0]
                translate = list(stack.translate)
                if translate[-3] != z0:
                    translate[-3] = z0
                    stack.translate = translate
                z = self.viewer.dims.ndim - 3
                if not z0 <= step[z] < z0 + pz:
                    step[z] = z0 + pz // 2
            self.viewer.dims.current_step = tuple(step)

    def _on_index(self, value):
        if not self._syncing and self._grid is not None:
            self._select(self._grid.patch_index(value))

    def _set_index(self, index: tuple):
        flat = int(np.ravel_multi_index(index, self._grid.grid_shape))
        if flat != self.index.value:
            self.index.value = flat  # triggers _on_index -> _select
        else:
            self._select(index)

    def _on_click(self, viewer, event):
        try:
            layer = self.image.value
            if self._grid is None or layer is None or layer not in viewer.layers:
                return
            coords = layer.world_to_data(event.position)
            index = self._grid.patch_at(coords[-self._grid.ndim:])
            if index is not None:
                self._set_index(index)
        except RuntimeError:  # the widget was closed: stop listening
            if self._on_click in viewer.mouse_drag_callbacks:
                viewer.mouse_drag_callbacks.remove(self._on_click)

    def _on_dims(self, event):
        stack = self._layers.get("patches")
        if self._syncing or self._grid is None or stack is None or stack not in self.viewer.layers:
            return
        grid, batched, _ = self._shown
        first = self.viewer.dims.ndim - stack.ndim
        step = self.viewer.dims.current_step[first:first + grid.ndim]
        if len(step) == grid.ndim and all(0 <= i < g for i, g in zip(step, grid.grid_shape)):
            self._syncing = True
            self.index.value = int(np.ravel_multi_index(step, grid.grid_shape))
            self._syncing = False
            self._select(tuple(step))


def _metric_lines(m: dict, ssim: bool = True) -> list[str]:
    return [f"max |err|: {float(m['max_abs']):.3g}   RMSE: {float(m['rmse']):.3g}",
            f"PSNR: {float(m['psnr']):.1f} dB   "
            + (f"SSIM: {float(m['ssim']):.4f}" if ssim else "SSIM: …")]


class _Cancelled(Exception):
    pass


def _lazy_metrics(result, job: Job):
    """Compute a lazy run's metrics (a full pass over the image), given up as soon as a newer
    run starts."""
    import dask
    from dask.callbacks import Callback

    def check(*_):
        if job.cancel.is_set():
            raise _Cancelled

    try:
        with Callback(pretask=check):
            (metrics,) = dask.compute(result.metrics, scheduler="threads")
    except _Cancelled:
        return None
    return {k: float(v) for k, v in metrics.items()}


#: Seconds between progress updates. Each one repaints the widget on the main thread, which
#: slowed a 2048^2 run's computation in the worker from 0.10 to 0.18 s (measured under Xvfb).
PROGRESS_INTERVAL = 0.1


def _throttled(gen, interval: float = PROGRESS_INTERVAL):
    """Re-yield ``gen``'s progress at most every ``interval`` seconds (the first after one
    interval, so short runs show none), ``None`` in between: every batch still yields, so a
    newer run's ``quit()`` stops this one at once. Returns ``gen``'s return value."""
    last = time.perf_counter()
    try:
        while True:
            try:
                value = next(gen)
            except StopIteration as stop:
                return stop.value
            now = time.perf_counter()
            if now - last >= interval:
                last = now
                yield value
            else:
                yield None
    finally:
        gen.close()  # cancelling the worker cancels the run


def _compute(gen, job: Job):
    """Worker body: stream the run (yielding progress), hand over the layers' data, then
    compute the slow SSIM (for a lazy run: every metric) and return it."""
    result = yield from _throttled(gen)
    stack_cls = _layers.LazyPatchStack if job.lazy else _layers.PatchStack
    # What the layers show, made here rather than on the main thread: float32 weights (napari
    # would convert float64 for the GPU there) and the error as displayed.
    error = _layers.error_data(result.error, job.rgb)  # lazy stays lazy
    weights = result.weights if job.lazy else result.weights.astype(np.float32)
    yield ("layers", result, stack_cls(job.image, job.grid, job.batched), weights, error)
    if job.lazy:
        return _lazy_metrics(result, job)
    channel_axis = None if job.grid.channel_axis is None else job.grid.channel_axis + job.batched
    yield ("metrics", compute_metrics(result.merged, result.reference, channel_axis=channel_axis,
                                      ssim=False, error=result.error),
           _layers.error_limit(error))
    # In bands, yielding between them: a newer run's quit() stops a stale SSIM at once
    # instead of letting it compete with the new run for the CPU.
    return (yield from iter_ssim(result.merged, result.reference, channel_axis=channel_axis))
