"""Compatibility shim: the Patch Explorer lives in :mod:`patch_viewer._qt` (the view) and
:mod:`patch_viewer._controller` (the Qt-free model)."""

from ._controller import GUI_MAX_BYTES, LAYER_NAMES, VOLUME_MODES
from ._qt import PatchExplorer

__all__ = ["GUI_MAX_BYTES", "LAYER_NAMES", "VOLUME_MODES", "PatchExplorer"]
