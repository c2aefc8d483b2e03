import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from patch_viewer import PatchGrid, extract_patches, merge_patches, weight_map
from patch_viewer.core._layout import patches_to_canonical
from patch_viewer.core.merge import Merger, plan
from patch_viewer.core.merge import numpy_engine as ne
from patch_viewer.core.merge import numpy_merger as nm
from patch_viewer.core.merge.kernels_numpy import owned_segments as _owned_segments
from patch_viewer.core.merge.numpy_merger import NumpyMerger
from patch_viewer.core.merge.precision import narrow_sums_exact

from .reference import brute_coverage, brute_merge, to_user_layout
from .strategies import DTYPES, grids, images

pytestmark = pytest.mark.usefixtures("backend")

NAMED = ["uniform", "triangular", "hann", "gaussian", "overlap-tile"]


# ----------------------------------------------------------------- small hand-computed cases
def test_hand_computed_mean_1d():
    grid = PatchGrid((6,), 4, stride=2)
    patches = np.array([[1.0, 1, 1, 1], [3, 3, 3, 3]])
    assert merge_patches(patches, grid).tolist() == [1, 1, 2, 2, 3, 3]
    assert merge_patches(patches, grid, reduce="max").tolist() == [1, 1, 3, 3, 3, 3]
    assert merge_patches(patches, grid, reduce="min").tolist() == [1, 1, 1, 1, 3, 3]
    assert merge_patches(patches, grid, window="overlap-tile").tolist() == [1, 1, 1, 3, 3, 3]
    tri = merge_patches(patches, grid, window=np.array([1.0, 1.0, 3.0, 1.0]))
    # pixel 2: value 1 at weight 3 and value 3 at weight 1 -> (3 + 3) / 4;
    # pixel 3: value 1 at weight 1 and value 3 at weight 1 -> 2
    assert tri.tolist() == [1, 1, 1.5, 2, 3, 3]


def test_hand_computed_stride_one_2d():
    grid = PatchGrid((3, 3), 2, stride=1)
    patches = np.arange(4.0).reshape(2, 2, 1, 1) * np.ones((1, 1, 2, 2))
    merged = merge_patches(patches, grid)
    assert merged.tolist() == [[0, 0.5, 1], [1, 1.5, 2], [2, 2.5, 3]]
    assert weight_map(grid).tolist() == [[1, 2, 1], [2, 4, 2], [1, 2, 1]]


def test_weight_map_separable_hand():
    assert weight_map(PatchGrid((6,), 4, stride=2)).tolist() == [1, 1, 2, 2, 1, 1]
    w = weight_map(PatchGrid((5,), 3, stride=2), window="triangular")
    # triangular(3) = [0.5, 1, 0.5] at origins 0 and 2
    assert w.tolist() == [0.5, 1.0, 1.0, 1.0, 0.5]
    assert weight_map(PatchGrid((5,), 2, stride=3, edge="drop"), "overlap-tile").tolist() == [
        1,
        1,
        0,
        1,
        1,
    ]


def test_classic_case_round_trip_exact():
    image = np.random.default_rng(0).random((100, 100))
    grid = PatchGrid(image.shape, 39, stride=1)
    for window in NAMED:
        np.testing.assert_array_equal(
            merge_patches(extract_patches(image, grid), grid, window=window), image
        )
    np.testing.assert_array_equal(weight_map(grid), brute_coverage(grid))
    assert weight_map(grid).max() == 39 * 39


def test_many_overlaps_do_not_overflow():
    # 1521 overlaps at stride 1 (MONAI/patchly count in uint8 and overflow past 255).
    image = np.full((100, 100), 200, np.uint8)
    grid = PatchGrid(image.shape, 39, stride=1)
    merged = merge_patches(extract_patches(image, grid), grid)
    assert merged.dtype == np.float32
    np.testing.assert_array_equal(merged, 200)


def test_hann_and_triangular_keep_the_border():
    # tiler's hann/bartlett zero the outer ring of the image; ours must not.
    image = np.random.default_rng(1).random((64, 64)) + 1
    grid = PatchGrid(image.shape, 16, stride=8)
    for window in ("hann", "triangular", "gaussian"):
        merged = merge_patches(extract_patches(image, grid), grid, window=window)
        np.testing.assert_array_equal(merged, image)
        assert weight_map(grid, window).min() > 0


def test_dtype_rules():
    grid = PatchGrid((20, 20), 5, stride=3)
    for dtype, out in [
        (np.uint8, np.float32),
        (np.int16, np.float32),
        (np.float16, np.float32),
        (np.float32, np.float32),
        (np.float64, np.float64),
        (np.int32, np.float64),
        (np.int64, np.float64),
        (np.bool_, np.float32),
    ]:
        p = extract_patches(np.ones((20, 20), dtype), grid)
        assert merge_patches(p, grid).dtype == out, dtype
    image = np.random.default_rng(2).integers(0, 256, (20, 20), dtype=np.uint8)
    m = merge_patches(extract_patches(image, grid), grid, window="hann", dtype=np.uint8)
    assert m.dtype == np.uint8
    np.testing.assert_array_equal(m, image)


def test_integer_output_is_rounded_and_clipped():
    grid = PatchGrid((4,), 2, stride=2)
    m = merge_patches(np.array([[-3.6, 1.4], [255.6, 300.0]]), grid, dtype=np.uint8)
    assert m.tolist() == [0, 1, 255, 255]


def test_uncovered_pixels_are_marked_not_zero():
    grid = PatchGrid((10,), 3, stride=4, edge="drop")
    p = np.ones((2, 3))
    m = merge_patches(p, grid)
    assert np.isnan(m[[3, 7, 8, 9]]).all() and (m[[0, 1, 2, 4, 5, 6]] == 1).all()
    assert merge_patches(p, grid, fill_value=-1)[3] == -1
    assert merge_patches(p, grid, dtype=np.int16, fill_value=-7)[9] == -7
    with pytest.raises(ValueError, match="fill_value"):
        merge_patches(p, grid, dtype=np.uint8)
    for reduce in ("max", "min"):
        assert np.isnan(merge_patches(p, grid, reduce=reduce)[9])
    assert np.isnan(merge_patches(p, grid, window="overlap-tile")[9])


def test_flat_and_batched_forms():
    rng = np.random.default_rng(3)
    grid = PatchGrid((3, 17, 19), (5, 4), stride=(3, 2), channel_axis=0)
    stack = rng.random((4,) + grid.patches_shape)
    flat = stack.reshape((4, grid.n_patches) + grid.patch_shape)
    batched = merge_patches(stack, grid)
    assert batched.shape == (4,) + grid.image_shape
    np.testing.assert_array_equal(merge_patches(flat, grid), batched)
    for i in range(4):
        np.testing.assert_allclose(merge_patches(stack[i], grid), batched[i], rtol=1e-12)
        np.testing.assert_allclose(merge_patches(flat[i], grid), batched[i], rtol=1e-12)


def test_patches_are_never_modified():
    rng = np.random.default_rng(4)
    grid = PatchGrid((30, 30), 7, stride=2)
    p = rng.random(grid.patches_shape)
    before = p.copy()
    for window in NAMED:
        merge_patches(p, grid, window=window)
    np.testing.assert_array_equal(p, before)


# ----------------------------------------------------------------- properties
@settings(max_examples=300, deadline=None)
@given(grids(), st.sampled_from(DTYPES), st.sampled_from(NAMED), st.integers(0, 2**32 - 1))
def test_identity_round_trip_is_exact(grid, dtype, window, seed):
    image = images(grid, dtype, seed)
    before = image.copy()
    merged = merge_patches(extract_patches(image, grid), grid, window=window)
    covered = brute_coverage(grid) > 0
    if grid.channel_axis is not None:
        covered = np.expand_dims(covered, grid.channel_axis)
    covered = np.broadcast_to(covered, image.shape)
    np.testing.assert_array_equal(merged[covered], image[covered].astype(merged.dtype))
    assert np.isnan(merged[~covered]).all()
    np.testing.assert_array_equal(image, before)
    if dtype in (np.uint8, np.uint16, np.int16, np.int32) and covered.all():
        np.testing.assert_array_equal(
            merge_patches(extract_patches(image, grid), grid, window=window, dtype=dtype), image
        )


@settings(max_examples=300, deadline=None)
@given(
    grids(),
    st.sampled_from(["mean", "max", "min"]),
    st.sampled_from(NAMED + ["array"]),
    st.sampled_from([np.float64, np.float32, np.uint8]),
    st.integers(0, 2**32 - 1),
)
def test_random_stack_matches_brute_force(grid, reduce, window, dtype, seed):
    assume(reduce == "mean" or window == "uniform")
    rng = np.random.default_rng(seed)
    if window == "array":
        window = rng.random(grid.patch_size) + (rng.random(grid.patch_size) < 0.8)
    if dtype == np.uint8:
        p = rng.integers(0, 256, grid.patches_shape).astype(np.uint8)
    else:
        p = (rng.standard_normal(grid.patches_shape) * 100).astype(dtype)
    merged = merge_patches(p, grid, window=window, reduce=reduce)
    canon = p[..., None] if grid.channel_axis is None else p
    expected = to_user_layout(brute_merge(canon, grid, window, reduce), grid)
    rtol = 1e-5 if merged.dtype == np.float32 else 1e-10
    np.testing.assert_allclose(
        merged, expected, rtol=rtol, atol=rtol * (1 + float(np.abs(p).max()))
    )
    assert np.array_equal(np.isnan(merged), np.isnan(expected))


@settings(max_examples=200, deadline=None)
@given(grids(), st.sampled_from(NAMED[:-1]))
def test_weight_map_matches_brute_force(grid, window):
    w = weight_map(grid, window)
    if window == "uniform":
        np.testing.assert_array_equal(w, brute_coverage(grid))
    sub = PatchGrid(
        grid.spatial_shape, grid.patch_size, grid.stride, edge=grid.edge, pad_mode=grid.pad_mode
    )
    from patch_viewer.core.windows import make_window

    win = make_window(window, grid.patch_size)
    win = np.ones(grid.patch_size) if win is None else win
    expected = np.zeros(grid.padded_shape)
    for idx in np.ndindex(grid.grid_shape):
        o = sub.patch_origin(idx)
        expected[tuple(slice(a, a + p) for a, p in zip(o, grid.patch_size))] += win
    expected = expected[tuple(slice(0, n) for n in grid.spatial_shape)]
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    # An arbitrary array window goes through the general overlap-add path.
    np.testing.assert_allclose(weight_map(grid, win), expected, rtol=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    grids(),
    st.sampled_from(["mean", "max"]),
    st.sampled_from(["uniform", "hann", "overlap-tile"]),
    st.integers(1, 5),
    st.integers(0, 2**32 - 1),
)
def test_streaming_equals_all_at_once(grid, reduce, window, rows, seed):
    """Adding the stack in batches of patch rows gives the same result as all at once.

    Patch values are small integers, so every sum is exact whatever the grouping.
    """
    assume(reduce == "mean" or window == "uniform")
    rng = np.random.default_rng(seed)
    p = rng.integers(-50, 50, grid.patches_shape).astype(np.float64)
    whole = merge_patches(p, grid, window=window, reduce=reduce)
    canon, _ = patches_to_canonical(p, grid)
    merger = Merger(grid, 1, canon.shape[-1], canon.dtype, window=window, reduce=reduce)
    for r in range(0, grid.grid_shape[0], rows):
        merger.add(canon[:, r : r + rows], 0, r)
    streamed = merger.result()
    streamed = (
        streamed[0, ..., 0]
        if grid.channel_axis is None
        else np.moveaxis(streamed[0], -1, grid.channel_axis)
    )
    if window == "uniform":
        np.testing.assert_array_equal(streamed, whole)
    else:
        np.testing.assert_allclose(streamed, whole, rtol=1e-13, atol=1e-12)


@given(
    st.lists(st.integers(0, 30), min_size=1, max_size=8, unique=True).map(sorted),
    st.integers(1, 9),
    st.sampled_from(["first", "centre"]),
)
def test_owned_segments_partition_the_covered_pixels(origins, p, rule):
    o = np.array(origins)
    owner = np.full(o[-1] + p, -1)
    for i0, i1, a, w, pitch in _owned_segments(o, p, rule):
        for i in range(i0, i1):
            assert i1 - i0 == 1 or o[i] - o[i0] == (i - i0) * pitch
            sl = slice(o[i] + a, o[i] + a + w)
            assert (owner[sl] == -1).all()  # nobody owns a pixel twice
            owner[sl] = i
    for x in range(len(owner)):
        covering = [i for i, oi in enumerate(o) if oi <= x < oi + p]
        if not covering:
            assert owner[x] == -1
        elif rule == "first":
            assert owner[x] == covering[0]
        else:
            centre = [abs(x - (o[i] + (p - 1) / 2)) for i in covering]
            assert owner[x] == covering[int(np.argmin(centre))]


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(window="bartlett"), ValueError, "window.*uniform"),
        (dict(window=np.ones((3, 3))), ValueError, "window.*patch's spatial shape"),
        (dict(window=-np.ones((4, 4))), ValueError, "window.*>= 0"),
        (dict(window=np.zeros((4, 4))), ValueError, "window.*positive"),
        (dict(window=np.full((4, 4), np.nan)), ValueError, "window.*finite"),
        (dict(window=np.full((4, 4), "a")), TypeError, "window.*numeric"),
        (dict(reduce="median"), ValueError, "reduce.*mean.*max.*min"),
        (dict(reduce="max", window="hann"), ValueError, "window.*uniform.*reduce='max'"),
        (dict(window="gaussian", sigma=0), ValueError, r"sigma.*\[0.01, 10.0\]"),
        (dict(window="hann", sigma=1), TypeError, "hann.*no parameter.*sigma"),
        (dict(dtype=np.complex64), TypeError, "dtype"),
    ],
)
def test_bad_merge_arguments(kwargs, exc, match):
    grid = PatchGrid((10, 10), 4, stride=2)
    with pytest.raises(exc, match=match):
        merge_patches(np.ones(grid.patches_shape), grid, **kwargs)


def test_bad_stack_shape_names_expected_forms():
    grid = PatchGrid((10, 10), 4, stride=2)
    with pytest.raises(ValueError, match=r"patches.*\(4, 4, 4, 4\).*\(16, 4, 4\)"):
        merge_patches(np.ones((4, 4, 4, 3)), grid)
    with pytest.raises(TypeError, match="real numbers"):
        merge_patches(np.ones(grid.patches_shape, complex), grid)
    with pytest.raises(TypeError, match="grid"):
        merge_patches(np.ones(grid.patches_shape), (10, 10))


def test_nan_in_patches_stays_local():
    grid = PatchGrid((8,), 2, stride=2)
    p = np.ones((4, 2))
    p[1, 0] = np.nan
    m = merge_patches(p, grid)
    assert np.isnan(m[2]) and np.isfinite(np.delete(m, 2)).all()


@settings(max_examples=100, deadline=None)
@given(
    grids(),
    st.sampled_from(["mean", "max"]),
    st.sampled_from(["uniform", "hann", "overlap-tile"]),
    st.integers(2, 4),
    st.integers(0, 2**32 - 1),
)
def test_threaded_accumulation_equals_single_thread(grid, reduce, window, workers, seed):
    assume(reduce == "mean" or window == "uniform")
    rng = np.random.default_rng(seed)
    p = rng.standard_normal((3,) + grid.patches_shape)  # batch of 3 images, float64
    # many parts (NumPy) or bands (numba), so that every thread gets some
    # (pytest.MonkeyPatch.context: hypothesis runs many examples inside one test call)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nm, "PIECE_BYTES", 256)
        mp.setattr(plan, "BAND_BYTES", 64)
        one = merge_patches(p, grid, window=window, reduce=reduce, workers=1)
        for n in (2, workers):
            many = merge_patches(p, grid, window=window, reduce=reduce, workers=n)
            np.testing.assert_array_equal(many, one)  # the same bits, whatever the threads


@settings(max_examples=150, deadline=None)
@given(
    grids(),
    st.sampled_from(["mean", "max", "min"]),
    st.sampled_from([np.float32, np.uint8]),
    st.integers(1, 3),
    st.sampled_from([1, 64, 2**20]),
    st.sampled_from([None, 1, 300, 2**20]),
    st.integers(0, 2**32 - 1),
)
def test_numpy_banded_merge_equals_streaming(
    grid, reduce, dtype, workers, band_bytes, stage_bytes, seed
):
    """The NumPy banded merge (bands of one stride of rows, or of a few rows, or of whole images, on
    1-3 threads; patches read in place or staged one, a few or all columns at a time) gives
    exactly what the streaming accumulator gives."""
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 200, (2,) + grid.patches_shape).astype(dtype)  # two images
    canon, _ = patches_to_canonical(p, grid)
    merger = NumpyMerger(grid, 2, canon.shape[-1], canon.dtype, reduce=reduce)
    assume(merger.bandable)
    # at least one column per group where staging runs, so that it always does
    stage = (
        {"STAGE_BYTES": 0}
        if stage_bytes is None
        else {"STAGE_BYTES": stage_bytes, "STAGE_MIN_COLUMNS": 0}
    )
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"BAND_BYTES": band_bytes, **stage}.items():
            mp.setattr(ne, name, value)
        banded = merger.finish(merger.merge_banded(canon, workers))
    streamed = NumpyMerger(grid, 2, canon.shape[-1], canon.dtype, reduce=reduce)
    streamed.add(canon)
    np.testing.assert_array_equal(banded, streamed.result())
    assert banded.dtype == streamed.result().dtype


@pytest.mark.parametrize("count, exact", [(1, True), (2, True), (3, False), (4, True), (8, False)])
def test_float32_sums_of_agreeing_values_exact_only_for_1_2_4(count, exact):
    """The claim behind narrow_sums_exact, for EVERY float32 in [1, 2) (scaling by powers of
    two changes nothing short of overflow): adding `count` copies one after another in float32
    and dividing by `count` gives the value back for 1, 2 and 4 copies only."""
    v = (np.arange(2**23, dtype=np.uint32) | np.uint32(127 << 23)).view(np.float32)
    total = v.copy()
    for _ in range(count - 1):
        total += v
    assert bool(np.array_equal(total / np.float32(count), v)) is exact


def test_narrow_sums_chosen_by_coverage_counts():
    half = PatchGrid((1024, 1024), 64, stride=32)  # counts 1, 2, 4
    assert narrow_sums_exact(half)
    assert NumpyMerger(half, 1, 1, np.float32, narrow=True).acc_dtype == np.float32
    assert NumpyMerger(half, 1, 1, np.float32).acc_dtype == np.float64  # streaming: not asked
    assert NumpyMerger(half, 1, 1, np.float32, narrow=True, window="hann").acc_dtype == np.float32
    assert not NumpyMerger(half, 1, 1, np.float32, narrow=True, window="hann").narrow
    assert not narrow_sums_exact(PatchGrid((1000, 1000), 64, stride=32))  # shifted: 3 and 6
    assert not narrow_sums_exact(PatchGrid((64, 64, 64), 32, stride=16))  # 8 in 3-D
    rng = np.random.default_rng(3)
    image = rng.standard_normal((256, 200)).astype(np.float32)
    grid = PatchGrid(image.shape, 16, stride=8)
    np.testing.assert_array_equal(merge_patches(extract_patches(image, grid), grid), image)
    p = rng.standard_normal(grid.patches_shape).astype(np.float32)
    expected = to_user_layout(brute_merge(p[..., None], grid), grid)
    np.testing.assert_allclose(merge_patches(p, grid), expected, rtol=4e-7, atol=1e-6)


def test_narrow_sums_overflow_falls_back_to_float64():
    """Values near the float32 limit overflow a float32 sum of two: the merge starts again
    with float64 sums, exact and without warnings."""
    image = np.full((64, 48), 3e38, np.float32)
    image[::3] = -2.9e38
    grid = PatchGrid(image.shape, 16, stride=8)
    assert NumpyMerger(grid, 1, 1, np.float32, narrow=True).narrow
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for workers in (1, 2):
            merged = merge_patches(extract_patches(image, grid), grid, workers=workers)
            np.testing.assert_array_equal(merged, image)
    merger = NumpyMerger(grid, 1, 1, np.float32, narrow=True)
    canon, _ = patches_to_canonical(extract_patches(image, grid), grid)
    with pytest.raises(FloatingPointError):
        merger.merge_banded(canon)


def test_banded_merge_with_channels_last():
    """RGB patches at a wide stride: the weights spread over the channel axis."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    grid = PatchGrid(image.shape, 32, stride=24, channel_axis=-1)
    p = extract_patches(image, grid, copy=True).astype(np.float32)
    p += rng.standard_normal(p.shape).astype(np.float32)
    for workers in (1, 2):
        merged = merge_patches(p, grid, workers=workers)
        expected = to_user_layout(brute_merge(p, grid), grid)
        np.testing.assert_allclose(merged, expected, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(merge_patches(extract_patches(image, grid), grid), image)


def test_workers_argument_is_checked():
    grid = PatchGrid((10, 10), 4, stride=2)
    with pytest.raises(ValueError, match=r"workers.*>= 1"):
        merge_patches(np.ones(grid.patches_shape), grid, workers=0)


def test_stacks_that_disagree_with_the_grid_never_reach_a_kernel(monkeypatch):
    """A wrong shape is refused before any kernel runs (kernels would read out of bounds)."""
    from patch_viewer.core.merge import kernels_numba as K

    calls = []
    for name in ("band_sum", "band_weighted", "band_anchored", "band_max", "band_gather"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a)))
    grid = PatchGrid((10, 12), 4, stride=2)
    g = grid.patches_shape  # (4, 5, 4, 4)
    for shape in [
        (4, 6, 4, 4),
        (5, 5, 4, 4),
        (4, 5, 4, 3),
        (4, 5, 5, 4),
        (19, 4, 4),
        (4, 5, 4, 4, 3),
        (4, 5, 4),
    ]:
        with pytest.raises(ValueError, match="patches"):
            merge_patches(np.ones(shape, np.float32), grid)
    assert calls == []
    merge_patches(np.ones(g, np.float32), grid)
    assert calls or plan.backend() == "numpy"


@settings(max_examples=40, deadline=None)
@given(
    grids(),
    st.sampled_from(["reversed", "fortran", "byteswapped", "unaligned", "sliced"]),
    st.integers(0, 2**32 - 1),
)
def test_any_memory_layout_of_the_stack_merges_alike(grid, layout, seed):
    """Negative, Fortran, sliced, byte-swapped or unaligned stacks give the C stack's bits."""
    p = np.random.default_rng(seed).standard_normal(grid.patches_shape).astype(np.float32)
    if layout == "reversed":
        q = np.flip(np.flip(p, -1).copy(), -1)
    elif layout == "fortran":
        q = np.asfortranarray(p)
    elif layout == "byteswapped":
        q = p.astype(p.dtype.newbyteorder(">"))
    elif layout == "unaligned":
        raw = np.empty(p.nbytes + 1, np.uint8)
        q = raw[1:].view(np.float32).reshape(p.shape)
        q[...] = p
    else:
        q = np.repeat(p, 2, axis=-1)[..., ::2]
    np.testing.assert_array_equal(merge_patches(q, grid), merge_patches(p, grid))


@settings(max_examples=150, deadline=None)
@given(
    grids(),
    st.sampled_from(NAMED[1:4] + ["array"]),
    st.sampled_from([np.int32, np.uint32, np.int64, np.uint64]),
    st.integers(0, 2**32 - 1),
)
def test_weighted_means_of_integers_never_wrap(grid, window, dtype, seed):
    """Integers spanning their whole range, under a window (anchored sums): ``value - anchor``
    is taken in float64, never in the integer dtype, where it wrapped (the NumPy engine gave
    uint64 means 0.96 x 2**64 off)."""
    rng = np.random.default_rng(seed)
    if window == "array":
        window = rng.random(grid.patch_size) + 0.5
    info = np.iinfo(dtype)
    p = rng.integers(info.min, info.max, grid.patches_shape, dtype=dtype, endpoint=True)
    merged = merge_patches(p, grid, window=window)
    canon = p[..., None] if grid.channel_axis is None else p
    expected = to_user_layout(brute_merge(canon, grid, window), grid)
    scale = float(max(abs(int(info.min)), int(info.max)))
    np.testing.assert_allclose(merged, expected, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(23,), (17, 19, 3), (9, 10, 11)])
@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_fill_marks_exactly_the_uncovered_pixels(shape, dtype, reduce):
    """Uncovered pixels (edge='drop' and gaps between patches) take ``fill_value`` on every
    axis, with channels and without, in a float and an integer output; covered ones keep the
    mean. The marks are written per axis (no image-sized index)."""
    channel_axis = -1 if len(shape) == 3 and shape[-1] == 3 else None
    grid = PatchGrid(shape, 3, stride=4, edge="drop", channel_axis=channel_axis)
    rng = np.random.default_rng(len(shape))
    image = (rng.random(shape) * 100).astype(dtype)
    patches = extract_patches(image, grid)
    truth = brute_merge(
        patches_to_canonical(np.asarray(patches), grid)[0][0], grid, reduce=reduce
    ).reshape(shape)
    holes = np.isnan(truth)
    assert holes.any() and not holes.all()
    for out in (np.float64, np.int32):
        m = merge_patches(patches, grid, reduce=reduce, dtype=out, fill_value=-5)
        assert (m[holes] == -5).all()
        expected = truth[~holes] if out is np.float64 else np.rint(truth[~holes])
        np.testing.assert_allclose(m[~holes], expected, rtol=1e-12)


def test_plans_are_kept_per_grid_and_options():
    """A named window's plan is decided once per grid and set of options (a small merge's
    plan cost as much as its kernel's start); other options get their own plan, an array
    window is never kept, a refused option is refused every time, and the cached plan merges
    to the same bits."""
    grid = PatchGrid((20, 20), 6, stride=2)
    first = plan.make_merge_plan(grid, np.uint8, 1)
    assert plan.make_merge_plan(grid, np.uint8, 1) is first
    assert plan.make_merge_plan(grid, np.float32, 1) is not first
    assert plan.make_merge_plan(grid, np.uint8, 3) is not first
    g1 = plan.make_merge_plan(grid, np.float32, 1, window="gaussian", window_params={"sigma": 0.1})
    g2 = plan.make_merge_plan(grid, np.float32, 1, window="gaussian", window_params={"sigma": 0.2})
    assert g1 is not g2 and not np.array_equal(g1.factors[0], g2.factors[0])
    win = np.ones((6, 6))
    assert plan.make_merge_plan(grid, np.uint8, 1, window=win) is not plan.make_merge_plan(
        grid, np.uint8, 1, window=win
    )
    for _ in range(2):
        with pytest.raises(ValueError, match="windows weight the mean only"):
            plan.make_merge_plan(grid, np.uint8, 1, window="hann", reduce="max")
    for _ in range(20):  # a bounded cache: the oldest plans go
        plan.make_merge_plan(
            grid, np.float64, 1, window="gaussian", window_params={"sigma": 0.05 * (_ + 1)}
        )
    assert len(grid.__dict__["_plans"]) <= 8
    image = np.random.default_rng(0).integers(0, 256, (20, 20), dtype=np.uint8)
    stack = extract_patches(image, grid)
    assert np.array_equal(merge_patches(stack, grid), merge_patches(stack, grid))
    assert np.array_equal(merge_patches(stack, grid), image)


@settings(max_examples=150, deadline=None)
@given(
    grids(),
    st.sampled_from(["mean", "max"]),
    st.sampled_from(["uniform", "hann", "overlap-tile"]),
    st.sampled_from(DTYPES),
    st.sampled_from([None, np.float64, np.int16]),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_merge_into_out_is_the_merge(grid, reduce, window, dtype, out_dtype, batched, seed):
    """``out=`` receives exactly the merge's bits (every edge mode, channel layout, window,
    reduction and output dtype, with a batch axis or not), is what is returned, and is
    written through again by a second merge into it."""
    assume(reduce == "mean" or window == "uniform")
    image = images(grid, dtype, seed)
    if batched:
        image = np.stack([image, image[::-1].copy()])
    stack = np.ascontiguousarray(extract_patches(image, grid))
    kwargs = dict(window=window, reduce=reduce, dtype=out_dtype, fill_value=7)
    want = merge_patches(stack, grid, **kwargs)
    out = np.full(want.shape, 3, want.dtype)
    got = merge_patches(stack, grid, out=out, **kwargs)
    assert got is out
    np.testing.assert_array_equal(out, want)
    noisy = stack + np.ones_like(stack)  # another stack: every pixel rewritten
    merge_patches(noisy, grid, out=out, **kwargs)
    np.testing.assert_array_equal(out, merge_patches(noisy, grid, **kwargs))


def test_merge_into_out_writes_in_place_where_it_can():
    """A float32 mean of a uint8 stack is weighed straight into a C-contiguous ``out`` (no
    image-sized array is made); a channel axis that is not last is copied in, exactly."""
    import tracemalloc

    image = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    grid = PatchGrid(image.shape, 256, stride=192, channel_axis=-1)
    stack = extract_patches(image, grid, copy=True)
    out = np.empty(image.shape, np.float32)
    merge_patches(stack, grid, out=out)  # compiles / warms the plan
    tracemalloc.start()
    merge_patches(stack, grid, out=out)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(out, image)
    if plan.backend() == "numba":
        assert peak < out.nbytes / 4, peak  # without out=: the 12 MiB result, at least
    first = np.moveaxis(image[:256, :256], -1, 0).copy()
    grid = PatchGrid(first.shape, 64, stride=48, channel_axis=0)
    out = np.empty(first.shape, np.float32)
    assert merge_patches(extract_patches(first, grid), grid, out=out) is out
    assert np.array_equal(out, first)


def test_bad_out_is_refused_before_any_work():
    image = np.arange(100.0).reshape(10, 10)
    grid = PatchGrid(image.shape, 4, stride=3)
    stack = extract_patches(image, grid, copy=True)
    cases = [
        (np.zeros((10, 9)), r"shape \(10, 10\) and dtype float64, got \(10, 9\)"),
        (np.zeros((10, 10), np.float32), "dtype float64, got .* float32"),
        ([0.0], "got list"),
        (stack.reshape(-1)[:100].reshape(10, 10), "share memory with `patches`"),
    ]
    for out, match in cases:
        with pytest.raises(ValueError, match=match):
            merge_patches(stack, grid, out=out)
    frozen = np.zeros((10, 10))
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        merge_patches(stack, grid, out=frozen)
    with pytest.raises(ValueError, match="dtype uint8"):
        merge_patches(stack, grid, dtype=np.uint8, out=np.zeros((10, 10)))
    assert np.array_equal(stack, extract_patches(image, grid))


@settings(max_examples=100, deadline=None)
@given(grids(), st.integers(0, 2**32 - 1))
def test_uniform_anchored_sums_equal_a_window_of_ones(grid, seed):
    """float64 means under the uniform window skip the window (``band_anchored_plain``): the
    same bits as the windowed kernel given a window of ones. (The NumPy engine takes other
    routes for the two, which agree to its stated 4 ulp.)"""
    if plan.backend() != "numba":
        pytest.skip("a property of the compiled kernels")
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(grid.patches_shape) * 10.0 ** rng.integers(-3, 4)
    plain = merge_patches(p, grid)
    ones = merge_patches(p, grid, window=np.ones(grid.patch_size))
    np.testing.assert_array_equal(plain, ones)
