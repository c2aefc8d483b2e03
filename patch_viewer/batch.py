"""Batch processing for ``patch-viewer process``: plan, then run many files through the core.

The plan is made from file headers alone (no pixels read): every input gets its grid, its output
paths and a route, and every problem with the parameters, the outputs or the inputs is listed
before anything is written. Small images of one shape are stacked into batches and go through
:func:`patch_viewer.process` on a pool of worker processes; an image too large for the memory
budget is streamed chunk by chunk through dask and written to zarr, when its format can be read
lazily.

Running the plan, and what happens on faults, is :mod:`patch_viewer.batch_run`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from dask.utils import format_bytes

from . import io
from .core import FILTERS, PatchGrid, Predictor, make_plan, make_window
from .core.checks import check_fill_value, check_reduce_window
from .core.merge.precision import work_dtype
from .core.metrics import ssim_bytes

#: Images per in-memory batch are chosen so that a batch holds about this many bytes (float64).
BATCH_TARGET_BYTES = 8 * 2**20
METRIC_COLUMNS = (
    "input",
    "output",
    "shape",
    "dtype",
    "patches",
    "max_abs",
    "rmse",
    "psnr",
    "ssim",
    "covered",
)


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
class BatchPlan:
    items: list[Item]
    batches: list[list[Item]]  # in-memory batches (lazy items are run one by one)
    n_patches: int
    peak_bytes: int
    processes: int = 1
    unreadable: list[tuple[Path, str]] = field(default_factory=list)


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
    return PatchGrid(
        image.shape,
        _size(opts.patch_size),
        _size(opts.stride),
        edge=opts.edge,
        pad_mode=opts.pad_mode,
        channel_axis=_channel_axis(image, opts.channel_axis),
    )


def out_dtype(dtype: np.dtype, opts: Options, grid: PatchGrid | None = None) -> np.dtype:
    """The merged image's dtype: ``auto`` keeps the input's (so a PNG stays a PNG and an
    identity run is exact), except bool, whose merge is a fraction (float32), and a
    predictor's output of another dtype (class probabilities stay float); ``input`` keeps
    it always; or the float dtype named."""
    if opts.dtype == "auto":
        if grid is not None and isinstance(FILTERS[opts.patch_filter], Predictor):
            out = predicted(grid, dtype, opts)[0].dtype
            if out != dtype:
                return work_dtype(out)
        return np.dtype(np.float32) if dtype == np.bool_ else dtype
    return dtype if opts.dtype == "input" else np.dtype(opts.dtype)


def _filter_dtype(dtype: np.dtype, opts: Options, grid: PatchGrid | None = None) -> np.dtype:
    filt = FILTERS[opts.patch_filter]
    if isinstance(filt, Predictor):
        return predicted(grid, dtype, opts)[0].dtype
    probe = filt(np.zeros((1, 3, 3), dtype), (1, 2), **opts.filter_params)
    return np.asarray(probe).dtype


def predicted(grid: PatchGrid, dtype: np.dtype, opts: Options):
    """The outputs of the chosen predictor on ``grid`` (one call on one zero patch; cached per
    geometry and dtype)."""
    key = (
        opts.patch_filter,
        grid.patch_size,
        grid.n_channels,
        np.dtype(dtype).str,
        tuple(sorted(opts.filter_params.items())),
    )
    if key not in _PREDICTED:
        _PREDICTED[key] = FILTERS[opts.patch_filter].probe(grid, dtype, opts.filter_params)
    return _PREDICTED[key]


_PREDICTED: dict = {}


def image_bytes(it: Item, opts: Options, n: int = 1) -> int:
    """Planned peak of ``n`` images of ``it``'s kind in memory: read, stacked, processed
    (:func:`make_plan`), then measured one at a time."""
    dtype = it.image.dtype
    plan = make_plan(
        it.grid,
        n,
        dtype=dtype,
        window=opts.window,
        reduce=opts.reduce,
        reference=opts.reference,
        filter_dtype=_filter_dtype(dtype, opts, it.grid),
        out_dtype=out_dtype(dtype, opts, it.grid),
        metrics=False,
    )
    pixels = math.prod(it.image.shape)
    metrics = 0
    if opts.metrics is not None:
        metrics = 24 * min(pixels, 2**20) + (
            ssim_bytes(it.image.shape, it.grid.channel_axis) if opts.ssim else 0
        )
    return 2 * n * pixels * dtype.itemsize + plan.peak_bytes + metrics


def _lazy_bytes(grid: PatchGrid, chunk: int, threads: int) -> int:
    """Rough peak of the chunked route: per thread, a halo'd chunk held ~6 times (input,
    canvas, anchor, result, error, metrics) in float64, plus a filtered batch."""
    block = math.prod(
        min(n, chunk) + 2 * (p - 1) for n, p in zip(grid.padded_shape, grid.patch_size, strict=True)
    )
    return threads * (6 * 8 * block * (grid.n_channels or 1) + 2 * 8 * 2**20)


def stream_threads(grid: PatchGrid, chunk: int, workers: int) -> int:
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
            problems.append(
                f"--channel-axis must be auto, none or an integer, got {opts.channel_axis!r}"
            )
    problems += _check_paths(opts)
    return problems


#: Core messages name API parameters: the options that set them.
_OPTIONS = {
    "window parameter `sigma`": "--window-sigma",
    "`window`": "--window",
    "`fill_value`": "--fill-value",
    "filter parameter": "--param",
    "filter ": "--filter/--param",
}


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
            problems.append(f"--metrics {m}: folder {m.parent} does not exist (only -o is created)")
    return problems


def make_batch_plan(paths, opts: Options) -> BatchPlan:
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
    images, unreadable = _probe_all(files)
    if opts.fail_fast or not images:
        problems += [msg for _, msg in unreadable]
    if not parameters_ok:  # they would repeat for every file: list them once, with the rest
        raise PlanError("\n".join(problems))
    items = _plan_items(images, opts, problems)
    problems += _check_outputs(files, items, opts)
    if problems:
        raise PlanError("\n".join(problems))
    todo = [it for it in items if not it.skip]
    batches = _batches([it for it in todo if not it.lazy], opts)
    processes = max(1, min(opts.workers, len(batches)))
    return BatchPlan(
        items,
        batches,
        sum(it.grid.n_patches for it in todo),
        _peak_bytes(todo, batches, processes, opts),
        processes,
        unreadable,
    )


def _probe_all(files):
    """``(headers, [(path, why) for the unreadable])``."""
    images, unreadable = [], []
    for path in files:
        try:
            images.append(io.probe(path))
        except io.ImageError as exc:
            unreadable.append((path, str(exc)))
    return images, unreadable


def _plan_items(images, opts: Options, problems: list[str]) -> list[Item]:
    """An :class:`Item` per image; the problems of each go to ``problems``."""
    processes = max(1, min(opts.workers, len(images)))
    items = []
    for image in images:
        try:
            items.append(_plan_item(image, opts, processes))
        except (io.ImageError, ValueError, TypeError) as exc:
            msg = str(exc)
            problems.append(msg if str(image.path) in msg else f"{image.path}: {msg}")
    return items


def _peak_bytes(todo: list[Item], batches, processes: int, opts: Options) -> int:
    """The larger of the in-memory phase (each process on its largest batch) and the
    largest streamed image."""
    lazy = [
        _lazy_bytes(it.grid, opts.chunk, stream_threads(it.grid, opts.chunk, opts.workers))
        for it in todo
        if it.lazy
    ]
    in_memory = processes * max((image_bytes(b[0], opts, len(b)) for b in batches), default=0)
    return max([*lazy, in_memory, 0])


def _plan_item(image: io.ImageFile, opts: Options, processes: int) -> Item:
    grid = _grid(image, opts)
    fmt = image.format if opts.out_format == "same" else opts.out_format
    dtype = out_dtype(image.dtype, opts, grid)
    model = FILTERS[opts.patch_filter]
    if (
        opts.errors
        and isinstance(model, Predictor)
        and not model.comparable(predicted(grid, image.dtype, opts), grid)
    ):
        raise io.ImageError(
            f"{image.path}: --errors compares the output with the input, but predictor "
            f"{model.name!r} returns {predicted(grid, image.dtype, opts)[0].describe(grid, False)} "
            f"for patches of {grid.patch_shape}; leave out --errors"
        )
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
                f"use fewer --workers"
            )
        threads = stream_threads(grid, opts.chunk, opts.workers)
        need = _lazy_bytes(grid, opts.chunk, threads)
        if need > opts.max_memory:
            raise io.ImageError(
                f"{image.path}: streaming in chunks of {opts.chunk} px on {threads} thread(s) "
                f"needs about {format_bytes(need)} ({format_bytes(need // threads)} a "
                f"thread), over --max-memory {format_bytes(opts.max_memory)}; use a smaller "
                f"--chunk or fewer --workers"
            )
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
            f"--dtype input, or --format tiff/npy/zarr"
        )
    if fmt == "jpeg" and dtype != np.uint8:
        raise io.ImageError(f"{image.path}: JPEG output holds uint8 only, not {dtype}")
    if not grid.is_covering and dtype.kind != "f":
        if opts.fill_value is None:
            raise io.ImageError(
                f"{image.path}: some pixels are covered by no patch (--edge drop, or stride > "
                f"patch size) and the {dtype} output cannot mark them NaN: pass --fill-value, "
                f"or --dtype float32"
            )
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
        return (
            f"{out}: written twice (from {seen[r]} and {it.image.path}); give the inputs "
            f"distinct names"
        )
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
    outs = [(it.output, out_dtype(it.image.dtype, opts, it.grid))]
    outs += [(it.error_output, None)] if it.error_output else []
    return all(_complete(o, it.image.shape, dt) for o, dt in outs) and (
        opts.metrics is None or str(it.image.path) in have_rows
    )


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
            problems += [
                f"{o}: exists; pass --overwrite to replace it, or --skip-existing to keep it"
                for o in existing
            ]
    if (
        opts.metrics is not None
        and opts.metrics.exists()
        and not (opts.overwrite or opts.skip_existing)
    ):
        problems.append(
            f"--metrics {opts.metrics}: exists; pass --overwrite to replace it, or "
            f"--skip-existing to add to it"
        )
    return problems


def _batches(items: list[Item], opts: Options) -> list[list[Item]]:
    """Consecutive images of one shape, dtype and grid, stacked up to the batch size."""
    out: list[list[Item]] = []
    for it in items:
        key = (it.image.shape, it.image.dtype, it.grid)
        if (
            out
            and (out[-1][0].image.shape, out[-1][0].image.dtype, out[-1][0].grid) == key
            and len(out[-1]) < _batch_size(it, opts)
        ):
            out[-1].append(it)
        else:
            out.append([it])
    return out


def _batch_size(it: Item, opts: Options) -> int:
    if opts.batch_images:
        return opts.batch_images
    per_image = math.prod(it.grid.padded_shape) * (it.grid.n_channels or 1) * 8
    return int(min(256, max(1, BATCH_TARGET_BYTES // per_image)))


def describe(plan: BatchPlan, opts: Options) -> str:
    """The plan, as printed before the run."""
    lazy = [it for it in plan.items if it.lazy and not it.skip]
    skipped = sum(it.skip for it in plan.items)
    shapes = sorted({it.image.shape for it in plan.items})
    ps = "x".join(map(str, plan.items[0].grid.patch_size)) if plan.items else "-"
    listed = ", ".join("x".join(map(str, s)) for s in shapes[:3])
    listed += ", ..." if len(shapes) > 3 else ""
    lines = [
        (
            f"plan: {len(plan.items):,} image(s) of {len(shapes)} shape(s) ({listed}), "
            f"{plan.n_patches:,} patches of {ps}, stride {'x'.join(map(str, opts.stride))}, "
            f"filter {opts.patch_filter}, window {opts.window}"
        ),
        (
            f"      in memory: {sum(map(len, plan.batches)):,} image(s) in {len(plan.batches):,} "
            f"batch(es) on {plan.processes} process(es); streamed through dask: {len(lazy)} "
            f"image(s)" + (f"; skipped (already done): {skipped}" if skipped else "")
        ),
        (
            f"      estimated peak memory {format_bytes(plan.peak_bytes)} of a "
            f"{format_bytes(opts.max_memory)} budget (--max-memory); output to {opts.output}/"
        ),
    ]
    lines += [f"      will skip (unreadable): {msg}" for _, msg in plan.unreadable]
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict]:
    """The whole rows of a metrics CSV (a row cut short by a hard kill is left out)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return [
            r
            for r in csv.DictReader(f)
            if r.get("input") and all(r.get(k) not in (None, "") for k in METRIC_COLUMNS)
        ]
