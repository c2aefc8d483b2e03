#!/usr/bin/env bash
# Render the README screenshots from the real app under Xvfb (patch-viewer --screenshot).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/figures
mkdir -p "$out"
run() { xvfb-run -a -s "-screen 0 1600x1000x24" python -m patch_viewer "$@"; }
run --screenshot "$out/classic.png"
run sample_data/ihc_256.png --patch-size 48 --stride 24 --filter gaussian --window hann \
    --screenshot "$out/rgb.png"
