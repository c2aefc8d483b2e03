"""Render the Patch Explorer in the states a user sees, one PNG each (run under Xvfb).

xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/gui_states.py benchmarks/figures
"""

import sys
from pathlib import Path

import napari
from qtpy.QtCore import QEventLoop, QTimer

STATES = {
    "empty": dict(sample=None),
    "classic-otsu": dict(sample="classic", filter="otsu"),
    "classic-sobel": dict(sample="classic", filter="sobel", reference="filter"),
    "noisy-median": dict(sample="noisy", filter="median", reference="filter", window="hann"),
    "rgb": dict(sample="rgb", filter="gaussian", window="hann"),
    "volume": dict(sample="volume", filter="gaussian", reference="filter", patch=16, stride=12),
    "volume-3d": dict(
        sample="volume", filter="gaussian", reference="filter", patch=16, stride=12, ndisplay=3
    ),
    "error-memory": dict(sample="classic", patch=8, stride=1, max_bytes=1000),
    "stride1": dict(sample="noisy", patch=32, stride=1, run=True),
    "tune": dict(sample="noisy", filter="median", reference="filter", window="hann", tune=True),
}


def wait(signal, ms=60_000):
    loop = QEventLoop()
    signal.connect(loop.quit)
    QTimer.singleShot(ms, loop.quit)
    loop.exec_() if hasattr(loop, "exec_") else loop.exec()


def render(
    name,
    sample=None,
    filter="identity",
    reference="input",
    window="uniform",
    patch=32,
    stride=16,
    max_bytes=None,
    run=False,
    tune=False,
    ndisplay=2,
    out=Path("."),
):
    from patch_viewer import _controller

    viewer = napari.Viewer()
    viewer.window.resize(1500, 900)
    if sample:
        viewer.open_sample("patch-viewer", sample)
    _, w = viewer.window.add_plugin_dock_widget("patch-viewer", "Patch Explorer")
    w.live.value = False
    if max_bytes:
        _controller.GUI_MAX_BYTES = max_bytes
    if sample:
        w.patch_size.value = patch
        w.stride.value = stride
        w.filter.value = filter
        w.window.value = window
        w.reference.value = reference
        idle = []  # the public signal: results, metrics and SSIM shown, or an error
        w.signals.idle.connect(lambda: idle.append(True))
        w.run()
        if not idle:
            wait(w.signals.idle)
    _controller.GUI_MAX_BYTES = 2 * 2**30
    viewer.dims.ndisplay = ndisplay
    if tune:
        panel = w.open_tune()
        done = []
        panel.progress.valueChanged.connect(
            lambda v: done.append(v) if v == panel.progress.maximum() else None
        )
        panel.sweep()
        napari.qt.get_qapp().processEvents()
        while not done:
            wait(panel.progress.valueChanged, 5_000)
    for _ in range(5):
        napari.qt.get_qapp().processEvents()
    viewer.screenshot(str(out / f"state-{name}.png"), canvas_only=False, flash=False)
    viewer.close()


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/figures")
    out.mkdir(parents=True, exist_ok=True)
    names = sys.argv[2:] or list(STATES)
    for name in names:
        render(name, out=out, **STATES[name])
        print("wrote", out / f"state-{name}.png")
