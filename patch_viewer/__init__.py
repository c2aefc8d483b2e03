"""patch_viewer: slice images into overlapping patches, process each patch, merge them back.

Importing this package pulls in NumPy, SciPy and scikit-image only (no Qt, napari or magicgui);
the napari plugin lives in private modules that napari loads through the manifest.
"""

from . import core
from .core import *  # noqa: F403

# The one place the version is written: pyproject.toml reads it (hatch dynamic version).
__version__ = "0.1.0"
__all__ = ["__version__"]
__all__ += core.__all__
