import pytest

from patch_viewer._sample_data import load


@pytest.fixture
def explorer(make_napari_viewer, qtbot):
    """A viewer with the classic sample and the Patch Explorer docked through the manifest."""
    viewer = make_napari_viewer()
    viewer.open_sample("patch-viewer", "classic")
    _, widget = viewer.window.add_plugin_dock_widget("patch-viewer", "Patch Explorer")
    widget.live.value = False  # tests run explicitly (this also cancels the pending live run)
    return viewer, widget


def run(qtbot, widget, timeout=30_000):
    """Run and wait for the layers to show the result."""
    with qtbot.waitSignal(widget.signals.computed, timeout=timeout) as blocker:
        widget.run()
    return blocker.args[0]


@pytest.fixture
def classic():
    return load("camera_100.png")


@pytest.fixture(scope="session", autouse=True)
def _kernels_loaded():
    """Load (on a cold cache: compile) the compiled kernels once before the GUI tests: the
    explorer warms them up in a worker as it docks, and on a fresh checkout that compile
    (a minute or more) would hold the first runs past their signal timeouts."""
    import patch_viewer as pv

    pv.warm_up()
