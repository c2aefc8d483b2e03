"""Writing results into a caller's arrays: ``error_map(out=)``, ``weight_map(out=)`` and
``process(buffers=)`` give the same values as new arrays, and never write anything else."""

import numpy as np
import pytest

import patch_viewer as pv
from patch_viewer import PatchGrid, error_map, weight_map


def test_error_map_writes_into_out():
    rng = np.random.default_rng(0)
    merged, ref = rng.random((7, 9), dtype=np.float32), rng.random((7, 9), dtype=np.float32)
    out = np.full((7, 9), np.nan, np.float32)
    got = error_map(merged, ref, out=out)
    assert got is out
    np.testing.assert_array_equal(out, error_map(merged, ref))
    # uint8 reference: the error is float32, as without out
    ref8 = (ref * 255).astype(np.uint8)
    np.testing.assert_array_equal(
        error_map(merged, ref8, out=np.empty((7, 9), np.float32)), error_map(merged, ref8)
    )


@pytest.mark.parametrize(
    "out",
    [
        np.empty((7, 8), np.float32),  # shape
        np.empty((7, 9), np.float64),  # dtype: float32 inputs give a float32 error
        np.empty((9, 7), np.float32).T,  # not C-contiguous
    ],
)
def test_error_map_refuses_an_out_that_does_not_fit(out):
    a = np.zeros((7, 9), np.float32)
    with pytest.raises(ValueError, match="`out`"):
        error_map(a, a + 1, out=out)


def test_error_map_refuses_an_out_that_is_an_input():
    merged, ref = np.zeros((4, 4), np.float32), np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="share memory"):
        error_map(merged, ref, out=merged)
    assert (merged == 0).all()


@pytest.mark.parametrize(
    ("shape", "patch", "stride", "window", "params"),
    [
        ((50, 61), 16, 5, "uniform", {}),
        ((50, 61), 16, 5, "hann", {}),
        ((50, 61), 15, 4, "gaussian", {"sigma": 0.2}),
        ((50, 61), 16, 16, "overlap-tile", {}),
        ((40,), 9, 2, "triangular", {}),
        ((9, 10, 11), 4, 3, "hann", {}),
        ((30, 30), 8, 3, np.random.default_rng(1).random((8, 8)), {}),  # not separable
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_map_into_out_is_the_map_rounded_once(shape, patch, stride, window, params, dtype):
    grid = PatchGrid(shape, patch, stride)
    out = np.full(shape, np.nan, dtype)
    got = weight_map(grid, window, out=out, **params)
    assert got is out
    np.testing.assert_array_equal(out, weight_map(grid, window, **params).astype(dtype))


def test_weight_map_refuses_an_out_that_does_not_fit():
    grid = PatchGrid((10, 12), 4, 2)
    for out in (np.empty((10, 11)), np.empty((10, 12), np.int64), np.empty((12, 10)).T):
        with pytest.raises(ValueError, match="`out`"):
            weight_map(grid, out=out)


@pytest.mark.parametrize("reference", ["input", "filter"])
@pytest.mark.parametrize("patch_filter", ["identity", "gaussian", "median"])
def test_process_into_buffers_equals_process(reference, patch_filter):
    rng = np.random.default_rng(2)
    image = rng.random((70, 83), dtype=np.float32)
    kept = image.copy()
    grid = PatchGrid(image.shape, 16, 7)
    kw = dict(window="hann", reference=reference)
    plain = pv.process(image, grid, patch_filter, **kw)
    buffers = {
        "merged": np.full(image.shape, np.nan, np.float32),
        "error": np.full(image.shape, np.nan, np.float32),
        "weights": np.zeros((70, 83)),
    }
    r = pv.process(image, grid, patch_filter, buffers=buffers, **kw)
    assert r.error is buffers["error"] and r.weights is buffers["weights"]
    if pv.backend() == "numba":  # weighed straight into the buffer
        assert np.shares_memory(r.merged, buffers["merged"])
    else:  # the NumPy engine makes its own result and leaves the buffer alone
        assert np.isnan(buffers["merged"]).all()
    np.testing.assert_array_equal(r.merged, plain.merged)
    np.testing.assert_array_equal(r.error, plain.error)
    np.testing.assert_array_equal(r.weights, plain.weights)
    assert r.metrics == plain.metrics
    np.testing.assert_array_equal(image, kept)
    # a float32 weights buffer holds the float64 map rounded once (what the explorer shows)
    w32 = np.empty((70, 83), np.float32)
    r32 = pv.process(image, grid, patch_filter, buffers={"weights": w32}, **kw)
    assert r32.weights is w32
    np.testing.assert_array_equal(w32, plain.weights.astype(np.float32))
    np.testing.assert_array_equal(r32.error, plain.error)


def test_buffers_that_do_not_fit_are_left_alone():
    image = np.random.default_rng(3).random((40, 50)).astype(np.float32)
    grid = PatchGrid(image.shape, 8, 4)
    wrong = {
        "error": np.full((40, 50), 7.0),  # float64: the error of float32 images is float32
        "weights": np.full((40, 49), 7.0, np.float32),  # another shape
        "merged": np.full((40, 50), 7.0),  # float64: float32 images merge into float32
    }
    r = pv.process(image, grid, "identity", buffers=wrong)
    assert r.error is not wrong["error"] and r.weights is not wrong["weights"]
    assert not np.shares_memory(r.merged, wrong["merged"])
    assert all((a == 7).all() for a in wrong.values())
    np.testing.assert_array_equal(r.merged, image)
    # a max merge is not weighed: it makes its own result and leaves the buffer alone
    kept = np.full((40, 50), 7.0, np.float32)
    r = pv.process(image, grid, "identity", reduce="max", buffers={"merged": kept})
    assert not np.shares_memory(r.merged, kept) and (kept == 7).all()
    np.testing.assert_array_equal(r.merged, image)
    np.testing.assert_array_equal(r.weights, pv.weight_map(grid))


def test_bad_buffers_are_refused_before_any_work():
    image = np.zeros((20, 20), np.float32)
    grid = PatchGrid(image.shape, 8, 4)
    with pytest.raises(ValueError, match="keys"):
        pv.process(image, grid, buffers={"reference": np.empty((20, 20), np.float32)})
    with pytest.raises(ValueError, match="share memory"):
        pv.process(image, grid, buffers={"error": image})  # the caller's image stays untouched
    same = np.empty((20, 20), np.float32)
    with pytest.raises(ValueError, match="share memory"):
        pv.process(image, grid, buffers={"error": same, "weights": same})
    with pytest.raises(ValueError, match="writeable"):
        ro = np.empty((20, 20), np.float32)
        ro.flags.writeable = False
        pv.process(image, grid, buffers={"error": ro})
    with pytest.raises(TypeError, match="NumPy array"):
        pv.process(image, grid, buffers={"error": [[0.0] * 20] * 20})
