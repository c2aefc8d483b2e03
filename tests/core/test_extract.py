import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patch_viewer import PatchGrid, extract_patches, merge_patches
from patch_viewer.core._layout import stack_order

from .reference import brute_merge, brute_patches
from .strategies import DTYPES, grids, images

pytestmark = pytest.mark.usefixtures("backend")


def test_hand_computed():
    image = np.arange(16).reshape(4, 4)
    p = extract_patches(image, PatchGrid(image.shape, 2, stride=2))
    assert p.shape == (2, 2, 2, 2)
    assert p[1, 0].tolist() == [[8, 9], [12, 13]]
    p = extract_patches(np.arange(5), PatchGrid((5,), 2, stride=2, edge="pad", pad_mode="constant"))
    assert p.tolist() == [[0, 1], [2, 3], [4, 0]]


def test_regular_grid_gives_zero_copy_readonly_view():
    image = np.random.default_rng(0).random((512, 512)).astype(np.float32)
    grid = PatchGrid(image.shape, 39, stride=1)
    p = extract_patches(image, grid)
    assert np.shares_memory(p, image)
    assert not p.flags.writeable
    with pytest.raises(ValueError):
        p[0, 0, 0, 0] = 1
    assert p.shape == (474, 474, 39, 39)


def test_view_is_fast_whatever_the_size():
    big = np.zeros((4096, 4096), np.float32)
    grid = PatchGrid(big.shape, 64, stride=1)
    extract_patches(big, grid)
    start = time.perf_counter()
    for _ in range(10):
        extract_patches(big, grid)
    # A view never touches the pixels; generous bound (the benchmark records the real figure).
    assert (time.perf_counter() - start) / 10 < 0.05


def test_copy_is_writeable_and_independent():
    image = np.arange(36.0).reshape(6, 6)
    p = extract_patches(image, PatchGrid(image.shape, 3, stride=3), copy=True)
    assert p.flags.writeable and p.flags.c_contiguous
    p[...] = -1
    assert image.min() == 0


def test_shift_grid_copies_only_then_and_is_readonly():
    image = np.arange(11.0)
    grid = PatchGrid(image.shape, 4, stride=3)
    p = extract_patches(image, grid)
    assert p[:, 0].tolist() == [0, 3, 6, 7]
    assert not p.flags.writeable


@settings(max_examples=150, deadline=None)
@given(grids(), st.sampled_from(DTYPES), st.integers(0, 2**32 - 1))
def test_matches_brute_force_every_layout(grid, dtype, seed):
    image = images(grid, dtype, seed)
    before = image.copy()
    p = extract_patches(image, grid)
    assert p.shape == grid.patches_shape and p.dtype == image.dtype
    canon = p[..., None] if grid.channel_axis is None else p
    np.testing.assert_array_equal(canon.astype(np.float64), brute_patches(image, grid))
    np.testing.assert_array_equal(image, before)


@settings(max_examples=150, deadline=None)
@given(grids(), st.sampled_from(DTYPES), st.booleans(), st.integers(0, 2**32 - 1))
def test_merge_layout_same_patches_same_merge(grid, dtype, batched, seed):
    """layout='merge' changes only the memory order: same values and shape, writeable, not
    sharing the image; merging it gives exactly what merging the C-order copy gives (summed
    in the same order), for single images and batches."""
    image = images(grid, dtype, seed)
    if batched:
        image = np.stack([image, image[::-1].copy() if grid.ndim else image])
    c = extract_patches(image, grid, copy=True)
    m = extract_patches(image, grid, copy=True, layout="merge")
    assert m.shape == c.shape and m.dtype == c.dtype and m.flags.writeable
    assert not np.shares_memory(m, image)
    np.testing.assert_array_equal(m, c)
    order = stack_order(grid)
    if order is not None:  # a real reorder, unless only axes of size 1 move
        canon = (2 if batched else 1, *grid.grid_shape, *grid.patch_size, grid.n_channels or 1)
        moved = [a for a in order if canon[a] > 1]
        if moved != sorted(moved):
            assert m.strides != c.strides
    # processed patches (overlaps disagree), kept in each layout
    noise = np.random.default_rng(seed).integers(0, 3, c.shape).astype(c.dtype)
    pm, pc = np.empty_like(m), np.empty_like(c)
    np.add(m, noise, out=pm)
    np.add(c, noise, out=pc)
    assert [st for st, n in zip(pm.strides, pm.shape) if n > 1] == [
        st for st, n in zip(m.strides, m.shape) if n > 1
    ]
    for reduce, window in (("mean", "uniform"), ("max", "uniform"), ("mean", "hann")):
        for a, b in ((m, c), (pm, pc)):
            np.testing.assert_array_equal(
                merge_patches(a, grid, reduce=reduce, window=window),
                merge_patches(b, grid, reduce=reduce, window=window),
            )


def test_merge_layout_at_stride_1_is_row_offset_major():
    image = np.arange(100.0).reshape(10, 10)
    grid = PatchGrid(image.shape, 4, stride=1)
    m = extract_patches(image, grid, copy=True, layout="merge")
    # for each row offset, the patch rows of every patch: (p0, g0, g1, p1) in memory
    assert m.strides == (7 * 4 * 8, 4 * 8, 7 * 7 * 4 * 8, 8)
    assert m.reshape(grid.n_patches, 4, 4).base is not None  # flat view, no copy
    out = np.empty_like(m)  # patches processed into empty_like, or element-wise, keep it
    np.multiply(m, 2, out=out)
    assert out.strides == (m * 2).strides == m.strides
    np.testing.assert_array_equal(merge_patches(out, grid), 2 * image)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.uint8])
@pytest.mark.parametrize("window", ["uniform", "hann", "triangular"])
def test_merge_layout_processed_patches_merge_the_same(dtype, window):
    """Stride 1 along the rows (2 along the columns), RGB, two images: processed patches kept
    in the merge layout merge exactly as the same patches in C order (anchored and weighed
    one row offset at a time there), and match the brute-force weighted mean."""
    rng = np.random.default_rng(7)
    images_ = (rng.random((2, 23, 30, 3)) * 200).astype(dtype)
    grid = PatchGrid((23, 30, 3), (9, 7), stride=(1, 2), channel_axis=-1)
    m = extract_patches(images_, grid, copy=True, layout="merge")
    noise = rng.integers(0, 40, m.shape).astype(dtype)
    pm = np.empty_like(m)
    np.add(m, noise, out=pm)
    pc = np.ascontiguousarray(pm)
    assert pm.strides != pc.strides
    merged = merge_patches(pm, grid, window=window)
    np.testing.assert_array_equal(merged, merge_patches(pc, grid, window=window))
    for i in range(2):
        expected = brute_merge(pc[i].astype(np.float64), grid, window=window)
        np.testing.assert_allclose(merged[i], expected, rtol=1e-5)
    np.testing.assert_array_equal(merge_patches(m, grid, window=window, dtype=dtype), images_)


def test_copy_of_a_contiguous_view_is_still_a_copy():
    image = np.arange(8.0)
    for layout in ("C", "merge"):
        p = extract_patches(image, PatchGrid(image.shape, 8), copy=True, layout=layout)
        assert p.flags.writeable and not np.shares_memory(p, image)


def test_batch_axis():
    images_ = np.random.default_rng(1).random((5, 20, 21))
    grid = PatchGrid((20, 21), 6, stride=4)
    p = extract_patches(images_, grid)
    assert p.shape == (5,) + grid.patches_shape
    np.testing.assert_array_equal(p[3], extract_patches(images_[3], grid))


def test_refuses_huge_copy_with_size_and_alternative():
    grid = PatchGrid((512, 512), 39, stride=1)
    with pytest.raises(MemoryError, match=r"GiB.*max_bytes.*process"):
        extract_patches(np.zeros((512, 512)), grid, copy=True, max_bytes=2**30)


@pytest.mark.parametrize(
    "image, grid, exc, match",
    [
        (np.zeros((10, 11)), PatchGrid((10, 10), 3), ValueError, "image.*image_shape"),
        (np.zeros((10, 10)), "grid", TypeError, "grid.*PatchGrid"),
    ],
)
def test_bad_input(image, grid, exc, match):
    with pytest.raises(exc, match=match):
        extract_patches(image, grid)


def test_bad_layout_names_the_choices():
    grid = PatchGrid((10, 10), 3)
    with pytest.raises(ValueError, match=r"layout.*'C', 'merge'.*'F'"):
        extract_patches(np.zeros((10, 10)), grid, copy=True, layout="F")
    with pytest.raises(ValueError, match=r"layout.*copy=True"):
        extract_patches(np.zeros((10, 10)), grid, layout="merge")


@settings(max_examples=80, deadline=None)
@given(grids(), st.sampled_from(DTYPES), st.booleans(), st.integers(0, 2**32 - 1))
def test_copy_into_out_is_the_copy(grid, dtype, batched, seed):
    """``out=`` receives exactly the C-ordered copy (every edge mode, channels, batches,
    dtypes), is what is returned, and can be filled again from another image."""
    image = images(grid, dtype, seed)
    if batched:
        image = np.stack([image, image[::-1].copy()])
    want = extract_patches(image, grid, copy=True)
    out = np.full(want.shape, 1, want.dtype)
    got = extract_patches(image, grid, copy=True, out=out)
    assert got is out
    np.testing.assert_array_equal(out, want)
    other = images(grid, dtype, seed + 1)
    if batched:
        other = np.stack([other, other])
    extract_patches(other, grid, copy=True, out=out)
    np.testing.assert_array_equal(out, extract_patches(other, grid, copy=True))


def test_bad_out_is_refused_before_anything_is_written():
    image = np.arange(100.0).reshape(10, 10)
    grid = PatchGrid(image.shape, 4, stride=3)
    shape = grid.grid_shape + grid.patch_shape
    cases = [
        (dict(out=np.zeros(shape)), "copy=True"),
        (dict(copy=True, layout="merge", out=np.zeros(shape)), "copy=True"),
        (dict(copy=True, out=np.zeros(shape[:-1])), r"shape \(3, 3, 4, 4\) and dtype float64"),
        (dict(copy=True, out=np.zeros(shape, np.float32)), "dtype float64, got .* float32"),
        (dict(copy=True, out=np.zeros(shape[::-1]).T), "C-contiguous"),
        (dict(copy=True, out=[0.0]), "got list"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            extract_patches(image, grid, **kwargs)
    frozen = np.zeros(shape)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        extract_patches(image, grid, copy=True, out=frozen)
    flat = np.zeros(50 + int(np.prod(shape)))
    flat[:100] = image.ravel()
    with pytest.raises(ValueError, match="share memory"):  # the copy would overwrite its source
        extract_patches(flat[:100].reshape(10, 10), grid, copy=True, out=flat[50:].reshape(shape))
    assert np.array_equal(flat[:100], image.ravel()) and not flat[100:].any()
