"""Small pieces of the explorer's view: texts, signals, the undock watcher."""

from __future__ import annotations

from qtpy.QtCore import QEvent, QObject, Signal

HINT = "Open an image to start (File ▸ Open Sample ▸ Patch Viewer), then pick it above."
TIPS = {
    "image": "The image layer to cut into patches.",
    "patch_size": "Patch size in pixels, per axis.",
    "stride": "Step between patch origins; smaller than the patch size means overlap.",
    "edge": "What to do where the last patch would overrun the image: shift it back, pad "
    "the image, or drop the remainder.",
    "pad_mode": "How the image is padded when edge = pad.",
    "volume_mode": "Cut a 3-D image into 3-D patches, or each plane into 2-D patches.",
    "window": "Blending window: how much each patch pixel counts where patches overlap.",
    "sigma": "Width of the gaussian window as a fraction of the patch size.",
    "reduce": "How overlapping patch values are combined.",
    "filter": "Filter applied to every patch on its own: the built-in ones, those other "
    "packages contribute (entry-point group patch_viewer.filters), or a custom "
    "function.",
    "custom": "A model or function run on each batch of patches, by its import path "
    "(package.module:function; imported, never evaluated). It gets (N, *patch[, C]) "
    "and may return another number of channels (class probabilities), dtype or "
    "resolution.",
    "reference": "What the error compares the merged image with. 'filter on whole image' "
    "shows the seams that patch-wise filtering leaves. In the 3-D view the "
    "error tile shows |error| as a maximum-intensity projection (a projection of "
    "the signed error would hide where the merged image is below the reference); "
    "the 2-D view shows its sign.",
    "live": "Re-run at once whenever a control changes.",
    "run": "Run now (also runs long jobs that live preview holds back).",
    "cancel": "Stop the running job.",
    "copy_python": "Copy a Python snippet that reproduces this result (pv.process).",
    "copy_command": "Copy a `patch-viewer process` command line that reproduces this result.",
    "tune": "Open a chart of seam error, time and patch count against the stride.",
    "index": "Flat index of the selected patch (click the image to pick one).",
}


class ExplorerSignals(QObject):
    """``started(job)``, ``computed(result)`` once the layers show a run, ``ssim_computed``,
    ``failed(message)``, ``finished()`` when the worker is done or cancelled, and ``idle()``
    once nothing is running or pending: the layers and the read-out show everything there is
    to show (a finished run with its metrics and SSIM, an error, a held-back or cancelled run,
    or the hint of an empty viewer). Scripts and the launcher wait on ``idle``."""

    started = Signal(object)
    computed = Signal(object)
    ssim_computed = Signal(float)
    failed = Signal(str)
    finished = Signal()
    idle = Signal()


class Undocked(QObject):
    """Calls ``callback`` when the watched widget loses its parent: napari's
    ``remove_dock_widget`` un-parents the widget without deleting it, and a closed explorer
    must stop listening to the viewer."""

    def __init__(self, callback):
        super().__init__()
        self._callback = callback

    def eventFilter(self, obj, event):
        if event.type() == QEvent.Type.ParentChange and obj.parent() is None:
            self._callback()
        return False


def set_progress(bar, value: int) -> None:
    """Set a magicgui ``ProgressBar``'s value with a queued repaint.

    ``QProgressBar.setValue`` repaints at once (synchronously); in a window with napari's
    OpenGL canvas, under software rendering, each such repaint composes the whole window
    (~90 ms measured at 2048², in the slot that shows a run's layers). With updates off while
    the value changes, the paint is queued and merged with the canvas' next one.
    """
    native = bar.native
    native.setUpdatesEnabled(False)
    try:
        bar.value = value
    finally:
        native.setUpdatesEnabled(True)
    native.update()
