"""Bad input is answered up front, by a ValueError/TypeError that names the parameter; odd
but valid input (float16, inf, NaN, int64, per-plane patches) gives the documented result."""

import math
import warnings

import dask
import dask.array as da
import numpy as np
import pytest

import patch_viewer as pv
from patch_viewer import FILTERS, Param, PatchGrid, iter_process, process, register_filter
from patch_viewer.core.metrics import data_range_of

IMAGE = np.random.default_rng(0).random((40, 40)).astype(np.float32)
GRID = PatchGrid(IMAGE.shape, 8, 4)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(max_bytes=-1), ValueError, r"`max_bytes` must be >= 1"),
        (dict(max_bytes="lots"), ValueError, r"`max_bytes`.*'1GB'"),
        (dict(max_bytes=1.5), TypeError, r"`max_bytes`"),
        (
            dict(window="gaussian", window_params={"sigma": "a"}),
            TypeError,
            r"`sigma` must be a number in \[0.01, 10.0\]",
        ),
        (dict(window="gaussian", window_params={"sigma": True}), TypeError, r"`sigma`"),
        (dict(window="gaussian", window_params={"sigma": 50.0}), ValueError, r"`sigma`.*10.0"),
        (dict(fill_value="x"), TypeError, r"`fill_value` must be a real number"),
        (dict(fill_value=300, dtype=np.uint8), ValueError, r"`fill_value`.*\[0, 255\]"),
        (dict(dtype="complex64"), TypeError, r"`dtype`"),
        (dict(reduce="max", window="hann"), ValueError, r"`window` must be 'uniform' with reduce"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        iter_process(IMAGE, GRID, **kwargs)


def test_max_bytes_accepts_sizes():
    assert process(IMAGE, GRID, max_bytes="1GB").merged.shape == IMAGE.shape
    with pytest.raises(MemoryError, match="max_bytes"):
        process(IMAGE, GRID, max_bytes="1 KiB")


def test_progress_must_be_callable_before_any_work():
    calls = []

    @register_filter("count_calls")
    def count(stack, spatial_axes):
        calls.append(1)
        return stack

    try:
        with pytest.raises(TypeError, match=r"`progress` must be a callable"):
            process(IMAGE, GRID, "count_calls", progress=5)
    finally:
        del FILTERS["count_calls"]
    assert calls == []


def test_channel_axis_true_is_not_axis_1():
    with pytest.raises(TypeError, match="`channel_axis` must be an int or None"):
        PatchGrid((40, 40, 3), 8, channel_axis=True)


def test_register_filter_refuses_what_would_fail_later():
    with pytest.raises(TypeError, match="`func` must be callable"):
        register_filter("x", 5)
    with pytest.raises(TypeError, match=r"`params\['k'\]` must be a Param"):
        register_filter("x", lambda s, a, k: s, params={"k": 3})
    with pytest.raises(ValueError, match="`default` must be in"):
        Param(5, 0, 1)
    assert "x" not in FILTERS


def test_rgb_without_channel_axis_says_how():
    rgb = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="channel_axis=-1"):
        PatchGrid(rgb.shape, 8)
    with pytest.raises(ValueError, match="channel_axis=-1"):
        process(rgb, PatchGrid((40, 40), 8))


def test_masked_arrays_are_refused_not_silently_unmasked():
    masked = np.ma.masked_greater(IMAGE, 0.5)
    with pytest.raises(TypeError, match=r"masked array.*filled"):
        process(masked, GRID)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_pixels_into_an_integer_dtype_are_refused(bad):
    image = IMAGE.copy()
    image[3, 3] = bad
    with pytest.raises(ValueError, match=r"NaN or inf.*integer `dtype`"):
        process(image, GRID, dtype=np.uint8)
    assert np.isnan(process(image, GRID).merged[3, 3]) == np.isnan(bad)


@pytest.mark.parametrize("kind", ["inf", "nan", "some inf"])
@pytest.mark.parametrize("name", ["identity", "gaussian", "zscore", "minmax", "otsu", "invert"])
def test_no_runtime_warning_for_inf_or_nan_images(kind, name):
    image = {
        "inf": np.full((32, 32), np.inf),
        "nan": np.full((32, 32), np.nan),
        "some inf": np.where(np.eye(32) > 0, np.inf, 1.0),
    }[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = process(image, PatchGrid(image.shape, 8, 4), name, reference="filter")
    assert r.merged.shape == image.shape


@pytest.mark.parametrize("name", ["gaussian", "median", "uniform", "sobel", "unsharp"])
def test_float16_is_filtered_in_float32(name):
    image = IMAGE.astype(np.float16)
    r = process(image, GRID, name, reference="filter")
    expected = process(image.astype(np.float32), GRID, name, reference="filter")
    assert r.merged.dtype == np.float32
    np.testing.assert_array_equal(r.merged, expected.merged)
    lazy = process(da.from_array(image, chunks=20), GRID, name, reference="filter")
    merged, metrics = dask.compute(lazy.merged, lazy.metrics)
    np.testing.assert_allclose(merged, r.merged, rtol=1e-6)
    assert metrics["psnr"] == pytest.approx(r.metrics["psnr"], rel=1e-6)


def test_lazy_and_in_memory_metrics_follow_one_rule_for_integers():
    image = np.random.default_rng(1).integers(-1000, 1000, (200, 300)).astype(np.int16)
    grid = PatchGrid(image.shape, 32, 16)
    r = process(image, grid, "median", reference="filter")
    lazy = process(da.from_array(image, chunks=100), grid, "median", reference="filter")
    assert lazy.reference.dtype == r.reference.dtype == np.int16
    (m,) = dask.compute(lazy.metrics)
    for key in ("max_abs", "rmse", "psnr", "ssim"):
        assert float(m[key]) == pytest.approx(r.metrics[key], rel=1e-9), key


def test_wide_integers_use_the_data_range_not_the_dtype_range():
    ref = np.arange(100, dtype=np.int64).reshape(10, 10) * 10  # data range 990
    merged = ref + 1
    assert data_range_of(ref) == 990
    m = pv.compute_metrics(merged, ref)
    assert m["psnr"] == pytest.approx(20 * math.log10(990))
    assert data_range_of(ref.astype(np.uint8)) == 255  # 8 and 16 bits: the dtype's range
    lazy = pv.core.chunked.chunked_metrics(
        da.from_array(merged.astype(np.float64), chunks=5), da.from_array(ref, chunks=5)
    )
    assert float(lazy["psnr"].compute()) == pytest.approx(m["psnr"])


def test_per_plane_patches_compare_with_a_per_plane_reference():
    volume = np.random.default_rng(2).random((6, 24, 24)).astype(np.float32)
    grid = PatchGrid(volume.shape, (1, 24, 24), 1)  # each patch is one whole plane
    r = process(volume, grid, "gaussian", filter_params={"sigma": 2.0}, reference="filter")
    assert r.metrics["max_abs"] == 0  # no seam can exist, and none shows
    lazy = process(
        da.from_array(volume, chunks=(2, 24, 24)),
        grid,
        "gaussian",
        filter_params={"sigma": 2.0},
        reference="filter",
    )
    assert float(lazy.metrics["max_abs"].compute()) == 0
