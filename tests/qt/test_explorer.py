"""Issue 13: every result legible, every control explained (each test would have caught a
defect)."""

import numpy as np
import pytest

import patch_viewer as pv
from patch_viewer import _controller, _layers
from patch_viewer._qt._canvas import ORDER
from patch_viewer._qt._support import HINT

from .conftest import run


def dock(make_napari_viewer, sample=None, **params):
    viewer = make_napari_viewer()
    if sample:
        viewer.open_sample("patch-viewer", sample)
    _, w = viewer.window.add_plugin_dock_widget("patch-viewer", "Patch Explorer")
    w.live.value = False
    for name, value in params.items():
        getattr(w, name).value = value
    return viewer, w


@pytest.mark.parametrize("name", ["otsu", "sobel"])
def test_merged_and_filtered_patch_limits_follow_their_own_data(make_napari_viewer, qtbot, name):
    viewer, w = dock(make_napari_viewer, "classic", filter=name)
    run(qtbot, w)
    merged = viewer.layers["merged"]
    lo, hi = merged.contrast_limits
    data = np.asarray(merged.data)
    assert data.min() <= lo < hi <= data.max()  # not the input's 0..255
    inside = np.mean((data > lo) & (data < hi)) + np.mean(data >= hi) * (data.max() > hi)
    assert 0 < np.mean(data <= lo) < 1 and inside > 0  # neither solid black nor clipped white
    assert viewer.layers["filtered patches"].contrast_limits == merged.contrast_limits
    assert (
        viewer.layers["patches"].contrast_limits == viewer.layers["camera 100x100"].contrast_limits
    )


def test_selected_patch_is_shown_before_and_after_the_filter(explorer, qtbot, classic):
    viewer, w = explorer
    w.filter.value = "gaussian"
    run(qtbot, w)
    w.index.value = 14
    before, after = viewer.layers["patches"], viewer.layers["filtered patches"]
    raw = pv.extract_patches(classic, w.grid)
    i, j = w.grid.patch_index(14)
    np.testing.assert_array_equal(before.data[i, j], raw[i, j])
    expected = pv.FILTERS["gaussian"](raw[i, j][None].astype(np.float64), (1, 2), sigma=1.0)[0]
    np.testing.assert_allclose(after.data[i, j], expected, rtol=1e-5, atol=1e-5)
    assert after.translate[-1] == before.translate[-1] + 32 + _layers.tile_gap((100, 100)) / 2


def test_every_tile_has_a_caption_and_layers_keep_their_order(explorer, qtbot):
    viewer, w = explorer
    w.filter.value = "gaussian"
    with qtbot.waitSignal(w.signals.ssim_computed, timeout=30_000):
        run(qtbot, w)
    captions = list(viewer.layers["tile labels"].features["caption"])
    assert captions == [*_layers.TILE_CAPTIONS.values(), ""]  # "": room for the last one
    assert "error (merged − reference)" in captions
    names = [layer.name for layer in viewer.layers]
    assert names == ["camera 100x100", *(n for n in ORDER if n != "classes")]  # no model
    assert viewer.dims.axis_labels == ("patch row", "patch column", "y", "x")


def test_3d_patches_leave_the_z_slider_free(make_napari_viewer, qtbot):
    viewer, w = dock(make_napari_viewer, "volume")
    w.patch_size.value = 16
    w.stride.value = 12
    run(qtbot, w)
    assert viewer.dims.axis_labels == ("patch plane", "patch row", "patch column", "z", "y", "x")
    shown = [n for n in ORDER if n != "classes"]  # (no model: no class labels)
    assert [layer.name for layer in viewer.layers] == ["blobs 3-D", *shown]
    w.click(tuple(viewer.dims.point[:-3]) + (30, 40, 50))
    step = list(viewer.dims.current_step)
    step[-3] = 60
    viewer.dims.current_step = tuple(step)  # browse a plane outside the selected patch
    assert viewer.dims.current_step[-3] == 60


def test_long_messages_wrap_and_the_dock_keeps_its_width(explorer, qtbot, monkeypatch):
    _viewer, w = explorer
    width = w.native.minimumSizeHint().width()
    monkeypatch.setattr(_controller, "GUI_MAX_BYTES", 1000)
    with qtbot.waitSignal(w.signals.failed, timeout=5_000) as blocker:
        w.run()
    assert len(blocker.args[0]) > 80
    w.readout.value = "a-very-long-unbroken-path/" * 40  # cannot even wrap at spaces
    assert w.readout.native.wordWrap()
    assert w.native.minimumSizeHint().width() <= width


def test_an_empty_viewer_shows_a_neutral_hint(make_napari_viewer, qtbot):
    from napari.utils.notifications import notification_manager

    before = len(notification_manager.records)
    _viewer, w = dock(make_napari_viewer)
    w.live.value = True
    qtbot.wait(50)
    assert w.readout.value == HINT
    assert "ff7070" not in w.readout.native.styleSheet()
    assert len(notification_manager.records) == before  # no warning toast
    assert not w.volume_mode.visible


def test_controls_have_tooltips_and_distinct_labels(explorer):
    _viewer, w = explorer
    w.window.value = "gaussian"
    w.filter.value = "gaussian"
    controls = [
        w.image,
        w.patch_size,
        w.stride,
        w.edge,
        w.pad_mode,
        w.volume_mode,
        w.window,
        w.sigma,
        w.reduce,
        w.filter,
        w.reference,
        w.live,
        w.run_button,
        w.cancel_button,
        w.index,
        *w.filter_params,
    ]
    assert all(c.tooltip for c in controls)
    labels = [w.sigma.label, *(c.label for c in w.filter_params)]
    assert len(set(labels)) == len(labels) and "σ" in w.sigma.label
    assert w.sigma.native.text() == "0.125"


def test_controls_are_settable_through_value(explorer):
    _viewer, w = explorer
    w.patch_size.value = 39
    assert w.patch_size.value == (39, 39) and w.patch_size.linked.value
    w.stride.value = (8, 12)
    assert w.stride.value == (8, 12) and not w.stride.linked.value


def test_cancel_eta_and_stale_metrics(make_napari_viewer, qtbot):
    _viewer, w = dock(make_napari_viewer, "noisy")
    run(qtbot, w)
    w.filter.value = "median"
    w.patch_size.value = 24
    w.stride.value = 1  # 100,000 median-filtered patches in 14 batches: seconds
    with qtbot.waitSignal(w.signals.started, timeout=5_000):
        w.run()
    # A run that takes a while marks the old metrics stale and offers Cancel.
    qtbot.waitUntil(lambda: w.readout.value.startswith("(updating…)"), timeout=5_000)
    assert w.cancel_button.enabled
    qtbot.waitUntil(lambda: "s left" in w.progress.label, timeout=20_000)
    with qtbot.waitSignal(w.signals.finished, timeout=5_000):
        w.cancel_button.clicked.emit()
    assert "Cancelled" in w.readout.value and not w.cancel_button.enabled
    assert w.grid.stride == (16, 16)  # the layers keep the last finished run


def test_live_preview_starts_at_once_but_holds_back_long_runs(explorer, qtbot, monkeypatch):
    _viewer, w = explorer
    from qtpy.QtWidgets import QApplication

    w.live.value = True
    QApplication.processEvents()
    started = []
    w.signals.started.connect(started.append)
    w.stride.value = 10
    QApplication.processEvents()  # one turn of the event loop (was a fixed 150 ms debounce)
    assert len(started) == 1
    monkeypatch.setattr(_controller, "PIXELS_PER_SECOND", 1e4)
    with qtbot.assertNotEmitted(w.signals.started, wait=100):
        w.stride.value = 4
    assert "press Run" in w.readout.value and "estimated" in w.readout.value


def test_grid_thins_by_zoom_and_the_selection_stands_out(make_napari_viewer, qtbot):
    viewer, w = dock(make_napari_viewer, "noisy")
    w.stride.value = 1
    run(qtbot, w, timeout=60_000)
    grid = viewer.layers["patch grid"]
    viewer.scene.camera.zoom = 0.5
    far = len(grid.data)
    viewer.scene.camera.zoom = 8
    near = len(grid.data)
    assert far < near
    h = max(w.grid.spatial_shape)
    assert far <= 2 * (h * 0.5 / _layers.MIN_SCREEN_SPACING + 2) + _layers.SELECTION_SEGMENTS
    assert _layers.GRID_COLOR[3] < 0.5 and _layers.SELECTION_SEGMENTS > 4


def test_rgb_thumbnail_is_not_white_and_identity_error_is_quiet(make_napari_viewer, qtbot):
    viewer, w = dock(make_napari_viewer, "rgb")
    run(qtbot, w)
    merged, source = viewer.layers["merged"], viewer.layers["IHC histology"]
    assert np.abs(merged.thumbnail.astype(float) - source.thumbnail.astype(float)).mean() < 5
    error = viewer.layers["error"]
    assert np.all(np.asarray(error.data) == 0)
    middle = error.colormap.map(np.array([0.5]))[0]
    assert middle[:3].max() < 0.2  # a zero error is dark and quiet, not a white square
    qtbot.waitUntil(
        lambda: "error: 0 everywhere" in list(viewer.layers["tile labels"].features["caption"]),
        timeout=10_000,
    )


def test_padded_patch_larger_than_the_image_stays_in_its_tile(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((40, 40)), name="small")
    _, w = viewer.window.add_plugin_dock_widget("patch-viewer", "Patch Explorer")
    w.live.value = False
    w.edge.value = "pad"
    w.patch_size.value = 64
    w.stride.value = 32
    run(qtbot, w)
    patches = viewer.layers["patches"]
    after = viewer.layers["filtered patches"]
    assert after.translate[-1] >= patches.translate[-1] + 64
    assert viewer.layers["error"].translate[-1] >= viewer.layers["merged"].translate[-1] + 64


@pytest.mark.parametrize("setting", ["gaussian-window", "rgb"])
def test_copy_as_python_and_as_command_reproduce_the_merged_layer(
    make_napari_viewer, qtbot, tmp_path, setting
):
    import subprocess
    import sys

    from qtpy.QtWidgets import QApplication

    viewer, w = dock(make_napari_viewer, "rgb" if setting == "rgb" else "classic")
    w.stride.value = 12
    w.filter.value = "gaussian"
    w.filter_params[0].value = 1.5
    w.window.value = "gaussian" if setting != "rgb" else "hann"
    w.sigma.value = 0.2
    w.reference.value = "filter"
    run(qtbot, w)
    merged = np.asarray(viewer.layers["merged"].data)
    code = w.to_python()
    assert "viewer.layers[" in code and "pv.process(" in code
    namespace = {"viewer": viewer}
    exec(code, namespace)
    tol = 0.5 if setting == "rgb" else 1e-9  # 8-bit RGB is shown rounded
    np.testing.assert_allclose(namespace["result"].merged, merged, atol=tol, rtol=0)
    w.copy_python.clicked.emit()
    assert QApplication.clipboard().text() == code
    # The command, on a saved copy of the image.
    image = viewer.layers[w.image.value.name].data
    np.save(tmp_path / "image.npy", image)
    cmd = w.to_command().replace("IMAGE.tif", str(tmp_path / "image.npy"))
    cmd = cmd.replace(" -o results ", f" -o {tmp_path / 'out'} ")
    assert cmd.startswith("patch-viewer process ")
    args = [sys.executable, "-m", "patch_viewer", *cmd.split()[1:]]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out" / "image.npy"), merged, atol=tol, rtol=0)


def test_copy_as_python_reads_the_file_the_layer_came_from(
    make_napari_viewer, qtbot, tmp_path, classic
):
    from skimage import io

    path = tmp_path / "camera.png"
    io.imsave(path, classic)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari")
    _, w = viewer.window.add_plugin_dock_widget("patch-viewer", "Patch Explorer")
    w.live.value = False
    run(qtbot, w)
    code = w.to_python()
    assert repr(str(path)) in code and "viewer.layers" not in code
    namespace = {}
    exec(code, namespace)
    np.testing.assert_array_equal(namespace["result"].merged, viewer.layers["merged"].data)
    assert str(path) in w.to_command()


def test_layers_whose_inputs_did_not_change_are_not_reset(explorer, qtbot):
    viewer, w = explorer
    run(qtbot, w)
    weights, patches = viewer.layers["overlap weights"].data, viewer.layers["patches"].data
    w.filter.value = "gaussian"
    run(qtbot, w)
    assert viewer.layers["overlap weights"].data is weights  # the filter does not change them
    assert viewer.layers["patches"].data is patches
    w.window.value = "hann"
    run(qtbot, w)
    assert viewer.layers["overlap weights"].data is not weights


def test_a_quick_run_touches_no_widget_before_its_layers(explorer, qtbot):
    """Latency: under software OpenGL each widget repaint composes the whole window while the
    worker runs. A quick run marks nothing stale, shows no progress and no Cancel; the tile
    captions are not set again when they did not change; the weights layer is not reset
    when only the filter changed."""
    viewer, w = explorer
    w.filter.value = "median"
    with qtbot.waitSignal(w.signals.idle, timeout=30_000):
        shown = run(qtbot, w)
    before, progress = w.readout.value, w.progress.value
    labels = viewer.layers["tile labels"]
    seen = []
    labels.events.data.connect(seen.append)
    labels.events.features.connect(seen.append)
    weights = viewer.layers["overlap weights"].data
    w.filter.value = "gaussian"
    with (
        qtbot.waitSignal(w.signals.idle, timeout=30_000),
        qtbot.waitSignal(w.signals.computed, timeout=30_000),
    ):
        w.run()
        assert w.readout.value == before and not w.cancel_button.enabled
        assert w.progress.value == progress
    assert seen == []  # same tiles, same captions: not set again
    assert viewer.layers["overlap weights"].data is weights
    assert shown.grid == w.grid


def test_a_closed_dock_stops_listening_to_the_viewer(explorer, qtbot):
    viewer, w = explorer
    run(qtbot, w)
    viewer.window.remove_dock_widget("all")  # un-parents the widget, does not delete it
    assert w.selection._on_click not in viewer.mouse_drag_callbacks
    viewer.layers.clear()
    viewer.add_image(np.zeros((20, 20)))
    viewer.scene.camera.zoom = 3  # no handler of the closed explorer runs


def test_tune_chart_sweeps_the_stride_and_a_click_applies_it(explorer, qtbot):
    _viewer, w = explorer
    w.filter.value = "gaussian"
    tune = w.open_tune()
    tune.sweep()
    qtbot.waitUntil(lambda: not tune.cancel_button.isEnabled(), timeout=30_000)
    strides = [p.stride for p in tune.points]
    assert strides == _controller.tune_strides(32) and len(strides) >= 4
    assert all(p.rmse >= 0 and p.n_patches > 0 for p in tune.points)
    assert [p.n_patches for p in tune.points] == sorted(p.n_patches for p in tune.points)
    err_ax = tune.figure.axes[0]
    assert len(err_ax.lines) == 2 and len(err_ax.lines[0].get_xdata()) == len(strides)
    from types import SimpleNamespace

    tune._on_pick(SimpleNamespace(ind=[1]))  # the second-smallest stride
    assert w.stride.value == (sorted(strides)[1],) * 2
    assert w.open_tune() is tune  # docked once


def test_tune_chart_is_not_squashed_when_docked(explorer, qtbot):
    _viewer, w = explorer
    tune = w.open_tune()
    qtbot.wait(50)
    assert tune.chart.height() >= 300


# ----------------------------------------------------------------- predictors in the explorer
def three_class(batch):
    """A stand-in model for the tests: (N, h, w) -> (N, h, w, 3) class probabilities."""
    x = batch.astype(np.float32) / 255
    return np.stack([x, 1 - x, np.full_like(x, 0.2)], axis=-1) / np.float32(1.2)


def test_a_custom_function_with_k_outputs_shows_channels_and_classes(explorer, qtbot):
    viewer, w = explorer
    w.filter.value = _controller.CUSTOM
    assert w.custom.native.isVisibleTo(w.native)
    w.custom.value = "tests.qt.test_explorer:three_class"
    result = run(qtbot, w)
    assert result.merged.shape == (100, 100, 3)
    merged = viewer.layers["merged"]
    assert merged.rgb and merged.data.shape == (100, 100, 3)
    np.testing.assert_allclose(merged.data, result.merged)
    classes = viewer.layers["classes"]
    assert classes.data.shape == (100, 100)
    np.testing.assert_array_equal(classes.data, result.merged.argmax(-1) + 1)
    assert tuple(classes.translate) == tuple(merged.translate)
    assert "3 channels" in w.readout.value and "n/a" in w.readout.value
    captions = list(viewer.layers["tile labels"].features["caption"])
    assert any(c.startswith("error: n/a") for c in captions)
    assert not viewer.layers["error"].colorbar.visible
    after = viewer.layers["filtered patches"]
    assert after.rgb and after.data[(0, 0)].shape == (32, 32, 3)
    snippet = w.to_python()
    assert "pv.Predictor(pv.load_callable('tests.qt.test_explorer:three_class'))" in snippet
    # back to a filter: the classes layer goes, the merged tile is grey again
    w.filter.value = "identity"
    run(qtbot, w)
    assert "classes" not in viewer.layers and not viewer.layers["merged"].rgb


def test_the_whole_image_reference_gives_k_channel_metrics(explorer, qtbot):
    _viewer, w = explorer
    w.filter.value = _controller.CUSTOM
    w.custom.value = "tests.qt.test_explorer:three_class"
    w.reference.value = "filter"
    with qtbot.waitSignal(w.signals.ssim_computed, timeout=30_000):
        run(qtbot, w)
    assert "n/a" not in w.readout.value and "RMSE: 0" in w.readout.value  # pixel-wise model


def test_a_bad_import_path_is_a_message_not_a_crash(explorer, qtbot):
    _viewer, w = explorer
    w.filter.value = _controller.CUSTOM
    for path, words in [
        ("no_such_pkg.mod:f", "cannot import module 'no_such_pkg.mod'"),
        ("os.path:nope", "has no attribute 'nope'"),
        ("just text", "package.module:function"),
    ]:
        w.custom.value = path
        with qtbot.waitSignal(w.signals.failed, timeout=5_000) as blocker:
            w.run()
        assert words in blocker.args[0] and words in w.readout.value


def test_registered_and_plugin_predictors_are_listed(make_napari_viewer, qtbot):
    import patch_viewer as pv

    pv.register_predictor("three-class test model", three_class, channels=3)
    try:
        viewer = make_napari_viewer()
        viewer.open_sample("patch-viewer", "classic")
        _, w = viewer.window.add_plugin_dock_widget("patch-viewer", "Patch Explorer")
        w.live.value = False
        assert "three-class test model" in w.filter.choices
        w.filter.value = "three-class test model"
        result = run(qtbot, w)
        assert result.merged.shape == (100, 100, 3) and "classes" in viewer.layers
    finally:
        del pv.FILTERS["three-class test model"]


def test_docking_loads_the_compiled_kernels_in_a_worker(make_napari_viewer, qtbot):
    """The explorer warms numba's kernels up in a thread as it docks (the first run then
    does not wait on a compile or on numba's start-up)."""
    viewer = make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget("patch-viewer", "Patch Explorer")
    if w.warm is not None:  # None: this process was warm already (tests/qt warms it first)
        qtbot.waitUntil(lambda: not w.warm.is_running, timeout=60_000)
    if pv.backend() == "numba":
        from patch_viewer.core.merge import kernels_numba, kernels_scatter

        assert kernels_numba.band_sum.signatures and kernels_scatter.scatter_sum.signatures


def test_3d_view_projects_the_error_with_both_signs(make_napari_viewer, qtbot):
    """A maximum-intensity projection of the signed error showed only its positive half: the
    3-D view projects |error| (sequential colormap); the 2-D view keeps the sign."""
    viewer, w = dock(make_napari_viewer, "volume", filter="gaussian", reference="filter")
    w.patch_size.value = 16
    w.stride.value = 12
    with qtbot.waitSignal(w.signals.ssim_computed, timeout=60_000):
        result = run(qtbot, w)
    signed = np.asarray(result.error)
    assert signed.min() < 0 < signed.max()  # both signs to show
    layer = viewer.layers["error"]
    lo, hi = layer.contrast_limits
    assert lo == -hi and layer.colormap.name == _layers.ERROR_COLORMAP["name"]
    viewer.dims.ndisplay = 3
    assert layer.rendering == "mip"
    np.testing.assert_array_equal(layer.data, np.abs(signed))
    assert layer.colormap.name == _layers.ABS_ERROR_COLORMAP
    assert layer.contrast_limits == [0.0, hi]
    projection = np.asarray(layer.data).max(axis=0)  # what the MIP along z draws
    np.testing.assert_array_equal(projection, np.abs(signed).max(axis=0))
    assert _layers.ABS_ERROR_CAPTION in list(viewer.layers["tile labels"].features["caption"])
    assert "maximum-intensity projection" in w.reference.tooltip
    run(qtbot, w)  # a new result in the 3-D view arrives projected too
    assert np.asarray(layer.data).min() >= 0
    viewer.dims.ndisplay = 2
    assert np.asarray(layer.data).min() < 0
    assert layer.colormap.name == _layers.ERROR_COLORMAP["name"] and layer.contrast_limits[0] < 0


def test_idle_signal_comes_once_everything_is_shown(explorer, qtbot):
    """The launcher waits on `signals.idle`, not on private attributes or on "…" in the
    read-out: idle comes after the metrics and SSIM, after an error and after a cancel."""
    _viewer, w = explorer
    with qtbot.waitSignal(w.signals.idle, timeout=30_000):
        w.filter.value = "gaussian"
        w.run()
        assert w.busy
    assert not w.busy and "SSIM: 0." in w.readout.value and "…" not in w.readout.value
    with qtbot.waitSignal(w.signals.idle, timeout=5_000):
        w.patch_size.value = 1000  # larger than the image with edge=shift: refused at once
        w.run()
    assert not w.busy and w.readout.value.startswith("⚠")
    w.patch_size.value = 32
    with qtbot.waitSignal(w.signals.idle, timeout=5_000):
        w.run()
        w.cancel()
    assert not w.busy


def test_launcher_screenshot_waits_on_the_idle_signal(make_napari_viewer, qtbot, tmp_path):
    from patch_viewer.cli import screenshot_when_idle

    viewer, w = dock(make_napari_viewer, "classic", filter="gaussian")
    from types import SimpleNamespace

    path = tmp_path / "shot.png"
    closed = []
    window = SimpleNamespace(
        screenshot=viewer.screenshot,  # the fixture closes the viewer
        close=lambda: closed.append("SSIM: 0." in w.readout.value),
    )
    screenshot_when_idle(window, w, str(path))
    with qtbot.waitSignal(w.signals.idle, timeout=30_000):
        w.run()
    qtbot.waitUntil(lambda: bool(closed), timeout=5_000)
    assert path.exists() and closed == [True]  # shot once, with every metric shown


def test_progress_before_the_run_shows_busy_is_ignored(make_napari_viewer, qtbot, monkeypatch):
    """A progress update that came before the busy display (150 ms) once raised in a slot
    (the bar's range was set only by the busy display)."""
    monkeypatch.setattr(_controller, "SHOW_BUSY_AFTER_MS", 60_000)
    monkeypatch.setattr(_controller, "PROGRESS_INTERVAL", 0.0)
    _viewer, w = dock(make_napari_viewer, "noisy", filter="median")
    w.stride.value = 4
    with qtbot.waitSignal(w.signals.idle, timeout=60_000):
        w.run()
    assert w.progress.value == w.progress.max and "SSIM" in w.readout.value


def test_the_rightmost_caption_is_not_clipped_by_the_fitted_view(explorer, qtbot):
    """The view that fits the layers cut "error (merged − reference)" at the canvas edge: the
    captions are drawn in screen pixels, so the layout keeps room right of the last tile."""
    viewer, w = explorer
    w.filter.value = "gaussian"
    run(qtbot, w)
    error = viewer.layers["error"]
    right_of_error = error.translate[-1] + error.data.shape[-1]
    labels_right = viewer.layers["tile labels"].extent.world[1][-1]
    assert labels_right >= right_of_error + 0.4 * error.data.shape[-1]


def test_a_run_that_showed_progress_ends_at_full(make_napari_viewer, qtbot, monkeypatch):
    """A one-batch run that showed busy ended with its bar at 0%."""
    monkeypatch.setattr(_controller, "SHOW_BUSY_AFTER_MS", 0)
    _viewer, w = dock(make_napari_viewer, "noisy", filter="median")  # hundreds of ms
    w.stride.value = 4
    with qtbot.waitSignal(w.signals.idle, timeout=60_000):
        w.run()
        qtbot.waitUntil(lambda: w.cancel_button.enabled, timeout=5_000)  # it showed busy
    assert w.progress.value == w.progress.max


def test_captions_shrink_with_the_tiles_on_screen(explorer, qtbot):
    """Captions are drawn in screen pixels: on small tiles they overlapped their neighbours."""
    viewer, w = explorer
    run(qtbot, w)
    labels = viewer.layers["tile labels"]
    viewer.scene.camera.zoom = 0.5  # 100 px tiles drawn 50 px wide
    small = labels.text.size
    viewer.scene.camera.zoom = 4.0
    assert small < labels.text.size <= 14 and small >= 6


def test_tune_chart_keeps_rmse_readable_beside_max_error(explorer, qtbot):
    """RMSE far below max |error| was a flat line at zero on a shared linear axis."""
    _viewer, w = explorer
    tune = w.open_tune()
    tune.points = [
        _controller.TunePoint(s, r, m, 0.01, 100 // s)
        for s, r, m in [(4, 0.01, 0.5), (8, 0.2, 3.0), (16, 2.0, 80.0)]
    ]
    tune.draw()
    assert tune.figure.axes[0].get_yscale() == "symlog"
    tune.points = [_controller.TunePoint(s, 1.0, 2.0, 0.01, 10) for s in (4, 8)]
    tune.draw()
    assert tune.figure.axes[0].get_yscale() == "linear"


def test_progress_is_set_without_a_synchronous_repaint(qtbot):
    """QProgressBar.setValue paints at once; under software OpenGL each paint composed the
    whole window inside the slot that shows a run's layers. set_progress queues the paint."""
    from magicgui.widgets import ProgressBar
    from qtpy.QtCore import QEvent, QObject

    from patch_viewer._qt._support import set_progress

    class Paints(QObject):
        count = 0

        def eventFilter(self, obj, event):
            if event.type() == QEvent.Type.Paint:
                self.count += 1
            return False

    bar = ProgressBar(value=0, min=0, max=1000)
    qtbot.addWidget(bar.native)
    paints = Paints()
    bar.native.installEventFilter(paints)
    bar.native.show()
    qtbot.waitUntil(lambda: paints.count >= 1, timeout=5_000)  # shown and painted once
    qtbot.wait(200)  # no window configuration pending (repaint() would then only queue)
    before = paints.count
    bar.value = 400  # what the explorer did: a paint inside the call
    direct = paints.count - before
    after_direct = paints.count
    set_progress(bar, 700)
    assert direct >= 1 and paints.count == after_direct
    assert bar.value == 700 and bar.native.updatesEnabled()
    qtbot.waitUntil(lambda: paints.count > after_direct, timeout=2_000)  # the queued paint
