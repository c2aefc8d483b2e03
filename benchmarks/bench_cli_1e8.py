"""10^8 patches through the command line: 26,000 images of 100x100 float32 as .npy files,
39x39 patches at stride 1 (3,844 per image), a per-patch filter, merged images written back.

    python benchmarks/bench_cli_1e8.py                   # the whole run (1 GB in, 1 GB out)
    python benchmarks/bench_cli_1e8.py --images 2000     # a sample, extrapolated linearly

Times ``patch-viewer process IN -o OUT --patch-size 39 --stride 1 --filter F -q`` end to end
(start-up, reading, processing, writing; the files are in the page cache after they are made,
as in a batch job that runs after the data arrived). Prints the rate in patches/s and, for a
sample, the time the 26,000-image run takes at that rate.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TOTAL_IMAGES = 26_000
PATCHES_PER_IMAGE = 62 * 62


def make_inputs(folder: Path, n: int) -> None:
    if folder.exists() and len(list(folder.glob("*.npy"))) == n:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        np.save(folder / f"img{i:05d}.npy", rng.random((100, 100), dtype=np.float32))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=TOTAL_IMAGES)
    ap.add_argument("--filter", default="invert")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/patch-viewer-bench"))
    args = ap.parse_args(argv)
    src = args.workdir / f"npy-{args.images}"
    out = args.workdir / f"out-{args.images}"
    t = time.perf_counter()
    make_inputs(src, args.images)
    print(f"inputs: {args.images:,} .npy files in {src} ({time.perf_counter() - t:.0f} s to make)")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "patch_viewer",
        "process",
        str(src),
        "-o",
        str(out),
        "--patch-size",
        "39",
        "--stride",
        "1",
        "--filter",
        args.filter,
        "--workers",
        str(args.workers),
        "-q",
    ]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t
    written = len(list(out.glob("*.npy")))
    assert written == args.images, f"{written} outputs for {args.images} inputs"
    patches = args.images * PATCHES_PER_IMAGE
    rate = patches / elapsed
    total = TOTAL_IMAGES * PATCHES_PER_IMAGE
    print(
        f"patch-viewer process, filter {args.filter}, {args.workers} workers: {args.images:,} "
        f"images, {patches:,} patches in {elapsed:.1f} s = {rate / 1e6:.2f} M patches/s"
    )
    print(
        f"10^8 patches ({total:,}): {total / rate:.0f} s "
        f"({'measured' if args.images >= TOTAL_IMAGES else 'extrapolated linearly'}, I/O "
        f"included)"
    )
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
