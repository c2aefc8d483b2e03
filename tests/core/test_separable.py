"""The compiled separable filters give scipy.ndimage's bits, and the backends' filters agree."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from patch_viewer import FILTERS
from patch_viewer.core.merge.plan import BACKEND_ENV

S = pytest.importorskip("patch_viewer.core.separable")


@st.composite
def stacks(draw):
    """A float stack with 1-3 leading patch axes, 1-3 spatial axes, maybe channels, in C, F or
    a sliced (non-contiguous) layout, with values over many magnitudes."""
    nd = draw(st.integers(1, 3))
    lead = draw(st.integers(1, 2))
    chan = draw(st.sampled_from([0, 1, 3]))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=lead + nd, max_size=lead + nd)))
    shape += (chan,) if chan else ()
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-4, 5)).astype(dtype)
    layout = draw(st.sampled_from(["C", "F", "sliced"]))
    if layout == "F":
        x = np.asfortranarray(x)
    elif layout == "sliced":
        x = np.repeat(x, 2, axis=0)[::2]
    return x, tuple(range(lead, lead + nd))


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


@settings(max_examples=150, deadline=None)
@given(stacks(), st.sampled_from([0.1, 0.5, 1.0, 2.5, 5.0, 20.0]), st.integers(1, 8))
def test_bits_equal_scipy(case, sigma, size):
    x, axes = case
    per = [a in axes for a in range(x.ndim)]
    assert same(
        S.gaussian(x, axes, sigma),
        ndi.gaussian_filter(x, [sigma if p else 0 for p in per], output=np.empty_like(x)),
    )
    assert same(
        S.uniform(x, axes, size),
        ndi.uniform_filter(x, [size if p else 1 for p in per], output=np.empty_like(x)),
    )
    for weights in ([-1.0, 0.0, 1.0], [1.0, 2.0, 1.0], [0.25, -1.0, 3.0, 0.5]):
        for ax in axes:
            assert same(
                S.correlate1d(x, weights, ax),
                ndi.correlate1d(x, weights, axis=ax, output=np.empty_like(x)),
            )


def test_non_finite_values_propagate_as_in_scipy():
    x = np.random.default_rng(0).random((4, 9, 9)).astype(np.float32)
    x[0, 3, 3], x[1, 0, 0], x[2, 8, 1] = np.nan, np.inf, -np.inf
    assert same(
        S.gaussian(x, (1, 2), 1.0), ndi.gaussian_filter(x, (0, 1, 1), output=np.empty_like(x))
    )
    assert same(S.uniform(x, (1, 2), 3), ndi.uniform_filter(x, (1, 3, 3), output=np.empty_like(x)))


def test_large_stacks_split_over_threads_give_the_same_bits(monkeypatch):
    """Above the thread threshold slabs go to threads; the bits must not change."""
    x = np.random.default_rng(1).random((3000, 31, 31)).astype(np.float32)  # 11 MB: threaded
    from patch_viewer.core import separable

    threaded = separable.gaussian(x, (1, 2), 2.0)
    monkeypatch.setattr(separable, "default_workers", lambda nbytes: 1)
    assert same(threaded, separable.gaussian(x, (1, 2), 2.0))
    assert same(threaded, ndi.gaussian_filter(x, (0, 2, 2), output=np.empty_like(x)))


def test_the_output_keeps_the_stacks_memory_order():
    x = np.asfortranarray(np.random.default_rng(2).random((5, 8, 7)))
    assert S.gaussian(x, (1, 2), 1.0).flags.f_contiguous


@pytest.mark.parametrize(
    "name, params",
    [
        ("gaussian", {"sigma": 1.5}),
        ("uniform", {"size": 4}),
        ("sobel", {}),
        ("unsharp", {"radius": 2.0, "amount": 0.7}),
    ],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float16, np.float32, np.float64])
def test_the_backends_filters_are_bit_identical(monkeypatch, name, params, dtype):
    """The numba backend's filters (compiled) and the NumPy backend's (scipy) give the same
    bits, for every input dtype and with channels."""
    rng = np.random.default_rng(3)
    x = (rng.random((6, 11, 13, 2)) * 200).astype(dtype)
    out = {}
    for b in ("numba", "numpy"):
        monkeypatch.setenv(BACKEND_ENV, b)
        out[b] = FILTERS[name](x, (1, 2), **params)
    assert same(out["numba"], out["numpy"])
