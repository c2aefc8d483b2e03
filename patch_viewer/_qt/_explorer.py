"""Patch Explorer dock widget: controls -> :mod:`.._controller` job -> worker -> :class:`Canvas`."""

from __future__ import annotations

import contextlib
from functools import partial

import napari
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QSizePolicy

from .. import _controller as ctl
from ..core import EDGE_MODES, FILTERS, PAD_MODES, REDUCTIONS, WINDOWS, warm_up
from ..core.warmup import is_warm
from ._axis import AxisInts
from ._canvas import Canvas
from ._selection import Selection
from ._support import HINT, TIPS, ExplorerSignals, Undocked, set_progress


class PatchExplorer(Container):
    """Dock widget: patch size/stride, edge, window, filter -> grid, weights, merged, error."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        self.viewer = napari_viewer
        self.canvas = Canvas(napari_viewer)
        t = TIPS
        self.image = ComboBox(choices=self._image_choices, label="image", tooltip=t["image"])
        self.patch_size = AxisInts("patch size", 32, tooltip=t["patch_size"])
        self.stride = AxisInts("stride", 16, tooltip=t["stride"])
        self.edge = ComboBox(choices=EDGE_MODES, value="shift", label="edge", tooltip=t["edge"])
        self.pad_mode = ComboBox(
            choices=PAD_MODES, value="reflect", label="pad mode", tooltip=t["pad_mode"]
        )
        self.volume_mode = ComboBox(
            choices=ctl.VOLUME_MODES,
            value=ctl.VOLUME_MODES[0],
            label="3-D",
            tooltip=t["volume_mode"],
        )
        self.window = ComboBox(
            choices=WINDOWS, value="uniform", label="window", tooltip=t["window"]
        )
        self.sigma = FloatSpinBox(
            value=0.125,
            min=0.01,
            max=10.0,
            step=0.025,
            label="window σ (× patch)",
            tooltip=t["sigma"],
        )
        self.sigma.native.setDecimals(3)
        self.sigma.value = 0.125  # set again: magicgui rounded it to 2 decimals
        self.reduce = ComboBox(
            choices=REDUCTIONS, value="mean", label="reduce", tooltip=t["reduce"]
        )
        self.filter = ComboBox(
            choices=[*FILTERS, ctl.CUSTOM], value="identity", label="filter", tooltip=t["filter"]
        )
        self.custom = LineEdit(value="", label="function", tooltip=t["custom"])
        self.custom.native.setPlaceholderText("package.module:function")
        self.filter_params = Container(labels=True)
        self.reference = ComboBox(
            choices=[("input image", "input"), ("filter on whole image", "filter")],
            value="input",
            label="error vs",
            tooltip=t["reference"],
        )
        self.live = CheckBox(value=True, text="live preview", tooltip=t["live"])
        self.run_button = PushButton(text="Run", tooltip=t["run"])
        self.cancel_button = PushButton(text="Cancel", tooltip=t["cancel"], enabled=False)
        self.copy_python = PushButton(text="Copy as Python", tooltip=t["copy_python"])
        self.copy_command = PushButton(text="Copy as command", tooltip=t["copy_command"])
        self.tune_button = PushButton(text="Tune…", tooltip=t["tune"])
        buttons = Container(
            widgets=[self.run_button, self.cancel_button], layout="horizontal", labels=False
        )
        copies = Container(
            widgets=[self.copy_python, self.copy_command, self.tune_button],
            layout="horizontal",
            labels=False,
        )
        self.index = SpinBox(value=0, min=0, max=0, label="patch index", tooltip=t["index"])
        self.progress = ProgressBar(value=0, min=0, max=1000, label="progress")
        self.readout = Label(value=HINT)
        super().__init__(
            widgets=[
                self.image,
                self.patch_size,
                self.stride,
                self.edge,
                self.pad_mode,
                self.volume_mode,
                self.window,
                self.sigma,
                self.reduce,
                self.filter,
                self.custom,
                self.filter_params,
                self.reference,
                self.live,
                buttons,
                copies,
                self.index,
                self.progress,
                self.readout,
            ]
        )
        self._style_readout()
        self.signals = ExplorerSignals()
        self.buffers = ctl.Buffers()  # image-sized arrays reused from run to run
        self._generation = 0
        self._worker = None
        self._running = False  # the current generation's worker has not finished
        self._busy_shown = False  # the current run shows progress (it outlasted 150 ms)
        self._job = None
        self._lines: list[str] = []
        self._timer = QTimer()  # interval 0: coalesces the changes of one event-loop turn
        self._timer.setSingleShot(True)
        self._timer.setInterval(0)
        self._timer.timeout.connect(partial(self.run, auto=True))
        # A run that outlasts this shows that it runs (stale metrics, progress, Cancel). A
        # quicker one changes no widget before its layers: under software OpenGL every widget
        # repaint composes the whole window, which the worker then waits for.
        self._busy_timer = QTimer()
        self._busy_timer.setSingleShot(True)
        self._busy_timer.setInterval(ctl.SHOW_BUSY_AFTER_MS)
        self._busy_timer.timeout.connect(self._show_busy)
        for w in (
            self.patch_size,
            self.stride,
            self.edge,
            self.pad_mode,
            self.window,
            self.sigma,
            self.reduce,
            self.reference,
        ):
            w.changed.connect(self._on_param)
        self.custom.changed.connect(self._on_custom)
        self.volume_mode.changed.connect(self._on_image)
        self.filter.changed.connect(self._on_filter)
        self.image.changed.connect(self._on_image)
        self.run_button.changed.connect(lambda *_: self.run())
        self.cancel_button.changed.connect(lambda *_: self.cancel())
        self.live.changed.connect(self._on_param)
        self.copy_python.changed.connect(lambda *_: self._copy(self.to_python()))
        self.copy_command.changed.connect(lambda *_: self._copy(self.to_command()))
        self.tune_button.changed.connect(lambda *_: self.open_tune())
        self.tune = None
        self.selection = Selection(self)
        self.native.destroyed.connect(self._teardown)
        self._undocked = Undocked(self._teardown)
        self.native.installEventFilter(self._undocked)
        self._on_filter()
        self._on_image()
        # Load the compiled kernels off the main thread now, so the first run does not wait
        # on numba's start-up (about 0.3 s from its cache, seconds when it compiles); once a
        # process is warm, later docks start no thread.
        self.warm = None if is_warm() else create_worker(warm_up)
        if self.warm is not None:
            self.warm.start()

    def _style_readout(self):
        native = self.readout.native
        native.setWordWrap(True)  # a long message wraps instead of widening the dock
        native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Minimum)
        native.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        native.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        native.setMinimumHeight(6 * native.fontMetrics().lineSpacing())
        native.setMinimumWidth(0)
        native.setMaximumWidth(16777215)

    def _teardown(self, *_):
        """The dock was closed: drop pending work and stop listening to the viewer."""
        self._generation += 1
        for step in [
            self._timer.stop,
            lambda: self._worker is not None and self._worker.quit(),
            self.selection.teardown,
        ]:
            with contextlib.suppress(RuntimeError, ValueError):
                step()

    def _image_choices(self, _widget=None):
        """The viewer's image layers, less the ones this widget made."""
        ours = {layer.unique_id for layer in self.canvas.layers.values()}
        return [
            (layer.name, layer)
            for layer in self.viewer.layers
            if isinstance(layer, napari.layers.Image) and layer.unique_id not in ours
        ]

    @property
    def grid(self):
        """The :class:`~patch_viewer.PatchGrid` of the results on screen (None before any)."""
        return self.canvas.grid

    def click(self, position) -> None:
        """Select the patch at world ``position``, as a click on the canvas does."""
        from types import SimpleNamespace

        self.selection._on_click(self.viewer, SimpleNamespace(position=tuple(position)))

    def _source_path(self):
        layer = self.image.value
        path = getattr(getattr(layer, "source", None), "path", None)
        return str(path) if path else None

    def to_python(self) -> str:
        """A snippet reproducing the current result with ``pv.process`` (bound to ``result``)."""
        layer = self.image.value
        return ctl.to_python(
            self.params(), rgb=bool(layer.rgb), path=self._source_path(), layer=layer.name
        )

    def to_command(self, output: str = "results") -> str:
        """A ``patch-viewer process`` line reproducing the current result."""
        return ctl.to_command(self.params(), path=self._source_path(), output=output)

    def open_tune(self):
        """Dock the Tune panel (once) and return it."""
        if self.tune is None:
            from ._tune import TunePanel

            self.tune = TunePanel(self)
            # A tab beside the explorer: stacked below it, the chart would grow the window.
            self.viewer.window.add_dock_widget(self.tune, name="Tune", area="right", tabify=True)
        return self.tune

    def _copy(self, text: str):
        from qtpy.QtWidgets import QApplication

        QApplication.clipboard().setText(text)

    # ------------------------------------------------------------------ parameters
    def _on_param(self, *_):
        self.pad_mode.visible = self.edge.value == "pad"
        self.sigma.visible = self.window.value == "gaussian"
        if self.live.value:
            self._timer.start()
        else:
            self._timer.stop()  # turning live preview off drops the pending run

    def _on_custom(self, *_):
        if self.filter.value == ctl.CUSTOM:
            self._on_param()

    def _on_filter(self, *_):
        self.filter_params.clear()
        custom = self.filter.value == ctl.CUSTOM
        self.custom.visible = custom
        declared = {} if custom else FILTERS[self.filter.value].params
        for name, p in declared.items():
            cls = SpinBox if p.kind is int else FloatSpinBox
            w = cls(
                value=p.default,
                min=p.min,
                max=p.max,
                name=name,
                label=f"filter {name}",
                tooltip=p.doc,
            )
            if cls is FloatSpinBox:
                w.native.setDecimals(3)
                w.value = p.default
            w.changed.connect(self._on_param)
            self.filter_params.append(w)
        self.filter_params.visible = len(self.filter_params) > 0
        self._on_param()

    def _on_image(self, *_):
        layer = self.image.value
        self.volume_mode.visible = False
        if layer is not None:
            nd = layer.data.ndim - (1 if layer.rgb else 0)
            self.volume_mode.visible = nd == 3
            spatial = 2 if nd == 3 and self.volume_mode.value != ctl.VOLUME_MODES[0] else min(nd, 3)
            self.patch_size.set_axes(spatial)
            self.stride.set_axes(spatial)
        self._on_param()

    def params(self) -> ctl.Params:
        """The current settings."""
        return ctl.Params(
            tuple(self.patch_size.value),
            tuple(self.stride.value),
            self.edge.value,
            self.pad_mode.value,
            self.volume_mode.value == ctl.VOLUME_MODES[1],
            self.window.value,
            float(self.sigma.value),
            self.reduce.value,
            self.filter.value,
            {w.name: w.value for w in self.filter_params},
            self.reference.value,
            self.custom.value,
        )

    def make_job(self) -> ctl.Job:
        layer = self.image.value
        data = layer.data[0] if layer.multiscale else layer.data  # full resolution
        return ctl.make_job(data, bool(layer.rgb), layer.contrast_limits, self.params())

    # ------------------------------------------------------------------ running
    @property
    def busy(self) -> bool:
        """Whether a run is pending or running (results, metrics or SSIM still to come);
        ``signals.idle`` is emitted when this turns False."""
        return self._running or self._timer.isActive()

    def _settle(self):
        """Nothing of the current generation is left running: say so, unless a newer
        change is already scheduled."""
        self._running = False
        self._busy_timer.stop()
        if not self.busy:
            self.signals.idle.emit()

    def run(self, *_, auto: bool = False):
        """Start a run with the current parameters; a newer run makes older results stale.
        ``auto`` (live preview) holds back runs estimated over ``WARN_SECONDS``."""
        if self.image.value is None:
            self._message(HINT)
            self._settle()
            return
        self.buffers.reclaim(self.canvas.arrays())
        job = None
        try:
            job = self.make_job()
            gen = ctl.start(job, self.buffers.lend(job))
        except (ValueError, TypeError, MemoryError) as exc:
            if job is not None:
                self.buffers.finished(job)  # nothing writes them
            self._stop()  # what runs now is for older settings
            self._generation += 1
            self._fail(str(exc), toast=False)
            self._settle()
            return
        if auto and not job.lazy and job.estimated_seconds > ctl.WARN_SECONDS:
            self.buffers.finished(job)  # the run does not start
            self._stop()  # what runs now is for older settings
            self._generation += 1
            self._message(
                f"This run is estimated at about {job.estimated_seconds:.0f} s "
                f"({job.grid.n_patches:,} patches): press Run to start it, or raise "
                f"the stride.",
                warn=True,
            )
            self._settle()
            return
        self._stop()
        self._generation += 1
        self._job = job
        worker = create_worker(ctl.compute, gen, job, _start_thread=False, _ignore_errors=True)
        g = self._generation
        worker.yielded.connect(partial(self._on_yielded, g, job))
        worker.returned.connect(partial(self._on_ssim, g))
        worker.errored.connect(partial(self._on_error, g))
        worker.finished.connect(partial(self._on_finished, g))
        worker.finished.connect(partial(self.buffers.finished, job))  # stale ones too
        self._worker = worker
        self._running, self._busy_shown = True, False
        worker.start()
        self._busy_timer.start()
        self.signals.started.emit(job)

    def _stop(self):
        if self._job is not None:
            self._job.cancel.set()  # stops a lazy metrics pass at its next task
        if self._worker is not None:
            self._worker.quit()

    def cancel(self):
        """Stop the running job; the layers keep the last finished run."""
        self._stop()
        self._generation += 1
        self._busy_timer.stop()
        self.cancel_button.enabled = False
        set_progress(self.progress, 0)
        self._message(
            "Cancelled. "
            + ("The layers show the last finished run." if self.canvas.grid is not None else "")
        )
        self.signals.finished.emit()
        self._settle()

    def _show_busy(self):
        """The run is taking a while: mark the metrics stale, show progress and Cancel."""
        if not self._running:
            return
        self._busy_shown = True
        set_progress(self.progress, 0)
        self.progress.label = "progress"
        self.cancel_button.enabled = True
        if self._lines:
            self.readout.value = "\n".join(["(updating…)"] + self._lines)
            self.readout.native.setStyleSheet("color: gray")

    def _on_yielded(self, generation, job, value):
        if generation != self._generation or value is None:
            return
        if isinstance(value, ctl.Progress):
            if not self._busy_shown:  # a quick run shows no progress (see _busy_timer)
                return
            set_progress(self.progress, int(1000 * value.done / max(value.total, 1)))
            eta = value.eta
            self.progress.label = "progress" if eta is None else f"{eta:.0f} s left"
        elif isinstance(value, ctl.Shown):
            self._busy_timer.stop()
            self.selection.show(job, value)  # the layers first, then the widgets
            self._lines = ctl.summary_lines(job, value.result)
            self._message("\n".join(self._lines))
            self.signals.computed.emit(value.result)
            if self._busy_shown:  # only if it showed (see _busy_timer)
                set_progress(self.progress, self.progress.max)
                self.progress.label = "progress"
        elif isinstance(value, ctl.Metrics):
            self._on_metrics(value.values, value.error_limit)

    def _on_metrics(self, m: dict, limit: float, ssim: bool = False):
        if not self._lines:
            return
        self._lines[-2:] = ctl.metric_lines(m, ssim=ssim)
        self._message("\n".join(self._lines))
        span = abs(self._job.limits[1] - self._job.limits[0]) if self._job else 1.0
        self.canvas.set_error_limit(limit, span)

    def _on_ssim(self, generation, value):
        if generation != self._generation or not self._lines or value is None:
            return
        if isinstance(value, dict):  # a lazy run: every metric arrives now
            self._on_metrics(value, value["max_abs"], ssim=True)
            value = value["ssim"]
        else:
            self._lines[-1] = self._lines[-1].replace("SSIM: …", f"SSIM: {value:.4f}")
        self._message("\n".join(self._lines))
        self.signals.ssim_computed.emit(value)

    def _on_error(self, generation, exc):
        if generation == self._generation:
            self._fail(f"{type(exc).__name__}: {exc}", toast=True)

    def _on_finished(self, generation):
        if generation == self._generation:
            self.cancel_button.enabled = False
            if self._lines and self.progress.value != self.progress.max:
                set_progress(self.progress, self.progress.max)  # done; after the layers
            self.signals.finished.emit()
            self._settle()

    def _message(self, text: str, warn: bool = False):
        self.readout.value = text
        self.readout.native.setStyleSheet("color: #ffb050" if warn else "")

    def _fail(self, message: str, toast: bool):
        self.readout.value = f"⚠ {message}"
        self.readout.native.setStyleSheet("color: #ff7070")
        if toast:  # unexpected errors only; parameter problems show in the read-out
            show_error(f"Patch Explorer: {message}")
        self.signals.failed.emit(message)
