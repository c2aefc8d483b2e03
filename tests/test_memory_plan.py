"""The memory plan holds: peak RSS of a run, measured in a fresh process, stays within the
plan (``result.plan.peak_bytes``) and no more than 25% under it, for several sizes and
options (metrics and banded SSIM included, as they are by default)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from patch_viewer.core.merge.plan import BACKEND_ENV

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(),
    reason="needs Linux /proc to reset and read peak RSS",
)

MEASURE = r"""
import json, sys
import numpy as np
import patch_viewer as pv

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

n, dtype, reference, name, window = sys.argv[1:]
n = int(n)
warm = (np.random.default_rng(1).random((96, 96)) * 200).astype(dtype)
pv.process(warm, pv.PatchGrid(warm.shape, 32, 16), name, reference=reference, window=window)
image = (np.random.default_rng(0).random((n, n)) * 200).astype(dtype)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
r = pv.process(image, pv.PatchGrid(image.shape, 32, 16), name, reference=reference,
               window=window)
print(json.dumps({"grew": status("VmHWM") - base, "plan": r.plan.peak_bytes}))
"""


@pytest.mark.parametrize(
    "n, dtype, reference, name, window",
    [
        (1024, "float32", "input", "identity", "uniform"),
        (2048, "float32", "filter", "gaussian", "uniform"),
        (1536, "uint8", "filter", "median", "hann"),
        (1536, "float64", "input", "identity", "uniform"),
    ],
)
@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_peak_rss_stays_within_the_plan(n, dtype, reference, name, window, backend):
    """On both merge backends: each asks its own merge for the state it keeps."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(n), dtype, reference, name, window],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, BACKEND_ENV: backend},
    )
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["grew"] <= m["plan"] <= 1.25 * m["grew"], m
