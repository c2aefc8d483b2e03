"""The README's worked example, with its figure: a scikit-image trainable pixel classifier
(random forest on multiscale_basic_features) run patch-wise through ``pv.process`` with K = 3
class probabilities, and its seam error against the same classifier on the whole image, for
the uniform and the hann window.

    python benchmarks/example_classifier.py   # the table, and figures/classifier_seams.png
"""

import time
from functools import partial
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from skimage.feature import multiscale_basic_features
from skimage.future import fit_segmenter
from sklearn.ensemble import RandomForestClassifier

import patch_viewer as pv

ROOT = Path(__file__).parents[1]
SCRIBBLES = {
    1: [(170, 40), (205, 90), (175, 60)],  # stroma
    2: [(180, 100), (152, 168), (144, 118), (126, 169)],  # nuclei (hematoxylin)
    3: [(33, 200), (233, 140), (20, 230)],
}  # DAB-stained epithelium


def train(image):
    features = partial(multiscale_basic_features, channel_axis=-1, sigma_min=1, sigma_max=8)
    scribbles = np.zeros(image.shape[:2], np.uint8)
    for label, corners in SCRIBBLES.items():
        for r, c in corners:
            scribbles[r : r + 5, c : c + 5] = label
    clf = fit_segmenter(
        scribbles,
        features(image),
        RandomForestClassifier(n_estimators=50, max_depth=10, random_state=0),
    )

    def classify(batch):
        """(N, h, w, 3) RGB patches -> (N, h, w, 3) class probabilities."""
        return np.stack(
            [
                clf.predict_proba(features(p).reshape(-1, clf.n_features_in_)).reshape(
                    p.shape[:2] + (3,)
                )
                for p in batch
            ]
        ).astype(np.float32)

    return pv.Predictor(classify, channels=3, batch_size=16), scribbles


def main():
    image = iio.imread(ROOT / "sample_data" / "ihc_256.png")
    model, scribbles = train(image)
    grid = pv.PatchGrid(image.shape, 64, stride=32, channel_axis=-1)
    results = {}
    print(f"{'window':8s} | seam RMSE | max |error| | time")
    for window in ("uniform", "hann"):
        t = time.perf_counter()
        results[window] = r = pv.process(image, grid, model, window=window, reference="filter")
        print(
            f"{window:8s} | {r.metrics['rmse']:9.4f} | {r.metrics['max_abs']:11.3f} | "
            f"{time.perf_counter() - t:.1f} s"
        )
    _figure(image, scribbles, results)


def _figure(image, scribbles, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(16, 4.4))
    ax[0].imshow(image)
    ys, xs = np.nonzero(scribbles)
    colours = np.array(["w", "red", "lime", "blue"])[scribbles[ys, xs]]
    ax[0].scatter(xs, ys, c=colours, s=3)
    ax[0].set_title("ihc_256 + scribbles\n(stroma, nuclei, DAB)")
    ax[1].imshow(results["hann"].merged)
    ax[1].set_title("merged probabilities (hann)\nstroma = R, nuclei = G, DAB = B")
    for a, window in zip(ax[2:], ("uniform", "hann")):
        r = results[window]
        im = a.imshow(np.abs(r.error).max(-1), vmin=0, vmax=0.3, cmap="magma")
        a.set_title(f"seam error, {window} window\nRMSE {r.metrics['rmse']:.3f}")
    for a in ax:
        a.axis("off")
    fig.colorbar(im, ax=list(ax), fraction=0.02, label="max over classes |p - p(whole image)|")
    fig.savefig(
        ROOT / "benchmarks" / "figures" / "classifier_seams.png", dpi=80, bbox_inches="tight"
    )


if __name__ == "__main__":
    main()
