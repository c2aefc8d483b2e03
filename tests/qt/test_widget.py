import math
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import patch_viewer as pv
from patch_viewer import _controller, _widget
from patch_viewer import _layers as _layers_mod
from patch_viewer._layers import TILES, PatchStack
from patch_viewer._qt._support import HINT

from .conftest import run

LAYERS = _controller.LAYER_NAMES


def test_manifest_validates_with_imports():
    out = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "patch_viewer/napari.yaml", "--imports"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "valid" in out.stdout, out.stdout + out.stderr


def test_widget_appears_in_plugins_and_layers_menu():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("patch-viewer")
    assert [w.display_name for w in manifest.contributions.widgets] == ["Patch Explorer"]
    menus = manifest.contributions.menus
    assert any(k.startswith("napari/layers/") for k in menus)
    assert {s.key for s in manifest.contributions.sample_data} == {
        "classic",
        "noisy",
        "rgb",
        "volume",
    }


def test_classic_identity_is_exact(explorer, qtbot, classic):
    viewer, w = explorer
    w.patch_size.set_value([39])
    w.stride.set_value([1])
    result = run(qtbot, w)
    layers = {name: viewer.layers[name] for name in LAYERS}
    np.testing.assert_array_equal(layers["merged"].data, classic)
    assert not np.any(layers["error"].data)
    grid = pv.PatchGrid(classic.shape, 39, 1)
    np.testing.assert_array_equal(layers["overlap weights"].data, pv.weight_map(grid))
    assert layers["overlap weights"].data.max() == 1521
    assert layers["overlap weights"].colorbar.visible
    assert layers["patches"].data.shape == (62, 62, 39, 39)
    np.testing.assert_array_equal(layers["patches"].data[5, 7], classic[5:44, 7:46])
    assert "3,844" in w.readout.value and result.merged.shape == classic.shape
    # The layers show first; the metrics, then SSIM, follow from the same worker.
    assert w._worker is not None
    with qtbot.waitSignal(w.signals.ssim_computed, timeout=10_000, raising=False) as ssim:
        pass
    if not ssim.signal_triggered:  # it may have arrived already
        assert "SSIM: 1.0000" in w.readout.value
    assert "SSIM: 1.0000" in w.readout.value
    assert "max |err|: 0 " in w.readout.value and "PSNR: inf" in w.readout.value
    lo, hi = layers["error"].contrast_limits
    assert lo == -hi  # symmetric, diverging
    assert w.index.max == 3843


def test_layers_are_updated_in_place(explorer, qtbot):
    viewer, w = explorer
    run(qtbot, w)
    before = {name: viewer.layers[name] for name in LAYERS}
    w.stride.set_value([8])
    run(qtbot, w)
    assert all(viewer.layers[name] is layer for name, layer in before.items())
    assert len(viewer.layers) == 1 + len(LAYERS)


@pytest.mark.parametrize("edge", pv.EDGE_MODES)
@pytest.mark.parametrize("window", pv.WINDOWS)
def test_edge_and_window_controls_match_the_core(explorer, qtbot, classic, edge, window):
    viewer, w = explorer
    w.patch_size.set_value([21, 17])
    w.stride.set_value([9, 11])
    w.edge.value = edge
    w.window.value = window
    if edge == "pad":
        w.pad_mode.value = "wrap"
    if window == "gaussian":
        w.sigma.value = 0.3
    run(qtbot, w)
    grid = pv.PatchGrid(classic.shape, (21, 17), (9, 11), edge=edge, pad_mode="wrap")
    params = {"sigma": 0.3} if window == "gaussian" else {}
    expected = pv.process(classic, grid, window=window, window_params=params)
    np.testing.assert_array_equal(viewer.layers["merged"].data, expected.merged)
    # shown in float32 (what the GPU takes; converted in the worker, not on the main thread)
    assert viewer.layers["overlap weights"].data.dtype == np.float32
    np.testing.assert_array_equal(
        viewer.layers["overlap weights"].data, expected.weights.astype(np.float32)
    )
    np.testing.assert_array_equal(viewer.layers["error"].data, expected.error)


@pytest.mark.parametrize("name", sorted(pv.FILTERS))
def test_every_filter_and_its_parameters(explorer, qtbot, classic, name):
    viewer, w = explorer
    w.filter.value = name
    declared = pv.FILTERS[name].params
    assert [c.name for c in w.filter_params] == list(declared)
    assert all(c.label.startswith("filter ") for c in w.filter_params)  # not the window's
    params = {}
    for control in w.filter_params:
        p = declared[control.name]
        assert (control.min, control.max) == (p.min, p.max)
        control.value = (
            p.max
            if p.kind is int and p.max < 10
            else p.default * 2
            if p.default * 2 <= p.max
            else p.default
        )
        params[control.name] = control.value
    w.reference.value = "filter"
    w.reduce.value = "max"
    run(qtbot, w)
    grid = pv.PatchGrid(classic.shape, 32, 16)
    expected = pv.process(
        classic, grid, name, filter_params=params, reduce="max", reference="filter"
    )
    np.testing.assert_allclose(viewer.layers["merged"].data, expected.merged, rtol=1e-6)
    np.testing.assert_allclose(viewer.layers["error"].data, expected.error, rtol=1e-6, atol=1e-6)


def test_click_selects_the_patch_whose_centre_is_nearest(explorer, qtbot):
    viewer, w = explorer
    run(qtbot, w)  # 32/16 on 100x100: origins 0, 16, 32, 48, 64, 68
    w.click((50.3, 70.0))
    # rows covering 50: origins 32, 48 (centres 47.5, 63.5); columns covering 70: origins 48,
    # 64, 68 (centres 63.5, 79.5, 83.5). Nearest centres: origin (32, 48), index (2, 3).
    assert w.index.value == 2 * 6 + 3
    vectors = viewer.layers["patch grid"].data
    colors = viewer.layers["patch grid"].edge_color
    highlighted = vectors[np.all(np.isclose(colors, [1.0, 0.85, 0.0, 1.0]), axis=1)]
    assert highlighted.shape[0] == _layers_mod.SELECTION_SEGMENTS  # a thick outline
    lo = highlighted[:, 0].min(axis=0)
    assert np.all((lo > [31.5 - 1, 47.5 - 1]) & (lo <= [31.5, 47.5]))  # around origin (32, 48)
    step = viewer.dims.current_step
    assert step[:2] == (2, 3)  # the patch stack shows the same patch
    w.click((-5, 3))  # outside: nothing changes
    assert w.index.value == 15


def test_selection_keeps_its_position_when_the_grid_changes(explorer, qtbot):
    _viewer, w = explorer
    run(qtbot, w)
    w.click((80.0, 20.0))
    before = w.grid.patch_origin(w.grid.patch_index(w.index.value))
    w.stride.set_value([8])
    run(qtbot, w)
    after = w.grid.patch_origin(w.grid.patch_index(w.index.value))
    assert np.abs(np.subtract(after, before)).max() <= 4  # same place, not the same flat index


def test_selector_and_sliders_follow_each_other(explorer, qtbot):
    viewer, w = explorer
    run(qtbot, w)
    w.index.value = 13  # (2, 1) on a 6x6 grid
    assert viewer.dims.current_step[:2] == (2, 1)
    step = list(viewer.dims.current_step)
    step[:2] = [4, 4]
    viewer.dims.current_step = tuple(step)
    assert w.index.value == 28


def test_grid_layer_stays_light_with_many_patches(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((700, 700), np.float32), name="big")
    _, w = viewer.window.add_plugin_dock_widget("patch-viewer", "Patch Explorer")
    w.live.value = False
    w.patch_size.set_value([16])
    w.stride.set_value([2])
    run(qtbot, w, timeout=60_000)
    assert w.grid.n_patches == 343 * 343 > 100_000
    assert viewer.layers["patch grid"].data.shape[0] < 400  # thinned lines, not 10^5 shapes


def test_rgb_is_never_patched_across_channels(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample("patch-viewer", "rgb")
    _, w = viewer.window.add_plugin_dock_widget("patch-viewer", "Patch Explorer")
    w.live.value = False
    run(qtbot, w)
    image = viewer.layers["IHC histology"].data
    merged = viewer.layers["merged"]
    assert merged.rgb
    np.testing.assert_array_equal(merged.data, image)
    assert viewer.layers["patches"].data.shape == (15, 15, 32, 32, 3)
    assert viewer.layers["error"].data.shape == image.shape[:2]


def test_error_limits_match_the_displayed_error(make_napari_viewer, qtbot):
    """RGB errors are shown channel-averaged; the symmetric limits follow what is shown."""
    viewer = make_napari_viewer()
    viewer.open_sample("patch-viewer", "rgb")
    _, w = viewer.window.add_plugin_dock_widget("patch-viewer", "Patch Explorer")
    w.live.value = False
    w.filter.value = "gaussian"
    with qtbot.waitSignal(w.signals.ssim_computed, timeout=30_000):
        run(qtbot, w)
    error = viewer.layers["error"]
    lo, hi = error.contrast_limits
    shown = np.abs(np.asarray(error.data))
    assert -lo == hi == pytest.approx(float(np.percentile(shown, 99.5)))
    assert hi < shown.max()  # outliers do not wash the seams out
    assert error.colorbar.visible


@pytest.mark.parametrize("mode", _widget.VOLUME_MODES)
def test_volume_3d_patches_or_2d_per_plane(make_napari_viewer, qtbot, mode):
    viewer = make_napari_viewer()
    viewer.open_sample("patch-viewer", "volume")
    _, w = viewer.window.add_plugin_dock_widget("patch-viewer", "Patch Explorer")
    w.live.value = False
    w.volume_mode.value = mode
    assert w.patch_size.n_axes == (3 if mode == _widget.VOLUME_MODES[0] else 2)
    w.patch_size.set_value([16])
    w.stride.set_value([12])
    run(qtbot, w)
    volume = viewer.layers["blobs 3-D"].data
    np.testing.assert_array_equal(viewer.layers["merged"].data, volume)
    shape = viewer.layers["patches"].data.shape
    assert shape == (
        (5, 5, 5, 16, 16, 16) if mode == _widget.VOLUME_MODES[0] else (5, 5, 64, 16, 16)
    )
    w.click(tuple(viewer.dims.point[:-3]) + (30, 40, 50))
    assert w.index.value > 0
    if mode == _widget.VOLUME_MODES[0]:  # the patch tile follows the selected patch in z
        index = w.grid.patch_index(w.index.value)
        z0 = w.grid.patch_origin(index)[0]
        assert viewer.layers["patches"].translate[-3] == z0 > 0
        assert z0 <= viewer.dims.current_step[-3] < z0 + 16


@pytest.mark.parametrize("backend", ["dask", "zarr", "multiscale"])
def test_dask_and_zarr_layers_stay_lazy(make_napari_viewer, qtbot, tmp_path, backend):
    import dask.array as da
    import zarr

    image = np.random.default_rng(0).random((300, 260)).astype(np.float32)
    if backend == "zarr":
        data = zarr.open_array(
            str(tmp_path / "im.zarr"),
            mode="w",
            shape=image.shape,
            chunks=(128, 128),
            dtype=image.dtype,
        )
        data[...] = image
    else:
        data = da.from_array(image, chunks=100)
    viewer = make_napari_viewer()
    if backend == "multiscale":
        viewer.add_image(
            [data, data[::2, ::2]], name="lazy", multiscale=True, contrast_limits=(0, 1)
        )
    else:
        viewer.add_image(data, name="lazy", contrast_limits=(0, 1))
    _, w = viewer.window.add_plugin_dock_widget("patch-viewer", "Patch Explorer")
    w.live.value = False
    w.image.value = viewer.layers["lazy"]
    w.patch_size.set_value([32])
    w.stride.set_value([12])
    w.filter.value = "gaussian"
    w.window.value = "hann"
    with qtbot.waitSignal(w.signals.ssim_computed, timeout=60_000) as metrics:
        run(qtbot, w, timeout=60_000)
    for name in ("merged", "error", "overlap weights"):
        assert isinstance(viewer.layers[name].data, da.Array), name  # napari computes it
    expected = pv.process(image, pv.PatchGrid(image.shape, 32, 12), "gaussian", window="hann")
    np.testing.assert_allclose(
        np.asarray(viewer.layers["merged"].data), expected.merged, rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(viewer.layers["overlap weights"].data), expected.weights)
    assert viewer.layers["overlap weights"].contrast_limits[1] == pytest.approx(
        expected.weights.max()
    )
    assert metrics.args[0] == pytest.approx(expected.metrics["ssim"], rel=1e-6)
    lo, hi = viewer.layers["error"].contrast_limits
    assert -lo == hi == pytest.approx(expected.metrics["max_abs"], rel=1e-6)
    assert f"RMSE: {expected.metrics['rmse']:.3g}" in w.readout.value
    patches = viewer.layers["patches"].data
    assert isinstance(patches, _layers_mod.LazyPatchStack)
    np.testing.assert_array_equal(patches[3, 4], pv.extract_patches(image, w.grid)[3, 4])


def test_bad_parameters_show_a_message_and_keep_the_last_layers(explorer, qtbot):
    viewer, w = explorer
    run(qtbot, w)
    merged = viewer.layers["merged"].data.copy()
    w.patch_size.set_value([150])
    with qtbot.waitSignal(w.signals.failed, timeout=5_000) as blocker:
        w.run()
    assert "patch_size" in blocker.args[0] and "1..100" in blocker.args[0]
    assert "patch_size" in w.readout.value
    np.testing.assert_array_equal(viewer.layers["merged"].data, merged)
    assert w.stride.boxes[1].min == 1  # stride 0 cannot even be entered


def test_memory_estimate_over_the_limit_is_refused(explorer, qtbot, monkeypatch):
    _viewer, w = explorer
    monkeypatch.setattr(_controller, "GUI_MAX_BYTES", 1000)
    with qtbot.waitSignal(w.signals.failed, timeout=5_000) as blocker:
        w.run()
    assert "raise the stride or shrink the patch" in blocker.args[0]
    assert "1000 B allowed" in blocker.args[0] and "max_bytes" not in blocker.args[0]


def test_removing_or_renaming_layers_never_raises(explorer, qtbot):
    viewer, w = explorer
    run(qtbot, w)
    viewer.layers.remove("merged")
    viewer.layers["error"].name = "my error"
    viewer.layers.remove("camera 100x100")
    w.run()  # no image left: a neutral hint, not a crash
    assert w.readout.value == HINT
    viewer.open_sample("patch-viewer", "classic")
    w.image.reset_choices()
    run(qtbot, w)
    assert "merged" in viewer.layers and "my error" in viewer.layers


def test_newest_parameters_win(explorer, qtbot):
    viewer, w = explorer
    w.filter.value = "median"
    w.patch_size.set_value([24])
    w.stride.set_value([1])  # slow: 5,929 median-filtered patches
    w.run()
    first = w._worker
    w.stride.set_value([19])
    result = run(qtbot, w)
    assert result.grid.stride == (19, 19)
    with qtbot.waitSignal(first.finished, timeout=30_000, raising=False):
        pass
    assert w.grid.stride == (19, 19)
    assert viewer.layers["patches"].data.shape[:2] == (5, 5)


def test_live_preview_reruns_on_change(explorer, qtbot):
    _viewer, w = explorer
    w.live.value = True
    with qtbot.waitSignal(w.signals.computed, timeout=10_000):
        w.stride.set_value([10])
    assert w.grid.stride == (10, 10)


def test_layout_and_screenshot_are_not_blank(explorer, qtbot):
    viewer, w = explorer
    run(qtbot, w)
    for name, (_, col) in TILES.items():
        assert viewer.layers[name].translate[-1] == pytest.approx(
            col * (100 + _layers_mod.tile_gap((100, 100)))
        )
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.std() > 10


def test_patch_stack_is_lazy_and_exact():
    image = np.arange(60 * 70, dtype=np.float32).reshape(60, 70)
    grid = pv.PatchGrid(image.shape, 13, 4)  # irregular (shift): extract would copy
    stack = PatchStack(image, grid)
    expected = pv.extract_patches(image, grid)
    assert stack.shape == expected.shape
    np.testing.assert_array_equal(stack[3, 15], expected[3, 15])
    np.testing.assert_array_equal(stack[2:5, -1, ::2], expected[2:5, -1, ::2])
    np.testing.assert_array_equal(np.asarray(stack), expected)


def test_sample_data_loaders():
    from patch_viewer import _sample_data as s

    shapes = {
        "classic": (100, 100),
        "noisy": (303, 384),
        "rgb": (256, 256, 3),
        "volume": (64, 64, 64),
    }
    for name, shape in shapes.items():
        [(data, meta)] = getattr(s, name)()
        assert data.shape == shape and data.dtype == np.uint8 and meta["name"]


def test_wheel_ships_the_sample_data_and_manifest(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    [wheel] = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("camera_100.png", "coins_noisy.png", "ihc_256.png", "blobs3d_64.npy"):
        assert f"patch_viewer/sample_data/{f}" in names
    assert "patch_viewer/napari.yaml" in names


def test_launcher(tmp_path):
    help_ = subprocess.run(
        [sys.executable, "-m", "patch_viewer", "--help"], capture_output=True, text=True
    )
    assert help_.returncode == 0 and "--patch-size" in help_.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "patch_viewer", str(tmp_path / "no.png")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "no such file" in missing.stderr
    png = tmp_path / "shot.png"
    shot = subprocess.run(
        [
            sys.executable,
            "-m",
            "patch_viewer",
            "--patch-size",
            "25",
            "--stride",
            "5",
            "--filter",
            "gaussian",
            "--screenshot",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    from skimage import io

    img = io.imread(png)
    assert img.shape[0] > 500 and img.std() > 10
    assert not math.isnan(img.mean())


def test_progress_is_throttled_but_every_batch_still_yields():
    from patch_viewer._controller import throttle_progress

    closed = []

    def run():
        try:
            for k in range(5):
                yield (k, 5)
            return "result"
        finally:
            closed.append(True)

    gen = throttle_progress(run(), interval=3600)
    items = []
    try:
        while True:
            items.append(next(gen))
    except StopIteration as stop:
        assert stop.value == "result"
    assert items == [None] * 5  # one per batch (so quit() is seen), none shown: a short run
    assert [(p.done, p.total) for p in throttle_progress(run(), interval=0)] == [
        (k, 5) for k in range(5)
    ]
    gen = throttle_progress(run(), interval=0)
    next(gen)
    gen.close()  # cancelling the worker closes the run
    assert closed == [True, True, True]
