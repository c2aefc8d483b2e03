"""Patch Explorer responsiveness, in the real app (run under a display or Xvfb):

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/bench_gui.py

Prints the time from a parameter change (live preview on: no debounce, the run starts at once)
to the layers' data being set (worker + layer updates, before the canvas redraw), and the redraw
that follows, separately, for 512^2, 2048^2 and 4096^2 float32 images with the identity and a
Gaussian filter (patch 64, stride 32 and 31 in turn), and the time to redraw the `patch grid`
layer at 10^3, 10^4 and 10^5 patches. Medians over repeats. "idle": each change comes after the
previous run has finished (metrics and SSIM included); "back to back": right after the previous
run's layers showed, while its metrics and SSIM still run (a newer run stops them at their next
step).
"""

from __future__ import annotations

import statistics
import time

import napari
import numpy as np
from qtpy.QtCore import QEventLoop
from qtpy.QtWidgets import QApplication
from superqt.utils._qthreading import WorkerBase


def settle(seconds: float = 0.2):
    """Process events for ``seconds``: the redraws that the previous run's metrics queued
    (the error tile's new limits) happen here, not inside the next measurement."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        QApplication.processEvents()
        time.sleep(0.005)


def wait_computed(widget):
    loop = QEventLoop()
    widget.signals.computed.connect(loop.quit)
    widget.signals.failed.connect(loop.quit)
    loop.exec_()
    widget.signals.computed.disconnect(loop.quit)
    widget.signals.failed.disconnect(loop.quit)


def main(repeats: int = 5, sides=(512, 2048, 4096)):
    from patch_viewer import _controller

    # Live preview holds back runs estimated over WARN_SECONDS (4096^2 at stride 31 is one):
    # the benchmark measures the run itself.
    _controller.WARN_SECONDS = float("inf")
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 900)
    rng = np.random.default_rng(0)
    print(
        "| image | filter | patches | change -> layers set (ms): idle | back to back | "
        "redraw (ms) |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for side in sides:
        viewer.layers.clear()
        viewer.add_image(rng.random((side, side), dtype=np.float32), name=f"{side}")
        _, w = viewer.window.add_plugin_dock_widget("patch-viewer", "Patch Explorer")
        w.live.value = False
        w.image.reset_choices()
        w.patch_size.set_value([64])
        for name in ("identity", "gaussian"):
            w.filter.value = name
            medians, redraws = [], []
            w.live.value = True
            for idle in (True, False):
                times = []
                for k in range(repeats + 1):
                    if idle:  # the previous run's metrics and SSIM have finished, and drawn
                        WorkerBase.await_workers(60_000)
                        settle()
                    t0 = time.perf_counter()
                    w.stride.set_value([31 if k % 2 == 0 else 32])  # live preview starts it
                    wait_computed(w)
                    t1 = time.perf_counter()
                    QApplication.processEvents()  # the redraw
                    if k:  # first run warms caches and creates the layers
                        times.append(t1 - t0)
                        redraws.append(time.perf_counter() - t1)
                medians.append(statistics.median(times) * 1e3)
            w.live.value = False
            print(
                f"| {side}x{side} | {name} | {w.grid.n_patches:,} | {medians[0]:.0f} | "
                f"{medians[1]:.0f} | {statistics.median(redraws) * 1e3:.0f} |"
            )
        viewer.window.remove_dock_widget("all")
    print("\n| patches | segments drawn | patch grid redraw (ms) |")
    print("|---:|---:|---:|")
    viewer.layers.clear()
    viewer.add_image(np.zeros((1000, 1000), np.float32), name="grid")
    _, w = viewer.window.add_plugin_dock_widget("patch-viewer", "Patch Explorer")
    w.live.value = False
    w.image.reset_choices()
    w.filter.value = "identity"
    for stride in (32, 10, 3):  # about 10^3, 10^4, 10^5 patches
        w.patch_size.set_value([16])
        w.stride.set_value([stride])
        w.run()
        wait_computed(w)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            w.index.value = (w.index.value + 977) % (w.index.max + 1)  # redraws the grid
            QApplication.processEvents()
            times.append(time.perf_counter() - t0)
        print(
            f"| {w.grid.n_patches:,} | {len(viewer.layers['patch grid'].data):,} | "
            f"{statistics.median(times) * 1e3:.1f} |"
        )
    WorkerBase.await_workers(10_000)  # SSIM may still be on its way; let it land first
    viewer.close()


if __name__ == "__main__":
    import sys

    main(sides=tuple(int(a) for a in sys.argv[1:]) or (512, 2048, 4096))
