"""Patch-wise inference: predictors, batches of patches to feed them, and patch selection.

A :class:`Predictor` wraps a model (any callable on a batch of patches) whose output may
differ from its input: K channels (class probabilities), another dtype, another resolution
(a whole multiple or fraction of the patch per axis), one vector per patch, or several
outputs at once. :func:`iter_batches` cuts the batches that feed it, :func:`select_patches`
chooses the patches worth running, and :class:`~patch_viewer.core.accumulator.Accumulator`
merges the outputs wherever they were computed. :func:`patch_viewer.process` runs the whole
loop for a predictor as it does for a filter.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ._layout import pad_canonical, to_canonical, window_view
from .accumulator import Accumulator
from .accumulator_args import parse_scale
from .checks import check_grid, positive_int
from .grid import PatchGrid

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


class PatchBatch(NamedTuple):
    """One batch of patches: ``patches`` (``(N, *patch_size[, C])``, or ``(N, C, *patch_size)``
    channels-first), their flat ``indices`` into the grid and their spatial ``origins``."""

    patches: np.ndarray
    indices: np.ndarray
    origins: np.ndarray


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
        from .filters import PatchFilter

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
        return {str(k): _numpy(v) for k, v in items}

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


def _numpy(a) -> np.ndarray:
    if type(a).__module__.startswith("torch"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


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
    from .filters import FILTERS

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


# --------------------------------------------------------------------------- batches
def iter_batches(
    image: ArrayLike,
    grid: PatchGrid,
    batch_size: int = 64,
    *,
    indices: ArrayLike | None = None,
    channels_first: bool = False,
) -> Iterator[PatchBatch]:
    """Batches of patches of ``image`` with their indices, to feed a model.

    Parameters
    ----------
    image : array_like
        One image of ``grid.image_shape``.
    grid : PatchGrid
        The patch geometry (``edge="pad"`` pads as the grid says, with ``pad_value``).
    batch_size : int, optional
        Patches per batch (the last may be smaller).
    indices : array_like of int, optional
        Flat patch indices to yield, in this order (e.g. from :func:`select_patches`).
        Default: every patch, in C order.
    channels_first : bool, optional
        ``(N, C, *patch_size)`` (C = 1 for images without a channel axis) as torch and MONAI
        expect, instead of ``(N, *patch_size[, C])``.

    Yields
    ------
    PatchBatch
        ``(patches, indices, origins)``; ``patches`` is a fresh C-contiguous array the model
        may keep or modify.

    Examples
    --------
    >>> grid = PatchGrid((6, 8), 4, stride=2)
    >>> [b.patches.shape for b in iter_batches(np.zeros((6, 8)), grid, 4)]
    [(4, 4, 4), (2, 4, 4)]
    >>> next(iter_batches(np.zeros((6, 8)), grid, 4, channels_first=True)).patches.shape
    (4, 1, 4, 4)
    """
    from .checks import check_image

    check_grid(grid)
    batch_size = positive_int(batch_size, "batch_size")
    image = check_image(image, grid)
    if image.shape != grid.image_shape:
        raise ValueError(
            f"`image` must have the grid's image_shape {grid.image_shape} (one "
            f"image), got {image.shape}"
        )
    order = np.arange(grid.n_patches) if indices is None else flat_indices(indices, grid)
    return _batches(image, grid, batch_size, order, channels_first)


def _batches(image, grid, batch_size, order, channels_first):
    view = window_view(pad_canonical(to_canonical(image, grid, False), grid), grid)[0]
    nd = grid.ndim
    origins = (
        np.stack([o[i] for o, i in zip(grid.origins, np.unravel_index(order, grid.grid_shape))], -1)
        if len(order)
        else np.zeros((0, nd), np.int64)
    )
    for start in range(0, len(order), batch_size):
        org = origins[start : start + batch_size]
        patches = view[tuple(org.T)]  # (N, *patch, C): a gathered copy
        if channels_first:
            patches = np.ascontiguousarray(np.moveaxis(patches, -1, 1))
        elif grid.channel_axis is None:
            patches = patches[..., 0]
        yield PatchBatch(patches, order[start : start + batch_size].copy(), org.copy())


def flat_indices(indices, grid: PatchGrid) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.size == 0:
        return np.zeros(0, np.int64)
    if idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise TypeError(
            f"`indices` must be a 1-D array of flat patch indices (ints), got "
            f"shape {idx.shape} dtype {idx.dtype}"
        )
    bad = (idx < 0) | (idx >= grid.n_patches)
    if bad.any():
        raise IndexError(
            f"`indices` must be in 0..{grid.n_patches - 1} (grid "
            f"{grid.grid_shape}), got {idx[bad][:5].tolist()}"
        )
    return idx.astype(np.int64)


# --------------------------------------------------------------------------- selection
def select_patches(
    grid: PatchGrid,
    *,
    mask: ArrayLike | None = None,
    min_fraction: float = 0.5,
    image: ArrayLike | None = None,
    predicate: Callable | None = None,
    indices: ArrayLike | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Flat indices of the patches worth processing (sorted, unique).

    Every criterion given must hold (they combine with "and"):

    - ``mask`` (the image's spatial shape, truthy where the tissue, cell, ... is): the
      patch's fraction of mask pixels is at least ``min_fraction`` (padding counts as not
      masked);
    - ``predicate(patches) -> bool array (N,)``, called on batches of ``image``'s patches
      (as :func:`iter_batches` yields them);
    - ``indices``: a list of flat indices.

    Examples
    --------
    >>> grid = PatchGrid((8, 8), 4, stride=4)
    >>> mask = np.zeros((8, 8), bool); mask[:4, :3] = True
    >>> select_patches(grid, mask=mask, min_fraction=0.5).tolist()
    [0]
    >>> image = np.arange(64.0).reshape(8, 8)
    >>> select_patches(grid, image=image, predicate=lambda p: p.mean(axis=(1, 2)) > 30).tolist()
    [2, 3]
    """
    check_grid(grid)
    if mask is None and predicate is None and indices is None:
        raise TypeError("select_patches needs at least one of `mask`, `predicate`, `indices`")
    keep = np.ones(grid.n_patches, bool)
    if indices is not None:
        chosen = np.zeros(grid.n_patches, bool)
        chosen[flat_indices(indices, grid)] = True
        keep &= chosen
    if mask is not None:
        keep &= mask_fraction(mask, grid) >= _fraction(min_fraction)
    if predicate is not None:
        if image is None:
            raise TypeError("`predicate` needs the `image` whose patches it judges")
        if not callable(predicate):
            raise TypeError(f"`predicate` must be callable, got {predicate!r}")
        candidates = np.flatnonzero(keep)
        for batch in iter_batches(image, grid, batch_size, indices=candidates):
            verdict = np.asarray(predicate(batch.patches))
            if verdict.shape != batch.indices.shape:
                raise ValueError(
                    f"`predicate` must return one bool per patch, shape "
                    f"{batch.indices.shape}, got shape {verdict.shape}"
                )
            keep[batch.indices] = verdict.astype(bool)
    return np.flatnonzero(keep)


def _fraction(value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.number))
        or not 0 <= value <= 1
    ):
        raise ValueError(f"`min_fraction` must be a number in [0, 1], got {value!r}")
    return float(value)


def mask_fraction(mask, grid: PatchGrid) -> np.ndarray:
    """Per patch (flat, C order), the fraction of its pixels where ``mask`` is true, from a
    summed-area table: O(image + patches) whatever the patch size."""
    mask = np.asarray(mask)
    if mask.shape != grid.spatial_shape:
        raise ValueError(
            f"`mask` must have the image's spatial shape {grid.spatial_shape}, got {mask.shape}"
        )
    nd = grid.ndim
    table = np.zeros(tuple(m + 1 for m in grid.padded_shape), np.int64)
    table[tuple(slice(1, n + 1) for n in grid.spatial_shape)] = mask.astype(bool)
    for ax in range(nd):
        np.cumsum(table, axis=ax, out=table)
    origins = np.meshgrid(*grid.origins, indexing="ij")
    total = np.zeros(grid.grid_shape, np.int64)
    for corner in np.ndindex((2,) * nd):
        at = tuple(o + c * p for o, c, p in zip(origins, corner, grid.patch_size))
        total += (-1) ** (nd - sum(corner)) * table[at]
    return (total / math.prod(grid.patch_size)).ravel()
