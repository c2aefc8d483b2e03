"""`patch-viewer`: open napari with an image, the Patch Explorer docked and the result computed;
or, with the ``process`` subcommand, run many files through the core in batch (no napari).

    patch-viewer [IMAGE] [--patch-size N [N ...]] [--stride N [N ...]] [--filter NAME]
    patch-viewer process INPUT... -o OUTPUT [--patch-size ...] [--stride ...] [--filter ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .core import EDGE_MODES, FILTERS, PAD_MODES, REDUCTIONS, REFERENCES, WINDOWS


def read_image(path: str):
    """Read a NumPy .npy, TIFF, PNG or JPEG file, with a clear error for anything else; a zarr
    folder opens lazily (a dask array: the Patch Explorer then keeps its results lazy)."""
    p = Path(path)
    from . import io

    if io.is_zarr_dir(p):
        try:
            return io.probe(p).lazy(1024)
        except io.ImageError as exc:
            raise SystemExit(f"patch-viewer: {exc}") from None
    if not p.is_file():
        raise SystemExit(f"patch-viewer: no such file: {path}")
    try:
        return io.read_image(p)
    except io.ImageError as exc:
        raise SystemExit(f"patch-viewer: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="patch-viewer",
        description="Open napari with an image (default: the classic 100x100 sample), the "
        "Patch Explorer docked and the result computed.",
        epilog="Batch processing without a window: patch-viewer process --help",
    )
    ap.add_argument(
        "image",
        nargs="?",
        help="image file (.npy, .tif, .png, .jpg), or a .zarr folder (opened lazily)",
    )
    ap.add_argument(
        "--patch-size",
        type=int,
        nargs="+",
        metavar="N",
        help="patch size (one value, or one per spatial axis); default 39 for the "
        "sample, 32 otherwise",
    )
    ap.add_argument(
        "--stride",
        type=int,
        nargs="+",
        metavar="N",
        help="stride (one value or one per axis); default 1 for the sample, 16 otherwise",
    )
    ap.add_argument(
        "--filter",
        choices=sorted(FILTERS),
        default="identity",
        help="per-patch filter (default identity)",
    )
    ap.add_argument("--window", choices=WINDOWS, default="uniform", help="blending window")
    ap.add_argument(
        "--screenshot", metavar="PNG", help="render the window to this PNG once computed, then exit"
    )
    return ap


def _bytes(text: str) -> int:
    """``--max-memory``: a size such as 2GiB or 500MB (``dask.utils.parse_bytes``)."""
    from .core.checks import parse_max_bytes

    try:
        return parse_max_bytes(text, "--max-memory")
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _param(text: str):
    name, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return name.strip(), float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_process_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="patch-viewer process",
        description="Cut every input image into overlapping patches, filter each patch, merge "
        "them back, and write the merged images (and, on request, error maps and a "
        "CSV of metrics). Prints the plan first; shows progress with rate and ETA.",
    )
    ap.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files (.tif, .png, .jpg, .npy, .zarr) or folders of them",
    )
    ap.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        metavar="OUTPUT",
        help="folder for the results (created if missing)",
    )
    ap.add_argument(
        "--patch-size",
        type=_positive,
        nargs="+",
        default=[32],
        metavar="N",
        help="patch size, one value or one per spatial axis (default 32)",
    )
    ap.add_argument(
        "--stride",
        type=_positive,
        nargs="+",
        default=[16],
        metavar="N",
        help="stride, one value or one per spatial axis (default 16)",
    )
    ap.add_argument("--edge", choices=EDGE_MODES, default="shift")
    ap.add_argument("--pad-mode", choices=PAD_MODES, default="reflect")
    ap.add_argument(
        "--channel-axis",
        default="auto",
        metavar="AXIS",
        help="axis holding channels: auto (RGB(A) images: last), none, or an integer",
    )
    ap.add_argument(
        "--filter",
        choices=sorted(FILTERS),
        default="identity",
        help="per-patch filter (default identity)",
    )
    ap.add_argument(
        "--param",
        type=_param,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="filter parameter, e.g. --param sigma=2 (repeatable)",
    )
    ap.add_argument("--window", choices=WINDOWS, default="uniform", help="blending window")
    ap.add_argument(
        "--window-sigma",
        type=float,
        metavar="S",
        help="sigma of the gaussian window, as a fraction of the patch size",
    )
    ap.add_argument("--reduce", choices=REDUCTIONS, default="mean")
    ap.add_argument(
        "--reference",
        choices=REFERENCES,
        default="input",
        help="what errors are measured against (default: the input image)",
    )
    ap.add_argument(
        "--dtype",
        choices=("auto", "input", "float32", "float64"),
        default="auto",
        help="merged image dtype. auto (default): the input's, integers rounded "
        "and clipped, except bool inputs, which give float32; input: the "
        "input's always. (The Python API returns float unless dtype= is "
        "given.)",
    )
    ap.add_argument(
        "--fill-value",
        type=float,
        metavar="V",
        help="value for pixels no patch covers (--edge drop, or stride > patch) "
        "in an integer output; float outputs mark them NaN",
    )
    ap.add_argument(
        "--format",
        dest="out_format",
        default="same",
        choices=("same", "tiff", "png", "npy", "zarr"),
        help="output format (default: the input's; zarr for streamed images; JPEG "
        "inputs are re-encoded at quality 95, use png or tiff for lossless)",
    )
    ap.add_argument("--errors", action="store_true", help="also write signed error maps")
    ap.add_argument(
        "--metrics",
        type=Path,
        metavar="CSV",
        help="write max-abs, RMSE, PSNR and SSIM per image to this CSV",
    )
    ap.add_argument(
        "--no-ssim",
        dest="ssim",
        action="store_false",
        help="leave SSIM out of the metrics (computed in bands, it about doubles "
        "the time of an identity run; see README)",
    )
    ap.add_argument(
        "--max-memory",
        type=_bytes,
        default=2 * 2**30,
        metavar="SIZE",
        help="memory budget (default 2GiB); larger images are streamed through "
        "dask, or refused when their format cannot be streamed",
    )
    ap.add_argument(
        "--workers",
        type=_positive,
        default=None,
        metavar="N",
        help="worker processes for in-memory batches, threads for streamed images "
        "(default: all cores)",
    )
    ap.add_argument(
        "--chunk",
        type=_positive,
        default=1024,
        metavar="PX",
        help="chunk edge for streamed images (default 1024)",
    )
    ap.add_argument(
        "--batch-images",
        type=_positive,
        metavar="N",
        help="small images per in-memory batch (default: about 8 MiB of them)",
    )
    ap.add_argument(
        "--overwrite", action="store_true", help="replace existing output files (never folders)"
    )
    ap.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip images whose outputs exist and are complete (resume a run)",
    )
    ap.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop at the first input that fails (default: log it, go on, exit 1 at the end)",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    ap.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return ap


def _options(args):
    import os

    from . import batch

    return batch.Options(
        output=args.output,
        patch_size=tuple(args.patch_size),
        stride=tuple(args.stride),
        edge=args.edge,
        pad_mode=args.pad_mode,
        channel_axis=args.channel_axis,
        patch_filter=args.filter,
        filter_params=dict(args.param),
        window=args.window,
        window_params={} if args.window_sigma is None else {"sigma": args.window_sigma},
        reduce=args.reduce,
        reference=args.reference,
        dtype=args.dtype,
        fill_value=args.fill_value,
        out_format=args.out_format,
        errors=args.errors,
        metrics=args.metrics,
        ssim=args.ssim,
        max_memory=args.max_memory,
        workers=args.workers or os.cpu_count() or 1,
        chunk=args.chunk,
        batch_images=args.batch_images,
        overwrite=args.overwrite,
        skip_existing=args.skip_existing,
        fail_fast=args.fail_fast,
    )


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def _error(text: str) -> None:
    print(f"patch-viewer process: {text}", file=sys.stderr, flush=True)


def process_main(argv) -> int:
    """``patch-viewer process``: exit 0 on success, 2 for bad input (nothing done), 1 if any
    image failed or the run stopped (what was written is complete), 130 on Ctrl-C."""
    from . import batch, batch_run, io

    args = build_process_parser().parse_args(argv)
    opts = _options(args)
    try:
        plan = batch.make_batch_plan(args.inputs, opts)
    except (batch.PlanError, ValueError, TypeError) as exc:
        _error(str(exc))
        return 2
    _say(args.quiet and not args.dry_run, batch.describe(plan, opts))
    if args.dry_run:
        return 0
    try:
        report = batch_run.run(plan, opts, quiet=args.quiet)
    except KeyboardInterrupt:
        _error(
            "interrupted; files already written are complete"
            + (f", and {opts.metrics} holds their metrics" if opts.metrics else "")
        )
        return 130
    except (io.DiskFullError, batch_run.RunFailed) as exc:
        _error(f"stopped: {exc}; files already written are complete")
        return 1
    except Exception as exc:  # noqa: BLE001 - report, keep what was written, exit non-zero
        _error(f"failed: {exc}; files already written are complete")
        return 1
    if report.failures:
        lines = "\n".join(f"  {msg}" for _, msg in report.failures)
        _error(
            f"{len(report.failures)} of {len(plan.items) + len(plan.unreadable)} image(s) "
            f"failed (the others were written):\n{lines}"
        )
        return 1
    _say(
        args.quiet,
        f"wrote {report.written:,} image(s) to {opts.output}/"
        + (f"; metrics in {opts.metrics}" if opts.metrics else ""),
    )
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["process"]:
        return process_main(argv[1:])
    args = build_parser().parse_args(argv)
    data = read_image(args.image) if args.image else None
    import napari

    viewer = napari.Viewer(title="patch_viewer")
    if data is None:
        viewer.open_sample("patch-viewer", "classic")
        size, stride = args.patch_size or [39], args.stride or [1]
    else:
        rgb = data.ndim == 3 and data.shape[-1] in (3, 4)
        limits = {}
        if not isinstance(data, np.ndarray):  # lazy: don't let napari scan the whole image
            lo, hi = (0, 255) if data.dtype == np.uint8 else (0.0, 1.0)
            sample = np.asarray(data[tuple(slice(0, min(n, 512)) for n in data.shape)])
            if data.dtype != np.uint8 and sample.size:
                lo, hi = float(np.nanmin(sample)), float(np.nanmax(sample))
            limits = {"contrast_limits": (lo, hi if hi > lo else lo + 1)}
        viewer.add_image(data, name=Path(args.image).stem.removesuffix(".zarr"), rgb=rgb, **limits)
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
    if args.screenshot:
        viewer.window.resize(1500, 900)
        screenshot_when_idle(viewer, widget, args.screenshot)
    widget.run()
    napari.run()
    return 0


#: The launcher's screenshot waits at most this long for the explorer to settle.
SCREENSHOT_TIMEOUT_S = 120


def screenshot_when_idle(viewer, widget, path, timeout: float = SCREENSHOT_TIMEOUT_S):
    """Save ``viewer``'s window to ``path`` and close it once ``widget`` is idle (its run shown
    with every metric, or its error), or after ``timeout`` seconds. Connect before the run."""
    from qtpy.QtCore import QTimer

    state = {"done": False}

    def shoot(*_):
        if state["done"]:
            return
        state["done"] = True
        viewer.screenshot(path, canvas_only=False, flash=False)
        print(f"saved {path}")
        viewer.close()

    # The next event-loop turn: the dock's read-out and the canvas draw the last update first.
    widget.signals.idle.connect(lambda: QTimer.singleShot(0, shoot))
    QTimer.singleShot(int(timeout * 1000), shoot)


if __name__ == "__main__":
    sys.exit(main())
