"""Larger than memory: a 20,000 x 20,000 float32 zarr image, 256/192 patches, gaussian filter.

    python benchmarks/bench_chunked.py                       # 20,000^2, threads then cluster
    python benchmarks/bench_chunked.py --size 8000 --modes threads

The input (1.6 GB on disk for 20,000^2, chunks of 2,048^2) is written once to --workdir. Each
mode then runs in a fresh process: the merged image is computed chunk by chunk through
``patch_viewer.process`` (the dask path) and stored to a zarr array on disk, together with
max-abs, RMSE and PSNR (SSIM with --ssim) in the same pass. ``threads`` uses dask's threaded
scheduler with 2 workers; ``cluster`` a dask.distributed LocalCluster of 2 worker processes
(1 thread each). Peak memory is the largest sum of resident memory over the benchmark
process and all its children (cluster workers included), sampled every 50 ms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _memory import tree_peak


def make_input(path: Path, size: int, chunk: int) -> None:
    import dask.array as da

    if path.exists():
        return
    t = time.perf_counter()
    image = da.random.default_rng(0).random((size, size), chunks=chunk, dtype=np.float32)
    image.to_zarr(str(path))
    print(f"wrote {path} ({size}x{size} float32) in {time.perf_counter() - t:.0f} s", flush=True)


def run_mode(
    mode: str, src: Path, out: Path, patch: int, stride: int, ssim: bool, work_chunk: int
) -> dict:
    """One measured run (called in a fresh process)."""
    import dask
    import dask.array as da
    import zarr

    import patch_viewer as pv

    stop = tree_peak()
    client = cluster = None
    if mode == "cluster":
        import distributed

        cluster = distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            memory_limit="1GiB",
        )
        client = distributed.Client(cluster)
    t = time.perf_counter()
    # Stored in 2,048^2 chunks, processed in 1,024^2 ones: each task then holds a quarter of
    # the pixels (with its halo) and the run about half the memory, for ~10% more work.
    image = da.from_zarr(str(src)).rechunk(work_chunk)
    grid = pv.PatchGrid(image.shape, patch, stride=stride)
    r = pv.process(image, grid, "gaussian", filter_params={"sigma": 2.0}, ssim=ssim)
    merged = r.merged.rechunk(image.chunksize)
    target = zarr.open_array(
        str(out), mode="w", shape=merged.shape, dtype=merged.dtype, chunks=merged.chunksize
    )
    store = da.store(merged, target, lock=False, compute=False)
    metrics = {k: v for k, v in r.metrics.items() if ssim or k != "ssim"}
    if client is not None:
        _, metrics = client.compute([store, metrics], sync=True)
    else:
        _, metrics = dask.compute(store, metrics, scheduler="threads", num_workers=2)
    elapsed = time.perf_counter() - t
    if client is not None:
        client.close()
        cluster.close()
    peak = stop()
    return {
        "mode": mode,
        "seconds": elapsed,
        "peak_bytes": peak,
        "patches": grid.n_patches,
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20_000)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--work-chunk", type=int, default=1024, help="chunk edge processed")
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--stride", type=int, default=192)
    ap.add_argument(
        "--modes", nargs="+", default=["threads", "cluster"], choices=["threads", "cluster"]
    )
    ap.add_argument("--ssim", action="store_true", help="include SSIM (a second full pass)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/patch-viewer-bench"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    src = args.workdir / f"input-{args.size}.zarr"
    if args.child:
        result = run_mode(
            args.child,
            src,
            args.workdir / f"merged-{args.child}.zarr",
            args.patch,
            args.stride,
            args.ssim,
            args.work_chunk,
        )
        print("RESULT " + json.dumps(result))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    make_input(src, args.size, args.chunk)
    print(
        f"{args.size}x{args.size} float32 zarr (stored in {args.chunk}^2 chunks, processed in "
        f"{args.work_chunk}^2), patch {args.patch}, "
        f"stride {args.stride}, gaussian sigma 2, 2 workers"
    )
    print("| mode | wall s | patches/s | peak memory | max-abs err | RMSE |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--size",
            str(args.size),
            "--patch",
            str(args.patch),
            "--stride",
            str(args.stride),
            "--work-chunk",
            str(args.work_chunk),
            "--workdir",
            str(args.workdir),
        ] + (["--ssim"] if args.ssim else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        m = r["metrics"]
        print(
            f"| {mode} | {r['seconds']:.1f} | {r['patches'] / r['seconds']:,.0f} | "
            f"{r['peak_bytes'] / 2**30:.2f} GiB | {m['max_abs']:.3g} | {m['rmse']:.3g} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
