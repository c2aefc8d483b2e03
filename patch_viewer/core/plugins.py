"""Filters and predictors from other installed packages: the ``patch_viewer.filters``
entry-point group.

A package contributes in its ``pyproject.toml``::

    [project.entry-points."patch_viewer.filters"]
    denoise = "my_package.filters:denoise"

where ``denoise`` is a :class:`~patch_viewer.core.filter_registry.PatchFilter` or a
:class:`~patch_viewer.core.predict.Predictor` (registered under the entry point's name), or a
list of them (each under its own name). They join ``patch_viewer.FILTERS`` when patch_viewer
is imported, so the command line's ``--filter`` and the Patch Explorer list them. A package
that fails to load is skipped with a warning naming it; it never breaks the import, and never
replaces a built-in filter.
"""

from __future__ import annotations

import dataclasses
import warnings
from importlib.metadata import entry_points

# From .filters rather than .filter_registry: importing it registers the built-in filters,
# which _BUILTIN records before any plugin joins.
from .filters import FILTERS, PatchFilter
from .predict import Predictor

__all__ = ["GROUP", "load_entry_points"]

GROUP = "patch_viewer.filters"


def load_entry_points(group: str = GROUP) -> list[str]:
    """Register the filters of every installed entry point of ``group``; returns their
    names."""
    builtin = set(_BUILTIN)
    added = []
    for ep in entry_points(group=group):
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the import
            warnings.warn(
                f"patch_viewer: filter plugin {ep.name!r} ({ep.value}) failed to "
                f"load and is skipped: {type(exc).__name__}: {exc}",
                stacklevel=2,
            )
            continue
        items = obj if isinstance(obj, (list, tuple)) else [obj]
        for item in items:
            if not isinstance(item, (PatchFilter, Predictor)):
                warnings.warn(
                    f"patch_viewer: filter plugin {ep.name!r} ({ep.value}) gave a "
                    f"{type(item).__name__}, not a PatchFilter or Predictor; skipped",
                    stacklevel=2,
                )
                continue
            named = item
            if not isinstance(obj, (list, tuple)) and item.name != ep.name:
                named = dataclasses.replace(item, name=ep.name)
            if named.name in builtin:
                warnings.warn(
                    f"patch_viewer: filter plugin {ep.name!r} would replace the "
                    f"built-in filter {named.name!r}; skipped",
                    stacklevel=2,
                )
                continue
            FILTERS[named.name] = named
            added.append(named.name)
    return added


_BUILTIN = tuple(FILTERS)
