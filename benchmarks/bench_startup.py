"""The first call in a fresh process: what numba's start-up and its kernel cache cost.

    python benchmarks/bench_startup.py [--repeat 3]

Each row is measured in new Python processes (best of ``--repeat``): ``import patch_viewer``,
then the first ``merge_patches`` of the W1 workload (100x100 float32, 39x39 patches, stride 1),
either straight away or after ``pv.warm_up()``. "warm cache" uses the kernels numba cached on
disk by an earlier run; "cold cache" points ``NUMBA_CACHE_DIR`` at an empty directory, as after
installing. The NumPy backend's row is for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import patch_viewer as pv
t1 = time.perf_counter()
warm = pv.warm_up() if sys.argv[1] == "1" else 0.0
t2 = time.perf_counter()
image = np.random.default_rng(0).random((100, 100)).astype(np.float32)
grid = pv.PatchGrid(image.shape, 39, stride=1)
patches = pv.extract_patches(image, grid)
t3 = time.perf_counter()
pv.merge_patches(patches, grid)
t4 = time.perf_counter()
pv.merge_patches(patches, grid)
t5 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "warm_up": warm, "first": t4 - t3, "second": t5 - t4}))
"""


def child(warm: bool, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "1" if warm else "0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def best(runs):
    return {k: min(r[k] for r in runs) for k in runs[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    base = dict(os.environ)
    numba_env = base | {"PATCH_VIEWER_BACKEND": "numba"}
    child(True, numba_env)  # make sure the default cache is warm
    rows = []
    for label, warm, env, cold in [
        ("numba, warm cache", False, numba_env, False),
        ("numba, warm cache, after warm_up()", True, numba_env, False),
        ("numba, cold cache", False, numba_env, True),
        ("numba, cold cache, after warm_up()", True, numba_env, True),
        ("numpy backend", False, base | {"PATCH_VIEWER_BACKEND": "numpy"}, False),
    ]:
        runs = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as cache:
                runs.append(child(warm, env | ({"NUMBA_CACHE_DIR": cache} if cold else {})))
        rows.append((label, best(runs)))
    print(f"# first call in a fresh process (W1: 100x100 float32, 39/1), best of {args.repeat}")
    print("| setting | import patch_viewer | warm_up() | first merge | second merge |")
    print("|---|---:|---:|---:|---:|")
    for label, r in rows:
        print(
            f"| {label} | {r['import'] * 1e3:.0f} ms | "
            f"{r['warm_up'] * 1e3:.0f} ms | {r['first'] * 1e3:.1f} ms | "
            f"{r['second'] * 1e3:.1f} ms |"
        )


if __name__ == "__main__":
    main()
