"""Patch-wise inference: predictors, and the registry they join.

A :class:`Predictor` wraps a model (any callable on a batch of patches) whose output may
differ from its input: K channels (class probabilities), another dtype, another resolution
(a whole multiple or fraction of the patch per axis), one vector per patch, or several
outputs at once. :func:`register_predictor` adds one to ``patch_viewer.FILTERS`` and
:func:`load_callable` finds a model by name. :func:`iter_batches` cuts the batches that feed
it and :func:`select_patches` chooses the patches worth running (both in :mod:`.batches`),
and :class:`~patch_viewer.core.accumulator.Accumulator` merges the outputs wherever they were
computed. :func:`patch_viewer.process` runs the whole loop for a predictor as it does for a
filter.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from .accumulator import Accumulator
from .accumulator_args import as_numpy, parse_scale
from .batches import PatchBatch, flat_indices, iter_batches, select_patches
from .grid import PatchGrid

# The batches and the selection moved to .batches; what this module exported from there
# stays importable from here.
__all__ = [
    "Output",
    "PatchBatch",
    "PredictionError",
    "Predictor",
    "flat_indices",
    "iter_batches",
    "load_callable",
    "register_predictor",
    "select_patches",
]


class PredictionError(RuntimeError):
    """A predictor failed, or returned what its declaration (or first call) rules out."""


@dataclass(frozen=True)
class Output:
    """What a predictor returns for a batch of ``N`` patches, one per output.

    ``channels`` K (None: no channel axis), ``scale`` per spatial axis (output pixels per
    input pixel), ``per_patch`` (one vector per patch instead of an image patch) and the
    ``dtype``.
    """

    name: str
    channels: int | None
    scale: tuple[Fraction, ...]
    per_patch: bool
    dtype: np.dtype

    def describe(self, grid: PatchGrid, channels_first: bool) -> str:
        k = () if self.channels is None else (self.channels,)
        if self.per_patch:
            return f"(N, {', '.join(map(str, k))})" if k else "(N,)"
        size = tuple(int(p * f) for p, f in zip(grid.patch_size, self.scale))
        shape = (k + size) if channels_first else (size + k)
        return "(N, " + ", ".join(map(str, shape)) + ")"


@dataclass(frozen=True)
class Predictor:
    """A model run on batches of patches, whose output may differ from its input.

    Parameters
    ----------
    func : callable
        ``func(batch, **params)``: ``batch`` is ``(N, *patch_size, C)`` (``(N, *patch_size)``
        for images without a channel axis), or ``(N, C, *patch_size)`` with
        ``channels_first`` (C = 1 then). It returns an array ``(N, *out_patch, K)`` (``(N,
        K, *out_patch)`` channels-first; ``(N, *out_patch)`` without channels), one vector
        per patch ``(N, K)``, or several such arrays as a dict or tuple. NumPy arrays or
        CPU torch tensors.
    name : str, optional
        Shown in the registry, the GUI and errors (default: the function's name).
    channels, scale, dtype, per_patch : optional
        The output, declared (None: found by calling ``func`` once, on the first batch).
        Declared values are checked against every batch.
    channels_first : bool, optional
        Whether ``func`` takes and returns channels after the batch axis (torch, MONAI).
    batch_size : int, optional
        Patches per call (default 64).
    params : dict of str -> Param, optional
        Declared parameters (ranges the GUI and the command line check).

    Examples
    --------
    >>> from patch_viewer import process
    >>> probs = Predictor(lambda b: np.stack([b, 1 - b], axis=-1), name="two-class")
    >>> grid = PatchGrid((32, 32), 8, stride=4)
    >>> r = process(np.full((32, 32), 0.25), grid, probs)
    >>> r.merged.shape, float(r.merged[0, 0, 1])
    ((32, 32, 2), 0.75)
    """

    func: Callable
    name: str = ""
    channels: int | str | None = "infer"
    scale: object = None
    dtype: object = None
    per_patch: bool | None = None
    channels_first: bool = False
    batch_size: int = 64
    params: dict = field(default_factory=dict)
    doc: str = ""
    halo: Callable | None = None  # (as PatchFilter: reach for a chunked whole-image reference)

    def __post_init__(self):
        if not callable(self.func):
            raise TypeError(f"predictor `func` must be callable, got {self.func!r}")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if not self.name:
            set_("name", getattr(self.func, "__name__", "predictor"))
        if not self.doc:
            set_("doc", (getattr(self.func, "__doc__", None) or "").strip())
        b = self.batch_size
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise ValueError(f"predictor `batch_size` must be an int >= 1, got {b!r}")
        if self.dtype is not None:
            set_("dtype", np.dtype(self.dtype))
        if self.channels not in ("infer", None):
            k = self.channels
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
                raise ValueError(
                    f"predictor `channels` must be an int >= 1, None or 'infer', got {k!r}"
                )

    def validate(self, params: Mapping[str, float] | None) -> dict:
        """Parameters with defaults filled in, checked against their declared ranges."""
        from .filter_registry import PatchFilter

        return PatchFilter(self.name, self.func, self.params).validate(params)

    # ------------------------------------------------------------------ calls
    def run(self, batch: np.ndarray, params: dict, where: str) -> dict[str, np.ndarray]:
        """Call the model on ``batch``; its outputs as a dict of NumPy arrays. Exceptions
        become :class:`PredictionError` naming ``where`` (the batch)."""
        try:
            out = self.func(batch, **params)
        except Exception as exc:
            raise PredictionError(
                f"predictor {self.name!r} failed on {where} (input {tuple(batch.shape)} "
                f"{batch.dtype}): {type(exc).__name__}: {exc}"
            ) from exc
        if isinstance(out, dict):
            items = list(out.items())
        elif isinstance(out, (tuple, list)):
            items = [(f"output{k}", v) for k, v in enumerate(out)]
        else:
            items = [("output", out)]  # one output: Result.merged; by name in outputs
        if not items:
            raise PredictionError(f"predictor {self.name!r} returned no output on {where}")
        return {str(k): as_numpy(v) for k, v in items}

    def outputs(self, out: dict[str, np.ndarray], grid: PatchGrid, n: int) -> list[Output]:
        """The :class:`Output` of each array a first call returned (checked against the
        declaration)."""
        return [self._output(name, a, grid, n) for name, a in out.items()]

    def _output(self, name: str, a: np.ndarray, grid: PatchGrid, n: int) -> Output:
        nd = grid.ndim
        if a.dtype.kind not in "biuf":
            raise PredictionError(
                f"predictor {self.name!r} returned {name!r} of dtype {a.dtype}; "
                "outputs must hold real numbers"
            )
        if a.ndim == 0 or a.shape[0] != n:
            raise PredictionError(
                f"predictor {self.name!r} returned {name!r} of shape "
                f"{a.shape} for a batch of {n} patches: the first axis must "
                f"be the batch ({n})"
            )
        vector = self.per_patch if self.per_patch is not None else (a.ndim <= 2 and nd > 1)
        if vector:
            if a.ndim > 2:
                raise PredictionError(
                    f"predictor {self.name!r} is declared per_patch but "
                    f"returned {name!r} of shape {a.shape}: expected (N, K)"
                )
            k = a.shape[1] if a.ndim == 2 else None
            spec = Output(name, k, (Fraction(1),) * nd, True, a.dtype)
        else:
            if a.ndim not in (nd + 1, nd + 2):
                raise PredictionError(
                    f"predictor {self.name!r} returned {name!r} of shape {a.shape} for patches "
                    f"of {grid.patch_size}: expected (N, *patch[, K]), {nd} spatial axes"
                )
            k = None if a.ndim == nd + 1 else (a.shape[1] if self.channels_first else a.shape[-1])
            size = a.shape[1 : 1 + nd] if (k is None or not self.channels_first) else a.shape[2:]
            scale = tuple(Fraction(s, p) for s, p in zip(size, grid.patch_size))
            spec = Output(name, k, scale, False, a.dtype)
        self._check_declared(spec, grid)
        return spec

    def _check_declared(self, spec: Output, grid: PatchGrid) -> None:
        problems = []
        if self.channels not in ("infer", spec.channels):
            problems.append(f"channels {spec.channels} (declared {self.channels})")
        if self.scale is not None and parse_scale(self.scale, grid.ndim) != spec.scale:
            problems.append(f"scale {tuple(map(str, spec.scale))} (declared {self.scale})")
        if self.dtype is not None and self.dtype != spec.dtype:
            problems.append(f"dtype {spec.dtype} (declared {self.dtype})")
        if problems:
            raise PredictionError(
                f"predictor {self.name!r} returned {spec.name!r} with " + ", ".join(problems)
            )

    def check(
        self, out: dict[str, np.ndarray], specs: list[Output], grid: PatchGrid, n: int, where: str
    ) -> None:
        """Refuse a batch's outputs that differ from the first call's (names, shapes,
        dtypes)."""
        if list(out) != [s.name for s in specs]:
            raise PredictionError(
                f"predictor {self.name!r} returned outputs {list(out)} on "
                f"{where}, but {[s.name for s in specs]} on the first batch"
            )
        for spec in specs:
            a = out[spec.name]
            got = self._output(spec.name, a, grid, n) if a.ndim and a.shape[0] == n else None
            if got != spec:
                raise PredictionError(
                    f"predictor {self.name!r} returned {spec.name!r} of shape {a.shape} "
                    f"{a.dtype} on {where}; the first batch gave "
                    f"{spec.describe(grid, self.channels_first)} {spec.dtype}"
                )

    def probe(self, grid: PatchGrid, dtype: DTypeLike, params: dict | None = None) -> list[Output]:
        """The outputs, found by calling the model once on one zero patch of ``dtype``."""
        c = grid.n_channels
        shape = (1,) + grid.patch_size + (() if c is None else (c,))
        if self.channels_first:
            shape = (1, c or 1) + grid.patch_size
        out = self.run(np.zeros(shape, dtype), self.validate(params), "a probe of one patch")
        return self.outputs(out, grid, 1)

    def comparable(self, specs: list[Output], grid: PatchGrid) -> bool:
        """Whether the first output has the input's shape (an error map can be made)."""
        s = specs[0]
        return not s.per_patch and all(f == 1 for f in s.scale) and s.channels == grid.n_channels

    def accumulators(self, specs: list[Output], grid: PatchGrid, **merge) -> dict:
        """One :class:`Accumulator` per output."""
        return {
            s.name: Accumulator(grid, channels=s.channels, scale=s.scale, **merge) for s in specs
        }


def register_predictor(name: str, func: Callable | None = None, **options: Any) -> Callable:
    """Register a :class:`Predictor` under ``name`` in ``patch_viewer.FILTERS`` (so the
    command line's ``--filter`` and the Patch Explorer list it); usable as a decorator.
    ``options`` are :class:`Predictor`'s fields.

    Examples
    --------
    >>> from patch_viewer import FILTERS
    >>> @register_predictor("halves", channels=2)
    ... def halves(batch):
    ...     return np.stack([batch / 2, batch / 2], axis=-1)
    >>> FILTERS["halves"].channels
    2
    >>> del FILTERS["halves"]
    """
    from .filter_registry import FILTERS

    if not isinstance(name, str) or not name:
        raise TypeError(f"predictor `name` must be a non-empty string, got {name!r}")

    def deco(f):
        FILTERS[name] = Predictor(f, name=name, **options)
        return f

    return deco if func is None else deco(func)


def load_callable(spec: str) -> Callable:
    """The object ``spec`` names, as ``"package.module:attribute"`` (imported, never
    evaluated as text). Errors name the spec and say what is wrong.

    Examples
    --------
    >>> load_callable("math:sqrt")(4.0)
    2.0
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"a custom function is named as 'package.module:function', got {spec!r}")
    module, attr = spec.split(":")
    try:
        obj = importlib.import_module(module)
    except Exception as exc:
        raise ImportError(
            f"cannot import module {module!r} for {spec!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        if not part.isidentifier() or not hasattr(obj, part):
            raise ImportError(f"module {module!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec!r} is not callable (it is a {type(obj).__name__})")
    return obj
