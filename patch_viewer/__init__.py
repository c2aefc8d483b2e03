"""patch_viewer: slice images into overlapping patches, process each patch, merge them back.

Importing this package pulls in NumPy, SciPy and scikit-image only (no Qt, napari or magicgui);
the napari plugin lives in private modules that napari loads through the manifest.
"""

from .core import *  # noqa: F403
from .core import __all__ as _core_all

__version__ = "0.1.0"
__all__ = ["__version__", *_core_all]
