"""10^8 patches: 26,000 images of 100x100 float32, 39x39 patches at stride 1 (3,844 each).

    python benchmarks/bench_1e8.py                 # a 1,000-image sample, extrapolated
    python benchmarks/bench_1e8.py --images 26000  # the whole run

Images are made on the fly in chunks (the input alone would be 1 GB), each chunk goes through
``patch_viewer.process`` with a filter that makes new values (``scale``: x * 2, marked
``pv.elementwise``; ``--filter invert`` for a per-patch one, ``--filter gaussian`` for one that
runs on materialised batches), on two worker processes (``--threads`` for threads).
``PATCH_VIEWER_BACKEND=numpy`` measures the NumPy fallback. Prints the rate in patches/s, the
time the full 10^8 run takes at that rate (linear extrapolation: every chunk is the same work),
and the peak resident memory summed over all processes.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from unittest import mock

import numpy as np
from _memory import tree_peak

import patch_viewer as pv

TOTAL_IMAGES = 26_000


@pv.elementwise
def scale(x):
    """x * 2: element-wise, so the compiled backend runs it inside the merge."""
    return x * np.float32(2.0)


def job(chunk, filt, batch_bytes):
    start, n = chunk
    grid = pv.PatchGrid((100, 100), 39, stride=1)
    images = np.random.default_rng(start).random((n, 100, 100), dtype=np.float32)
    r = pv.process(
        images, grid, scale if filt == "scale" else filt, ssim=False, batch_bytes=batch_bytes
    )
    assert r.merged.shape == images.shape
    return n * grid.n_patches


def warm(filt):
    """Each worker's start: imports, and one small run that compiles (or loads) the kernels."""
    grid = pv.PatchGrid((100, 100), 39, stride=1)
    pv.process(
        np.zeros((1, 100, 100), np.float32), grid, scale if filt == "scale" else filt, ssim=False
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=32, help="images per process() call")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--threads", action="store_true", help="threads instead of processes (slower: the GIL)"
    )
    ap.add_argument("--filter", default="scale", help="'scale' or a registered filter name")
    ap.add_argument(
        "--batch-mib",
        type=float,
        default=None,
        help="streamed batch size (default: process()'s own)",
    )
    args = ap.parse_args(argv)
    grid = pv.PatchGrid((100, 100), 39, stride=1)
    batch_bytes = None if args.batch_mib is None else int(args.batch_mib * 2**20)
    chunks = [(i, min(args.chunk, args.images - i)) for i in range(0, args.images, args.chunk)]
    stop = tree_peak()
    t_start = time.perf_counter()
    pool_cls = ThreadPoolExecutor if args.threads else ProcessPoolExecutor
    with pool_cls(args.workers, initializer=warm, initargs=(args.filter,)) as pool:
        list(pool.map(time.sleep, [0.2] * args.workers))  # every worker started and warm
        t0 = time.perf_counter()
        done = sum(
            pool.map(functools.partial(job, filt=args.filter, batch_bytes=batch_bytes), chunks)
        )
    elapsed = time.perf_counter() - t0
    startup = t0 - t_start
    peak = stop()
    rate = done / elapsed
    total = TOTAL_IMAGES * grid.n_patches
    kind = "threads" if args.threads else "processes"
    print(
        f"{args.images:,} images, {done:,} patches of 39x39 (filter {args.filter}, "
        f"{args.workers} {kind}): {elapsed:.1f} s, {rate / 1e6:.2f} M patches/s"
    )
    print(
        f"10^8 patches ({total:,}) at that rate: {total / rate:.0f} s "
        f"({'measured' if args.images >= TOTAL_IMAGES else 'extrapolated linearly'}), plus "
        f"{startup:.1f} s to start the workers (imports, kernels loaded or compiled); peak "
        f"resident memory {peak / 2**20:.0f} MiB (all processes)"
    )
    us = args.workers * elapsed / done * 1e6
    print(f"per patch: {us:.2f} µs of one core, everything included")
    if args.filter in ("gaussian", "uniform", "sobel", "unsharp", "median"):
        fast, ref = filter_cost(args.filter)
        print(
            f"the filter alone, per 39x39 patch on one core: {fast:.2f} µs here "
            f"(this backend), {ref:.2f} µs with scipy.ndimage ({ref / fast:.2f}x)"
        )


def filter_cost(name, n=15_376):
    """µs per 39x39 patch of the registered filter (as this backend runs it, on one thread)
    and of scipy.ndimage, interleaved, best of 3."""
    from scipy import ndimage as ndi

    filt = pv.FILTERS[name]
    x = np.random.default_rng(0).random((n, 39, 39), np.float32)
    scipy_calls = {
        "gaussian": lambda: ndi.gaussian_filter(x, (0, 1, 1), output=np.empty_like(x)),
        "uniform": lambda: ndi.uniform_filter(x, (1, 3, 3), output=np.empty_like(x)),
        "median": lambda: ndi.median_filter(x, (1, 3, 3), output=np.empty_like(x)),
    }
    ours = lambda: filt(x, (1, 2))  # noqa: E731
    with mock.patch.dict(os.environ, {"PATCH_VIEWER_BACKEND": "numpy"}):
        ref = scipy_calls.get(name, lambda: filt(x, (1, 2)))  # sobel, unsharp: the NumPy path
        ref_timed = _timed(ref)
    fast_timed = _timed(ours)
    with mock.patch.dict(os.environ, {"PATCH_VIEWER_BACKEND": "numpy"}):
        ref_timed = min(ref_timed, _timed(ref))
    return fast_timed / n * 1e6, ref_timed / n * 1e6


def _timed(f, repeat=3):
    from patch_viewer.core.merge import plan

    best = np.inf
    with mock.patch.object(plan, "THREAD_MIN_BYTES", 1 << 62):  # one thread
        for _ in range(repeat):
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
    return best


if __name__ == "__main__":
    main()
