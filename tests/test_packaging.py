"""The installed distribution's metadata agrees with the package: one version, the licence
declared the PEP 639 way and shipped."""

from importlib import metadata

import patch_viewer

DIST = "patch-viewer"


def test_version_is_single_sourced():
    # pyproject.toml reads the version from patch_viewer/__init__.py (hatch dynamic version).
    assert metadata.version(DIST) == patch_viewer.__version__


def test_license_is_an_spdx_expression_with_its_text():
    meta = metadata.metadata(DIST)
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert "LICENSE" in meta.get_all("License-File")
    # and no legacy License classifier beside it (PEP 639 forbids both)
    assert not any(c.startswith("License ::") for c in meta.get_all("Classifier"))


def test_every_core_module_declares_its_public_names():
    import importlib
    import pkgutil

    from patch_viewer import core

    for info in pkgutil.walk_packages(core.__path__, core.__name__ + "."):
        module = importlib.import_module(info.name)
        names = getattr(module, "__all__", None)
        assert names is not None, f"{info.name} has no __all__"
        assert not [n for n in names if not hasattr(module, n)], info.name
        assert not [n for n in names if n.startswith("_")], info.name
