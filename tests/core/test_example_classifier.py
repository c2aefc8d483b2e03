"""The README's worked example, end to end: a scikit-image trainable pixel classifier (random
forest) run patch-wise with K = 3 class probabilities, against the same classifier on the
whole image."""

import importlib.util
from pathlib import Path

import dask.array as da
import imageio.v3 as iio
import numpy as np

import patch_viewer as pv

ROOT = Path(__file__).parents[2]


def _example():
    spec = importlib.util.spec_from_file_location(
        "example_classifier", ROOT / "benchmarks" / "example_classifier.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pixel_classifier_patch_wise_with_class_probabilities():
    image = iio.imread(ROOT / "sample_data" / "ihc_256.png")
    model, scribbles = _example().train(image)
    grid = pv.PatchGrid(image.shape, 64, stride=32, channel_axis=-1)
    rmse = {}
    for window in ("uniform", "hann"):
        r = pv.process(image, grid, model, window=window, reference="filter")
        assert r.merged.shape == (256, 256, 3) and r.merged.dtype == np.float32
        np.testing.assert_allclose(r.merged.sum(axis=-1), 1, atol=1e-5)  # still probabilities
        np.testing.assert_allclose(r.reference.sum(axis=-1), 1, atol=1e-5)
        labels = r.merged.argmax(axis=-1) + 1
        drawn = scribbles > 0
        assert (labels[drawn] == scribbles[drawn]).mean() > 0.95  # it learned its scribbles
        assert np.bincount(labels.ravel(), minlength=4)[1:].min() > 0.05 * labels.size
        rmse[window] = r.metrics["rmse"]
    # Seams: the classifier's features see the patch border; the hann window hides them.
    assert 0 < rmse["hann"] < 0.5 * rmse["uniform"] < 0.05
    lazy = pv.process(da.from_array(image, chunks=(100, 128, 3)), grid, model, window="hann")
    np.testing.assert_array_equal(lazy.merged.compute(), r.merged)
