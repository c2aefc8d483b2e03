"""The explorer reuses image-sized arrays from run to run (:class:`_controller.Buffers`): never
one a layer shows or a running worker writes, and with the same results as fresh arrays."""

import numpy as np
import pytest

import patch_viewer as pv
from patch_viewer import _controller as ctl

from .conftest import run


def _layer_arrays(viewer):
    return [layer.data for layer in viewer.layers if isinstance(layer.data, np.ndarray)]


def test_reused_buffers_never_alias_what_a_layer_shows(explorer, qtbot):
    viewer, w = explorer
    seen = []
    for k, stride in enumerate([6, 7, 6, 7, 5]):
        w.stride.value = stride
        with qtbot.waitSignal(w.signals.idle, timeout=30_000):
            run(qtbot, w)
        error, weights = viewer.layers["error"].data, viewer.layers["overlap weights"].data
        merged = viewer.layers["merged"].data
        seen.append((error, weights, merged))
        # what the run wrote is what the layers show, and it equals a fresh run's result
        job = w._job
        fresh = pv.process(job.image, job.grid, window=job.kwargs["window"])
        np.testing.assert_array_equal(viewer.layers["merged"].data, fresh.merged)
        np.testing.assert_array_equal(error, fresh.error)
        np.testing.assert_array_equal(weights, fresh.weights.astype(np.float32))
        # no array the pool may lend again is on screen
        shown = _layer_arrays(viewer) + [w.canvas._error]
        w.buffers.reclaim(w.canvas.arrays())
        for free in w.buffers._free:
            assert not any(np.shares_memory(free, a) for a in shown)
        if k >= 2:  # the run before last's arrays came back (the mechanism works)
            assert error is seen[k - 2][0] and weights is seen[k - 2][1]
            assert error is not seen[k - 1][0]
            # the merged image was weighed into a lent array of a run before (compiled backend)
            olds = [a for prev in seen[: k - 1] for a in (prev[0], prev[2])]
            assert any(np.shares_memory(merged, a) for a in olds)
            assert not np.shares_memory(merged, seen[k - 1][2])


def test_the_3d_views_signed_error_is_never_lent(make_napari_viewer, qtbot):
    """In the 3-D view the error tile shows |error|; the signed error it was made from is
    shown again on the way back to 2-D, so it stays out of the pool."""
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((12, 40, 40), dtype=np.float32))
    _, w = viewer.window.add_plugin_dock_widget("patch-viewer", "Patch Explorer")
    w.live.value = False
    w.image.reset_choices()
    w.patch_size.value = 8
    w.stride.value = 6
    run(qtbot, w)
    viewer.dims.ndisplay = 3
    signed = w.canvas._error
    assert viewer.layers["error"].data is not signed
    w.stride.value = 7
    with qtbot.waitSignal(w.signals.idle, timeout=30_000):
        run(qtbot, w)
    w.stride.value = 5
    with qtbot.waitSignal(w.signals.idle, timeout=30_000):
        run(qtbot, w)
    assert viewer.layers["error"].data is w.canvas._abs
    w.buffers.reclaim(w.canvas.arrays())
    assert w.buffers._free  # the pool has arrays to lend, and none of them is the error
    for a in w.buffers._free + w.buffers.lent():
        assert not np.shares_memory(a, w.canvas._error)
    viewer.dims.ndisplay = 2
    job = w._job
    np.testing.assert_array_equal(
        viewer.layers["error"].data, pv.process(job.image, job.grid, window="uniform").error
    )


class _Job:
    """What :meth:`Buffers.lend` reads of a job."""

    def __init__(self, shape=(8, 9), lazy=False, rgb=False, dtype=np.float32):
        self.lazy, self.rgb = lazy, rgb
        self.image = np.zeros(shape, dtype)
        self.grid = pv.PatchGrid(shape, 4, 2)


def test_buffers_come_back_only_when_finished_and_off_screen():
    pool = ctl.Buffers()
    a = _Job()
    lent_a = pool.lend(a)
    assert set(lent_a) == {"merged", "error", "weights"}
    assert len({id(x) for x in lent_a.values()}) == 3
    # a float64 image merges into float64: no float32 array is lent for its merged image
    assert set(ctl.Buffers().lend(_Job(dtype=np.float64))) == {"error", "weights"}
    b = _Job()
    pool.reclaim([])
    lent_b = pool.lend(b)  # a's worker still runs: its arrays are not lent again
    assert not any(x is y for x in lent_a.values() for y in lent_b.values())
    pool.finished(a)
    pool.reclaim([lent_a["error"]])  # a's error is on screen, its weights are not
    c = _Job()
    lent_c = pool.lend(c)
    assert any(x is lent_a["weights"] for x in lent_c.values())
    assert all(x is not lent_a["error"] for x in lent_c.values())
    pool.finished(b)
    pool.finished(c)
    pool.reclaim([lent_c["error"][2:5]])  # a view of it counts as showing it
    assert all(not np.shares_memory(x, lent_c["error"]) for x in pool._free)


@pytest.mark.parametrize("kind", ["lazy", "rgb"])
def test_lazy_and_rgb_runs_get_no_buffers(kind):
    assert ctl.Buffers().lend(_Job(**{kind: True})) == {}
