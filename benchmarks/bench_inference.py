"""Patch-wise inference: our overhead around a model, against MONAI's, and the Accumulator
against a one-shot merge (all measured in this run, interleaved).

1. Sliding-window inference: a 2048² float32 image, 256/192 patches (11 x 11), a NumPy
   predictor with 16 output channels (a fixed 3x3 convolution bank), batches of 8. The
   overhead is everything but the predictor call (cutting batches, accumulating, dividing),
   as a fraction of the predictor's own time. MONAI's ``sliding_window_inference`` runs the
   same predictor (wrapped for torch, channels first) with ``overlap=0.25`` (stride 192) and
   ``mode="constant"``. Targets: ours <= 10% of the predictor time, and <= half of MONAI's.
2. The Accumulator fed 10^5 patches (1024² float32, 32/3) in random order, in batches of 64,
   against ``merge_patches`` of the same stack in one call, and one copy of the stack (the
   memory floor). Target: <= 1.5x the one-shot merge.

    python benchmarks/bench_inference.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

import patch_viewer as pv

BANK = np.random.default_rng(0).standard_normal((3, 3, 16)).astype(np.float32)


def conv_bank(batch):
    """(N, h, w) -> (N, h, w, 16): a fixed 3x3 convolution bank (edge-padded), channels last."""
    n, h, w = batch.shape
    pad = np.pad(batch, ((0, 0), (1, 1), (1, 1)), mode="edge")
    out = np.zeros((n, h, w, 16), np.float32)
    for dy in range(3):
        for dx in range(3):
            out += pad[:, dy : dy + h, dx : dx + w, None] * BANK[dy, dx]
    return out


class Timed:
    """A predictor wrapper that adds up the time spent inside the predictor."""

    def __init__(self, func):
        self.func, self.inside, self.calls = func, 0.0, 0

    def __call__(self, batch):
        t = time.perf_counter()
        out = self.func(batch)
        self.inside += time.perf_counter() - t
        self.calls += 1
        return out


def alone(image, grid):
    """The predictor by itself on the same 16 batches (the yardstick for the overheads)."""
    batches = [b.patches for b in pv.iter_batches(image, grid, 8)]
    t = time.perf_counter()
    for b in batches:
        conv_bank(b)
    return time.perf_counter() - t


def ours(image, grid):
    timed = Timed(conv_bank)
    model = pv.Predictor(timed, name="conv_bank", channels=16, batch_size=8)
    t = time.perf_counter()
    r = pv.process(image, grid, model, metrics=False)
    total = time.perf_counter() - t
    return total, timed.inside, r.merged


def monai(image):
    import torch
    from monai.inferers import sliding_window_inference

    def cf(x):  # MONAI hands (N, 1, h, w) tensors and wants (N, 16, h, w)
        out = conv_bank(x[:, 0].numpy())
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(out, -1, 1)))

    timed = Timed(cf)
    t = time.perf_counter()
    with torch.no_grad():
        out = sliding_window_inference(
            torch.from_numpy(image[None, None]), (256, 256), 8, timed, overlap=0.25, mode="constant"
        )
    total = time.perf_counter() - t
    return total, timed.inside, out[0].numpy()


def accumulator_vs_merge(repeat: int):
    rng = np.random.default_rng(1)
    image = rng.random((1024, 1024), dtype=np.float32)
    grid = pv.PatchGrid(image.shape, 32, stride=3)
    stack = np.ascontiguousarray(pv.extract_patches(image, grid).reshape((grid.n_patches, 32, 32)))
    order = rng.permutation(grid.n_patches)
    batches = [
        (np.ascontiguousarray(stack[b]), b) for b in np.array_split(order, grid.n_patches // 64)
    ]
    floor_out = np.empty_like(stack)
    best = {"copy": np.inf, "merge": np.inf, "acc": np.inf}
    for _ in range(repeat):  # interleaved
        t = time.perf_counter()
        np.copyto(floor_out, stack)
        best["copy"] = min(best["copy"], time.perf_counter() - t)
        t = time.perf_counter()
        merged = pv.merge_patches(stack, grid)
        best["merge"] = min(best["merge"], time.perf_counter() - t)
        t = time.perf_counter()
        acc = pv.Accumulator(grid)
        for patches, idx in batches:
            acc.add(patches, idx)
        got = acc.result()
        best["acc"] = min(best["acc"], time.perf_counter() - t)
    assert np.array_equal(got, merged) and np.array_equal(got, image)
    return grid, stack.nbytes, best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, numpy {np.__version__}, backend {pv.backend()}"
    )
    pv.warm_up()
    image = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    grid = pv.PatchGrid(image.shape, 256, stride=192)
    ours(image[:512, :512], pv.PatchGrid((512, 512), 256, stride=192))  # compile, warm caches
    try:
        monai(image[:512, :512])
        have_monai = True
    except ImportError as exc:
        print(f"(MONAI not measured: {exc}; pip install -e '.[bench]')")
        have_monai = False
    rows = {"patch_viewer": [], "MONAI": []}
    bare = []
    for _ in range(args.repeat):  # interleaved
        bare.append(alone(image, grid))
        rows["patch_viewer"].append(ours(image, grid))
        if have_monai:
            rows["MONAI"].append(monai(image))
    bare = float(np.median(bare))
    if have_monai:
        a, b = rows["patch_viewer"][-1][2], rows["MONAI"][-1][2]
        diff = float(np.abs(a - np.moveaxis(b, 0, -1)).max())
        print(f"# results agree: max |ours - MONAI| = {diff:.2e}")
    print(
        "\n## Sliding-window inference, 2048² float32, 256/192 (121 patches), 16-channel "
        "3x3 conv bank, batches of 8"
    )
    print(f"The predictor alone on the same batches: {bare:.2f} s (median of {args.repeat}).\n")
    print("| | total | in the predictor | overhead (median) | overhead / predictor alone |")
    print("|---|---:|---:|---:|---:|")
    over = {}
    for name, runs in rows.items():
        if not runs:
            continue
        over[name] = float(np.median([t - i for t, i, _ in runs]))
        total = float(np.median([t for t, _, _ in runs]))
        inside = float(np.median([i for _, i, _ in runs]))
        print(
            f"| {name} | {total:.2f} s | {inside:.2f} s | {over[name]:.3f} s | "
            f"{over[name] / bare:.1%} |"
        )
    if len(over) == 2:
        print(f"\nour overhead / MONAI's: {over['patch_viewer'] / over['MONAI']:.2f}")
    grid, nbytes, best = accumulator_vs_merge(args.repeat)
    print(
        f"\n## Accumulator: {grid.n_patches:,} patches of 32² float32 (1024², stride 3, "
        f"{nbytes / 2**20:.0f} MiB), random order, batches of 64"
    )
    print("| | time | x merge_patches | x one copy of the stack |")
    print("|---|---:|---:|---:|")
    for name, label in (
        ("copy", "np.copyto of the stack (floor)"),
        ("merge", "merge_patches, one call"),
        ("acc", "Accumulator.add x 1,7xx + result"),
    ):
        print(
            f"| {label} | {best[name] * 1e3:.0f} ms | {best[name] / best['merge']:.2f} | "
            f"{best[name] / best['copy']:.2f} |"
        )


if __name__ == "__main__":
    main()
