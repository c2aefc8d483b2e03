"""Running a batch plan (see :mod:`patch_viewer.batch`): worker processes that die with their
parent, live progress, the metrics CSV written as images finish, and streamed images.

Faults: an input that fails is logged and skipped (``fail_fast`` stops instead); a full disk
stops the run; Ctrl-C stops it at once. In every case the files written are complete, the CSV
holds the rows earned, and no temporary file is left (a hard kill leaves its temporary files
for the next run into the folder to remove).
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import io
from .batch import (
    METRIC_COLUMNS,
    BatchPlan,
    Item,
    Options,
    out_dtype,
    read_rows,
    stream_threads,
)
from .core import compute_metrics, process

#: Seconds between progress refreshes while worker processes run.
PROGRESS_EVERY = 0.1


@dataclass
class Report:
    """What a run did: metric rows (input order) and the inputs that failed, with why."""

    rows: list[dict]
    failures: list[tuple[Path, str]]
    written: int


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
        return (
            f"[{'#' * fill}{'.' * (width - fill)}] {100 * self.done / self.total:5.1f}% "
            f"{self.done:,}/{self.total:,} patches | {_rate(rate)} | "
            f"ETA {eta}"
        )

    def finish(self) -> str:
        elapsed = time.perf_counter() - self.start
        summary = (
            f"done: {self.done:,} patches in {elapsed:.1f} s "
            f"({_rate(self.done / max(elapsed, 1e-9))})"
        )
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


# --------------------------------------------------------------------------- running
def _process_kwargs(opts: Options) -> dict:
    return {
        "patch_filter": opts.patch_filter,
        "filter_params": opts.filter_params,
        "window": opts.window,
        "window_params": opts.window_params,
        "reduce": opts.reduce,
        "reference": opts.reference,
        "fill_value": opts.fill_value,
    }


def _row(it: Item, metrics: dict) -> dict:
    return {
        "input": str(it.image.path),
        "output": str(it.output),
        "shape": "x".join(map(str, it.image.shape)),
        "dtype": str(it.image.dtype),
        "patches": it.grid.n_patches,
        **{k: f"{float(metrics[k]):.9g}" for k in METRIC_COLUMNS[5:]},
    }


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
    dtype = out_dtype(first.image.dtype, opts, first.grid)
    r = process(
        np.stack(images),
        first.grid,
        dtype=dtype,
        metrics=False,
        progress=tick,
        **_process_kwargs(opts),
    )
    for k, it in enumerate(good):
        row = None
        if opts.metrics is not None:
            m = (
                r.metrics
                if r.error is None
                else compute_metrics(
                    r.merged[k],
                    r.reference[k],
                    channel_axis=first.grid.channel_axis,
                    ssim=opts.ssim,
                    error=r.error[k],
                )
            )  # (a predictor's output of another shape: NaN)
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
_STOP = None  # set once a batch has failed under fail_fast: the others are not started
_WRITING = threading.Lock()


def _init_worker(counter, stop, alive_fd: int, parent_fd: int, parent_pid: int) -> None:
    """In each worker: ignore Ctrl-C (the parent decides), name temporary files after the
    parent's PID, count patches into the shared counter, and exit as soon as the parent is
    gone: a thread blocks on the read end of a pipe whose write end only the parent holds,
    and end-of-file means the parent died (or gave up the run)."""
    global _COUNTER, _STOP
    _COUNTER, _STOP = counter, stop
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

    if opts.fail_fast and _STOP is not None and _STOP.is_set():
        return []  # an earlier batch failed: stop here, as --fail-fast asks
    try:
        results = _run_batch(batch, opts, tick if _COUNTER is not None else None)
    except BaseException:
        if opts.fail_fast and _STOP is not None:
            _STOP.set()
        raise
    if opts.fail_fast and _STOP is not None and any(k == "failed" for k, _ in results):
        _STOP.set()
    return results


class _Pool:
    """Worker processes that die with their parent (see :func:`_init_worker`)."""

    def __init__(self, n: int):
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        self.counter = ctx.Value("q", 0)
        self.stop = ctx.Event()
        self._read, self._write = os.pipe()
        self.pool = ProcessPoolExecutor(
            n,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(self.counter, self.stop, self._read, self._write, os.getpid()),
        )

    def abandon(self) -> None:
        """Stop now: closing the pipe makes every worker exit, whatever it is doing."""
        if self._write is not None:
            os.close(self._write)
            self._write = None
        self.pool.shutdown(wait=True, cancel_futures=True)
        os.close(self._read)
        self._read = None

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for fd in (self._write, self._read):
            if fd is not None:
                os.close(fd)
        self._write = self._read = None


class _Run:
    """One run's bookkeeping: progress, metric rows, failures."""

    def __init__(self, plan: BatchPlan, opts: Options, stream, quiet: bool):
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
        with _deferred_interrupt() as interrupted:
            pool = _Pool(self.plan.processes)
            try:
                self._drive(pool, interrupted)
            except BaseException:
                pool.abandon()
                raise
            pool.close()

    def _drive(self, pool: _Pool, interrupted: threading.Event) -> None:
        """Submit every batch, then collect results and refresh progress until all are in;
        Ctrl-C is acted on here, between waits, never inside the pool's own locks."""
        base = self.progress.done
        pending = {pool.pool.submit(_batch_job, b, self.opts): b for b in self.plan.batches}
        while pending:
            done, _ = wait(pending, timeout=PROGRESS_EVERY, return_when=FIRST_COMPLETED)
            if interrupted.is_set():
                raise KeyboardInterrupt
            self.progress.set(base + pool.counter.value)
            for f in done:
                self._collect(f, pending.pop(f))

    def _collect(self, future, batch) -> None:
        try:
            results = future.result()
        except io.DiskFullError:
            raise
        except Exception as exc:  # noqa: BLE001 - the batch failed: each of its images did
            results = [("failed", (str(it.image.path), f"{it.image.path}: {exc}")) for it in batch]
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


@contextlib.contextmanager
def _deferred_interrupt():
    """While worker processes run, Ctrl-C sets an event instead of raising wherever the main
    thread happens to be (inside the executor's locks, a KeyboardInterrupt could leave them
    held and the shutdown waiting forever); the loop raises it at a safe point."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


class RunFailed(RuntimeError):
    """The run stopped at its first failure (``fail_fast``)."""


def run(plan: BatchPlan, opts: Options, *, stream=None, quiet: bool = False) -> Report:
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
    r = process(
        image,
        it.grid,
        dtype=out_dtype(it.image.dtype, opts, it.grid),
        ssim=opts.ssim,
        **_process_kwargs(opts),
    )
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
    threads = ThreadPoolExecutor(stream_threads(it.grid, opts.chunk, opts.workers))
    try:
        import dask.array as da

        stored = da.store([a for a, _ in stores], [z for _, z in stores], lock=False, compute=False)
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
            raise io.DiskFullError(
                f"disk full: cannot write {it.output} ({io._free(it.output.parent)})"
            ) from exc
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


def _Tick(n_patches, progress):  # a class made on first use (dask import)
    return _tick_class()(n_patches, progress)


def _is_merge(key) -> bool:
    return "patch-merge" in str(key[0] if isinstance(key, tuple) else key)
