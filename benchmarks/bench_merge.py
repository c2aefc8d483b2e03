"""Merge speed and memory against peers, both backends, all measured in the same run.

    python benchmarks/bench_merge.py            # all workloads, all installed peers
    python benchmarks/bench_merge.py --quick W1 # fewer repeats, chosen workloads

Prints one markdown table per workload: median time over repeats, peak memory of NumPy
allocations (tracemalloc; "n/a" for torch), the ratio to the memory-bandwidth floor (one
np.copyto of the patch stack plus one of the output image), the ratio to patch_viewer, and
whether the result equals the true overlap mean. Peers are optional: pip install
".[bench]" (tiler, empatches), `pip install --no-deps patchify` (it pins numpy<2) and
`pip install torch==2.13.0` (CPU).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np

import patch_viewer as pv
from patch_viewer.core.merge.plan import BACKEND_ENV


def _numba_version():
    try:
        import numba
    except ImportError:
        return "missing"
    return numba.__version__


WORKLOADS = {
    "W1-f64": dict(shape=(100, 100), dtype=np.float64, patch=39, stride=1),
    "W1-u8": dict(shape=(100, 100), dtype=np.uint8, patch=39, stride=1),
    "W2": dict(shape=(1024, 1024), dtype=np.float32, patch=64, stride=32),
    "W3": dict(shape=(2048, 2048, 3), dtype=np.uint8, patch=256, stride=192, channel_axis=-1),
    "W3-drop": dict(
        shape=(2048, 2048, 3), dtype=np.uint8, patch=256, stride=192, channel_axis=-1, edge="drop"
    ),
    "W3-pad": dict(
        shape=(2048, 2048, 3), dtype=np.uint8, patch=256, stride=192, channel_axis=-1, edge="pad"
    ),
    "W4": dict(shape=(128, 128, 128), dtype=np.float32, patch=32, stride=16),
    "W5": dict(shape=(512, 512), dtype=np.float32, patch=39, stride=1),
}
MAX_INDEX_BYTES = 2 * 2**30  # skip index-array peers that would need more


def timeit(fn, repeats):
    fn()  # warm-up (and the only run for slow peers)
    times = []
    deadline = time.perf_counter() + 20
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return statistics.median(times)


def interleaved(fns: dict, repeats):
    """Medians of several functions timed in turn (one call of each per round), so that the
    machine's drift (these VMs vary by tens of percent within a minute) hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    deadline = time.perf_counter() + 40
    for _ in range(repeats):
        for k, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def per_call(fn, n):
    """Mean time of a microsecond-scale call over n back-to-back calls (no gc in between)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def peak_bytes(fn):
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------------------ peers
def seed_approach(image, grid, stack, offsets=None):
    """Precomputed fancy indices: gather an (H*W, max_coverage) array and sum it."""
    if grid.channel_axis is not None:
        return None
    cov = grid.coverage_1d()
    maxcov = int(np.prod([c.max() for c in cov]))
    if image.size * maxcov * 8 > MAX_INDEX_BYTES:
        return None
    n = grid.n_patches
    area = int(np.prod(grid.patch_size))
    flat = np.concatenate([stack.reshape(-1).astype(np.float64), [0.0]])
    # element e of patch k lands on pixel pix[k, e]
    pix = _pixel_index(grid).reshape(n * area)
    order = np.argsort(pix, kind="stable")
    counts = np.bincount(pix, minlength=image.size)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(pix.size) - np.repeat(starts, counts)
    idx = np.full((image.size, maxcov), flat.size - 1, dtype=np.int64)
    idx[pix[order], rank] = order

    def run():
        return (flat[idx].sum(axis=1) / counts).reshape(image.shape)

    return run


def seed_as_posted(image, grid):
    """The asker's scheme as the question describes it, extraction and merge together, for
    2-D images without channels: a patch matrix with one patch per column gathered by
    precomputed indices (``patches = imgFlat[ind]``), a zero column appended, an (H, W,
    max coverage) gather of it summed over its last axis (``np.sum(patchesWithColFlat[ind],
    axis=2)``), times precomputed weights; the indices kept as Python lists (``.tolist()``),
    which NumPy converts to arrays at every call. Written here from that description (the
    "integer-index variant" is :func:`seed_approach`). None where its index lists would not
    fit."""
    if grid.channel_axis is not None or grid.ndim != 2:
        return None
    cov = grid.coverage_1d()
    maxcov = int(np.prod([c.max() for c in cov]))
    if image.size * maxcov * 8 * 8 > MAX_INDEX_BYTES:  # a Python int list: ~8x the array
        return None
    n, area = grid.n_patches, int(np.prod(grid.patch_size))
    pix = _pixel_index(grid).reshape(n, area)  # pixel of element e of patch k
    img2patch = pix.T.tolist()  # (area, n): column k is patch k
    # flat positions in the (area, n + 1) matrix with its zero column, per pixel
    pos = (np.arange(area)[None, :] * (n + 1) + np.arange(n)[:, None]).reshape(-1)
    flat_pix = pix.reshape(-1)
    order = np.argsort(flat_pix, kind="stable")
    counts = np.bincount(flat_pix, minlength=image.size)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(flat_pix.size) - np.repeat(starts, counts)
    idx = np.full((image.size, maxcov), n, dtype=np.int64)  # (0, n): the zero column
    idx[flat_pix[order], rank] = pos[order]
    patch2img = idx.reshape(image.shape + (maxcov,)).tolist()
    weights = (1.0 / counts).reshape(image.shape)

    def run():
        patches = image.reshape(-1)[img2patch]  # patchify
        with_col = np.hstack([patches, np.zeros((area, 1), patches.dtype)]).reshape(-1)
        return weights * np.sum(with_col[patch2img], axis=2)  # unpatchify

    return run


def _pixel_index(grid):
    offs = np.stack(np.meshgrid(*[np.arange(p) for p in grid.patch_size], indexing="ij"), -1)
    org = np.stack(np.meshgrid(*grid.origins, indexing="ij"), -1)
    coords = org.reshape(-1, 1, grid.ndim) + offs.reshape(1, -1, grid.ndim)
    return np.ravel_multi_index(tuple(np.moveaxis(coords, -1, 0)), grid.spatial_shape)


def add_at(image, grid, stack, offsets=None):
    """numpy np.add.at over a precomputed pixel index per stack element."""
    if grid.channel_axis is not None or stack.size * 8 > MAX_INDEX_BYTES:
        return None
    pix = _pixel_index(grid).ravel()
    counts = np.bincount(pix, minlength=image.size)
    values = stack.reshape(-1)

    def run():
        out = np.zeros(image.size)
        np.add.at(out, pix, values)
        return (out / counts).reshape(image.shape)

    return run


def tiler_peer(image, grid, stack, offsets=None):
    try:
        from tiler import Merger, Tiler
    except ImportError:
        return None
    ch = None if grid.channel_axis is None else grid.channel_axis % image.ndim
    overlap = tuple(p - s for p, s in zip(grid.patch_size, grid.stride))
    if len(set(overlap)) != 1 or len(set(grid.patch_size)) != 1:
        return None
    tile_shape = list(grid.patch_size)
    if ch is not None:
        tile_shape.insert(ch, image.shape[ch])
    tiler = Tiler(image.shape, tile_shape, overlap=overlap[0], channel_dimension=ch)
    if tiler.n_tiles > 300_000:
        return None
    tiles = [tile for _, tile in tiler(image)]
    if offsets is not None:
        if len(tiles) != len(offsets):
            return None  # tiler pads where we shift: its grid differs, no like-for-like check
        tiles = [t + o for t, o in zip(tiles, offsets)]

    def run():
        merger = Merger(tiler)
        for i, tile in enumerate(tiles):
            merger.add(i, tile)
        return merger.merge(unpad=True)

    return run


def empatches_peer(image, grid, stack, offsets=None):
    try:
        from empatches import EMPatches
    except ImportError:
        return None
    if grid.ndim != 2 or len(set(grid.patch_size)) != 1 or len(set(grid.stride)) != 1:
        return None
    emp = EMPatches()
    patches, indices = emp.extract_patches(
        image, patchsize=grid.patch_size[0], stride=grid.stride[0]
    )
    if offsets is not None:
        if len(patches) != len(offsets):
            return None
        patches = [p + o for p, o in zip(patches, offsets)]

    def run():
        return emp.merge_patches(patches, indices, mode="avg")

    return run


def patchify_peer(image, grid, stack, offsets=None):
    try:
        from patchify import unpatchify
    except ImportError:
        return None
    if grid.channel_axis is not None or not grid.is_regular or grid.edge != "shift":
        return None

    def run():
        return unpatchify(stack, image.shape)

    return run


def torch_fold(image, grid, stack, threads, offsets=None):
    try:
        import torch
    except ImportError:
        return None
    if grid.ndim != 2 or not grid.is_regular:
        return None  # fold needs a regular 2-D grid
    c = 1 if grid.channel_axis is None else image.shape[grid.channel_axis]
    p0, p1 = grid.patch_size
    canon = stack if grid.channel_axis is not None else stack[..., None]
    cols = np.ascontiguousarray(
        np.moveaxis(canon.reshape(grid.n_patches, p0, p1, c), 0, -1)
        .transpose(2, 0, 1, 3)
        .reshape(1, c * p0 * p1, grid.n_patches)
    )
    cols = torch.from_numpy(cols.astype(np.float32 if stack.dtype != np.float64 else np.float64))
    ones = torch.ones_like(cols)
    # fold's output must be tiled exactly: the padded extent for edge="pad" (cropped after),
    # the covered part for edge="drop" (the rest stays uncovered: NaN)
    size = tuple(int(o[-1]) + p for o, p in zip(grid.origins, grid.patch_size))
    count = torch.nn.functional.fold(ones, size, grid.patch_size, stride=grid.stride)

    def run():
        torch.set_num_threads(threads)
        out = torch.nn.functional.fold(cols, size, grid.patch_size, stride=grid.stride) / count
        out = out[0].permute(1, 2, 0).numpy()
        h, w = grid.spatial_shape
        if out.shape[:2] != (h, w):
            full = np.full((h, w, c), np.nan, out.dtype)
            a, b = min(h, out.shape[0]), min(w, out.shape[1])
            full[:a, :b] = out[:a, :b]
            out = full
        return out[..., 0] if c == 1 else out

    return run


PEERS = {
    "seed (fancy-index gather)": seed_approach,
    "np.add.at": add_at,
    "tiler": tiler_peer,
    "empatches": empatches_peer,
    "patchify.unpatchify": patchify_peer,
    "torch fold (1 thread)": lambda i, g, s, offsets=None: torch_fold(i, g, s, 1, offsets),
    "torch fold (2 threads)": lambda i, g, s, offsets=None: torch_fold(i, g, s, 2, offsets),
}


def check(make, image, grid, stack):
    """Does the peer give the true overlap mean? Each patch k is shifted by k/n so that
    overlapping patches disagree; the truth is patch_viewer's merge, which the test suite
    checks against a brute-force per-pixel mean. None when the peer's grid differs."""
    offsets = np.arange(grid.n_patches, dtype=np.float64) * 16 / grid.n_patches
    shifted = stack.astype(np.float64) + offsets.reshape(
        grid.grid_shape + (1,) * len(grid.patch_shape)
    )
    fn = make(image.astype(np.float64), grid, shifted, offsets=offsets)
    if fn is None:
        return None
    truth = pv.merge_patches(shifted, grid, fill_value=0)
    result = np.asarray(fn(), dtype=np.float64)
    return result.shape == truth.shape and bool(np.allclose(result, truth, rtol=1e-4, atol=1e-3))


# ------------------------------------------------------------------------------ run
def numpy_rows(image, grid, stack, repeats):
    """The NumPy backend (the fallback where numba is missing): the C-order stack, and the
    same patches in the order that engine reads fastest (row offset first at stride 1, as
    torch.unfold lays them out)."""
    os.environ[BACKEND_ENV] = "numpy"
    try:
        t = timeit(lambda: pv.merge_patches(stack, grid, fill_value=0), repeats)
        rows = [("NumPy backend merge", t, None, True)]
        ordered = pv.extract_patches(image, grid, copy=True, layout="merge")
        if ordered.strides != stack.strides:
            t = timeit(lambda: pv.merge_patches(ordered, grid, fill_value=0), repeats)
            rows.append(("NumPy backend merge, stack in merge layout", t, None, True))
    finally:
        del os.environ[BACKEND_ENV]
    return rows


def run_workload(name, spec, repeats, out=sys.stdout):
    # torch's OpenMP threads spin for a while after a parallel region; let the previous
    # workload's go idle so they do not compete with the next workload's first measurements.
    gc.collect()
    time.sleep(1.0)
    rng = np.random.default_rng(0)
    image = (rng.random(spec["shape"]) * 250).astype(spec["dtype"])
    grid = pv.PatchGrid(
        image.shape,
        spec["patch"],
        spec["stride"],
        channel_axis=spec.get("channel_axis"),
        edge=spec.get("edge", "shift"),
    )
    stack = pv.extract_patches(image, grid, copy=True)
    merged = pv.merge_patches(stack, grid, fill_value=0)
    out_dtype = merged.dtype
    buf = np.empty_like(stack)
    into = np.empty_like(pv.extract_patches(image, grid, copy=True))
    dst = np.empty(image.shape, out_dtype)
    kept = np.empty(image.shape, out_dtype)  # merge_patches(out=): no fresh result each time
    src = image.astype(out_dtype)
    merge = lambda **kw: pv.merge_patches(stack, grid, fill_value=0, **kw)  # noqa: E731
    # The floor, our merges and the extractions are timed in turn (interleaved), so their
    # ratios are measured under the same conditions.
    t = interleaved(
        {
            "floor": lambda: (np.copyto(buf, stack), np.copyto(dst, src)),
            "ours": merge,
            # The floor writes into kept arrays; a merge into a kept `out=` is its like.
            "into": lambda: merge(out=kept),
            "into_one": lambda: merge(out=kept, workers=1),
            "both": lambda: pv.merge_patches(pv.extract_patches(image, grid), grid, fill_value=0),
            "one": lambda: merge(workers=1),
            "stack_copy": lambda: np.copyto(buf, stack),
            "extract_copy": lambda: pv.extract_patches(image, grid, copy=True),
            "extract_into": lambda: pv.extract_patches(image, grid, copy=True, out=into),
            # A copy into a new array pays the page faults of its first touch (the floor's
            # buffer is reused): the fair yardstick for any extraction that returns a new array.
            "fresh_copy": lambda: np.copyto(np.empty_like(stack), stack),
            "numpy_copy": lambda: np.ascontiguousarray(pv.extract_patches(image, grid)),
        },
        repeats,
    )
    floor, ours, both, one = t["floor"], t["ours"], t["both"], t["one"]
    into, into_one = t["into"], t["into_one"]
    stack_copy, extract_copy = t["stack_copy"], t["extract_copy"]
    fresh_copy, numpy_copy, extract_into = t["fresh_copy"], t["numpy_copy"], t["extract_into"]
    view_s = per_call(lambda: pv.extract_patches(image, grid), 1000)
    posted = seed_as_posted(image, grid)
    if posted is not None:
        assert np.allclose(posted(), pv.merge_patches(pv.extract_patches(image, grid), grid))
        posted_s = timeit(posted, 3)
    rows = [
        (f"patch_viewer merge ({pv.backend()})", ours, peak_bytes(merge), True),
        ("patch_viewer extract (view) + merge", both, None, True),
        ("patch_viewer merge, 1 thread", one, None, True),
        ("patch_viewer merge into a kept `out=`", into, peak_bytes(lambda: merge(out=kept)), True),
        ("patch_viewer merge into a kept `out=`, 1 thread", into_one, None, True),
    ]
    rows += numpy_rows(image, grid, stack, repeats)
    for peer, make in PEERS.items():
        fn = make(image, grid, stack)
        if fn is None:
            continue
        correct = check(make, image, grid, stack)
        t = timeit(fn, repeats if ours * 50 > 0.05 else max(1, repeats // 2))
        mem = None if peer.startswith("torch") else peak_bytes(fn)
        rows.append((peer, t, mem, correct))
        del fn
        gc.collect()
    print(
        f"\n### {name}: {image.shape} {image.dtype}, patch {spec['patch']}, stride "
        f"{spec['stride']} ({grid.n_patches:,} patches, stack {stack.nbytes / 2**20:.1f} MiB)",
        file=out,
    )
    print(
        f"floor {floor * 1e3:.2f} ms; extraction: view {view_s * 1e6:.1f} µs, copy "
        f"{extract_copy * 1e3:.2f} ms = {extract_copy / stack_copy:.2f}x one np.copyto of the "
        f"stack ({stack_copy * 1e3:.2f} ms), {extract_copy / fresh_copy:.2f}x one into a new "
        f"array ({fresh_copy * 1e3:.2f} ms); into a reused `out=` {extract_into * 1e3:.2f} ms = "
        f"{extract_into / stack_copy:.2f}x; NumPy's copy of the view {numpy_copy * 1e3:.2f} ms\n",
        file=out,
    )
    if posted is not None:
        print(
            f"extract + merge against the asker's code as posted (list indices, "
            f"{posted_s * 1e3:.0f} ms): ours (view + merge) is {posted_s / both:.0f}x faster\n",
            file=out,
        )
    print("| method | median ms | x floor | x patch_viewer | peak MiB | true mean |", file=out)
    print("|---|---:|---:|---:|---:|---|", file=out)
    for label, t, mem, correct in rows:
        mem_s = "n/a" if mem is None else f"{mem / 2**20:.1f}"
        verdict = {True: "yes", False: "**NO**", None: "n/c (other grid)"}[correct]
        print(
            f"| {label} | {t * 1e3:.2f} | {t / floor:.1f} | {t / ours:.1f} | {mem_s} | {verdict} |",
            file=out,
        )
    out.flush()
    return {"floor": floor, "ours": ours, "view": view_s, "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workloads", nargs="*", help=f"any of {', '.join(WORKLOADS)} (prefix ok)")
    ap.add_argument("--quick", action="store_true", help="3 repeats instead of 9")
    args = ap.parse_args(argv)
    # A workload's exact name picks it alone ("W3" is a workload, and a prefix of W3-drop).
    chosen = [
        w
        for w in WORKLOADS
        if not args.workloads
        or w in args.workloads
        or any(w.startswith(a) and a not in WORKLOADS for a in args.workloads)
    ]
    header = (
        f"numpy {np.__version__}, numba {_numba_version()}, patch_viewer {pv.__version__}, "
        f"{time.strftime('%Y-%m-%d')}, medians over repeats"
    )
    if len(chosen) > 1:
        # One fresh process per workload: the heap a previous workload's peers leave behind
        # (hundreds of MiB of index arrays and tile lists) slowed later measurements by up to
        # 1.8x, for every method alike.
        print(header + ", one process per workload")
        for name in chosen:
            cmd = [sys.executable, __file__, name] + (["--quick"] if args.quick else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            print(out.split("\n", 1)[1], end="", flush=True)  # without its header line
        return
    print(header)
    for name in chosen:
        run_workload(name, WORKLOADS[name], 3 if args.quick else 9)


if __name__ == "__main__":
    main()
