"""Batch processing for ``patch-viewer process``: plan, then run many files through the core.

The plan is made from file headers alone (no pixels read): every input gets its grid, its output
paths and a route, and every problem with the parameters, the outputs or the inputs is listed
before anything is written. Small images of one shape are stacked into batches and go through
:func:`patch_viewer.process` on a pool of worker processes; an image too large for the memory
budget is streamed chunk by chunk through dask and written to zarr, when its format can be read
lazily.

Faults: an input that cannot be read is logged and skipped (``fail_fast`` stops instead); a full
disk stops the run. Every file is written under a temporary name and renamed into place, metric
rows are appended to the CSV as images finish, workers exit when their parent dies, and
temporary files of dead runs are removed by the next run into the same folder.
"""

from __future__ import annotations

import csv
import io as _io
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from dask.utils import format_bytes

from . import io
from .core import FILTERS, PatchGrid, compute_metrics, make_plan, make_window, process
from .core.checks import check_fill_value, check_reduce_window
from .core.metrics import ssim_bytes

#: Images per in-memory batch are chosen so that a batch holds about this many bytes (float64).
BATCH_TARGET_BYTES = 8 * 2**20
METRIC_COLUMNS = ("input", "output", "shape", "dtype", "patches", "max_abs", "rmse", "psnr",
                  "ssim", "covered")
#: Seconds between progress refreshes while worker processes run.
PROGRESS_EVERY = 0.1


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
    dtype: str = "auto"  # "auto", "input", "float32" or "float64"
    fill_value: float | None = None
    out_format: str = "same"  # "same" or a format name
    errors: bool = False
    metrics: Path | None = None
    ssim: bool = True
    max_memory: int = 2 * 2**30
    workers: int = 2
    chunk: int = 1024
    batch_images: int | None = None
    overwrite: bool = False
    skip_existing: bool = False
    fail_fast: bool = False


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
    skip: bool = False  # --skip-existing: its outputs are there and complete


@dataclass
class Plan:
    items: list[Item]
    batches: list[list[Item]]  # in-memory batches (lazy items are run one by one)
    n_patches: int
    peak_bytes: int
    processes: int = 1
    unreadable: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class Report:
    """What a run did: metric rows (input order) and the inputs that failed, with why."""

    rows: list[dict]
    failures: list[tuple[Path, str]]
    written: int


class PlanError(ValueError):
    """The work cannot be done as asked: the message lists every reason."""


# --------------------------------------------------------------------------- planning
def _channel_axis(image: io.ImageFile, option: str):
    if option == "none":
        return None
    if option != "auto":
        return int(option)
    return image.channel_axis  # from the format and its metadata (see io.probe)


def _size(values):
    return values[0] if len(values) == 1 else tuple(values)


def _grid(image: io.ImageFile, opts: Options) -> PatchGrid:
    return PatchGrid(image.shape, _size(opts.patch_size), _size(opts.stride), edge=opts.edge,
                     pad_mode=opts.pad_mode, channel_axis=_channel_axis(image, opts.channel_axis))


def out_dtype(dtype: np.dtype, opts: Options) -> np.dtype:
    """The merged image's dtype: ``auto`` keeps the input's (so a PNG stays a PNG and an
    identity run is exact), except bool, whose merge is a fraction (float32); ``input`` keeps
    it always; or the float dtype named."""
    if opts.dtype == "auto":
        return np.dtype(np.float32) if dtype == np.bool_ else dtype
    return dtype if opts.dtype == "input" else np.dtype(opts.dtype)


def _filter_dtype(dtype: np.dtype, opts: Options) -> np.dtype:
    filt = FILTERS[opts.patch_filter]
    probe = filt(np.zeros((1, 3, 3), dtype), (1, 2), **opts.filter_params)
    return np.asarray(probe).dtype


def image_bytes(it: Item, opts: Options, n: int = 1) -> int:
    """Planned peak of ``n`` images of ``it``'s kind in memory: read, stacked, processed
    (:func:`make_plan`), then measured one at a time."""
    dtype = it.image.dtype
    plan = make_plan(it.grid, n, dtype=dtype, window=opts.window, reduce=opts.reduce,
                     reference=opts.reference, filter_dtype=_filter_dtype(dtype, opts),
                     out_dtype=out_dtype(dtype, opts), metrics=False)
    pixels = math.prod(it.image.shape)
    metrics = 0
    if opts.metrics is not None:
        metrics = 24 * min(pixels, 2**20) + (ssim_bytes(it.image.shape, it.grid.channel_axis)
                                             if opts.ssim else 0)
    return 2 * n * pixels * dtype.itemsize + plan.peak_bytes + metrics


def _lazy_bytes(grid: PatchGrid, chunk: int, threads: int) -> int:
    """Rough peak of the chunked route: per thread, a halo'd chunk held ~6 times (input,
    canvas, anchor, result, error, metrics) in float64, plus a filtered batch."""
    block = math.prod(min(n, chunk) + 2 * (p - 1) for n, p in zip(grid.padded_shape,
                                                                  grid.patch_size, strict=True))
    return threads * (6 * 8 * block * (grid.n_channels or 1) + 2 * 8 * 2**20)


def _threads(grid: PatchGrid, chunk: int, workers: int) -> int:
    """Threads that can work at once on a streamed image: no more than its chunks."""
    chunks = math.prod(math.ceil(n / chunk) for n in grid.spatial_shape)
    return max(1, min(workers, chunks))


def check_options(opts: Options) -> list[str]:
    """Every problem with the parameters themselves (not the files), each naming its option."""
    problems = []
    checks = [
        lambda: FILTERS[opts.patch_filter].validate(opts.filter_params),
        lambda: make_window(opts.window, (max(opts.patch_size),) * 1, **opts.window_params),
        lambda: check_reduce_window(opts.reduce, opts.window),
        lambda: check_fill_value(opts.fill_value),
    ]
    for check in checks:
        try:
            check()
        except (ValueError, TypeError) as exc:
            problems.append(_cli_names(str(exc)))
    if opts.channel_axis not in ("auto", "none"):
        try:
            int(opts.channel_axis)
        except ValueError:
            problems.append(f"--channel-axis must be auto, none or an integer, got "
                            f"{opts.channel_axis!r}")
    problems += _check_paths(opts)
    return problems


#: Core messages name API parameters: the options that set them.
_OPTIONS = {"window parameter `sigma`": "--window-sigma", "`window`": "--window",
            "`fill_value`": "--fill-value", "filter parameter": "--param",
            "filter ": "--filter/--param"}


def _cli_names(message: str) -> str:
    """A core message, with the command-line option that sets the parameter it names."""
    option = next((o for k, o in _OPTIONS.items() if k in message), None)
    return f"{option}: {message}" if option else message


def _check_paths(opts: Options) -> list[str]:
    problems = []
    for parent in [opts.output, *opts.output.parents]:
        if parent.exists():
            if not parent.is_dir():
                problems.append(f"-o {opts.output}: {parent} is a file, not a folder")
            break
    if opts.metrics is not None:
        m = opts.metrics
        if m.is_dir():
            problems.append(f"--metrics {m}: is a folder; give a CSV file name")
        elif not m.parent.is_dir() and m.parent.resolve() != opts.output.resolve():
            problems.append(f"--metrics {m}: folder {m.parent} does not exist (only -o is "
                            f"created)")
    return problems


def make_batch_plan(paths, opts: Options) -> Plan:
    """Validate the parameters, every input and every output, and decide routes, outputs and
    batches; raise :class:`PlanError` listing every problem before anything is read or
    written. Inputs whose header cannot be read are listed in ``plan.unreadable`` (the run
    skips them) unless ``opts.fail_fast``, or unless no input is readable."""
    problems = check_options(opts)
    try:
        files = io.find_inputs(paths)
    except io.ImageError as exc:
        raise PlanError("\n".join([*problems, str(exc)])) from None
    parameters_ok = not problems
    images, unreadable = [], []
    for path in files:
        try:
            images.append(io.probe(path))
        except io.ImageError as exc:
            unreadable.append((path, str(exc)))
    if opts.fail_fast or not images:
        problems += [msg for _, msg in unreadable]
    if not parameters_ok:  # they would repeat for every file: list them once, with the rest
        raise PlanError("\n".join(problems))
    processes = max(1, min(opts.workers, len(images)))
    items = []
    for image in images:
        try:
            items.append(_plan_item(image, opts, processes))
        except (io.ImageError, ValueError, TypeError) as exc:
            msg = str(exc)
            problems.append(msg if str(image.path) in msg else f"{image.path}: {msg}")
    problems += _check_outputs(files, items, opts)
    if problems:
        raise PlanError("\n".join(problems))
    todo = [it for it in items if not it.skip]
    batches = _batches([it for it in todo if not it.lazy], opts)
    processes = max(1, min(opts.workers, len(batches)))
    peak = max([_lazy_bytes(it.grid, opts.chunk, _threads(it.grid, opts.chunk, opts.workers))
                for it in todo if it.lazy]
               + [processes * max((image_bytes(b[0], opts, len(b)) for b in batches),
                                  default=0)] + [0])
    return Plan(items, batches, sum(it.grid.n_patches for it in todo), peak, processes,
                unreadable)


def _plan_item(image: io.ImageFile, opts: Options, processes: int) -> Item:
    grid = _grid(image, opts)
    fmt = image.format if opts.out_format == "same" else opts.out_format
    dtype = out_dtype(image.dtype, opts)
    probe_item = Item(image, grid, False, Path(), None, fmt, None)
    in_memory_bytes = image_bytes(probe_item, opts)
    share = opts.max_memory // processes
    lazy = in_memory_bytes > share
    if lazy:
        if image.format not in io.LAZY:
            raise io.ImageError(
                f"{image.path}: {format_bytes(in_memory_bytes)} to process in memory, over "
                f"the {format_bytes(share)} share of each of {processes} process(es) in "
                f"--max-memory {format_bytes(opts.max_memory)}, and {image.format} files "
                f"cannot be streamed; convert it to TIFF or zarr, raise --max-memory, or "
                f"use fewer --workers")
        threads = _threads(grid, opts.chunk, opts.workers)
        need = _lazy_bytes(grid, opts.chunk, threads)
        if need > opts.max_memory:
            raise io.ImageError(
                f"{image.path}: streaming in chunks of {opts.chunk} px on {threads} thread(s) "
                f"needs about {format_bytes(need)} ({format_bytes(need // threads)} a "
                f"thread), over --max-memory {format_bytes(opts.max_memory)}; use a smaller "
                f"--chunk or fewer --workers")
        fmt = "zarr"
    _check_format(image, grid, fmt, dtype, opts)
    suffix = {"tiff": ".tif", "png": ".png", "jpeg": ".jpg", "npy": ".npy", "zarr": ".zarr"}
    out = opts.output / (_stem(image.path) + suffix[fmt])
    err_fmt = err_out = None
    if opts.errors:
        err_fmt = "tiff" if fmt in io.INTEGER_ONLY else fmt
        err_out = opts.output / (_stem(image.path) + "_error" + suffix[err_fmt])
    return Item(image, grid, lazy, out, err_out, fmt, err_fmt)


def _check_format(image, grid, fmt, dtype, opts) -> None:
    if fmt in io.INTEGER_ONLY and dtype not in (np.uint8, np.uint16):
        raise io.ImageError(
            f"{image.path}: {fmt} output holds 8- or 16-bit integers only, not {dtype}; use "
            f"--dtype input, or --format tiff/npy/zarr")
    if fmt == "jpeg" and dtype != np.uint8:
        raise io.ImageError(f"{image.path}: JPEG output holds uint8 only, not {dtype}")
    if not grid.is_covering and dtype.kind != "f":
        if opts.fill_value is None:
            raise io.ImageError(
                f"{image.path}: some pixels are covered by no patch (--edge drop, or stride > "
                f"patch size) and the {dtype} output cannot mark them NaN: pass --fill-value, "
                f"or --dtype float32")
        check_fill_value(opts.fill_value, dtype)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(io.FORMATS, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _complete(path: Path, shape, dtype) -> bool:
    """Whether an existing output is a whole image of the expected shape and dtype (outputs
    are renamed into place only once written, so a readable header means a whole file)."""
    try:
        found = io.probe(path)
    except io.ImageError:
        return False
    return found.shape == tuple(shape) and (dtype is None or found.dtype == dtype)


def _check_outputs(files, items: list[Item], opts: Options) -> list[str]:
    """Collisions first (an output over an input, twice the same output, a folder in the
    way); then what exists already: skipped (``--skip-existing``), replaced
    (``--overwrite``) or refused."""
    problems = _collisions(files, items, opts)
    return problems or _existing(items, opts)


def _collision(out: Path, it: Item, inputs, zarr_inputs, seen) -> str | None:
    r = out.resolve()
    if r in inputs or any(r.is_relative_to(i) for i in zarr_inputs):
        return f"{out}: would overwrite an input; choose another -o/--output"
    if r in seen:
        return (f"{out}: written twice (from {seen[r]} and {it.image.path}); give the inputs "
                f"distinct names")
    if out.is_dir() and not (it.out_format == "zarr" and io.is_zarr_dir(out)):
        return f"{out}: is a folder; outputs replace files only, never folders"
    return None


def _collisions(files, items: list[Item], opts: Options) -> list[str]:
    problems = []
    inputs = {p.resolve() for p in files}
    zarr_inputs = [i for i in inputs if io.is_zarr_dir(i)]
    seen = {}
    targets = [(it.output, it) for it in items]
    targets += [(it.error_output, it) for it in items if it.error_output is not None]
    for out, it in targets:
        problem = _collision(out, it, inputs, zarr_inputs, seen)
        if problem:
            problems.append(problem)
        seen[out.resolve()] = it.image.path
    if opts.metrics is not None and opts.metrics.resolve() in inputs | set(seen):
        problems.append(f"{opts.metrics}: would overwrite an input or an output (--metrics)")
    return problems


def _done(it: Item, opts: Options, have_rows: set[str]) -> bool:
    """Whether an image's outputs are all there and complete, and its metrics row too."""
    outs = [(it.output, out_dtype(it.image.dtype, opts))]
    outs += [(it.error_output, None)] if it.error_output else []
    return all(_complete(o, it.image.shape, dt) for o, dt in outs) and (
        opts.metrics is None or str(it.image.path) in have_rows)


def _existing(items: list[Item], opts: Options) -> list[str]:
    problems = []
    have_rows = {r["input"] for r in read_rows(opts.metrics)} if opts.metrics else set()
    for it in items:
        existing = [o for o in (it.output, it.error_output) if o is not None and o.exists()]
        if not existing:
            continue
        if opts.skip_existing and _done(it, opts, have_rows):
            it.skip = True
        elif not (opts.overwrite or opts.skip_existing):
            problems += [f"{o}: exists; pass --overwrite to replace it, or --skip-existing "
                         f"to keep it" for o in existing]
    if opts.metrics is not None and opts.metrics.exists() and not (opts.overwrite
                                                                   or opts.skip_existing):
        problems.append(f"--metrics {opts.metrics}: exists; pass --overwrite to replace it, or "
                        f"--skip-existing to add to it")
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
    lazy = [it for it in plan.items if it.lazy and not it.skip]
    skipped = sum(it.skip for it in plan.items)
    shapes = sorted({it.image.shape for it in plan.items})
    ps = "x".join(map(str, plan.items[0].grid.patch_size)) if plan.items else "-"
    listed = ", ".join("x".join(map(str, s)) for s in shapes[:3])
    listed += ", ..." if len(shapes) > 3 else ""
    lines = [
        f"plan: {len(plan.items):,} image(s) of {len(shapes)} shape(s) ({listed}), "
        f"{plan.n_patches:,} patches of {ps}, stride {'x'.join(map(str, opts.stride))}, "
        f"filter {opts.patch_filter}, window {opts.window}",
        f"      in memory: {sum(map(len, plan.batches)):,} image(s) in {len(plan.batches):,} "
        f"batch(es) on {plan.processes} process(es); streamed through dask: {len(lazy)} "
        f"image(s)" + (f"; skipped (already done): {skipped}" if skipped else ""),
        f"      estimated peak memory {format_bytes(plan.peak_bytes)} of a "
        f"{format_bytes(opts.max_memory)} budget (--max-memory); output to {opts.output}/",
    ]
    lines += [f"      will skip (unreadable): {msg}" for _, msg in plan.unreadable]
    return "\n".join(lines)


# --------------------------------------------------------------------------- progress
class Progress:
    """A progress line on ``stream``: patches done, rate and ETA (thread-safe). On a terminal
    it redraws in place; otherwise it prints a line every tenth of the work.

    Hand-written rather than tqdm: it is fed from a counter shared with worker processes,
    prints one line per tenth in logs (tqdm would write a carriage-return stream there), and
    keeps the command line free of another dependency."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done = max(total, 1), 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = self._last = time.perf_counter()
        self._step = 0
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        with self._lock:
            self.done = min(max(done, self.done), self.total)
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


# --------------------------------------------------------------------------- metrics CSV
class MetricsLog:
    """The metrics CSV, written as the run goes: whoever finishes an image (a worker process
    or the parent) appends its row at once, in one ``O_APPEND`` write (rows from several
    processes never interleave), so an interrupted, killed or failed run keeps the rows it
    earned. :meth:`close` reads them back and rewrites the file atomically in input order.
    With ``keep`` (``--skip-existing``), rows of a previous run for the images skipped now
    are kept."""

    def __init__(self, path: Path | None, keep: set[str] = frozenset()):
        self.path = path
        if path is None:
            return
        rows = [r for r in read_rows(path) if r["input"] in keep] if keep else []
        io.write_text(path, _csv_text(rows, header=True))

    def add(self, row: dict | None) -> None:
        if self.path is not None and row is not None:
            append_row(self.path, row)

    def close(self, order: list[str]) -> list[dict]:
        if self.path is None:
            return []
        rows = {r["input"]: r for r in read_rows(self.path)}
        ordered = [rows[k] for k in order if k in rows]
        io.write_text(self.path, _csv_text(ordered, header=True))
        return ordered


def _csv_text(rows, header=False) -> str:
    text = _io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def append_row(path: Path, row: dict) -> None:
    """Append one CSV row with a single ``O_APPEND`` write."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, _csv_text([row]).encode())
    finally:
        os.close(fd)


def read_rows(path: Path) -> list[dict]:
    """The whole rows of a metrics CSV (a row cut short by a hard kill is left out)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f)
                if r.get("input") and all(r.get(k) not in (None, "") for k in METRIC_COLUMNS)]


# --------------------------------------------------------------------------- running
def _process_kwargs(opts: Options) -> dict:
    return {"patch_filter": opts.patch_filter, "filter_params": opts.filter_params,
            "window": opts.window, "window_params": opts.window_params, "reduce": opts.reduce,
            "reference": opts.reference, "fill_value": opts.fill_value}


def _row(it: Item, metrics: dict) -> dict:
    return {"input": str(it.image.path), "output": str(it.output),
            "shape": "x".join(map(str, it.image.shape)), "dtype": str(it.image.dtype),
            "patches": it.grid.n_patches,
            **{k: f"{float(metrics[k]):.9g}" for k in METRIC_COLUMNS[5:]}}


def _read_all(batch: list[Item]):
    """The batch's images that read back as their headers said, and the failures."""
    good, images, failed = [], [], []
    for it in batch:
        try:
            images.append(it.image.read())
            good.append(it)
        except io.ImageError as exc:
            failed.append((str(it.image.path), str(exc)))
    return good, images, failed


def _run_batch(batch: list[Item], opts: Options, tick=None) -> list[tuple[str, object]]:
    """One in-memory batch: ``("row", row or None)`` per written image, ``("failed", why)``
    per image that could not be read. A full disk raises."""
    good, images, failed = _read_all(batch)
    out = [("failed", f) for f in failed]
    if not good:
        return out
    first = good[0]
    r = process(np.stack(images), first.grid, dtype=out_dtype(first.image.dtype, opts),
                metrics=False, progress=tick, **_process_kwargs(opts))
    for k, it in enumerate(good):
        row = None
        if opts.metrics is not None:
            m = compute_metrics(r.merged[k], r.reference[k], channel_axis=first.grid.channel_axis,
                                ssim=opts.ssim, error=r.error[k])
            row = _row(it, m)
        with _WRITING:  # an image and its row: a worker told to exit waits for both
            meta = it.image.meta if it.out_format == "tiff" else None
            io.write(it.output, r.merged[k], it.out_format, meta)
            if it.error_output is not None:
                io.write(it.error_output, r.error[k], it.error_format, meta)
            if row is not None:
                append_row(opts.metrics, row)
        out.append(("row", (str(it.image.path), row)))
    return out


# Worker-process state: the shared patch counter, and the lock held while an image and its
# metrics row are written.
_COUNTER = None
_WRITING = threading.Lock()


def _init_worker(counter, alive_fd: int, parent_fd: int, parent_pid: int) -> None:
    """In each worker: ignore Ctrl-C (the parent decides), name temporary files after the
    parent's PID, count patches into the shared counter, and exit as soon as the parent is
    gone: a thread blocks on the read end of a pipe whose write end only the parent holds,
    and end-of-file means the parent died (or gave up the run)."""
    global _COUNTER
    _COUNTER = counter
    os.close(parent_fd)  # only the parent may hold the write end
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    io.RUN_PID = parent_pid
    threading.Thread(target=_exit_with_parent, args=(alive_fd,), daemon=True).start()


def _exit_with_parent(fd: int) -> None:
    while os.read(fd, 1):
        pass
    _WRITING.acquire()  # never exit between an image and its metrics row
    os._exit(1)  # pragma: no cover - runs in a worker that is going away


def _batch_job(batch: list[Item], opts: Options):
    last = [0]

    def tick(done: int, total: int) -> None:  # patches done in this batch, into the counter
        with _COUNTER.get_lock():
            _COUNTER.value += done - last[0]
        last[0] = done

    return _run_batch(batch, opts, tick if _COUNTER is not None else None)


class _Pool:
    """Worker processes that die with their parent (see :func:`_init_worker`)."""

    def __init__(self, n: int):
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        self.counter = ctx.Value("q", 0)
        self._read, self._write = os.pipe()
        self.pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker,
                                        initargs=(self.counter, self._read, self._write,
                                                  os.getpid()))

    def abandon(self) -> None:
        """Stop now: closing the pipe makes every worker exit, whatever it is doing."""
        if self._write is not None:
            os.close(self._write)
            self._write = None
        self.pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for fd in (self._write, self._read):
            if fd is not None:
                os.close(fd)
        self._write = self._read = None


class _Run:
    """One run's bookkeeping: progress, metric rows, failures."""

    def __init__(self, plan: Plan, opts: Options, stream, quiet: bool):
        self.plan, self.opts = plan, opts
        self.progress = Progress(plan.n_patches, stream, enabled=not quiet)
        keep = {str(it.image.path) for it in plan.items if it.skip}
        self.log = MetricsLog(opts.metrics, keep)
        self.failures = [(p, msg) for p, msg in plan.unreadable]
        self.written = 0

    def outcome(self, results) -> None:
        for kind, value in results:
            if kind == "failed":
                self.fail(Path(value[0]), value[1])
            else:
                self.written += 1  # its metrics row is in the CSV already

    def fail(self, path: Path, why: str) -> None:
        self.failures.append((path, why))
        if self.opts.fail_fast:
            raise RunFailed(why)

    def in_memory(self) -> None:
        if not self.plan.batches:
            return
        pool = _Pool(self.plan.processes)
        base = self.progress.done
        try:
            pending = {pool.pool.submit(_batch_job, b, self.opts): b for b in self.plan.batches}
            while pending:
                done, _ = wait(pending, timeout=PROGRESS_EVERY, return_when=FIRST_COMPLETED)
                self.progress.set(base + pool.counter.value)
                for f in done:
                    batch = pending.pop(f)
                    self._collect(f, batch)
        except BaseException:
            pool.abandon()
            raise
        pool.close()

    def _collect(self, future, batch) -> None:
        try:
            results = future.result()
        except io.DiskFullError:
            raise
        except Exception as exc:  # noqa: BLE001 - the batch failed: each of its images did
            results = [("failed", (str(it.image.path), f"{it.image.path}: {exc}"))
                       for it in batch]
        self.outcome(results)

    def streamed(self) -> None:
        for it in (it for it in self.plan.items if it.lazy and not it.skip):
            try:
                row = _run_lazy(it, self.opts, self.progress)
            except (io.DiskFullError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - log it, go on (or stop: fail_fast)
                self.fail(it.image.path, f"{it.image.path}: {exc}")
                continue
            self.log.add(row)
            self.outcome([("row", (str(it.image.path), row))])


class RunFailed(RuntimeError):
    """The run stopped at its first failure (``fail_fast``)."""


def run(plan: Plan, opts: Options, *, stream=None, quiet: bool = False) -> Report:
    """Run a plan: in-memory batches on worker processes, then streamed images one by one
    (dask threads). Metric rows reach the CSV as images finish; an input that fails is
    logged and skipped (``opts.fail_fast`` raises :class:`RunFailed` instead); a full disk
    raises :class:`patch_viewer.io.DiskFullError`; Ctrl-C raises KeyboardInterrupt. In every
    case the files written are complete, no temporary file is left, and the CSV holds the
    rows earned.

    Worker processes, not threads: the batches are independent files in and out, and the
    merge's many small NumPy steps scale across processes where threads wait on the GIL
    (2 threads ran 1.6x faster than 1, 2 processes 2x).
    """
    opts.output.mkdir(parents=True, exist_ok=True)
    for folder in {opts.output, *([opts.metrics.parent] if opts.metrics else [])}:
        io.clean_stale(folder)
    state = _Run(plan, opts, stream, quiet)
    try:
        state.in_memory()
        state.streamed()
    finally:
        io.clean_own(opts.output)
        rows = state.log.close([str(it.image.path) for it in plan.items])
    state.progress.finish()
    return Report(rows, state.failures, state.written)


def _run_lazy(it: Item, opts: Options, progress: Progress) -> dict | None:
    import dask
    import zarr

    image = it.image.lazy(opts.chunk)
    r = process(image, it.grid, dtype=out_dtype(it.image.dtype, opts), ssim=opts.ssim,
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
    threads = ThreadPoolExecutor(_threads(it.grid, opts.chunk, opts.workers))
    try:
        import dask.array as da

        stored = da.store([a for a, _ in stores], [z for _, z in stores], lock=False,
                          compute=False)
        wanted = r.metrics if opts.metrics is not None else {}
        with _Tick(it.grid.n_patches, progress) as tick:
            _, metrics = dask.compute(stored, wanted, scheduler="threads", pool=threads)
        progress.update(it.grid.n_patches - tick.counted)
        threads.shutdown(wait=True)
        for commit in commits:
            commit()
    except BaseException as exc:
        # Let running tasks finish writing before their store is removed (else a chunk
        # written after the removal leaves the temporary store behind).
        threads.shutdown(wait=True, cancel_futures=True)
        for abort in aborts:
            abort()
        if io._disk_full(exc, it.output):
            raise io.DiskFullError(f"disk full: cannot write {it.output} "
                                   f"({io._free(it.output.parent)})") from exc
        raise
    return _row(it, metrics) if opts.metrics is not None else None


def _tick_class():
    from dask.callbacks import Callback

    class Tick(Callback):
        """Progress from finished merge tasks (dask may fuse them: match by name)."""

        def __init__(self, n_patches, progress):
            super().__init__()
            self.n_patches, self.progress = n_patches, progress

        def _start(self, dsk):
            self.merges = sum(1 for k in dsk if _is_merge(k))
            self.carry = 0.0
            self.counted = 0

        def _posttask(self, key, result, dsk, state, worker_id):
            if _is_merge(key):
                self.carry += self.n_patches / max(self.merges, 1)
                whole = int(self.carry)
                self.carry -= whole
                self.counted += whole
                self.progress.update(whole)

    return Tick


def _Tick(n_patches, progress):  # noqa: N802 - a class made on first use (dask import)
    return _tick_class()(n_patches, progress)


def _is_merge(key) -> bool:
    return "patch-merge" in str(key[0] if isinstance(key, tuple) else key)
