"""The public API is annotated (issue 15): every parameter and return of every function and
public method that ``patch_viewer`` exports, so that type checkers see it (``py.typed``)."""

import inspect
from pathlib import Path

import patch_viewer as pv

_SKIP = {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}


def _callables():
    for name in pv.__all__:
        obj = getattr(pv, name)
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            for attr, value in vars(obj).items():
                if inspect.isfunction(value) and (attr == "__init__" or not attr.startswith("_")):
                    yield f"{name}.{attr}", value


def test_every_public_function_is_annotated():
    missing = []
    for name, func in _callables():
        sig = inspect.signature(func)
        missing += [
            f"{name}({p.name})"
            for p in sig.parameters.values()
            if p.name not in ("self", "cls") and p.kind not in _SKIP and p.annotation is p.empty
        ]
        if sig.return_annotation is sig.empty and not name.endswith("__init__"):
            missing.append(f"{name} -> ?")
    assert missing == []


def test_the_package_ships_its_type_marker():
    assert (Path(pv.__file__).parent / "py.typed").is_file()
