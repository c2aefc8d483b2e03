"""Patch-wise inference: the Accumulator, predictors, batches, selection, pad values and
plugins, against brute force, on both backends, in memory and on dask."""

from fractions import Fraction

import dask.array as da
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import patch_viewer as pv
from patch_viewer import (
    Accumulator,
    PatchGrid,
    PredictionError,
    Predictor,
    extract_patches,
    iter_batches,
    merge_patches,
    process,
    select_patches,
)
from patch_viewer.core import plugins
from patch_viewer.core.batches import mask_fraction
from patch_viewer.core.windows import make_window

from .reference import brute_patches
from .strategies import grids

pytestmark = pytest.mark.usefixtures("backend")


def brute_scatter(patches, origins, out_shape, patch, window=None, reduce="mean"):
    """Patches ``(N, *patch, C)`` added at ``origins`` one by one, float64; NaN where none."""
    c = patches.shape[-1]
    w = np.ones(patch) if window is None else window
    acc = (
        np.zeros(tuple(out_shape) + (c,))
        if reduce == "mean"
        else np.full(tuple(out_shape) + (c,), -np.inf if reduce == "max" else np.inf)
    )
    wsum = np.zeros(out_shape)
    for v, o in zip(patches.astype(np.float64), origins):
        sl = tuple(slice(a, a + p) for a, p in zip(o, patch))
        if reduce == "mean":
            acc[sl] += v * w[..., None]
        elif reduce == "max":
            acc[sl] = np.maximum(acc[sl], v)
        else:
            acc[sl] = np.minimum(acc[sl], v)
        wsum[sl] += w
    with np.errstate(invalid="ignore", divide="ignore"):
        out = acc / wsum[..., None] if reduce == "mean" else acc
    out[wsum == 0] = np.nan
    return out


# ----------------------------------------------------------------- the Accumulator
@settings(max_examples=150, deadline=None)
@given(
    grids(channels=(None,)),
    st.sampled_from([np.float32, np.float64, np.uint8, np.int64]),
    st.sampled_from(["uniform", "hann", "max"]),
    st.integers(0, 2**32 - 1),
)
def test_subsets_in_random_order_match_brute_force(grid, dtype, how, seed):
    rng = np.random.default_rng(seed)
    reduce = how if how == "max" else "mean"
    window = how if how == "hann" else "uniform"
    n = grid.n_patches
    chosen = rng.permutation(n)[: rng.integers(1, n + 1)]
    if np.dtype(dtype).kind == "f":
        patches = (rng.standard_normal((n,) + grid.patch_size) * 100).astype(dtype)
    else:
        info = np.iinfo(dtype)
        patches = rng.integers(
            info.min, info.max, (n,) + grid.patch_size, dtype=dtype, endpoint=True
        )
    acc = Accumulator(grid, window=window, reduce=reduce)
    for part in np.array_split(chosen, rng.integers(1, 5)):
        acc.add(patches[part], part)
    origins = [grid.patch_origin(int(k)) for k in chosen]
    win = make_window(window, grid.patch_size)
    expected = brute_scatter(
        patches[chosen][..., None], origins, grid.padded_shape, grid.patch_size, win, reduce
    )
    expected = expected[tuple(slice(0, s) for s in grid.spatial_shape)][..., 0]
    merged = acc.result(np.float64)
    scale = 1.0 + float(np.abs(patches.astype(np.float64)).max())
    np.testing.assert_allclose(merged, expected, rtol=0, atol=1e-12 * scale)
    assert np.array_equal(np.isnan(merged), np.isnan(expected))
    cover = np.isfinite(expected)
    assert np.array_equal(acc.count > 0, cover)


@settings(max_examples=100, deadline=None)
@given(
    grids(),
    st.sampled_from([np.float32, np.float64, np.uint16, np.uint64, bool]),
    st.sampled_from(["uniform", "triangular", "gaussian"]),
    st.integers(0, 2**32 - 1),
)
def test_identity_round_trip_in_any_order_is_exact(grid, dtype, window, seed):
    assume(grid.is_covering)
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        image = (rng.standard_normal(grid.image_shape) * 1e3).astype(dtype)
    elif dtype.kind == "b":
        image = rng.random(grid.image_shape) < 0.5
    else:
        image = rng.integers(0, np.iinfo(dtype).max, grid.image_shape, dtype=dtype, endpoint=True)
    patches = extract_patches(image, grid).reshape((grid.n_patches,) + grid.patch_shape)
    acc = Accumulator(grid, window=window)
    order = rng.permutation(grid.n_patches)
    for part in np.array_split(order, min(3, grid.n_patches)):
        acc.add(patches[part], part)
    assert np.array_equal(acc.result(dtype), image)
    assert np.array_equal(
        acc.result(dtype), merge_patches(patches, grid, window=window, dtype=dtype)
    )


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_arbitrary_origins_match_brute_force(nd, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(4, 14, nd))
    patch = tuple(int(rng.integers(1, s + 1)) for s in shape)
    grid = PatchGrid(shape + (2,), patch, channel_axis=-1)
    n = int(rng.integers(0, 30))
    origins = (
        np.stack([rng.integers(0, s - p + 1, n) for s, p in zip(shape, patch)], -1)
        if n
        else np.zeros((0, nd), int)
    )
    patches = rng.standard_normal((n,) + patch + (2,))
    acc = Accumulator(grid, window="hann")
    for part in np.array_split(np.arange(n), 3):
        acc.add(patches[part], origins=origins[part])
    expected = brute_scatter(patches, origins, shape, patch, make_window("hann", patch))
    np.testing.assert_allclose(acc.result(), expected, rtol=1e-12, atol=1e-12)
    wsum = np.zeros(shape)
    for o in origins:
        wsum[tuple(slice(a, a + p) for a, p in zip(o, patch))] += make_window("hann", patch)
    np.testing.assert_allclose(acc.weights(), wsum, rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(grids(channels=(None,)), st.sampled_from(["uniform", "hann"]), st.integers(0, 2**32 - 1))
def test_counts_and_weights_of_repeats_subsets_and_origins(grid, window, seed):
    """A whole grid added once, then twice, in random order (the counts then come from
    per-axis products), then a subset (no longer), then patches off the grid: count and
    weights match brute force at every step; grid indices ``(N, ndim)`` count as flat ones."""
    rng = np.random.default_rng(seed)
    n = grid.n_patches
    acc = Accumulator(grid, window=window)
    win = make_window(window, grid.patch_size)
    win = np.ones(grid.patch_size) if win is None else win
    count = np.zeros(grid.padded_shape, np.int64)
    wsum = np.zeros(grid.padded_shape)
    crop = tuple(slice(0, s) for s in grid.spatial_shape)

    def add(part=None, origins=None):
        if origins is None:
            origins = [grid.patch_origin(int(k)) for k in part]
            grid_indices = np.stack(np.unravel_index(part, grid.grid_shape), -1)
            acc.add(np.zeros((len(part),) + grid.patch_size), grid_indices if seed % 2 else part)
        else:
            acc.add(np.zeros((len(origins),) + grid.patch_size), origins=origins)
        for o in origins:
            box = tuple(slice(a, a + p) for a, p in zip(o, grid.patch_size))
            count[box] += 1
            wsum[box] += win

    def check():
        assert np.array_equal(acc.count, count[crop])
        np.testing.assert_allclose(acc.weights(), wsum[crop], rtol=1e-12, atol=1e-12)

    for _ in range(2):
        for part in np.array_split(rng.permutation(n), min(3, n)):
            add(part)
        check()
    add(rng.permutation(n)[: rng.integers(1, n + 1)])
    check()
    top = [m - p for m, p in zip(grid.padded_shape, grid.patch_size)]
    add(origins=np.stack([rng.integers(0, t + 1, 4) for t in top], -1))
    check()


def test_a_patch_added_twice_counts_twice():
    grid = PatchGrid((4,), 2, stride=2)
    acc = Accumulator(grid)
    acc.add(np.array([[1.0, 1.0], [5.0, 5.0]]), [0, 1])
    acc.add(np.array([[4.0, 4.0]]), [0])
    assert acc.result().tolist() == [2.5, 2.5, 5.0, 5.0]
    assert acc.count.tolist() == [2, 2, 1, 1]


def test_vectors_per_patch_average_over_each_footprint():
    grid = PatchGrid((6, 6), 4, stride=2)
    vectors = np.arange(grid.n_patches * 2, dtype=np.float64).reshape(-1, 2)
    acc = Accumulator(grid, channels=2)
    acc.add(vectors, np.arange(grid.n_patches))
    origins = [grid.patch_origin(k) for k in range(grid.n_patches)]
    painted = np.broadcast_to(vectors[:, None, None, :], (grid.n_patches, 4, 4, 2))
    np.testing.assert_allclose(acc.result(), brute_scatter(painted, origins, (6, 6), (4, 4)))


def test_channels_first_batches_and_torch_like_outputs():
    grid = PatchGrid((8, 8), 4, stride=4)
    acc = Accumulator(grid, channels=3)
    out = np.arange(4 * 3 * 16, dtype=np.float32).reshape(4, 3, 4, 4)
    acc.add(out, np.arange(4), channels_first=True)
    assert acc.result()[0, 0].tolist() == out[0, :, 0, 0].tolist()


# ----------------------------------------------------------------- predictors in process
def three_class(batch):
    return np.stack([batch, 1 - batch, batch * batch], axis=-1)


@pytest.mark.parametrize("edge", ["shift", "pad", "drop"])
def test_k_channel_predictor_equals_merging_each_channel(edge):
    rng = np.random.default_rng(1)
    image = rng.random((37, 29)).astype(np.float32)
    grid = PatchGrid(image.shape, (9, 7), stride=(4, 3), edge=edge)
    r = process(image, grid, Predictor(three_class, batch_size=13))
    patches = extract_patches(image, grid)
    for c, f in enumerate([lambda x: x, lambda x: 1 - x, lambda x: x * x]):
        want = merge_patches(f(patches), grid)
        np.testing.assert_array_equal(r.merged[..., c], want)
    assert r.error is None and np.isnan(r.metrics["rmse"])
    assert list(r.outputs) == ["output"]


def test_predictor_with_another_dtype_and_several_outputs():
    image = np.random.default_rng(2).integers(0, 255, (20, 24), dtype=np.uint8)
    grid = PatchGrid(image.shape, 8, stride=4)

    def model(batch):
        return {"mask": batch > 100, "score": batch.astype(np.float64) / 255}

    r = process(image, grid, Predictor(model, batch_size=5))
    assert set(r.outputs) == {"mask", "score"}
    np.testing.assert_allclose(r.outputs["score"], image / 255)
    np.testing.assert_array_equal(r.outputs["mask"], (image > 100).astype(np.float32))
    assert r.merged is r.outputs["mask"]


@pytest.mark.parametrize("scale", [2, Fraction(1, 2), (1, 3)])
def test_rescaled_outputs(scale):
    image = np.random.default_rng(3).random((24, 36))
    grid = PatchGrid(image.shape, (8, 12), stride=(4, 6))
    f = pv.core.accumulator.parse_scale(scale, 2)

    def resample(a):  # nearest up-sampling, block-mean down-sampling, per axis
        for ax, s in enumerate(f, start=1):
            if s >= 1:
                a = np.repeat(a, int(s), axis=ax)
            else:
                d = s.denominator
                shape = a.shape[:ax] + (a.shape[ax] // d, d) + a.shape[ax + 1 :]
                a = a.reshape(shape).mean(axis=ax + 1)
        return a

    r = process(image, grid, Predictor(resample, scale=scale))
    np.testing.assert_allclose(r.merged, resample(image[None])[0], rtol=1e-15)
    assert r.weights.shape == r.merged.shape


def test_streaming_equals_all_at_once_and_dask_equals_memory():
    rng = np.random.default_rng(4)
    image = rng.random((50, 44, 2)).astype(np.float32)
    grid = PatchGrid(image.shape, 10, stride=(3, 4), channel_axis=-1, edge="pad")
    model = Predictor(lambda b: np.concatenate([b, b[..., :1] * 2], -1), batch_size=7)
    r = process(image, grid, model, window="hann")
    acc = Accumulator(grid, channels=3, window="hann")
    patches = extract_patches(image, grid).reshape((grid.n_patches,) + grid.patch_shape)
    acc.add(model.func(patches), np.arange(grid.n_patches))
    # process streams in grid order and takes a whole grid's weights as per-axis products (as
    # merge_patches does): a float64 mean may differ in its last bits, the float32 by an ulp
    np.testing.assert_allclose(r.merged, acc.result(), rtol=2**-23, atol=0)
    lazy = process(da.from_array(image, chunks=(17, 13, 2)), grid, model, window="hann")
    assert isinstance(lazy.merged, da.Array)
    np.testing.assert_array_equal(lazy.merged.compute(), r.merged)
    np.testing.assert_array_equal(lazy.weights.compute(), r.weights)


def test_dask_rescaled_and_selected_equal_memory():
    rng = np.random.default_rng(5)
    image = rng.random((30, 40))
    grid = PatchGrid(image.shape, (6, 8), stride=(2, 4))
    down = Predictor(lambda b: b.reshape(len(b), 3, 2, 4, 2).mean((2, 4)), scale="1/2")
    chosen = select_patches(grid, image=image, predicate=lambda p: p.mean((1, 2)) > 0.5)
    mem = process(image, grid, down, indices=chosen)
    lazy = process(da.from_array(image, chunks=(9, 15)), grid, down, indices=chosen)
    np.testing.assert_array_equal(lazy.merged.compute(), mem.merged)
    np.testing.assert_array_equal(lazy.weights.compute(), mem.weights)


def test_reference_filter_runs_the_predictor_on_the_whole_image():
    image = np.random.default_rng(6).random((32, 32))
    grid = PatchGrid(image.shape, 8, stride=4)
    r = process(image, grid, Predictor(three_class), reference="filter")
    np.testing.assert_allclose(r.reference, three_class(image[None])[0])
    np.testing.assert_allclose(r.error, 0, atol=1e-15)  # pixel-wise: patches cannot seam
    vec = Predictor(lambda b: b.mean(axis=(1, 2))[:, None], per_patch=True)
    with pytest.raises(PredictionError, match="whole image"):
        process(image, grid, vec, reference="filter")


# ----------------------------------------------------------------- selection and batches
@settings(max_examples=60, deadline=None)
@given(grids(channels=(None,)), st.integers(0, 2**32 - 1), st.floats(0, 1))
def test_mask_fraction_matches_brute_force(grid, seed, fraction):
    mask = np.random.default_rng(seed).random(grid.spatial_shape) < 0.5
    padded = np.zeros(grid.padded_shape, bool)
    padded[tuple(slice(0, n) for n in grid.spatial_shape)] = mask
    want = []
    for k in range(grid.n_patches):
        o = grid.patch_origin(k)
        want.append(padded[tuple(slice(a, a + p) for a, p in zip(o, grid.patch_size))].mean())
    np.testing.assert_allclose(mask_fraction(mask, grid), want)
    chosen = select_patches(grid, mask=mask, min_fraction=fraction)
    assert chosen.tolist() == [k for k, w in enumerate(want) if w >= fraction]


def test_selected_patches_leave_fill_or_input_elsewhere():
    image = np.zeros((40, 40), np.float32)
    image[:20, :20] = 1
    grid = PatchGrid(image.shape, 10, stride=5)
    chosen = select_patches(grid, mask=image > 0, min_fraction=1.0)
    assert len(chosen) == 9
    flip = pv.PatchFilter("flip", lambda stack, axes: 1 - stack)
    r = process(image, grid, flip, indices=chosen)
    assert np.isnan(r.merged[30, 30]) and r.merged[5, 5] == 0
    assert np.isnan(r.merged[25, 25])
    kept = process(image, grid, flip, indices=chosen, uncovered="input")
    assert kept.merged[30, 30] == 0 and np.isfinite(kept.merged).all()
    assert np.array_equal(kept.merged[:20, :20], r.merged[:20, :20])
    both = select_patches(
        grid,
        mask=image > 0,
        min_fraction=0.5,
        indices=[0, 1, 35],
        image=image,
        predicate=lambda p: p.max(axis=(1, 2)) > 0,
    )
    assert both.tolist() == [0, 1]


def test_iter_batches_cover_the_grid_in_both_layouts():
    rng = np.random.default_rng(7)
    image = rng.random((3, 13, 11))
    grid = PatchGrid(
        image.shape,
        (5, 4),
        stride=(3, 2),
        channel_axis=0,
        edge="pad",
        pad_mode="constant",
        pad_value=-1,
    )
    want = brute_patches(image, grid).reshape((grid.n_patches,) + grid.patch_shape)
    got = list(iter_batches(image, grid, 6))
    assert np.array_equal(np.concatenate([b.indices for b in got]), np.arange(grid.n_patches))
    np.testing.assert_array_equal(np.concatenate([b.patches for b in got]), want)
    first = next(iter_batches(image, grid, 6, channels_first=True))
    np.testing.assert_array_equal(first.patches, np.moveaxis(want[:6], -1, 1))
    assert first.origins.tolist()[1] == list(grid.patch_origin(1))


def test_pad_value_pads_constant_edges():
    image = np.ones((5, 5), np.float32)
    grid = PatchGrid(image.shape, 4, stride=3, edge="pad", pad_mode="constant", pad_value=9)
    assert extract_patches(image, grid)[1, 1, 3, 3] == 9
    assert process(image, grid).merged.tolist() == image.tolist()  # cropped back
    lazy = process(da.from_array(image, chunks=3), grid, "gaussian")
    np.testing.assert_array_equal(lazy.merged.compute(), process(image, grid, "gaussian").merged)
    with pytest.raises(ValueError, match=r"pad_value.*0\.\.255"):
        extract_patches(
            image.astype(np.uint8),
            PatchGrid((5, 5), 4, stride=3, edge="pad", pad_mode="constant", pad_value=300),
        )
    with pytest.raises(TypeError, match="pad_value"):
        PatchGrid((5, 5), 4, pad_value="x")


# ----------------------------------------------------------------- bad input
def test_every_refusal_names_what_is_wrong():
    grid = PatchGrid((10, 10), 4, stride=2)
    acc = Accumulator(grid, channels=2)
    with pytest.raises(ValueError, match=r"\(3, 4, 4, 2\)"):
        acc.add(np.zeros((3, 4, 4)), [0, 1, 2])
    with pytest.raises(IndexError, match=r"indices.*0..15.*\[16\]"):
        acc.add(np.zeros((1, 4, 4, 2)), [16])
    with pytest.raises(IndexError, match=r"origins 0\.\.6 x 0\.\.6\), got \[\[7, 0\]\]"):
        acc.add(np.zeros((1, 4, 4, 2)), origins=[[7, 0]])
    acc.add(np.ones((1, 4, 4, 2), np.float32), [0])
    with pytest.raises(TypeError, match=r"batch 1 has dtype float64.*float32"):
        acc.add(np.ones((1, 4, 4, 2)), [1])
    assert acc.n_added == 1 and acc.result()[0, 0].tolist() == [1, 1]  # still usable
    with pytest.raises(ValueError, match=r"`mask` must have the image's spatial shape \(10, 10\)"):
        select_patches(grid, mask=np.ones((9, 10)))
    with pytest.raises(ValueError, match="scale 1/3 does not map the patch size"):
        Accumulator(grid, scale="1/3")


def test_a_predictor_that_breaks_its_declaration_or_first_call():
    image = np.random.default_rng(8).random((16, 16))
    grid = PatchGrid(image.shape, 4, stride=2)
    declared = Predictor(lambda b: np.stack([b, b], -1), name="two", channels=3)
    with pytest.raises(PredictionError, match=r"'two'.*channels 2 \(declared 3\)"):
        process(image, grid, declared)
    calls = []

    def drifting(batch):
        calls.append(1)
        return batch if len(calls) < 3 else batch[:, :2]

    with pytest.raises(PredictionError, match=r"shape \(10, 2, 4\).*on batch 2.*\(N, 4, 4\)"):
        process(image, grid, Predictor(drifting, batch_size=10))

    def retyped(batch):
        retyped.calls += 1
        return batch if retyped.calls < 2 else batch.astype(np.float32)

    retyped.calls = 0
    with pytest.raises(PredictionError, match=r"float32 on batch 1.*float64"):
        process(image, grid, Predictor(retyped, batch_size=10))


def test_a_failing_predictor_names_its_batch_and_leaves_nothing_half_merged():
    image = np.random.default_rng(9).random((160, 160))
    grid = PatchGrid(image.shape, 8, stride=2)

    def model(batch):
        model.calls += 1
        if model.calls == 38:
            raise RuntimeError("CUDA out of memory")
        return batch

    model.calls = 0
    with pytest.raises(
        PredictionError,
        match=r"'model' failed on batch 37 \(patches "
        r"2368..2431\).*CUDA out of memory",
    ):
        process(image, grid, Predictor(model, batch_size=64))
    acc = Accumulator(grid)  # the accumulator a user feeds by hand: a refused add changes nothing
    batches = list(iter_batches(image, grid, 64))
    for b in batches[:37]:
        acc.add(b.patches, b.indices)
    before = acc.result()
    with pytest.raises(ValueError):
        acc.add(batches[37].patches[:, :4], batches[37].indices)
    np.testing.assert_array_equal(acc.result(), before)
    for b in batches[37:]:
        acc.add(b.patches, b.indices)
    np.testing.assert_array_equal(acc.result(), image)


# ----------------------------------------------------------------- plugins
class _EntryPoint:
    def __init__(self, name, value, obj):
        self.name, self.value, self._obj = name, value, obj

    def load(self):
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


def test_entry_point_filters_join_the_registry(monkeypatch):
    halve = Predictor(lambda b: b / 2, name="x")
    mine = pv.PatchFilter("mine", lambda s, axes: s + 1)
    eps = [
        _EntryPoint("halve", "pkg:halve", halve),
        _EntryPoint("many", "pkg:many", [mine]),
        _EntryPoint("broken", "pkg:broken", ImportError("no torch")),
        _EntryPoint("gaussian", "pkg:g", mine),
        _EntryPoint("junk", "pkg:junk", 42),
    ]
    monkeypatch.setattr(
        plugins, "entry_points", lambda group: eps if group == plugins.GROUP else []
    )
    monkeypatch.setattr(pv.core.filters, "FILTERS", pv.FILTERS)
    for name in ("halve", "mine"):
        monkeypatch.delitem(pv.FILTERS, name, raising=False)
    with pytest.warns(UserWarning) as record:
        added = plugins.load_entry_points()
    try:
        assert added == ["halve", "mine"]
        assert pv.FILTERS["halve"].name == "halve" and pv.FILTERS["mine"] is mine
        assert pv.FILTERS["gaussian"].name == "gaussian" and pv.FILTERS["gaussian"] is not mine
        text = " ".join(str(w.message) for w in record)
        assert "'broken'" in text and "no torch" in text and "'junk'" in text
        assert "replace the built-in" in text
        image = np.ones((8, 8))
        assert process(image, PatchGrid(image.shape, 4, stride=2), "halve").merged[0, 0] == 0.5
    finally:
        for name in added:
            pv.FILTERS.pop(name, None)


def test_load_callable_imports_never_evaluates():
    assert pv.load_callable("numpy.linalg:norm") is np.linalg.norm
    with pytest.raises(ValueError, match=r"package\.module:function"):
        pv.load_callable("__import__('os').system('true')")
    with pytest.raises(ImportError, match="cannot import module 'no_such_module'"):
        pv.load_callable("no_such_module:f")
    with pytest.raises(ImportError, match="has no attribute 'nope'"):
        pv.load_callable("numpy:nope")


@pytest.mark.parametrize("window", ["uniform", "hann"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8])
def test_bands_and_threads_never_change_a_bit(monkeypatch, window, dtype):
    """Sums kept in bands of a few rows (forced small here) and threads over bands or over
    parts of one: the same bits as one band on one thread, and the brute-force values (a band
    offset once shifted every band but the first). A stream in grid order that releases
    finished rows gives the same bits again, for a whole grid and for chosen patches."""
    from patch_viewer.core.merge import scatter

    rng = np.random.default_rng(11)
    grid = PatchGrid((41, 37, 2), (9, 8), stride=(4, 3), channel_axis=-1)
    if np.dtype(dtype).kind == "f":
        patches = (rng.standard_normal((grid.n_patches,) + grid.patch_shape) * 50).astype(dtype)
    else:
        patches = rng.integers(0, 200, (grid.n_patches,) + grid.patch_shape).astype(dtype)
    parts = np.array_split(np.arange(grid.n_patches), 7)
    results = {}
    for band_bytes, workers in [(1 << 30, 1), (1 << 30, 2), (3000, 1), (3000, 2), (700, 5)]:
        monkeypatch.setattr(scatter, "default_workers", lambda nbytes, w=workers: w)
        monkeypatch.setattr(scatter, "BAND_BYTES", band_bytes)
        acc = Accumulator(grid, window=window)
        for part in parts:
            acc.add(patches[part], part)
        results[band_bytes, workers] = acc.result(np.float64)
        for whole in (True, False):  # streamed in grid order, finished rows released
            acc = Accumulator(grid, window=window)
            acc._stream(whole)
            for part in parts:
                acc.add(patches[part], part)
                acc._release(grid.patch_origin(int(part[-1]))[0], np.float64, None)
            got, want = acc.result(np.float64), results[band_bytes, workers]
            if whole and window != "uniform":  # weights as per-axis products (as merge_patches
                np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-13)  # takes them)
            else:
                assert np.array_equal(got, want)
            if band_bytes < 10000:  # several bands: the top ones were released on the way
                assert acc._state.released >= 1
                with pytest.raises(ValueError, match="released"):
                    acc.add(patches[:1], [0])
    first = results[1 << 30, 1]
    for key, r in results.items():
        assert np.array_equal(r, first), key
    origins = [grid.patch_origin(k) for k in range(grid.n_patches)]
    want = brute_scatter(
        patches, origins, grid.spatial_shape, grid.patch_size, make_window(window, grid.patch_size)
    )
    np.testing.assert_allclose(first, want, rtol=1e-12, atol=1e-9)
