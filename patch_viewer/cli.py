"""`patch-viewer`: open napari with an image, the Patch Explorer docked and the result computed.

    patch-viewer [IMAGE] [--patch-size N [N ...]] [--stride N [N ...]] [--filter NAME]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ._sample_data import read_array
from .core import FILTERS, WINDOWS


def read_image(path: str) -> np.ndarray:
    """Read a NumPy .npy, TIFF, PNG or JPEG file, with a clear error for anything else."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"patch-viewer: no such file: {path}")
    try:
        return read_array(p)
    except Exception as exc:  # any reader failure becomes one clear message
        raise SystemExit(f"patch-viewer: cannot read {path}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="patch-viewer",
        description="Open napari with an image (default: the classic 100x100 sample), the "
                    "Patch Explorer docked and the result computed.")
    ap.add_argument("image", nargs="?", help="image file (.npy, .tif, .png, .jpg)")
    ap.add_argument("--patch-size", type=int, nargs="+", metavar="N",
                    help="patch size (one value, or one per spatial axis); default 39 for the "
                         "sample, 32 otherwise")
    ap.add_argument("--stride", type=int, nargs="+", metavar="N",
                    help="stride (one value or one per axis); default 1 for the sample, 16 otherwise")
    ap.add_argument("--filter", choices=sorted(FILTERS), default="identity",
                    help="per-patch filter (default identity)")
    ap.add_argument("--window", choices=WINDOWS, default="uniform", help="blending window")
    ap.add_argument("--screenshot", metavar="PNG",
                    help="render the window to this PNG once computed, then exit")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    data = read_image(args.image) if args.image else None
    import napari

    viewer = napari.Viewer(title="patch_viewer")
    if data is None:
        viewer.open_sample("patch-viewer", "classic")
        size, stride = args.patch_size or [39], args.stride or [1]
    else:
        rgb = data.ndim == 3 and data.shape[-1] in (3, 4)
        viewer.add_image(data, name=Path(args.image).stem, rgb=rgb)
        size, stride = args.patch_size or [32], args.stride or [16]
    _, widget = viewer.window.add_plugin_dock_widget("patch-viewer", "Patch Explorer")
    widget.live.value = False  # set everything, then run once
    try:
        widget.patch_size.set_value(size)
        widget.stride.set_value(stride)
    except ValueError as exc:
        viewer.close()
        raise SystemExit(f"patch-viewer: {exc}") from None
    widget.filter.value = args.filter
    widget.window.value = args.window
    with widget.live.changed.blocked():  # live preview on, without scheduling a second run
        widget.live.value = True
    widget.run()
    if args.screenshot:
        viewer.window.resize(1500, 900)
        _screenshot_when_done(viewer, widget, args.screenshot)
    napari.run()
    return 0


def _screenshot_when_done(viewer, widget, path):
    from qtpy.QtCore import QTimer

    def shoot():
        if widget._worker is not None and widget._worker.is_running:
            QTimer.singleShot(200, shoot)
            return
        viewer.screenshot(path, canvas_only=False, flash=False)
        print(f"saved {path}")
        viewer.close()

    QTimer.singleShot(800, shoot)


if __name__ == "__main__":
    sys.exit(main())
