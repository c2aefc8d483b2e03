"""The Patch Explorer's view: magicgui/Qt widgets and the layers it maintains."""

from ._explorer import PatchExplorer

__all__ = ["PatchExplorer"]
