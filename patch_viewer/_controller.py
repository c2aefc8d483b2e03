"""The Patch Explorer's model, free of Qt: parameters -> job -> worker body -> result dataclasses.

The view (:mod:`patch_viewer._qt`) reads its widgets into :class:`Params`, turns them into a
:class:`Job` here, and runs :func:`compute` in a napari thread worker. The worker yields
:class:`Progress`, :class:`Shown` (the layers' data, prepared off the main thread) and
:class:`Metrics`, and returns the SSIM.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import _layers
from ._layers import LAYER_NAMES  # noqa: F401 - defined once, in the module that styles layers
from .core import (
    PatchGrid,
    compute_metrics,
    format_bytes,
    is_lazy,
    iter_process,
    make_plan,
    process,
)
from .core.merge import work_dtype
from .core.metrics import iter_ssim
from .core.pipeline import BUFFER_NAMES

#: The filter list's entry for a model named by its import path (``package.module:function``).
CUSTOM = "custom function…"
VOLUME_MODES = ("3-D patches", "2-D patches per plane")
#: The GUI refuses runs whose estimated peak memory exceeds this.
GUI_MAX_BYTES = 2 * 2**30
#: Patch pixels filtered and merged per second, a conservative guess for the run-time estimate.
PIXELS_PER_SECOND = 2e7
#: Live preview does not start runs estimated longer than this; the user presses Run.
WARN_SECONDS = 3.0
#: A run shows that it runs (metrics marked stale, progress, Cancel) once it outlasts this.
SHOW_BUSY_AFTER_MS = 150
#: Seconds between progress updates (each one repaints the widget on the main thread).
PROGRESS_INTERVAL = 0.1


@dataclass(frozen=True)
class Params:
    """The explorer's settings, as plain values."""

    patch_size: tuple
    stride: tuple
    edge: str = "shift"
    pad_mode: str = "reflect"
    per_plane: bool = False
    window: str = "uniform"
    window_sigma: float = 0.125
    reduce: str = "mean"
    patch_filter: str = "identity"
    filter_params: dict = field(default_factory=dict)
    reference: str = "input"
    custom: str = ""  # "package.module:function" when patch_filter is CUSTOM


@dataclass(frozen=True)
class Job:
    """Everything a run needs, read from the widgets on the main thread."""

    image: np.ndarray
    grid: PatchGrid
    batched: bool
    rgb: bool
    kwargs: dict
    limits: tuple
    lazy: bool = False  # a dask/zarr image: results stay lazy, napari computes what it shows
    params: Params | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def estimated_seconds(self) -> float:
        return self.grid.n_patches * math.prod(self.grid.patch_size) / PIXELS_PER_SECOND


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    elapsed: float

    @property
    def eta(self) -> float | None:
        """Seconds left, extrapolated from the rate so far (None before any batch)."""
        if self.done <= 0:
            return None
        return self.elapsed * (self.total - self.done) / self.done


@dataclass(frozen=True)
class Shown:
    """A run's results as the layers show them."""

    result: object
    stack: object
    weights: np.ndarray
    error: np.ndarray
    merged_limits: tuple
    merged: np.ndarray  # result.merged as displayed
    rgb: bool | None = None  # merged shown as RGB (None: as the input)
    classes: np.ndarray | None = None  # argmax of a predictor's channels (1-based), or None
    comparable: bool = True  # False: a predictor's output the input cannot be compared with


@dataclass(frozen=True)
class Metrics:
    values: dict
    error_limit: float


def make_job(data, rgb: bool, limits, p: Params) -> Job:
    """Validate ``p`` against the image and build the :class:`Job` (raises ValueError...)."""
    lazy = is_lazy(data)
    if not lazy:
        data = np.asarray(data)
    per_plane = data.ndim - rgb == 3 and p.per_plane
    shape = data.shape[1:] if per_plane else data.shape
    grid = PatchGrid(
        shape,
        p.patch_size,
        p.stride,
        edge=p.edge,
        pad_mode=p.pad_mode,
        channel_axis=-1 if rgb else None,
    )
    window_params = {"sigma": p.window_sigma} if p.window == "gaussian" else {}
    kwargs = dict(
        patch_filter=_model(p),
        filter_params=dict(p.filter_params),
        window=p.window,
        window_params=window_params,
        reduce=p.reduce,
        reference=p.reference,
        max_bytes=GUI_MAX_BYTES,
    )
    return Job(data, grid, per_plane, rgb, kwargs, tuple(limits), lazy, p)


def _model(p: Params):
    """The filter's registry name, or for :data:`CUSTOM` the imported function as a
    :class:`~patch_viewer.core.predict.Predictor` (its output found by a first call)."""
    if p.patch_filter != CUSTOM:
        return p.patch_filter
    from .core import Predictor, load_callable

    if not p.custom.strip():
        raise ValueError("Custom function: type its import path, package.module:function.")
    try:
        func = load_callable(p.custom.strip())
    except (ImportError, ValueError, TypeError) as exc:
        raise ValueError(f"Custom function: {exc}") from None
    return Predictor(func, name=p.custom.strip())


def start(job: Job, buffers: dict | None = None):
    """The run's generator, validated; a memory refusal is reworded for a GUI user.
    ``buffers`` (see :meth:`Buffers.lend`) may take the run's merged image, error and
    weights."""
    try:
        return iter_process(
            job.image, job.grid, ssim=job.lazy, metrics=job.lazy, buffers=buffers, **job.kwargs
        )
    except MemoryError:
        n = job.image.shape[0] if job.batched else 1
        need = make_plan(job.grid, n).peak_bytes
        raise MemoryError(
            f"Too much memory: raise the stride or shrink the patch "
            f"({format_bytes(need)} needed, {format_bytes(GUI_MAX_BYTES)} allowed)."
        ) from None


def patch_near(grid: PatchGrid, point) -> tuple | None:
    """Grid index of the patch whose centre is nearest ``point`` among those covering it."""
    index = []
    for at, n, o, p in zip(point, grid.spatial_shape, grid.origins, grid.patch_size):
        x = math.floor(at)
        if not 0 <= x < n:
            return None
        covering = np.flatnonzero((o <= x) & (x < o + p))
        if covering.size == 0:
            return None
        centres = o[covering] + (p - 1) / 2
        index.append(int(covering[np.argmin(np.abs(centres - x))]))
    return tuple(index)


def keep_position(old: PatchGrid | None, index: tuple | None, new: PatchGrid) -> tuple:
    """The index in ``new`` of the patch nearest the centre of ``old``'s patch ``index``."""
    if old is None or index is None or old.ndim != new.ndim:
        return (0,) * new.ndim
    centre = [o + (p - 1) / 2 for o, p in zip(old.patch_origin(index), old.patch_size)]
    return tuple(
        int(np.argmin(np.abs(o + (p - 1) / 2 - c)))
        for o, p, c in zip(new.origins, new.patch_size, centre)
    )


def robust_limits(data, rgb: bool = False, q: float = 0.5) -> tuple[float, float]:
    """Display range of ``data``: its ``q``-th to ``100-q``-th percentiles, on a subsample."""
    a = np.asarray(data)
    step = max(1, int(a.size // 2**18))
    flat = a.reshape(-1)[::step]
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return (0.0, 1.0)
    lo, hi = (float(v) for v in np.percentile(flat, (q, 100 - q)))
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:
        hi = lo + 1.0
    return (lo, hi)


def throttle_progress(gen, interval: float | None = None):
    """Re-yield ``gen``'s ``(done, total)`` as :class:`Progress` at most every ``interval``
    seconds, ``None`` in between: every batch still yields, so a newer run's ``quit()`` stops
    this one at once. Returns ``gen``'s return value."""
    interval = PROGRESS_INTERVAL if interval is None else interval
    t0 = last = time.perf_counter()
    try:
        while True:
            try:
                value = next(gen)
            except StopIteration as stop:
                return stop.value
            now = time.perf_counter()
            if now - last >= interval:
                last = now
                yield Progress(value[0], value[1], now - t0)
            else:
                yield None
    finally:
        gen.close()  # cancelling the worker cancels the run


def _display_weights(weights: np.ndarray) -> np.ndarray:
    """The weights as displayed: float32 (a run given a float32 buffer wrote them so)."""
    return weights if weights.dtype == np.float32 else weights.astype(np.float32)


class Buffers:
    """Image-sized arrays handed from run to run, so that a run writes its merged image, error
    and weights into memory already paged in instead of new arrays (each new 16-32 MiB array
    costs page faults, and they cost the most in the viewer's busy process).

    Lent to a job by :meth:`lend` (on the main thread, when the run starts), an array comes
    back to the free list only when that job's worker has finished (:meth:`finished`) and no
    layer shows it (:meth:`reclaim`, given the arrays on screen): a buffer still shown, or
    still written by a stale worker, is never lent again.
    """

    #: Free arrays kept at most (the rest are dropped to the allocator).
    KEEP = 4

    def __init__(self):
        self._free: list[np.ndarray] = []
        self._lent: dict[int, list[np.ndarray]] = {}  # id(job) -> its arrays, worker running
        self._held: list[np.ndarray] = []  # the worker finished; maybe on screen

    def lend(self, job: Job) -> dict:
        """Buffers for ``job``'s merged image and error (float32, the image's shape) and
        display weights (float32, the grid's spatial shape); the run uses those that fit its
        results (the merged image where it is float32 and weighed straight into it)."""
        if job.lazy or job.rgb or job.image.dtype.kind not in "fiu":
            return {}
        merged, error, weights = BUFFER_NAMES  # the keys of process(buffers=)
        shapes = {error: job.image.shape, weights: job.grid.spatial_shape}
        if work_dtype(job.image.dtype) == np.float32:  # the merge's default result dtype
            shapes[merged] = job.image.shape
        out = {name: self._take(shape) for name, shape in shapes.items()}
        self._lent[id(job)] = list(out.values())
        return out

    def _take(self, shape) -> np.ndarray:
        for k, a in enumerate(self._free):
            if a.shape == tuple(shape):
                return self._free.pop(k)
        return np.empty(shape, np.float32)

    def finished(self, job: Job) -> None:
        """``job``'s worker has finished: its arrays are free once no layer shows them."""
        self._held += self._lent.pop(id(job), [])

    def reclaim(self, shown) -> None:
        """Free the held arrays that share no memory with any array in ``shown``."""
        shown = [a for a in shown if isinstance(a, np.ndarray)]
        keep, free = [], []
        for a in self._held:
            (keep if any(np.may_share_memory(a, s) for s in shown) else free).append(a)
        self._held = keep
        self._free = (free + self._free)[: self.KEEP]

    def lent(self) -> list[np.ndarray]:
        """The arrays lent to workers that have not finished."""
        return [a for arrays in self._lent.values() for a in arrays]


class _Cancelled(Exception):
    pass


def _lazy_metrics(result, job: Job):
    """A lazy run's metrics (a full pass over the image), given up once a newer run starts."""
    import dask
    from dask.callbacks import Callback

    def check(*_):
        if job.cancel.is_set():
            raise _Cancelled

    try:
        with Callback(pretask=check):
            (metrics,) = dask.compute(result.metrics, scheduler="threads")
    except _Cancelled:
        return None
    return {k: float(v) for k, v in metrics.items()}


def compute(gen, job: Job):
    """Worker body: stream the run (yielding :class:`Progress`), hand over the layers' data
    (:class:`Shown`), then :class:`Metrics`, then return the slow SSIM (lazy: every metric)."""
    result = yield from throttle_progress(gen)
    stack_cls = _layers.LazyPatchStack if job.lazy else _layers.PatchStack
    stack = stack_cls(job.image, job.grid, job.batched)
    if not job.lazy and result.merged.shape != job.image.shape:
        shown = _predicted(result, job, stack)
        yield shown
        if shown.comparable:  # K channels against the model run on the whole image
            spatial = job.grid.ndim + job.batched
            ca = result.merged.ndim - 1 if result.merged.ndim > spatial else None
            yield Metrics(
                compute_metrics(
                    result.merged, result.reference, channel_axis=ca, ssim=False, error=result.error
                ),
                _layers.error_limit(shown.error),
            )
            return (yield from iter_ssim(result.merged, result.reference, channel_axis=ca))
        return None
    error = _layers.error_data(result.error, job.rgb)  # lazy stays lazy
    weights = result.weights if job.lazy else _display_weights(result.weights)
    limits = job.limits if job.lazy else robust_limits(result.merged, job.rgb)
    merged = result.merged
    if job.rgb and not job.lazy and job.image.dtype == np.uint8:
        # napari draws a float RGB thumbnail without its contrast limits (white above 1):
        # show an 8-bit image as 8 bits, rounded.
        merged = np.clip(np.rint(merged), 0, 255).astype(np.uint8)
        limits = (0.0, 255.0)
    yield Shown(result, stack, weights, error, limits, merged)
    if job.lazy:
        return _lazy_metrics(result, job)
    channel_axis = None if job.grid.channel_axis is None else job.grid.channel_axis + job.batched
    yield Metrics(
        compute_metrics(
            result.merged,
            result.reference,
            channel_axis=channel_axis,
            ssim=False,
            error=result.error,
        ),
        _layers.error_limit(error),
    )
    return (yield from iter_ssim(result.merged, result.reference, channel_axis=channel_axis))


def _predicted(result, job: Job, stack) -> Shown:
    """A predictor's output of another shape (K channels, another scale, vectors): shown as
    a grey image or an RGB composite of its channels, with the argmax as class labels; the
    error against the whole-image model when ``reference="filter"``, else none."""
    spatial = job.image.shape[1:] if job.batched else job.image.shape
    spatial = spatial[:-1] if job.rgb else spatial
    merged = result.merged
    if job.batched:
        parts = [_layers.channels_display(m, spatial) for m in merged]
        shown = np.stack([q[0] for q in parts])
        rgb, classes = parts[0][1], None if parts[0][2] is None else np.stack([q[2] for q in parts])
    else:
        shown, rgb, classes = _layers.channels_display(merged, spatial)
    limits = _layers.rgb_limits(shown) if rgb else robust_limits(shown)
    comparable = result.error is not None
    if comparable:
        e = np.asarray(result.error)
        e = (
            e
            if e.ndim == len(job.image.shape) - job.rgb
            else np.take_along_axis(
                e, np.abs(np.nan_to_num(e)).argmax(axis=-1)[..., None], axis=-1
            )[..., 0]
        )
        error = _layers._resample(e, spatial) if e.shape[-len(spatial) :] != spatial else e
    else:
        error = np.zeros(job.image.shape[:-1] if job.rgb else job.image.shape, np.float32)
    weights = np.asarray(result.weights, np.float32)
    if weights.shape != tuple(spatial):
        weights = _layers._resample(weights, spatial)
    return Shown(
        result, stack, weights, error.astype(np.float32), limits, shown, rgb, classes, comparable
    )


def output_lines(result, job: Job) -> list[str]:
    """What a predictor returned, for the read-out (nothing for plain filters)."""
    outputs = getattr(result, "outputs", None)
    if not outputs or result.merged.shape == job.image.shape:
        return []
    merged = result.merged
    spatial = job.image.shape[:-1] if job.rgb else job.image.shape
    extra = merged.shape[len(spatial) :] if merged.shape[: len(spatial)] == spatial else None
    if extra:
        what = f"{extra[0]} channels: RGB shows the first {min(extra[0], 3)}, 'classes' the argmax"
    else:
        what = f"shape {merged.shape} (shown resampled to the image)"
    names = f" ({', '.join(outputs)})" if len(outputs) > 1 else ""
    lines = [f"output{names}: {what}"]
    if result.error is None:
        lines.append(
            "no error map: the output is not an image like the input (set "
            "'error vs' to the filter on the whole image)"
        )
    return lines


def metric_lines(m: dict, ssim: bool = True) -> list[str]:
    return [
        f"max |err|: {float(m['max_abs']):.3g}   RMSE: {float(m['rmse']):.3g}",
        f"PSNR: {float(m['psnr']):.1f} dB   "
        + (f"SSIM: {float(m['ssim']):.4f}" if ssim else "SSIM: …"),
    ]


def summary_lines(job: Job, result) -> list[str]:
    cmin, cmax = job.grid.coverage_range()
    return [
        f"patches: {result.plan.n_patches:,}   grid: {' x '.join(map(str, job.grid.grid_shape))}",
        f"coverage: {cmin}–{cmax}   est. memory: {format_bytes(result.plan.peak_bytes)}",
        f"compute time: {result.elapsed * 1e3:.0f} ms" + ("  (lazy)" if job.lazy else ""),
        *output_lines(result, job),
        *(
            ["max |err|: n/a   RMSE: n/a", "PSNR: n/a   SSIM: n/a"]
            if result.error is None
            else ["max |err|: …   RMSE: …", "PSNR: …   SSIM: …"]
        ),
    ]


# ---------------------------------------------------------------------- settings carried to code
def _process_args(p: Params) -> str:
    args = [
        f"pv.Predictor(pv.load_callable({p.custom!r}))"
        if p.patch_filter == CUSTOM
        else repr(p.patch_filter)
    ]
    if p.filter_params:
        args.append(f"filter_params={dict(p.filter_params)!r}")
    args.append(f"window={p.window!r}")
    if p.window == "gaussian":
        args.append(f"window_params={{'sigma': {p.window_sigma!r}}}")
    args += [f"reduce={p.reduce!r}", f"reference={p.reference!r}"]
    return ", ".join(args)


def to_python(p: Params, *, rgb: bool, path: str | None = None, layer: str = "image") -> str:
    """A script that reproduces the run with the public API; the result is bound to ``result``.

    The image comes from ``path`` when the layer was opened from a file, else from the open
    viewer (``viewer.layers[layer].data``).
    """
    if path is not None:
        load = f"from skimage import io\n\nimage = io.imread({str(path)!r})"
    else:
        load = f"image = viewer.layers[{layer!r}].data  # in napari's console"
    shape = "image.shape[1:]" if p.per_plane else "image.shape"
    return (
        f"import patch_viewer as pv\n{load}\n"
        f"grid = pv.PatchGrid({shape}, {tuple(p.patch_size)!r}, {tuple(p.stride)!r}, "
        f"edge={p.edge!r}, pad_mode={p.pad_mode!r}, channel_axis={-1 if rgb else None!r})\n"
        f"result = pv.process(image, grid, {_process_args(p)})\n"
    )


def to_command(p: Params, *, path: str | None, output: str = "results") -> str:
    """A ``patch-viewer process`` line that reproduces the run (float64 merged, as ``.npy``)."""
    import shlex

    if p.patch_filter == CUSTOM:
        return (
            f"# {p.custom} has no command-line name: register it as an entry point of the "
            f"patch_viewer.filters group (see the README), then use --filter NAME"
        )
    words = [
        "patch-viewer",
        "process",
        str(path) if path else "IMAGE.tif",
        "-o",
        output,
        "--patch-size",
        *map(str, p.patch_size),
        "--stride",
        *map(str, p.stride),
        "--edge",
        p.edge,
        "--pad-mode",
        p.pad_mode,
        "--filter",
        p.patch_filter,
    ]
    for k, v in p.filter_params.items():
        words += ["--param", f"{k}={v}"]
    words += ["--window", p.window]
    if p.window == "gaussian":
        words += ["--window-sigma", repr(p.window_sigma)]
    words += [
        "--reduce",
        p.reduce,
        "--reference",
        p.reference,
        "--dtype",
        "float64",
        "--format",
        "npy",
    ]
    return " ".join(shlex.quote(w) for w in words)


# ---------------------------------------------------------------------- the Tune sweep
#: The sweep runs on a centre crop at most this many pixels a side (a coarse preview).
TUNE_CROP = 512


@dataclass(frozen=True)
class TunePoint:
    """One setting of the sweep and what it costs: seam error against the whole-image filter,
    compute time, patch count."""

    stride: int
    rmse: float
    max_abs: float
    seconds: float
    n_patches: int


def tune_strides(patch: int, n: int = 6) -> list[int]:
    """Strides from the patch size (no overlap) down to an eighth of it."""
    return sorted({max(1, round(patch / f)) for f in np.geomspace(1, 8, n)}, reverse=True)


def sweep(image, p: Params, rgb: bool, strides):
    """Generator: yields one :class:`TunePoint` per stride (closing it cancels the sweep)."""
    image = np.asarray(image)
    if p.per_plane:  # 2-D patches per plane: tune on the middle plane
        image = image[image.shape[0] // 2]
    spatial = image.shape[:-1] if rgb else image.shape
    crop = tuple(
        slice(max(0, (n - TUNE_CROP) // 2), max(0, (n - TUNE_CROP) // 2) + TUNE_CROP)
        for n in spatial
    )
    image = image[crop]
    window_params = {"sigma": p.window_sigma} if p.window == "gaussian" else {}
    for s in strides:
        grid = PatchGrid(
            image.shape,
            p.patch_size,
            s,
            edge=p.edge,
            pad_mode=p.pad_mode,
            channel_axis=-1 if rgb else None,
        )
        t0 = time.perf_counter()
        r = process(
            image,
            grid,
            p.patch_filter,
            filter_params=p.filter_params,
            window=p.window,
            window_params=window_params,
            reduce=p.reduce,
            reference="filter",
            ssim=False,
            max_bytes=GUI_MAX_BYTES,
        )
        yield TunePoint(
            int(s),
            float(r.metrics["rmse"]),
            float(r.metrics["max_abs"]),
            time.perf_counter() - t0,
            grid.n_patches,
        )
