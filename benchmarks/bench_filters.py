"""Separable linear filters on a stack of small patches: compiled kernels vs scipy.ndimage.

    python benchmarks/bench_filters.py [--patches 15376] [--size 39] [--repeat 5]

The workload is the issue's: 15,376 float32 patches of 39x39 (a 162x162 image at stride 1),
filtered patch by patch (nothing mixes between patches). For each filter it times, interleaved
in one process (best of ``--repeat``): ``scipy.ndimage`` as the NumPy backend calls it, the
compiled kernels of ``patch_viewer.core.separable`` (the numba backend's; large stacks
are split over the cores), and for the gaussian
the batched-matrix-product alternative (scipy's own 1-D operator, ``gaussian_filter1d`` of the
identity, applied with ``np.matmul`` in float32). It prints µs per patch, the speed-up over
scipy, and how far each result is from scipy's in float32 ulp (0 = the same bits).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from scipy import ndimage as ndi

from patch_viewer.core import filters as F
from patch_viewer.core import separable as S


def pv_threads():
    from patch_viewer.core.merge.plan import default_workers

    return default_workers(1 << 40)


def ulp(a, b):
    """Largest distance in units in the last place (float32), 0 when the bits agree."""
    ia = a.astype(np.float32).view(np.int32).astype(np.int64)
    ib = b.astype(np.float32).view(np.int32).astype(np.int64)
    return int(np.abs(ia - ib).max())


def matmul_gaussian(x, sigma):
    p = x.shape[-1]
    m = ndi.gaussian_filter1d(np.eye(p), sigma, axis=0, mode="reflect").astype(np.float32)
    return m @ x @ m.T  # rows then columns, batched over the patches


def cases(sizes):
    axes = (1, 2)
    sig = {s: (0.0, s, s) for s in sizes}
    return [
        (
            f"gaussian sigma {s}",
            lambda x, s=s: ndi.gaussian_filter(x, sig[s], output=np.empty_like(x)),
            lambda x, s=s: S.gaussian(x, axes, s),
            lambda x, s=s: matmul_gaussian(x, s),
        )
        for s in sizes
    ] + [
        (
            "uniform size 3",
            lambda x: ndi.uniform_filter(x, (1, 3, 3), output=np.empty_like(x)),
            lambda x: S.uniform(x, axes, 3),
            None,
        ),
        ("sobel (3 passes x 2 axes)", None, None, None),
        ("unsharp radius 1", None, None, None),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=15_376)
    ap.add_argument("--size", type=int, default=39)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    x = np.random.default_rng(0).random((args.patches, args.size, args.size), np.float32)
    print(
        f"# {args.patches} patches of {args.size}x{args.size} float32, "
        f"{platform.processor() or platform.machine()}, best of {args.repeat}; compiled: "
        f"{pv_threads()} thread(s), scipy: one"
    )
    print(
        "| filter | scipy µs/patch | compiled µs/patch | speed-up | ulp vs scipy "
        "| matmul µs/patch | matmul ulp |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, case_ref, case_fast, mm in cases((1.0, 5.0)):
        ref, fast = case_ref, case_fast
        if ref is None:  # whole registered filters, each backend as the pipeline calls it
            fname = name.split()[0]
            params = {"radius": 1.0, "amount": 1.0} if fname == "unsharp" else {}
            filt = F.FILTERS[fname]
            ref = _with_backend("numpy", filt, params)
            fast = _with_backend("numba", filt, params)
        runs = {"ref": ref, "fast": fast} | ({"mm": mm} if mm else {})
        for f in runs.values():
            f(x[:64])  # compile / warm
        best = dict.fromkeys(runs, np.inf)
        out = {}
        for _ in range(args.repeat):
            for key, f in runs.items():  # interleaved: the machine's noise hits all alike
                t = time.perf_counter()
                out[key] = f(x)
                best[key] = min(best[key], time.perf_counter() - t)
        us = {k: v / args.patches * 1e6 for k, v in best.items()}
        row = (
            f"| {name} | {us['ref']:.2f} | {us['fast']:.2f} | {us['ref'] / us['fast']:.2f}x "
            f"| {ulp(out['ref'], out['fast'])} |"
        )
        row += f" {us['mm']:.2f} | {ulp(out['ref'], out['mm'])} |" if mm else " — | — |"
        print(row, flush=True)


def _with_backend(name, filt, params):
    import os

    def run(x):
        old = os.environ.get("PATCH_VIEWER_BACKEND")
        os.environ["PATCH_VIEWER_BACKEND"] = name
        try:
            return filt(x, (1, 2), **params)
        finally:
            if old is None:
                os.environ.pop("PATCH_VIEWER_BACKEND")
            else:
                os.environ["PATCH_VIEWER_BACKEND"] = old

    return run


if __name__ == "__main__":
    main()
