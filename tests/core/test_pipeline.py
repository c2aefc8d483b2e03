import itertools
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patch_viewer as pv
from patch_viewer import (
    FILTERS,
    PatchGrid,
    extract_patches,
    iter_process,
    make_plan,
    merge_patches,
    process,
)

from .strategies import grids

pytestmark = pytest.mark.usefixtures("backend")


def test_identity_is_exact_with_zero_error():
    image = np.random.default_rng(0).random((100, 100)).astype(np.float32)
    r = process(image, PatchGrid(image.shape, 39, stride=1), batch_bytes=2**20)
    np.testing.assert_array_equal(r.merged, image)
    assert r.metrics["max_abs"] == 0 and r.metrics["psnr"] == np.inf
    assert not r.error.any()
    assert r.weights.max() == 39 * 39
    assert r.plan.n_patches == 3844 and r.plan.n_batches > 1


@settings(max_examples=80, deadline=None)
@given(
    grids(),
    st.sampled_from(["invert", "minmax", "median", "gaussian"]),
    st.sampled_from(["uniform", "triangular", "overlap-tile"]),
    st.integers(1, 2**22),
    st.integers(0, 2**32 - 1),
)
def test_streaming_equals_filtering_the_whole_stack(grid, name, window, batch_bytes, seed):
    """process() in batches of any size == filter the full stack, then merge it."""
    image = (np.random.default_rng(seed).random(grid.image_shape) * 64).round()
    before = image.copy()
    r = process(image, grid, name, window=window, batch_bytes=batch_bytes)
    patches = extract_patches(image, grid)
    canon = patches[..., None] if grid.channel_axis is None else patches
    nd = grid.ndim
    filtered = FILTERS[name](canon, tuple(range(nd, 2 * nd)))
    filtered = filtered[..., 0] if grid.channel_axis is None else filtered
    expected = merge_patches(filtered, grid, window=window)
    np.testing.assert_allclose(r.merged, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(image, before)


def test_reference_filter_shows_seams_only():
    image = np.random.default_rng(1).random((64, 64))
    grid = PatchGrid(image.shape, 16, stride=16)
    r = process(image, grid, "gaussian", filter_params={"sigma": 1.0}, reference="filter")
    # Farther than the blur radius (4 px) from patch borders, patch-wise and whole-image blurs
    # agree; at the seams they differ.
    interior = np.abs(r.error[4:12, 4:12]).max()
    seam = np.abs(r.error[14:18, :]).max()
    assert interior < 1e-12 and seam > 1e-3
    r_in = process(image, grid, "gaussian", filter_params={"sigma": 1.0})
    assert r_in.metrics["rmse"] > r.metrics["rmse"]


def test_progress_callback_and_generator_and_cancel():
    image = np.zeros((60, 60), np.uint8)
    grid = PatchGrid(image.shape, 10, stride=2)
    calls = []
    process(image, grid, progress=lambda d, t: calls.append((d, t)), batch_bytes=10_000)
    assert calls[-1] == (grid.n_patches, grid.n_patches)
    assert len(calls) > 2 and all(a[0] < b[0] for a, b in itertools.pairwise(calls))
    gen = iter_process(image, grid, batch_bytes=10_000)
    assert next(gen)[1] == grid.n_patches
    gen.close()  # cancelling is closing the generator


def test_batches_of_images_and_rgb():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, (6, 30, 31, 3), dtype=np.uint8)
    grid = PatchGrid((30, 31, 3), 8, stride=3, channel_axis=-1)
    r = process(images, grid, batch_bytes=50_000)
    np.testing.assert_array_equal(r.merged, images)
    single = process(images[4], grid)
    np.testing.assert_array_equal(single.merged, r.merged[4])


def test_plan_and_memory_refusal():
    plan = make_plan(PatchGrid((100, 100), 39), 26_000)
    assert plan.n_patches == 26_000 * 3844
    assert plan.stack_bytes > 500 * 2**30  # why the stack is never materialised
    with pytest.raises(MemoryError, match=r"this run would take .*max_bytes.*dask"):
        iter_process(np.zeros((400, 400)), PatchGrid((400, 400), 8), max_bytes=2**20)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(patch_filter="blur"), ValueError, "patch_filter"),
        (dict(reference="truth"), ValueError, "reference.*input.*filter"),
        (dict(reduce="sum"), ValueError, "reduce"),
        (dict(window="box"), ValueError, "window"),
        (dict(patch_filter="gaussian", filter_params={"sigma": 100}), ValueError, "sigma"),
        (dict(batch_bytes=0), ValueError, "batch_bytes"),
    ],
)
def test_bad_input_is_rejected_before_work(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        iter_process(np.zeros((20, 20)), PatchGrid((20, 20), 4), **kwargs)


def test_bad_image():
    with pytest.raises(TypeError, match=r"image.*real numbers"):
        process(np.zeros((20, 20), complex), PatchGrid((20, 20), 4))
    with pytest.raises(ValueError, match=r"image.*shape"):
        process(np.zeros((20, 21)), PatchGrid((20, 20), 4))


def test_importing_the_package_pulls_in_no_gui():
    code = (
        "import sys, patch_viewer; bad = [m for m in sys.modules if m.split('.')[0] in "
        "('napari', 'qtpy', 'magicgui', 'superqt', 'PyQt5', 'PyQt6', 'PySide6', 'tqdm')]; "
        "print(bad); sys.exit(bool(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------- the fused stream
def _unfused(name):
    """The same registered filter, but as a plain callable: the stream materialises it."""
    filt = FILTERS[name]
    return lambda stack, spatial_axes: filt(stack, spatial_axes)  # noqa: PLW0108 (hides filt)


@settings(max_examples=40, deadline=None)
@given(
    grids(channels=(None,)),
    st.sampled_from(["invert", "minmax", "zscore"]),
    st.sampled_from(["uniform", "hann"]),
    st.sampled_from([np.float32, np.uint8, np.float64]),
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
)
def test_fused_filters_equal_the_materialised_ones(grid, name, window, dtype, rows, seed):
    """Filters applied inside the compiled merge give the materialised path's result: the same
    bits for invert and minmax, within float32 rounding for zscore (its mean and deviation)."""
    rng = np.random.default_rng(seed)
    image = (rng.random(grid.image_shape) * 200).astype(dtype)
    row_bytes = max(1, grid.nbytes() // grid.grid_shape[0])
    kw = dict(window=window, metrics=False, batch_bytes=rows * row_bytes)
    fused = process(image, grid, name, **kw).merged
    plain = process(image, grid, _unfused(name), **kw).merged
    assert fused.dtype == plain.dtype
    if name == "zscore":
        np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(fused, plain)


def test_elementwise_functions_run_inside_the_merge():
    image = np.random.default_rng(3).random((40, 37)).astype(np.float32)
    grid = PatchGrid(image.shape, 9, stride=(2, 3))
    double = pv.elementwise(lambda x: x * np.float32(2))
    fused = process(image, grid, double, metrics=False).merged
    plain = process(image, grid, lambda s, ax: s * np.float32(2), metrics=False).merged
    np.testing.assert_array_equal(fused, plain)
    np.testing.assert_array_equal(fused, image * 2)
    # elsewhere (a batch of stacks, the NumPy backend) it is called on whole stacks
    assert double(np.ones((2, 3), np.float32), (1,)).tolist() == [[2, 2, 2], [2, 2, 2]]
