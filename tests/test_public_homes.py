"""What modules share has a public home, and the layer names are defined once (issue 13)."""

import ast
from pathlib import Path

import patch_viewer
from patch_viewer._layers import LAYER_NAMES

PACKAGE = Path(patch_viewer.__file__).parent
#: `patches` is also a column of the batch command's metrics CSV: another contract.
CSV_COLUMN = {("batch.py", "patches"), ("batch_run.py", "patches")}
#: `merged` and `error` are also keys of `process(buffers=)` (the names of Result's fields),
#: written once, in the core's BUFFER_NAMES: another contract.
CSV_COLUMN |= {("pipeline_runs.py", "merged"), ("pipeline_runs.py", "error")}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"))


def test_layer_names_are_written_once():
    seen = [
        (path.relative_to(PACKAGE).as_posix(), node.value)
        for path, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and node.value in LAYER_NAMES
        and (path.name, node.value) not in CSV_COLUMN
    ]
    assert sorted(seen) == sorted(("_layers.py", name) for name in LAYER_NAMES)


def test_no_module_imports_a_private_name_from_another():
    """What two modules share has a public home: no module imports a ``_name`` from another
    of ours, and the GUI, the launcher and the batch command use no ``core._module``."""
    bad = []
    for path, tree in _modules():
        rel = path.relative_to(PACKAGE)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.level > 0):
                continue
            module = (node.module or "").split(".")
            base = path.parent.joinpath(*[".."] * (node.level - 1), *module).resolve()
            in_core = "core" in module and rel.parts[0] != "core"
            if in_core and any(p.startswith("_") for p in module[module.index("core") :]):
                bad.append((rel.as_posix(), ".".join(module)))
            for alias in node.names:
                is_module = (base / f"{alias.name}.py").exists() or (base / alias.name).is_dir()
                if alias.name.startswith("_") and not alias.name.startswith("__") and not is_module:
                    bad.append((rel.as_posix(), f"{'.'.join(module)}.{alias.name}"))
    assert bad == []


def test_core_modules_the_gui_uses_declare_their_public_names():
    from patch_viewer.core import checks, extract, metrics

    for module, names in [
        (checks, ["format_bytes", "is_lazy"]),
        (extract, ["sliding_patches"]),
        (metrics, ["iter_ssim"]),
    ]:
        assert set(names) <= set(module.__all__)
    assert {"format_bytes", "is_lazy", "max_weight", "sliding_patches"} <= set(patch_viewer.__all__)
