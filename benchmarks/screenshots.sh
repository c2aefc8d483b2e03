#!/usr/bin/env bash
# Render the README screenshots from the real app under Xvfb (patch-viewer --screenshot).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/figures
mkdir -p "$out"
run() { xvfb-run -a -s "-screen 0 1600x1000x24" python -m patch_viewer "$@"; }
run --screenshot "$out/classic.png"
# The Patch Explorer's states (otsu, sobel, noisy coins with a median filter against the
# whole-image filter, RGB, 3-D, stride 1, an error, the empty viewer, the Tune chart).
xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/gui_states.py "$out"
run sample_data/ihc_256.png --patch-size 48 --stride 24 --filter gaussian --window hann \
    --screenshot "$out/rgb.png"
# A zarr image opens lazily: the merged, error and weight layers stay dask arrays.
tmp=$(mktemp -d)
python - "$tmp/coins_tiled.zarr" <<'PY'
import sys
import numpy as np
import zarr
from patch_viewer._sample_data import load
tiled = np.tile(load("coins_noisy.png"), (6, 6))
z = zarr.open_array(sys.argv[1], mode="w", shape=tiled.shape, chunks=(512, 512), dtype=tiled.dtype)
z[...] = tiled
PY
run "$tmp/coins_tiled.zarr" --patch-size 64 --stride 48 --filter gaussian --window hann \
    --screenshot "$out/lazy.png"
rm -rf "$tmp"
