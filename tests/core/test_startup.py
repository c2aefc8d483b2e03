"""Start-up: what importing costs, and warm_up()."""

import subprocess
import sys

import numpy as np

import patch_viewer as pv
from patch_viewer.core.merge.plan import BACKEND_ENV


def test_import_pulls_in_neither_gui_nor_heavy_optional_modules():
    """scipy.signal alone took 0.6-0.8 s of a 0.9 s import: windows import it on first use."""
    code = (
        "import sys, patch_viewer; heavy = [m for m in ('scipy.signal', 'numba', 'napari',"
        " 'qtpy', 'magicgui', 'dask') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_warm_up_loads_kernels_and_later_calls_are_cheap(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "numba")
    first = pv.warm_up(dtypes=("float32",), filters=("identity", "gaussian"))
    again = pv.warm_up(dtypes=("float32",), filters=("identity", "gaussian"))
    assert first >= 0 and again >= 0
    image = np.random.default_rng(0).random((20, 20)).astype(np.float32)
    grid = pv.PatchGrid(image.shape, 7, stride=3)
    assert np.array_equal(pv.merge_patches(pv.extract_patches(image, grid), grid), image)


def test_warm_up_does_nothing_on_the_numpy_backend(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "numpy")
    assert pv.warm_up() == 0.0
