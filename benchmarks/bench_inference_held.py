"""The inference loop of bench_inference.py with held outputs (merge/held.py) and without,
and MONAI's, interleaved in one process (the order rotated each round): medians of the total,
the time inside the predictor, and the overhead (total minus inside), with the predictor alone
as the yardstick. ``old`` switches holding off (each batch is added to bands of sums as it
comes); the last figure of each line is the largest difference from the first mode's output.

    python benchmarks/bench_inference_held.py [--modes old,new,monai] [--repeat 5]
"""

from __future__ import annotations

import argparse

import numpy as np
from bench_inference import alone, monai, ours

import patch_viewer as pv
from patch_viewer.core import accumulator


def run(mode, image, grid):
    holds = accumulator.Accumulator._holds
    if mode == "monai":
        total, inside, out = monai(image)
        return total, inside, np.moveaxis(out, 0, -1)
    if mode == "old":
        accumulator.Accumulator._holds = lambda self, dtype: False
    try:
        return ours(image, grid)
    finally:
        accumulator.Accumulator._holds = holds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="old,new,monai")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    modes = args.modes.split(",")
    pv.warm_up()
    image = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    grid = pv.PatchGrid(image.shape, 256, stride=192)
    small = pv.PatchGrid((512, 512), 256, stride=192)
    for m in modes:  # compile, warm caches
        run(m, image[:512, :512], small)
    rows = {m: [] for m in modes}
    outs, bare = {}, []
    for rep in range(args.repeat):
        bare.append(alone(image, grid))
        for m in modes[rep % len(modes) :] + modes[: rep % len(modes)]:
            total, inside, outs[m] = run(m, image, grid)
            rows[m].append((total, inside))
    yardstick = float(np.median(bare))
    print(f"predictor alone: {yardstick:.3f} s (median of {args.repeat})")
    for m in modes:
        total, inside = (float(np.median(v)) for v in zip(*rows[m]))
        over = float(np.median([t - i for t, i in rows[m]]))
        diff = float(np.abs(outs[m] - outs[modes[0]]).max())
        print(
            f"{m}: total {total:.3f} s, inside {inside:.3f} s, overhead {over:.3f} s "
            f"({over / yardstick:.1%} of the predictor alone), max diff {diff:.2e}"
        )


if __name__ == "__main__":
    main()
