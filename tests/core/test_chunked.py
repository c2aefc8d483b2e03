"""The dask path equals the in-memory one, whatever the chunking; it stays lazy; it runs on
dask.distributed."""

import dask
import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patch_viewer import PatchGrid, merge_patches, process
from patch_viewer.core.chunked import chunked_merge

from .strategies import grids

pytestmark = pytest.mark.usefixtures("backend")


def _close(a, b, dtype):
    """Equal up to the rounding of a different summation order (a few ulp of the data)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    if dtype.kind != "f":
        np.testing.assert_array_equal(a, b)
        return
    eps = np.finfo(a.dtype).eps
    scale = np.nanmax(np.abs(b)) if np.isfinite(b).any() else 1.0
    np.testing.assert_allclose(a, b, rtol=64 * eps, atol=64 * eps * max(scale, 1.0))
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))


@settings(max_examples=60, deadline=None)
@given(
    grids(),
    st.data(),
    st.sampled_from(["identity", "gaussian", "median", "invert", "zscore", "sobel"]),
    st.sampled_from(["uniform", "triangular", "hann", "overlap-tile"]),
    st.sampled_from([np.uint8, np.float32, np.float64]),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_chunked_equals_in_memory(grid, data, name, window, dtype, batched, seed):
    rng = np.random.default_rng(seed)
    shape = ((2,) if batched else ()) + grid.image_shape
    image = (rng.random(shape) * 200).astype(dtype)
    expected = process(image, grid, name, window=window, ssim=False)
    chunks = tuple(data.draw(st.integers(1, n)) for n in shape)
    lazy = process(da.from_array(image, chunks=chunks), grid, name, window=window, ssim=False)
    assert isinstance(lazy.merged, da.Array)
    merged, weights, error = dask.compute(lazy.merged, lazy.weights, lazy.error)
    if name == "identity":
        np.testing.assert_array_equal(merged, expected.merged)  # exact, as in memory
    _close(merged, expected.merged, expected.merged.dtype)
    _close(weights, expected.weights, np.dtype(np.float64))
    _close(error, expected.error, expected.error.dtype)


@settings(max_examples=30, deadline=None)
@given(
    grids(channels=(None,)), st.sampled_from(["max", "min"]), st.data(), st.integers(0, 2**32 - 1)
)
def test_chunked_max_min_are_exact(grid, reduce, data, seed):
    image = np.random.default_rng(seed).random(grid.image_shape)
    chunks = tuple(data.draw(st.integers(1, n)) for n in grid.image_shape)
    lazy = process(da.from_array(image, chunks=chunks), grid, "gaussian", reduce=reduce)
    np.testing.assert_array_equal(
        lazy.merged.compute(), process(image, grid, "gaussian", reduce=reduce).merged
    )


def test_result_does_not_depend_on_chunking_and_metrics_match():
    rng = np.random.default_rng(3)
    image = rng.random((240, 200, 3)).astype(np.float32)
    grid = PatchGrid(image.shape, 32, stride=24, channel_axis=-1)
    expected = process(image, grid, "gaussian", reference="filter", window="hann")
    results = []
    for chunks in [(64, 64, 3), (240, 33, 1), (100, 200, 2)]:
        r = process(
            da.from_array(image, chunks=chunks), grid, "gaussian", reference="filter", window="hann"
        )
        merged, reference, metrics = dask.compute(r.merged, r.reference, r.metrics)
        np.testing.assert_array_equal(reference, expected.reference)
        _close(merged, expected.merged, merged.dtype)
        for k, v in expected.metrics.items():
            assert metrics[k] == pytest.approx(v, rel=1e-6), k
        results.append(merged)
    _close(results[0], results[1], results[0].dtype)
    _close(results[0], results[2], results[0].dtype)


def test_uncovered_pixels_and_metrics_with_drop():
    image = np.arange(70 * 50, dtype=np.float64).reshape(70, 50)
    grid = PatchGrid(image.shape, 16, stride=20, edge="drop")
    expected = process(image, grid)
    r = process(da.from_array(image, chunks=25), grid)
    merged, metrics = dask.compute(r.merged, r.metrics)
    np.testing.assert_array_equal(merged, expected.merged)  # NaN where no patch covers
    assert np.isnan(merged).any()
    assert metrics["covered"] == pytest.approx(expected.metrics["covered"])
    assert metrics["ssim"] == pytest.approx(expected.metrics["ssim"])
    with pytest.raises(ValueError, match="fill_value"):
        chunked_merge(da.from_array(image, chunks=25), grid, dtype=np.uint8)
    m, _ = chunked_merge(da.from_array(image, chunks=25), grid, dtype=np.int32, fill_value=-1)
    assert (m.compute() == -1).sum() == np.isnan(expected.merged).sum()


def test_zarr_input(tmp_path):
    zarr = pytest.importorskip("zarr")
    image = np.random.default_rng(0).integers(0, 255, (300, 260), dtype=np.uint8)
    z = zarr.open_array(
        tmp_path / "im.zarr", mode="w", shape=image.shape, chunks=(128, 128), dtype=image.dtype
    )
    z[:] = image
    grid = PatchGrid(image.shape, 39, stride=13)
    r = process(z, grid, dtype=np.uint8)
    assert isinstance(r.merged, da.Array) and r.merged.chunks[0][0] == 128
    np.testing.assert_array_equal(r.merged.compute(), image)


def test_graph_is_lazy_and_reads_only_neighbouring_chunks():
    reads = []

    def load(block, block_info=None):
        reads.append(block_info[None]["chunk-location"])
        return block

    source = da.random.default_rng(0).random((1000, 1000), chunks=200)
    image = source.map_blocks(load, dtype=source.dtype)
    r = process(image, PatchGrid(image.shape, 32, stride=16), "gaussian")
    assert reads == []  # building the result computes nothing
    corner = r.merged[:10, :10].compute()
    assert corner.shape == (10, 10)
    # The corner chunk's halo (patch - 1 = 31 px) reaches only its right and lower neighbours.
    assert set(reads) <= {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_reference_filter_needs_a_declared_reach():
    image = da.zeros((64, 64), chunks=32)
    with pytest.raises(ValueError, match="reference='input'"):
        process(image, PatchGrid(image.shape, 16, stride=8), "zscore", reference="filter")


def test_merge_patches_refuses_a_dask_stack():
    grid = PatchGrid((10, 10), 4, stride=2)
    with pytest.raises(TypeError, match="process"):
        merge_patches(da.zeros(grid.patches_shape), grid)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::ResourceWarning")
def test_runs_unchanged_on_a_two_worker_local_cluster():
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(5)
    image = rng.random((300, 280)).astype(np.float32)
    grid = PatchGrid(image.shape, 39, stride=16, edge="pad", pad_mode="reflect")
    expected = process(image, grid, "median", window="triangular")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        assert len(client.scheduler_info()["workers"]) == 2
        r = process(da.from_array(image, chunks=100), grid, "median", window="triangular")
        merged, metrics = client.compute([r.merged, r.metrics], sync=True)
    _close(merged, expected.merged, merged.dtype)
    assert metrics["rmse"] == pytest.approx(expected.metrics["rmse"], rel=1e-6)


def test_different_runs_never_share_task_keys():
    """Key names are hashes of the inputs: caches (napari's dask cache) never mix two runs."""
    a = da.zeros((64, 64), chunks=32)
    b = da.ones((64, 64), chunks=32)
    grid = PatchGrid(a.shape, 16, stride=8)
    ra, rb = process(a, grid), process(b, grid)
    assert ra.merged.name != rb.merged.name
    assert process(a, grid, window="hann").weights.name != ra.weights.name
    np.testing.assert_array_equal(rb.merged.compute(), 1)


def test_chunked_metrics_settle_missing_pixels_as_in_memory():
    """NaN in the reference or the merged image: the chunked metrics (SSIM included) follow
    the same rule as compute_metrics."""
    from patch_viewer import compute_metrics
    from patch_viewer.core.chunked import chunked_metrics

    rng = np.random.default_rng(4)
    reference = rng.random((90, 80))
    merged = reference + rng.normal(0, 0.05, reference.shape)
    reference[10:13, 20:40] = np.nan
    merged[50:52, 5:9] = np.nan
    expected = compute_metrics(merged, reference)
    (got,) = dask.compute(
        chunked_metrics(da.from_array(merged, chunks=30), da.from_array(reference, chunks=30))
    )
    for k, v in expected.items():
        assert float(got[k]) == pytest.approx(v, rel=1e-9), k
