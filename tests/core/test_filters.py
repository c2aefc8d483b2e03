import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from patch_viewer import FILTERS, Param, get_filter, register_filter

BUILTIN = [
    "identity",
    "gaussian",
    "median",
    "uniform",
    "sobel",
    "unsharp",
    "invert",
    "zscore",
    "minmax",
    "otsu",
]


def test_registry_has_the_builtin_filters_with_declared_params():
    assert set(BUILTIN) <= set(FILTERS)
    assert len(FILTERS) >= 8
    for name in BUILTIN:
        f = FILTERS[name]
        for p in f.params.values():
            assert p.min <= p.default <= p.max
        assert f.doc


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(BUILTIN),
    st.integers(1, 3),
    st.sampled_from([None, 2]),
    st.integers(0, 2**32 - 1),
)
def test_filters_never_leak_between_patches(name, nd, channels, seed):
    """Filtering a stack equals filtering each patch on its own."""
    rng = np.random.default_rng(seed)
    patch = tuple(rng.integers(2, {1: 12, 2: 7, 3: 5}[nd], nd))
    lead = (3, 2)
    shape = lead + patch + (() if channels is None else (channels,))
    stack = rng.random(shape).astype(np.float32)
    spatial = tuple(range(len(lead), len(lead) + nd))
    out = FILTERS[name](stack, spatial)
    assert out.shape == stack.shape
    for idx in np.ndindex(lead):
        single = FILTERS[name](stack[idx][None], tuple(a - len(lead) + 1 for a in spatial))[0]
        np.testing.assert_allclose(out[idx], single, rtol=1e-5, atol=1e-6)


def test_matches_scipy_on_one_patch():
    rng = np.random.default_rng(1)
    img = rng.random((20, 24)).astype(np.float32)
    one = img[None, ..., None]
    ax = (1, 2)
    np.testing.assert_allclose(
        FILTERS["gaussian"](one, ax, sigma=1.5)[0, ..., 0], ndi.gaussian_filter(img, 1.5), rtol=1e-6
    )
    np.testing.assert_array_equal(
        FILTERS["median"](one, ax, size=3)[0, ..., 0], ndi.median_filter(img, 3)
    )
    np.testing.assert_allclose(
        FILTERS["sobel"](one, ax)[0, ..., 0],
        np.hypot(ndi.sobel(img, 0), ndi.sobel(img, 1)),
        rtol=1e-5,
    )
    z = FILTERS["zscore"](one, ax)[0, ..., 0]
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5
    m = FILTERS["minmax"](one, ax)[0, ..., 0]
    assert m.min() == 0 and m.max() == 1
    inv = FILTERS["invert"](one, ax)[0, ..., 0]
    np.testing.assert_allclose(inv, img.min() + img.max() - img)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_otsu_thresholds_match_skimage(seed):
    rng = np.random.default_rng(seed)
    stack = np.concatenate([rng.normal(0, 1, (4, 100)), rng.normal(5, 1, (4, 60))], axis=1)
    stack = stack.reshape(4, 16, 10)
    out = FILTERS["otsu"](stack, (1, 2))
    for i in range(4):
        expected = stack[i] > threshold_otsu(stack[i])
        np.testing.assert_array_equal(out[i].astype(bool), expected)


def test_constant_patches_do_not_divide_by_zero():
    stack = np.ones((2, 5, 5), np.float32)
    for name in ("zscore", "minmax", "otsu", "invert"):
        out = FILTERS[name](stack, (1, 2))
        assert np.isfinite(out).all()


def test_parameters_are_checked():
    with pytest.raises(ValueError, match=r"sigma.*\[0.1, 20.0\]"):
        FILTERS["gaussian"](np.ones((1, 4, 4)), (1, 2), sigma=0)
    with pytest.raises(TypeError, match=r"size.*integer"):
        FILTERS["median"](np.ones((1, 4, 4)), (1, 2), size=2.5)
    with pytest.raises(TypeError, match=r"gaussian.*sigma.*unknown.*radius"):
        FILTERS["gaussian"](np.ones((1, 4, 4)), (1, 2), radius=1)
    with pytest.raises(ValueError, match=r"patch_filter.*gaussian"):
        get_filter("blur")
    with pytest.raises(TypeError, match="patch_filter"):
        get_filter(3)


def test_register_batched_and_per_patch_callables():
    try:
        register_filter("double", lambda s, axes, k: s * k, params={"k": Param(2, 1, 5, int)})
        assert FILTERS["double"](np.ones((2, 3)), (1,)).tolist() == [[2, 2, 2], [2, 2, 2]]

        @register_filter("centre", batched=False)
        def centre(patch):
            return patch - patch.mean()

        stack = np.arange(12.0).reshape(2, 3, 2)  # 2 patches of 3 pixels, 2 channels
        out = FILTERS["centre"](stack, (1,))
        np.testing.assert_allclose(out[1, :, 0], [-2, 0, 2])
    finally:
        FILTERS.pop("double", None)
        FILTERS.pop("centre", None)
    f = get_filter(lambda s, axes: s + 1)
    assert f(np.zeros(2), (0,)).tolist() == [1, 1]
    bad = get_filter(lambda s, axes: s[:1])
    with pytest.raises(ValueError, match="returned shape"):
        bad(np.zeros((2, 2)), (1,))
