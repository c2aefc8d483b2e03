"""npe2 sample-data providers: small real images from ``sample_data/`` (shipped in the wheel)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

_HERE = Path(__file__).parent
# Installed wheel: patch_viewer/sample_data; source checkout (editable): ../sample_data.
_CANDIDATES = (_HERE / "sample_data", _HERE.parent / "sample_data")


def sample_path(name: str) -> Path:
    """Path of a bundled sample file."""
    for folder in _CANDIDATES:
        path = folder / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"sample file {name!r} not found in {[str(c) for c in _CANDIDATES]}")


def load(name: str) -> np.ndarray:
    """Read a bundled sample as an array (with the package's one reader, :mod:`.io`)."""
    from .io import read_image

    return read_image(sample_path(name))


def classic():
    return [(load("camera_100.png"), {"name": "camera 100x100"})]


def noisy():
    return [(load("coins_noisy.png"), {"name": "noisy coins"})]


def rgb():
    return [(load("ihc_256.png"), {"name": "IHC histology", "rgb": True})]


def volume():
    return [(load("blobs3d_64.npy"), {"name": "blobs 3-D"})]
