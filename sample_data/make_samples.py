"""Regenerate the sample images from scikit-image's bundled data (no download needed).

python sample_data/make_samples.py
"""

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage import data, io, transform, util

HERE = Path(__file__).parent


def main():
    camera = transform.resize(data.camera(), (100, 100), anti_aliasing=True)
    io.imsave(HERE / "camera_100.png", util.img_as_ubyte(camera), check_contrast=False)

    rng = np.random.default_rng(2024)
    coins = data.coins().astype(np.float64) + rng.normal(0, 20, data.coins().shape)
    io.imsave(
        HERE / "coins_noisy.png",
        np.clip(coins, 0, 255).round().astype(np.uint8),
        check_contrast=False,
    )

    io.imsave(
        HERE / "ihc_256.png", data.immunohistochemistry()[128:384, 128:384], check_contrast=False
    )

    blobs = data.binary_blobs(
        length=64, n_dim=3, volume_fraction=0.3, blob_size_fraction=0.15, rng=7
    ).astype(np.float64)
    volume = ndi.gaussian_filter(blobs, 1.5)
    np.save(HERE / "blobs3d_64.npy", util.img_as_ubyte(volume / volume.max()))


if __name__ == "__main__":
    main()
