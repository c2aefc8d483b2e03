"""The filter registry: declared parameters, named per-patch filters, and ``FILTERS``.

A filter is called as ``func(stack, spatial_axes, **params)``: ``stack`` holds many patches (and
possibly channels), ``spatial_axes`` names the axes of one patch. It returns an array of the same
shape and never mixes values between patches. :class:`PatchFilter` names a filter and checks its
parameters (each a :class:`Param` with a default and a range, from which the GUI builds its
controls) and its output's shape; :func:`register_filter` adds one to ``FILTERS`` (refusing a
bad registration at once), and :func:`get_filter` resolves what ``process`` is given: a
registered name, a filter or predictor, or a batched callable. The built-in filters are
defined in :mod:`.filters`; predictors join the same registry (:mod:`.predict`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .checks import check_number

if TYPE_CHECKING:
    from .predict import Predictor

__all__ = ["FILTERS", "Param", "PatchFilter", "get_filter", "register_filter"]


@dataclass(frozen=True)
class Param:
    """A filter parameter: its default and allowed range (the GUI builds a control from it)."""

    default: float
    min: float
    max: float
    kind: type = float
    doc: str = ""

    def __post_init__(self):
        for key in ("default", "min", "max"):
            check_number(getattr(self, key), f"Param `{key}`")
        if self.kind not in (int, float):
            raise TypeError(f"Param `kind` must be int or float, got {self.kind!r}")
        if not self.min <= self.default <= self.max:
            raise ValueError(
                f"Param `default` must be in [min, max] = [{self.min}, {self.max}], "
                f"got {self.default!r}"
            )

    def check(self, name: str, value: float) -> float:
        """``value`` checked against the declared range, as ``kind``."""
        check_number(
            value, f"filter parameter `{name}`", self.min, self.max, integer=self.kind is int
        )
        return self.kind(value)


@dataclass(frozen=True)
class PatchFilter:
    """A named per-patch filter with declared parameters."""

    name: str
    func: Callable[..., Any]
    params: dict[str, Param] = field(default_factory=dict)
    doc: str = ""
    #: ``halo(**params) -> int``: how far (px) the filter reaches when applied to a whole image,
    #: or None for filters built on per-image statistics (invert, zscore, ...). The chunked
    #: path needs it to compute ``reference="filter"`` block by block.
    halo: Callable[..., int] | None = None

    def validate(self, params: Mapping[str, float] | None) -> dict[str, float]:
        """Parameters with defaults filled in, checked against their declared ranges."""
        params = dict(params or {})
        unknown = set(params) - set(self.params)
        if unknown:
            raise TypeError(
                f"filter {self.name!r} takes parameters {tuple(self.params)}, "
                f"got unknown {tuple(sorted(unknown))}"
            )
        return {k: p.check(k, params.get(k, p.default)) for k, p in self.params.items()}

    def __call__(
        self, stack: np.ndarray, spatial_axes: Sequence[int], **params: float
    ) -> np.ndarray:
        # Non-finite pixels give NaN where a patch statistic is undefined (documented), not
        # RuntimeWarnings from inside NumPy.
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            out = self.func(stack, tuple(spatial_axes), **self.validate(params))
        if np.shape(out) != np.shape(stack):
            raise ValueError(
                f"filter {self.name!r} returned shape {np.shape(out)} for input {np.shape(stack)}"
            )
        return out


#: Filters and predictors by name (built in, registered, or from the entry-point group).
FILTERS: dict[str, PatchFilter | Predictor] = {}


def register_filter(
    name: str,
    func: Callable[..., Any] | None = None,
    *,
    params: dict[str, Param] | None = None,
    batched: bool = True,
    doc: str = "",
    halo: Callable[..., int] | None = None,
) -> Callable[..., Any]:
    """Add a filter to the registry (usable as a decorator).

    Parameters
    ----------
    name : str
        Registry name.
    func : callable
        ``func(stack, spatial_axes, **params)`` when ``batched`` (vectorised over the stack), or
        ``func(patch, **params)`` on one patch of shape ``patch_size`` (one channel at a time)
        when not.
    params : dict of str -> Param, optional
        Declared parameters with defaults and ranges.
    batched : bool, optional
        Whether ``func`` handles a whole stack; per-patch callables are looped over (slower).
    doc : str, optional
        One-line description (default: the function's docstring).
    halo : callable, optional
        ``halo(**params) -> int``, the filter's reach in pixels when applied to a whole image
        (a 3x3 kernel reaches 1). Declaring it lets the chunked (dask) path compute
        ``reference="filter"``; leave it None when the filter uses whole-image statistics.

    Examples
    --------
    >>> @register_filter("square", params={})
    ... def square(stack, spatial_axes):
    ...     return stack ** 2
    >>> FILTERS["square"](np.full((2, 3), 3.0), (1,)).tolist()
    [[9.0, 9.0, 9.0], [9.0, 9.0, 9.0]]
    >>> del FILTERS["square"]
    """
    _check_registration(name, func, params, halo)

    def deco(f):
        _check_registration(name, f, params, halo)
        call = f if batched else _per_patch(f)
        FILTERS[name] = PatchFilter(
            name, call, dict(params or {}), doc or (f.__doc__ or "").strip(), halo
        )
        return f

    return deco if func is None else deco(func)


def _check_registration(name, func, params, halo) -> None:
    """Refuse a bad registration at once, not at the first call (each message names the
    argument)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"filter `name` must be a non-empty string, got {name!r}")
    if func is not None and not callable(func):
        raise TypeError(f"filter `func` must be callable, got {func!r}")
    if params is not None and not isinstance(params, dict):
        raise TypeError(f"filter `params` must be a dict of name -> Param, got {params!r}")
    for key, value in (params or {}).items():
        if not (isinstance(key, str) and key.isidentifier()):
            raise TypeError(f"filter `params` keys must be identifiers, got {key!r}")
        if not isinstance(value, Param):
            raise TypeError(
                f"filter `params[{key!r}]` must be a Param(default, min, max), got {value!r}"
            )
    if halo is not None and not callable(halo):
        raise TypeError(f"filter `halo` must be callable or None, got {halo!r}")


def get_filter(spec: str | PatchFilter | Predictor | Callable[..., Any]) -> PatchFilter | Predictor:
    """A :class:`PatchFilter` (or a :class:`~patch_viewer.core.predict.Predictor`) from a
    registered name, a PatchFilter or Predictor, or a batched callable."""
    from .predict import Predictor

    if isinstance(spec, (PatchFilter, Predictor)):
        return spec
    if isinstance(spec, str):
        if spec not in FILTERS:
            raise ValueError(f"`patch_filter` must be one of {tuple(FILTERS)}, got {spec!r}")
        return FILTERS[spec]
    if callable(spec):
        return PatchFilter(getattr(spec, "__name__", "custom"), spec)
    raise TypeError(f"`patch_filter` must be a name, a PatchFilter or a callable, got {spec!r}")


def _per_patch(f):
    def call(stack, spatial_axes, **params):
        nd = len(spatial_axes)
        moved = np.moveaxis(stack, spatial_axes, range(stack.ndim - nd, stack.ndim))
        out = np.empty(moved.shape, dtype=np.result_type(stack.dtype, np.float32))
        for idx in np.ndindex(moved.shape[:-nd]):
            out[idx] = f(moved[idx], **params)
        return np.moveaxis(out, range(stack.ndim - nd, stack.ndim), spatial_axes)

    return call
