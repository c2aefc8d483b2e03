"""The Tune panel: sweep the stride, chart seam error, time and patch count; click to apply."""

from __future__ import annotations

from functools import partial

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.qt.threading import create_worker
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from .. import _controller as ctl


class TunePanel(QWidget):
    """Sweeps the explorer's stride for its current image and filter (a centre crop of at most
    ``TUNE_CROP`` px a side), against the filter applied to the whole image."""

    def __init__(self, explorer):
        super().__init__()
        self.explorer = explorer
        self.points: list[ctl.TunePoint] = []
        self._worker = None
        self._generation = 0
        self.figure = Figure(figsize=(4, 4.2), tight_layout=True, facecolor="#262930")
        self.chart = FigureCanvasQTAgg(self.figure)
        self.chart.mpl_connect("pick_event", self._on_pick)
        self.chart.setMinimumSize(280, 340)  # a dock below the explorer must not squash it
        self.sweep_button = QPushButton("Sweep stride")
        self.sweep_button.setToolTip(
            "Run the current patch size, window and filter at several "
            "strides and chart the seams each leaves."
        )
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.status = QLabel("Sweep, then click a point to apply its stride.")
        self.status.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.sweep_button)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(self.progress)
        layout.addWidget(self.chart)
        layout.addWidget(self.status)
        self.sweep_button.clicked.connect(self.sweep)
        self.cancel_button.clicked.connect(self.cancel)

    def sweep(self, *_):
        w = self.explorer
        layer = w.image.value
        if layer is None:
            self.status.setText("Open an image first.")
            return
        self.cancel()
        params = w.params()
        strides = ctl.tune_strides(min(params.patch_size))
        self._generation += 1
        self.points = []
        self.progress.setRange(0, len(strides))
        self.progress.setValue(0)
        data = layer.data[0] if layer.multiscale else layer.data
        worker = create_worker(
            ctl.sweep,
            data,
            params,
            bool(layer.rgb),
            strides,
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.yielded.connect(partial(self._on_point, self._generation))
        worker.errored.connect(partial(self._on_error, self._generation))
        worker.finished.connect(partial(self._on_finished, self._generation))
        self._worker = worker
        self.cancel_button.setEnabled(True)
        self.status.setText("Sweeping…")
        worker.start()

    def cancel(self, *_):
        if self._worker is not None:
            self._worker.quit()
        self._generation += 1
        self.cancel_button.setEnabled(False)

    def _on_point(self, generation, point):
        if generation != self._generation:
            return
        self.points.append(point)
        self.progress.setValue(len(self.points))
        self.draw()

    def _on_error(self, generation, exc):
        if generation == self._generation:
            self.status.setText(f"⚠ {exc}")

    def _on_finished(self, generation):
        if generation == self._generation:
            self.cancel_button.setEnabled(False)
            self.status.setText("Click a point to apply its stride.")

    def draw(self):
        """Seam error (RMSE, max |error|) and cost (time, patches) against the stride."""
        fig = self.figure
        fig.clear()
        pts = sorted(self.points, key=lambda p: p.stride)
        s = [p.stride for p in pts]
        style = dict(color="#d0d0d0", fontsize=8)
        err = fig.add_subplot(2, 1, 1)
        err.plot(s, [p.rmse for p in pts], "o-", color="#ff6ec7", label="RMSE", picker=6)
        err.plot(s, [p.max_abs for p in pts], "s--", color="#7cff8a", label="max |error|", picker=6)
        err.set_ylabel("seam error vs whole-image filter", **style)
        values = [v for p in pts for v in (p.rmse, p.max_abs) if v > 0]
        if values and max(values) > 10 * min(values):
            # RMSE sits far below max |error|: on a linear axis it was a flat line at zero.
            err.set_yscale("symlog", linthresh=min(values))
        err.legend(fontsize=7)
        cost = fig.add_subplot(2, 1, 2, sharex=err)
        cost.plot(s, [p.seconds * 1e3 for p in pts], "o-", color="#ffd24a", picker=6)
        cost.set_ylabel("compute time (ms)", **style)
        cost.set_xlabel("stride (px)  —  click a point to apply it", **style)
        count = cost.twinx()
        count.plot(s, [p.n_patches for p in pts], ":", color="#6ecbff")
        count.set_ylabel("patches (dotted)", **style)
        for ax in (err, cost, count):
            ax.set_facecolor("#1e1f24")
            ax.tick_params(colors="#d0d0d0", labelsize=7)
        self.chart.draw_idle()

    def _on_pick(self, event):
        strides = sorted(p.stride for p in self.points)
        if len(event.ind):
            self.apply(strides[int(event.ind[0])])

    def apply(self, stride: int):
        """Set the explorer's stride (live preview then re-runs)."""
        self.explorer.stride.value = int(stride)
        self.status.setText(f"Applied stride {stride}.")
