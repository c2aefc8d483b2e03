"""Batch processing for ``patch-viewer process``: plan, then run many files through the core.

The plan is made from file headers alone (no pixels read): every input gets its grid, its output
paths and a route. Small images of one shape are stacked into batches and go through
:func:`patch_viewer.process` on a pool of worker processes, so the per-call
overhead vanishes when there are thousands of them; an image too large for the memory budget is
streamed chunk by chunk through dask and written to zarr, when its format can be read lazily.
Nothing is written until the whole plan is valid; every file is written under a temporary name
and renamed into place.
"""

from __future__ import annotations

import csv
import io as _io
import math
import sys
import threading
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import io
from .core import PatchGrid, compute_metrics, make_plan, process
from .core._layout import _fmt_bytes

#: Images per in-memory batch are chosen so that a batch holds about this many bytes (float64).
BATCH_TARGET_BYTES = 8 * 2**20
METRIC_COLUMNS = ("input", "output", "shape", "dtype", "patches", "max_abs", "rmse", "psnr",
                  "ssim", "covered")


@dataclass(frozen=True)
class Options:
    """Everything the command line sets (see ``patch-viewer process --help``)."""

    output: Path
    patch_size: tuple[int, ...] = (32,)
    stride: tuple[int, ...] = (16,)
    edge: str = "shift"
    pad_mode: str = "reflect"
    channel_axis: str = "auto"  # "auto", "none" or an integer
    patch_filter: str = "identity"
    filter_params: dict = field(default_factory=dict)
    window: str = "uniform"
    window_params: dict = field(default_factory=dict)
    reduce: str = "mean"
    reference: str = "input"
    dtype: str = "input"  # "input", "float32" or "float64"
    out_format: str = "same"  # "same" or a format name
    errors: bool = False
    metrics: Path | None = None
    ssim: bool = True
    max_memory: int = 2 * 2**30
    workers: int = 2
    chunk: int = 1024
    batch_images: int | None = None
    overwrite: bool = False


@dataclass
class Item:
    """One input image with its grid, route and output paths."""

    image: io.ImageFile
    grid: PatchGrid
    lazy: bool
    output: Path
    error_output: Path | None
    out_format: str
    error_format: str | None


@dataclass
class Plan:
    items: list[Item]
    batches: list[list[Item]]  # in-memory batches (lazy items are run one by one)
    n_patches: int
    peak_bytes: int


class PlanError(ValueError):
    """The work cannot be done as asked: the message lists every reason."""


# --------------------------------------------------------------------------- planning
def _channel_axis(image: io.ImageFile, option: str):
    if option == "none":
        return None
    if option != "auto":
        return int(option)
    shape = image.shape
    # napari's rule for RGB(A): three axes, the last 3 or 4 long.
    return -1 if len(shape) == 3 and shape[-1] in (3, 4) and shape[0] > 4 else None


def _size(values):
    return values[0] if len(values) == 1 else tuple(values)


def _grid(image: io.ImageFile, opts: Options) -> PatchGrid:
    return PatchGrid(image.shape, _size(opts.patch_size), _size(opts.stride), edge=opts.edge,
                     pad_mode=opts.pad_mode, channel_axis=_channel_axis(image, opts.channel_axis))


def _out_dtype(image: io.ImageFile, opts: Options) -> np.dtype:
    return image.dtype if opts.dtype == "input" else np.dtype(opts.dtype)


def _lazy_bytes(grid: PatchGrid, chunk: int, workers: int) -> int:
    """Rough peak of the chunked route: per worker, a halo'd chunk held ~6 times (input,
    canvas, anchor, result, error, metrics) in float64, plus a filtered batch."""
    block = math.prod(min(n, chunk) + 2 * (p - 1) for n, p in zip(grid.padded_shape,
                                                                  grid.patch_size, strict=True))
    return workers * (6 * 8 * block * (grid.n_channels or 1) + 2 * 8 * 2**20)


def make_batch_plan(paths, opts: Options) -> Plan:
    """Validate every input and decide routes, outputs and batches; raise :class:`PlanError`
    listing every problem, before anything is read or written."""
    problems, items = [], []
    try:
        files = io.find_inputs(paths)
    except io.ImageError as exc:
        raise PlanError(str(exc)) from None
    for path in files:
        try:
            items.append(_plan_item(io.probe(path), opts))
        except (io.ImageError, ValueError, TypeError) as exc:
            msg = str(exc)
            problems.append(msg if str(path) in msg else f"{path}: {msg}")
    if not problems:
        problems += _check_outputs(files, items, opts)
    if problems:
        raise PlanError("\n".join(problems))
    batches = _batches([it for it in items if not it.lazy], opts)
    peak = max([_lazy_bytes(it.grid, opts.chunk, opts.workers) for it in items if it.lazy]
               + [opts.workers * _batch_bytes(b) for b in batches] + [0])
    return Plan(items, batches, sum(it.grid.n_patches for it in items), peak)


def _batch_bytes(batch: list[Item]) -> int:
    return make_plan(batch[0].grid, len(batch)).peak_bytes


def _plan_item(image: io.ImageFile, opts: Options) -> Item:
    grid = _grid(image, opts)
    in_memory_bytes = make_plan(grid).peak_bytes
    lazy = in_memory_bytes > opts.max_memory // max(opts.workers, 1)
    if lazy:
        if image.format not in io.LAZY:
            raise io.ImageError(
                f"{image.path}: {_fmt_bytes(in_memory_bytes)} to process in memory, "
                f"over the budget of {_fmt_bytes(opts.max_memory)} per run (--max-memory), and "
                f"{image.format} files cannot be streamed; convert it to TIFF or zarr, or raise "
                f"--max-memory")
        need = _lazy_bytes(grid, opts.chunk, opts.workers)
        if need > opts.max_memory:
            raise io.ImageError(
                f"{image.path}: streaming in chunks of {opts.chunk} px needs about "
                f"{_fmt_bytes(need)}, over --max-memory {_fmt_bytes(opts.max_memory)}; use a "
                f"smaller --chunk or fewer --workers")
    fmt = image.format if opts.out_format == "same" else opts.out_format
    if lazy:
        fmt = "zarr"
    dtype = _out_dtype(image, opts)
    if fmt in io.INTEGER_ONLY and dtype not in (np.uint8, np.uint16):
        raise io.ImageError(
            f"{image.path}: {fmt} output holds 8- or 16-bit integers only, not {dtype}; use "
            f"--dtype input, or --format tiff/npy/zarr")
    if fmt == "jpeg" and dtype != np.uint8:
        raise io.ImageError(f"{image.path}: JPEG output holds uint8 only, not {dtype}")
    suffix = {"tiff": ".tif", "png": ".png", "jpeg": ".jpg", "npy": ".npy", "zarr": ".zarr"}
    out = opts.output / (_stem(image.path) + suffix[fmt])
    err_fmt = err_out = None
    if opts.errors:
        err_fmt = "tiff" if fmt in io.INTEGER_ONLY else fmt
        err_out = opts.output / (_stem(image.path) + "_error" + suffix[err_fmt])
    return Item(image, grid, lazy, out, err_out, fmt, err_fmt)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(io.FORMATS, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _check_outputs(files, items: list[Item], opts: Options) -> list[str]:
    problems = []
    inputs = {p.resolve() for p in files}
    zarr_inputs = [i for i in inputs if io.is_zarr_dir(i)]
    seen = {}
    targets = [(it.output, it) for it in items]
    targets += [(it.error_output, it) for it in items if it.error_output is not None]
    if opts.metrics is not None:
        targets.append((opts.metrics, None))
    for out, it in targets:
        r = out.resolve()
        if r in inputs or any(r.is_relative_to(i) for i in zarr_inputs):
            problems.append(f"{out}: would overwrite an input; choose another -o/--output")
        elif r in seen:
            problems.append(f"{out}: written twice (from {seen[r]} and "
                            f"{it.image.path if it else '--metrics'}); give the inputs distinct "
                            f"names")
        elif out.exists() and not opts.overwrite:
            problems.append(f"{out}: exists; pass --overwrite to replace it")
        seen[r] = it.image.path if it else "--metrics"
    if opts.output.exists() and not opts.output.is_dir():
        problems.append(f"{opts.output}: exists and is not a folder")
    return problems


def _batches(items: list[Item], opts: Options) -> list[list[Item]]:
    """Consecutive images of one shape, dtype and grid, stacked up to the batch size."""
    out: list[list[Item]] = []
    for it in items:
        key = (it.image.shape, it.image.dtype, it.grid)
        if out and (out[-1][0].image.shape, out[-1][0].image.dtype, out[-1][0].grid) == key \
                and len(out[-1]) < _batch_size(it, opts):
            out[-1].append(it)
        else:
            out.append([it])
    return out


def _batch_size(it: Item, opts: Options) -> int:
    if opts.batch_images:
        return opts.batch_images
    per_image = math.prod(it.grid.padded_shape) * (it.grid.n_channels or 1) * 8
    return int(min(256, max(1, BATCH_TARGET_BYTES // per_image)))


def describe(plan: Plan, opts: Options) -> str:
    """The plan, as printed before the run."""
    lazy = [it for it in plan.items if it.lazy]
    shapes = sorted({it.image.shape for it in plan.items})
    ps = "x".join(map(str, plan.items[0].grid.patch_size)) if plan.items else "-"
    listed = ", ".join("x".join(map(str, s)) for s in shapes[:3])
    listed += ", ..." if len(shapes) > 3 else ""
    lines = [
        f"plan: {len(plan.items):,} image(s) of {len(shapes)} shape(s) ({listed}), "
        f"{plan.n_patches:,} patches of {ps}, stride {'x'.join(map(str, opts.stride))}, "
        f"filter {opts.patch_filter}, window {opts.window}",
        f"      in memory: {sum(map(len, plan.batches)):,} image(s) in {len(plan.batches):,} "
        f"batch(es) on {opts.workers} process(es); streamed through dask: {len(lazy)} image(s)",
        f"      estimated peak memory {_fmt_bytes(plan.peak_bytes)} of a "
        f"{_fmt_bytes(opts.max_memory)} budget (--max-memory); output to {opts.output}/",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- progress
class Progress:
    """A progress line on ``stream``: patches done, rate and ETA (thread-safe). On a terminal
    it redraws in place; otherwise it prints a line every tenth of the work."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done = max(total, 1), 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = self._last = time.perf_counter()
        self._step = 0
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.perf_counter()
            if not self.enabled:
                return
            if self.tty and now - self._last >= 0.2:
                self._last = now
                self.stream.write("\r" + self.line())
                self.stream.flush()
            elif not self.tty and 10 * self.done // self.total > self._step:
                self._step = 10 * self.done // self.total
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else math.inf
        eta = "?" if not math.isfinite(left) else time.strftime("%H:%M:%S", time.gmtime(left))
        width = 24
        fill = min(width, width * self.done // self.total)
        return (f"[{'#' * fill}{'.' * (width - fill)}] {100 * self.done / self.total:5.1f}% "
                f"{self.done:,}/{self.total:,} patches | {_rate(rate)} | "
                f"ETA {eta}")

    def finish(self) -> str:
        elapsed = time.perf_counter() - self.start
        summary = (f"done: {self.done:,} patches in {elapsed:.1f} s "
                   f"({_rate(self.done / max(elapsed, 1e-9))})")
        if self.enabled:
            self.stream.write(("\r" + self.line() + "\n" if self.tty else "") + summary + "\n")
            self.stream.flush()
        return summary


def _rate(per_s: float) -> str:
    if per_s >= 1e6:
        return f"{per_s / 1e6:.2f} M patches/s"
    if per_s >= 1e3:
        return f"{per_s / 1e3:.1f} k patches/s"
    return f"{per_s:.0f} patches/s"


# --------------------------------------------------------------------------- running
def _process_kwargs(opts: Options) -> dict:
    return {"patch_filter": opts.patch_filter, "filter_params": opts.filter_params,
            "window": opts.window, "window_params": opts.window_params, "reduce": opts.reduce,
            "reference": opts.reference}


def _run_batch(batch: list[Item], opts: Options) -> list[dict]:
    first = batch[0]
    images = np.stack([it.image.read() for it in batch])
    for it, im in zip(batch, images, strict=True):
        if im.shape != it.image.shape or im.dtype != it.image.dtype:
            raise io.ImageError(f"{it.image.path}: read {im.shape} {im.dtype}, but its header "
                                f"said {it.image.shape} {it.image.dtype}")
    r = process(images, first.grid, dtype=_out_dtype(first.image, opts), metrics=False,
                **_process_kwargs(opts))  # metrics per image, below, when asked
    rows = []
    channel_axis = first.grid.channel_axis
    for k, it in enumerate(batch):
        io.write(it.output, r.merged[k], it.out_format)
        if it.error_output is not None:
            io.write(it.error_output, r.error[k], it.error_format)
        if opts.metrics is not None:
            m = compute_metrics(r.merged[k], r.reference[k], channel_axis=channel_axis,
                                ssim=opts.ssim, error=r.error[k])
            rows.append(_row(it, m))
    return rows


def _row(it: Item, metrics: dict) -> dict:
    return {"input": str(it.image.path), "output": str(it.output),
            "shape": "x".join(map(str, it.image.shape)), "dtype": str(it.image.dtype),
            "patches": it.grid.n_patches,
            **{k: f"{float(metrics[k]):.9g}" for k in METRIC_COLUMNS[5:]}}


def _run_lazy(it: Item, opts: Options, progress: Progress) -> list[dict]:
    import dask
    import dask.array as da
    import zarr
    from dask.callbacks import Callback

    image = it.image.lazy(opts.chunk)
    r = process(image, it.grid, dtype=_out_dtype(it.image, opts), ssim=opts.ssim,
                **_process_kwargs(opts))
    targets = [(it.output, r.merged)]
    if it.error_output is not None:
        targets.append((it.error_output, r.error))
    stores, commits, aborts = [], [], []
    for path, arr in targets:
        tmp, commit, abort = io.zarr_target(path)
        aborts.append(abort)
        chunks = tuple(min(n, opts.chunk) for n in arr.shape)
        z = zarr.open_array(str(tmp), mode="w", shape=arr.shape, dtype=arr.dtype, chunks=chunks)
        stores.append((arr.rechunk(chunks), z))
        commits.append(commit)
    class _Tick(Callback):
        """Progress from finished merge tasks (dask may fuse them: match by name)."""

        def _start(self, dsk):
            self.merges = sum(1 for k in dsk if _is_merge(k))
            self.carry = 0.0
            self.counted = 0

        def _posttask(self, key, result, dsk, state, worker_id):
            if _is_merge(key):
                self.carry += it.grid.n_patches / max(self.merges, 1)
                whole = int(self.carry)
                self.carry -= whole
                self.counted += whole
                progress.update(whole)

    try:
        stored = da.store([a for a, _ in stores], [z for _, z in stores], lock=False,
                          compute=False)
        wanted = r.metrics if opts.metrics is not None else {}
        with _Tick() as tick:
            _, metrics = dask.compute(stored, wanted, scheduler="threads",
                                      num_workers=opts.workers)
        progress.update(it.grid.n_patches - tick.counted)
        for commit in commits:
            commit()
    except BaseException:
        for abort in aborts:
            abort()
        raise
    return [_row(it, metrics)] if opts.metrics is not None else []


def _is_merge(key) -> bool:
    return "patch-merge" in str(key[0] if isinstance(key, tuple) else key)


_FAILED = None  # in each worker process: set once any batch has failed


def _init_worker(event) -> None:
    global _FAILED
    _FAILED = event


def _batch_job(batch: list[Item], opts: Options):
    """One in-memory batch in a worker process; None when skipped after a failure (the run
    stops at its first failure, and what is already written stays complete)."""
    if _FAILED is not None and _FAILED.is_set():
        return None
    try:
        return _run_batch(batch, opts)
    except BaseException:
        if _FAILED is not None:
            _FAILED.set()
        raise


def run(plan: Plan, opts: Options, *, stream=None, quiet: bool = False) -> list[dict]:
    """Run a plan: in-memory batches on ``opts.workers`` processes, then streamed images one
    by one (dask threads). Returns the metrics rows (in input order) and writes the CSV if
    asked.

    Worker processes, not threads: the batches are independent files in and out, and the
    merge's many small NumPy steps scale across processes where threads wait on the GIL
    (2 threads ran 1.6x faster than 1, 2 processes 2x).
    """
    opts.output.mkdir(parents=True, exist_ok=True)
    progress = Progress(plan.n_patches, stream, enabled=not quiet)
    rows = {}
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    failed = ctx.Event()
    with ProcessPoolExecutor(max(opts.workers, 1), mp_context=ctx, initializer=_init_worker,
                             initargs=(failed,)) as pool:
        futures = {pool.submit(_batch_job, b, opts): b for b in plan.batches}
        try:
            for f in as_completed(futures):
                b, result = futures[f], f.result()
                if result is None:
                    continue
                progress.update(sum(it.grid.n_patches for it in b))
                for it, row in zip(b, result, strict=False):
                    rows[it.image.path] = row
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    for it in (it for it in plan.items if it.lazy):
        for row in _run_lazy(it, opts, progress):
            rows[it.image.path] = row
    progress.finish()
    ordered = [rows[it.image.path] for it in plan.items if it.image.path in rows]
    if opts.metrics is not None:
        text = _io.StringIO()
        writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(ordered)
        _write_text(opts.metrics, text.getvalue())
    return ordered


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
