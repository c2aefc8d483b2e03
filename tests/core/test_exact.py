"""Exactness at the dtype limits, correct rounding, and the two backends against each other."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from patch_viewer import PatchGrid, extract_patches, merge_patches, process
from patch_viewer.core.merge import backend
from patch_viewer.core.merge.plan import BACKEND_ENV

from .strategies import grids

pytestmark = pytest.mark.usefixtures("backend")


def exact_means(patches, grid):
    """Per-pixel mean of a canonical-less (C=1) stack as exact Fractions (None: uncovered)."""
    sums = np.zeros(grid.padded_shape, dtype=object)
    counts = np.zeros(grid.padded_shape, dtype=np.int64)
    peaks = np.zeros(grid.padded_shape)
    for idx in np.ndindex(grid.grid_shape):
        o = grid.patch_origin(idx)
        sl = tuple(slice(a, a + p) for a, p in zip(o, grid.patch_size))
        block = sums[sl]
        for off in np.ndindex(grid.patch_size):
            block[off] = block[off] + Fraction(patches[idx + off].item())
        counts[sl] += 1
        np.maximum(peaks[sl], np.abs(patches[idx].astype(np.float64)), out=peaks[sl])
    crop = tuple(slice(0, n) for n in grid.spatial_shape)
    return sums[crop], counts[crop], peaks[crop]


def nearest(values, dtype):
    """Round exact Fractions to the nearest ``dtype`` value (ties to even)."""
    out = np.empty(values.shape, dtype)
    for idx in np.ndindex(values.shape):
        v = values[idx]
        if np.dtype(dtype).kind == "f":
            out[idx] = _round_float(v, dtype)
        else:
            out[idx] = round(v)  # Python rounds Fractions half to even
    return out


def _round_float(v: Fraction, dtype):
    lo = np.array(float(v), dtype)  # float() of a Fraction is correctly rounded (to float64)
    # step to the neighbours and take the nearest to the exact value (ties to even mantissa)
    cands = [np.nextafter(lo, dtype(-np.inf)), lo, np.nextafter(lo, dtype(np.inf))]
    best = min(
        cands,
        key=lambda c: (
            abs(Fraction(float(c)) - v),
            int(np.array(c).view(np.uint32 if dtype == np.float32 else np.uint64)) & 1,
        ),
    )
    return best


@settings(max_examples=60, deadline=None)
@given(
    grids(max_side=9, edges=("shift", "pad"), channels=(None,)),
    st.sampled_from(
        [
            (np.float32, np.float32),
            (np.uint8, np.uint8),
            (np.int16, np.int16),
            (np.int32, np.int32),
            # integer stacks into float32 (their default): the compiled backend multiplies
            # by reciprocals where that is exact (small sums), and divides elsewhere
            (np.uint8, np.float32),
            (np.int8, np.float32),
            (np.bool_, np.float32),
            (np.int16, np.float32),
            (np.int32, np.float32),
        ]
    ),
    st.integers(0, 2**32 - 1),
)
def test_means_are_correctly_rounded(backend, grid, dtypes, seed):
    """float32 and integer outputs are the exact mean rounded once (0.5 ulp) on the compiled
    backend; the NumPy engine's float32 means of float32 stacks are within 4 ulp of the
    largest value summed (it divides one axis' weights at a time, and may sum in float32)."""
    assume(grid.is_covering)
    dtype, target = dtypes
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        p = (rng.standard_normal(grid.patches_shape) * 10.0 ** rng.integers(-3, 4)).astype(dtype)
    elif np.dtype(dtype).kind == "b":
        p = rng.random(grid.patches_shape) < 0.5
    else:
        info = np.iinfo(dtype)
        p = rng.integers(info.min, info.max, grid.patches_shape, endpoint=True, dtype=dtype)
    sums, counts, peaks = exact_means(p, grid)
    exact = np.vectorize(lambda s, c: s / c, otypes=[object])(sums, counts)
    merged = merge_patches(p, grid, dtype=target)
    expected = nearest(exact, target)
    if backend == "numpy" and dtype == np.float32:
        # The NumPy engine sums in float32 where coverage counts are 1, 2 or 4 (exact for
        # agreeing values: identity round trips), so where values cancel its error is bounded
        # by the largest term, not the result: 4 float32 ulp of the largest value summed.
        err = np.abs(merged.astype(np.float64) - expected.astype(np.float64))
        assert np.all(err <= 4 * np.spacing(peaks.astype(np.float32)).astype(np.float64))
    else:
        np.testing.assert_array_equal(merged, expected)


def test_reciprocals_round_like_division():
    """The rule the compiled merge uses for integer sums into float32 (merge.accumulate.
    _reciprocals_exact): below 2**24, over counts below 2**25 that are products of three
    per-axis counts, multiplying by the rounded reciprocals in the kernel's order gives the
    correctly rounded quotient. Every sum of 8-bit values over counts 1..8 per axis, and
    random sums up to the bound over large counts."""
    rng = np.random.default_rng(0)
    small = [(a, b, k, None) for a in range(1, 9) for b in range(1, 9) for k in range(1, 9)]
    large = []
    for _ in range(300):
        a, b, k = (int(v) for v in rng.integers(1, 2**8, 3))
        if a * b * k < 2**25:
            large.append((a, b, k, rng.integers(0, 2**24 // (a * b * k) * (a * b * k), 20_000)))
    for a, b, k, sums in small + large:
        c = a * b * k
        s = np.arange(255 * c + 1) if sums is None else sums
        if 255 * c >= 2**24 and sums is None:
            continue
        d = (1.0 / a) * (1.0 / b)  # the kernel: acc * (inv0[y] * inv1[z] * invk[k])
        got = (s.astype(np.float64) * (d * (1.0 / k))).astype(np.float32)
        # float64 division rounded to float32 is correctly rounded (53 >= 2 * 24 + 2)
        want = (s.astype(np.float64) / c).astype(np.float32)
        np.testing.assert_array_equal(got, want, err_msg=f"counts {a} x {b} x {k}")


@settings(max_examples=40, deadline=None)
@given(grids(max_side=9, edges=("shift", "pad"), channels=(None,)), st.integers(0, 2**32 - 1))
def test_float64_means_within_two_ulp_of_their_terms(backend, grid, seed):
    """2 ulp of the largest term on the compiled backend; the NumPy engine multiplies by one
    axis' rounded reciprocal weights at a time (two roundings per axis): 2 + 2 * ndim ulp."""
    assume(grid.is_covering)
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(grid.patches_shape) * 10.0 ** rng.integers(-3, 4)
    sums, counts, peaks = exact_means(p, grid)
    exact = np.vectorize(lambda s, c: float(s / c), otypes=[np.float64])(sums, counts)
    merged = merge_patches(p, grid)
    # the stated bound: 2 ulp of the largest value summed into the pixel (anchored sums are
    # exact where the values agree, and otherwise carry the anchor's rounding)
    bound = 2 if backend == "numba" else 2 + 2 * grid.ndim
    assert np.all(np.abs(merged - exact) <= bound * np.spacing(peaks))


LIMITS = {
    np.int64: [-(2**63), -(2**63) + 1, -(2**53) - 1, -1, 0, 1, 2**53 + 1, 2**63 - 2, 2**63 - 1],
    np.uint64: [0, 1, 2**53 + 1, 2**63, 2**64 - 2, 2**64 - 1],
}


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
@pytest.mark.parametrize("window", ["uniform", "hann"])
def test_64_bit_round_trips_are_exact_over_the_whole_range(dtype, window):
    rng = np.random.default_rng(0)
    values = np.array(LIMITS[dtype], dtype=dtype)
    image = rng.choice(values, (12, 11)).astype(dtype)
    grid = PatchGrid(image.shape, 5, stride=2)
    merged = merge_patches(extract_patches(image, grid), grid, dtype=dtype, window=window)
    assert merged.dtype == dtype
    np.testing.assert_array_equal(merged, image)
    flat = PatchGrid((len(values),), 3, stride=1)
    np.testing.assert_array_equal(
        merge_patches(extract_patches(values, flat), flat, dtype=dtype, window=window), values
    )


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_64_bit_means_are_exact(dtype):
    """The mean of huge integers, rounded half to even, with no float64 in between."""
    top = 2**63 - 1 if dtype == np.int64 else 2**64 - 1
    grid = PatchGrid((3,), 2, stride=1)  # pixel 1 is covered twice
    p = np.array([[top, top - 3], [top - 4, top]], dtype=dtype)  # means top, top-3.5, top
    merged = merge_patches(p, grid, dtype=dtype)
    assert [int(v) for v in merged] == [top, top - 3, top]  # top-3.5 rounds to even
    f = merge_patches(p, grid)
    assert f.dtype == np.float64 and float(f[0]) == float(top)
    # max/min compare in the integer domain too
    assert int(merge_patches(p, grid, reduce="min", dtype=dtype)[1]) == top - 4


def test_integer_dtype_saturates_instead_of_wrapping():
    g = PatchGrid((4,), 2, stride=1)
    image = np.array([1e10, 1, 2, 3], np.float32)
    merged = merge_patches(extract_patches(image, g), g, dtype=np.int32)
    assert merged.tolist() == [2**31 - 1, 1, 2, 3]
    low = merge_patches(extract_patches(-image, g), g, dtype=np.int32)
    assert low.tolist() == [-(2**31), -1, -2, -3]
    big = np.array([3e19, -1, 2**63, 5.0])
    assert merge_patches(extract_patches(big, g), g, dtype=np.int64).tolist() == [
        2**63 - 1,
        -1,
        2**63 - 1,
        5,
    ]
    assert merge_patches(extract_patches(big, g), g, dtype=np.uint8).tolist() == [255, 0, 255, 5]


def test_nan_into_an_integer_dtype_is_refused():
    g = PatchGrid((4,), 2, stride=1)
    image = np.array([np.nan, 1, 2, 3])
    with pytest.raises(ValueError, match=r"NaN.*dtype"):
        merge_patches(extract_patches(image, g), g, dtype=np.int16)


def test_zero_weight_pixels_count_as_uncovered():
    """A pixel whose covering window weights are all zero takes fill_value (or NaN), exactly
    like a pixel no patch covers, and an integer dtype then needs fill_value."""
    grid = PatchGrid((6,), 3, stride=3)
    window = np.array([1.0, 0.0, 1.0])
    image = np.arange(6, dtype=np.float32)
    merged = merge_patches(extract_patches(image, grid), grid, window=window)
    assert np.isnan(merged[[1, 4]]).all()
    np.testing.assert_array_equal(merged[[0, 2, 3, 5]], image[[0, 2, 3, 5]])
    filled = merge_patches(extract_patches(image, grid), grid, window=window, fill_value=-1)
    assert filled.tolist() == [0, -1, 2, 3, -1, 5]
    with pytest.raises(ValueError, match="fill_value"):
        merge_patches(extract_patches(image, grid), grid, window=window, dtype=np.uint8)
    as_int = merge_patches(
        extract_patches(image, grid), grid, window=window, dtype=np.uint8, fill_value=9
    )
    assert as_int.tolist() == [0, 9, 2, 3, 9, 5]


@pytest.mark.parametrize("fill, match", [("x", "fill_value.*number"), (300, "fill_value.*0..255")])
def test_bad_fill_value_is_refused_up_front(fill, match):
    grid = PatchGrid((6,), 2, stride=3)
    with pytest.raises((TypeError, ValueError), match=match):
        merge_patches(np.zeros(grid.patches_shape), grid, dtype=np.uint8, fill_value=fill)


@settings(max_examples=40, deadline=None)
@given(
    grids(max_side=12),
    st.sampled_from(["uniform", "hann", "overlap-tile"]),
    st.sampled_from([np.float64, np.float32, np.int64]),
    st.integers(0, 2**32 - 1),
)
def test_thread_count_never_changes_a_bit(grid, window, dtype, seed):
    rng = np.random.default_rng(seed)
    p = (rng.standard_normal((2,) + grid.patches_shape) * 1e6).astype(dtype)
    one = merge_patches(p, grid, window=window, workers=1)
    for workers in (2, 3):
        np.testing.assert_array_equal(merge_patches(p, grid, window=window, workers=workers), one)


def test_masked_patches_are_refused():
    grid = PatchGrid((6,), 2, stride=2)
    p = np.ma.masked_array(np.ones(grid.patches_shape), mask=False)
    with pytest.raises(TypeError, match="masked"):
        merge_patches(p, grid)


# ----------------------------------------------------------------- the backends agree
@settings(max_examples=80, deadline=None)
@given(
    grids(),
    st.sampled_from(["mean", "max", "min"]),
    st.sampled_from(["uniform", "hann", "overlap-tile", "array"]),
    st.sampled_from([np.float64, np.float32, np.uint8, np.int32, np.float16, bool]),
    st.integers(0, 2**32 - 1),
)
def test_backends_agree(grid, reduce, window, dtype, seed):
    """The compiled and the NumPy backends give the same result: bit for bit for max/min and
    overlap-tile; for means within ``4 + max coverage`` ulps of the output dtype at the largest
    patch value (the NumPy engine keeps float32 sums for windowed float32 means; the compiled
    one float64 sums, correctly rounded)."""
    if reduce != "mean" and window != "uniform":
        return
    rng = np.random.default_rng(seed)
    if window == "array":
        window = rng.random(grid.patch_size) + (rng.random(grid.patch_size) < 0.8)
    p = (rng.standard_normal(grid.patches_shape) * 100).astype(dtype)
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        for name in ("numba", "numpy"):
            mp.setenv(BACKEND_ENV, name)
            assert backend() == name
            results[name] = merge_patches(p, grid, window=window, reduce=reduce, fill_value=-7)
    a, b = results["numba"], results["numpy"]
    assert a.dtype == b.dtype and a.shape == b.shape
    exact = reduce != "mean" or (isinstance(window, str) and window in ("overlap-tile",))
    if exact:
        np.testing.assert_array_equal(a, b)
    else:
        peak = float(np.abs(p.astype(np.float64)).max())
        tol = (4 + grid.coverage_range()[1]) * np.finfo(a.dtype).eps * peak
        np.testing.assert_allclose(a, b, rtol=0, atol=tol)


def test_backend_switch(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "numpy")
    assert backend() == "numpy"
    monkeypatch.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match=f"{BACKEND_ENV}.*auto"):
        backend()


def test_process_gives_the_merge_result():
    """process() streams the same sums in the same order as merge_patches."""
    rng = np.random.default_rng(7)
    image = rng.standard_normal((57, 61)).astype(np.float32)
    grid = PatchGrid(image.shape, 13, stride=(3, 4))
    for window in ("uniform", "hann"):
        merged = merge_patches(extract_patches(image, grid), grid, window=window)
        result = process(image, grid, window=window, batch_bytes=4096, metrics=False)
        np.testing.assert_array_equal(result.merged, merged)
