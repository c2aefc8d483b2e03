"""A predictor's outputs streamed in grid order are held and summed band by band where their
rows are final (:mod:`patch_viewer.core.merge.held`): the same bits as adding each batch as it
comes, on random grids, channels, windows, output dtypes, bands, threads and batches that cut
grid rows anywhere; the path is taken; held memory stays bounded; outputs a model keeps a hold
on are copied first."""

import math
import weakref

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from patch_viewer import Accumulator, PatchGrid, Predictor, extract_patches, process
from patch_viewer.core import accumulator as accumulator_module
from patch_viewer.core.merge import held as held_module

from .strategies import grids

pytestmark = pytest.mark.usefixtures("backend")


def _stream(grid, patches, parts, *, hold, whole=True, window="uniform", dtype=None, fill=None):
    """Patches added part by part in grid order, the rows above each part's last patch
    released as ``process`` releases them; the accumulator and its result."""
    channels = None if patches.ndim == grid.ndim + 1 else patches.shape[-1]
    acc = Accumulator(grid, channels=channels, window=window)
    acc._stream(whole, hold=hold)
    for part in parts:
        acc.add(patches[part], part)
        acc._release(grid.patch_origin(int(part[-1]))[0], dtype, fill)
    return acc, acc.result(dtype, fill)


def _same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def _cuts(rng, order):
    """``order`` cut into parts of random sizes (so parts cut grid rows anywhere)."""
    k = int(rng.integers(0, len(order)))
    return np.split(order, np.sort(rng.choice(np.arange(1, len(order)), k, replace=False)))


@settings(max_examples=120, deadline=None)
@given(
    grids(channels=(None, 1, 3)),
    st.sampled_from([np.float32, np.float16, np.float64, np.uint8, np.int32]),
    st.sampled_from(["uniform", "hann"]),
    st.sampled_from([None, np.float32, np.float64]),
    st.sampled_from([1, 200, 1 << 20]),
    st.integers(1, 2),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_held_bands_give_the_bits_of_adding_as_they_come(
    grid, dtype, window, out, canvas_bytes, workers, whole, seed
):
    assume(grid.ndim > 1)
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 5))
    shape = (grid.n_patches,) + grid.patch_size + (k,)
    if np.dtype(dtype).kind == "f":  # exponents far apart: sums round, so order shows
        spread = 3 if dtype == np.float16 else 30
        scale = 10.0 ** rng.integers(-spread, spread + 1, shape)
        patches = (rng.standard_normal(shape) * scale).astype(dtype)
    else:  # int32 sums can pass 2**53: they stay int64
        patches = rng.integers(0, 256, shape).astype(dtype) << (23 if dtype == np.int32 else 0)
    order = np.arange(grid.n_patches)
    if not whole:
        order = np.flatnonzero(rng.random(grid.n_patches) < 0.6)
        assume(len(order) > 0)
    parts = _cuts(rng, order)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(held_module, "CANVAS_BYTES", canvas_bytes)
        mp.setattr(held_module, "default_workers", lambda nbytes: workers)
        # held on any grid, even where holding would take more memory than the sums
        mp.setattr(accumulator_module.Accumulator, "_holds", lambda self, dtype: True)
        acc, got = _stream(grid, patches, parts, hold=True, whole=whole, window=window, dtype=out)
    _, want = _stream(grid, patches, parts, hold=False, whole=whole, window=window, dtype=out)
    _same_bits(got, want)
    held = acc._state.held
    taken = acc._compiled and acc._state.mode in ("sum", "weighted")  # (not anchored sums)
    assert taken == (
        acc._compiled and dtype != np.float64 and (dtype, window) != (np.int32, "hann")
    )
    assert (held is not None) == taken
    if held is not None and len(parts) > 1:  # batches no unfinished row reaches are let go
        assert all(hi > held.done for _, _, _, hi in held.batches)


@pytest.mark.parametrize("window", ["uniform", "hann"])
def test_many_batches_over_each_pixel_keep_their_order(monkeypatch, window):
    """Up to 36 batches over a pixel, values 60 decades apart: float64 sums round, so
    summing the held batches in another order than they came changes bits."""
    monkeypatch.setattr(accumulator_module.Accumulator, "_holds", lambda self, dtype: True)
    rng = np.random.default_rng(0)
    grid = PatchGrid((20, 20), 6, stride=1)
    shape = (grid.n_patches, 6, 6, 2)
    patches = (rng.standard_normal(shape) * 10.0 ** rng.integers(-30, 31, shape)).astype(np.float32)
    parts = np.array_split(np.arange(grid.n_patches), 40)
    for out in (np.float64, np.float32):
        acc, got = _stream(grid, patches, parts, hold=True, window=window, dtype=out)
        _, want = _stream(grid, patches, parts, hold=False, window=window, dtype=out)
        _same_bits(got, want)
        assert (acc._state.held is not None) == acc._compiled


def test_integer_results_and_refusals_of_a_held_stream():
    """Asked for integers, held batches are added as if never held; rows finished may not be
    added to again."""
    rng = np.random.default_rng(3)
    grid = PatchGrid((30, 26), (7, 6), stride=(3, 4))
    patches = rng.random((grid.n_patches, 7, 6)).astype(np.float32) * 200
    parts = np.array_split(np.arange(grid.n_patches), 9)
    for dtype in (np.uint8, np.int32):
        _, got = _stream(grid, patches, parts, hold=True, dtype=dtype, fill=0)
        _, want = _stream(grid, patches, parts, hold=False, dtype=dtype, fill=0)
        _same_bits(got, want)
    acc, first = _stream(grid, patches, parts, hold=True, dtype=np.float32)
    if acc._state.held is None:  # (the NumPy backend: nothing is held)
        return
    assert acc._state.final == grid.patch_origin(grid.n_patches - 1)[0]
    with pytest.raises(ValueError, match="released"):
        acc.add(patches[:1], [0])
    _same_bits(acc.result(np.float32), first)  # a refused add changed nothing
    with pytest.raises(ValueError, match="same dtype"):
        acc.result(np.float64)


def _bank(batch):
    """A 4-channel output of fresh arrays (as models return them)."""
    return np.stack([batch, batch * 2, batch - 1, np.sin(batch)], axis=-1).astype(np.float32)


def _without_holding(mp):
    mp.setattr(accumulator_module.Accumulator, "_holds", lambda self, dtype: False)


@pytest.mark.parametrize("window", ["uniform", "hann", "triangular"])
@pytest.mark.parametrize("batch_size", [1, 5, 13])
def test_process_holds_a_predictors_outputs_with_the_same_bits(monkeypatch, window, batch_size):
    image = np.random.default_rng(5).random((62, 48)).astype(np.float32)
    grid = PatchGrid(image.shape, (12, 10), stride=(6, 4), edge="pad")
    per_row = grid.grid_shape[1]
    reach = math.ceil(12 / 6) + 1
    seen = []
    add = held_module.Held.add

    def spy(self, flat, o3, lo, hi):  # the held patches, whenever a batch comes
        add(self, flat, o3, lo, hi)
        seen.append(sum(len(b[1]) for b in self.batches))

    monkeypatch.setattr(held_module.Held, "add", spy)
    models = {
        "bank": Predictor(_bank, batch_size=batch_size),
        "x2": Predictor(lambda b: np.repeat(np.repeat(b, 2, 1), 2, 2), batch_size=batch_size),
        "half": Predictor(lambda b: b[:, ::2, ::2] * 3, batch_size=batch_size),
    }
    for name, model in models.items():
        seen.clear()
        got = process(image, grid, model, window=window, metrics=False).merged
        with pytest.MonkeyPatch.context() as mp:
            _without_holding(mp)
            want = process(image, grid, model, window=window, metrics=False).merged
        _same_bits(got, want)
        compiled = accumulator_module.backend() == "numba"
        assert bool(seen) == compiled, name  # the held path is taken where it is compiled
        if compiled:  # bounded: the rows a later row can reach, and a batch
            assert max(seen) <= reach * per_row + batch_size, name
            assert max(seen) < grid.n_patches / 2, name


def test_outputs_a_model_keeps_are_copied_before_they_are_held(monkeypatch):
    """A model that writes each batch into one buffer of its own, and returns it (or a view
    of it), must not change what is held: the run copies such outputs first."""
    image = np.random.default_rng(6).random((40, 36)).astype(np.float32)
    grid = PatchGrid(image.shape, 8, stride=3)
    held_arrays = []
    add = held_module.Held.add
    monkeypatch.setattr(
        held_module.Held, "add", lambda self, f, *a: (held_arrays.append(f), add(self, f, *a))
    )

    class Reuses:
        def __init__(self, view):
            self.buf, self.view = np.empty((7, 8, 8), np.float32), view

        def __call__(self, batch):
            out = self.buf[: len(batch)]
            np.multiply(batch, 3, out=out)
            return out if self.view else self.buf if len(batch) == 7 else out.copy()

    patches = extract_patches(image, grid).reshape(grid.n_patches, 8, 8)
    acc = Accumulator(grid)
    acc.add(patches * np.float32(3), np.arange(grid.n_patches))
    for view in (True, False):
        model = Reuses(view)
        got = process(image, grid, Predictor(model, batch_size=7), metrics=False).merged
        with pytest.MonkeyPatch.context() as mp:
            _without_holding(mp)
            want = process(image, grid, Predictor(Reuses(view), batch_size=7), metrics=False)
        _same_bits(got, want.merged)
        np.testing.assert_allclose(got, acc.result(np.float32), rtol=1e-6)
        assert not any(np.shares_memory(f, model.buf) for f in held_arrays)
    held_arrays.clear()
    returned = []  # (weak references: a reference kept would make the run copy them)

    def fresh(batch):
        out = batch * 3
        returned.append(weakref.ref(out))
        return out

    process(image, grid, Predictor(fresh, batch_size=7), metrics=False)
    if accumulator_module.backend() == "numba":  # fresh outputs are held as they are
        assert len(held_arrays) == len(returned)
        assert all(np.shares_memory(f, r()) for f, r in zip(held_arrays, returned))
