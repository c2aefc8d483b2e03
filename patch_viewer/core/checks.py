"""Argument checks shared by the public entry points (:func:`patch_viewer.process` and the
command line): every problem is answered before any work, as a ValueError or TypeError that
names the parameter and what it allows."""

from __future__ import annotations

import numbers
import operator

import numpy as np

from .grid import PatchGrid

__all__ = [
    "check_dtype",
    "check_fill_value",
    "check_finite_for_integer",
    "check_flat_indices",
    "check_grid",
    "check_image",
    "check_number",
    "check_out",
    "check_progress",
    "check_reduce_window",
    "format_bytes",
    "is_lazy",
    "is_real_number",
    "parse_max_bytes",
    "positive_int",
]


def format_bytes(n: float) -> str:
    """A byte count for people: powers of 1024, one decimal.

    Examples
    --------
    >>> format_bytes(512), format_bytes(3 * 2**29), format_bytes(447 * 2**30)
    ('512 B', '1.5 GiB', '447.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError  # pragma: no cover


def is_lazy(array: object) -> bool:
    """Whether ``array`` is a dask or zarr array (the chunked path handles it without loading
    it; in-memory functions refuse it).

    Examples
    --------
    >>> is_lazy(np.zeros(3))
    False
    """
    return type(array).__module__.startswith(("dask.", "zarr."))


def positive_int(value, name: str, allowed: str = "an int >= 1") -> int:
    """``value`` as an int >= 1 (an integer, not a bool); errors say ``allowed``.

    Examples
    --------
    >>> positive_int(np.int64(3), "batch_size")
    3
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be {allowed}, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"`{name}` must be {allowed}, got {value!r}") from None
    if number < 1:
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")
    return number


def check_grid(grid) -> PatchGrid:
    """``grid`` must be a :class:`PatchGrid` (not, say, a shape or a patch size)."""
    if not isinstance(grid, PatchGrid):
        raise TypeError(f"`grid` must be a PatchGrid, got {type(grid).__name__}")
    return grid


def check_flat_indices(idx: np.ndarray, grid: PatchGrid) -> None:
    """Flat patch indices (a 1-D integer array) must lie in ``0 .. grid.n_patches - 1``."""
    if len(idx) and (idx.min() < 0 or idx.max() >= grid.n_patches):
        bad = (idx < 0) | (idx >= grid.n_patches)
        raise IndexError(
            f"`indices` must be in 0..{grid.n_patches - 1} (grid {grid.grid_shape}), got "
            f"{idx[bad][:5].tolist()}"
        )


def is_real_number(value) -> bool:
    """A real number (Python or NumPy), but not a bool: ``True`` is an int to Python, never a
    size or a sigma here."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_number(
    value, name: str, lo: float | None = None, hi: float | None = None, *, integer: bool = False
) -> None:
    """``value`` must be a real number (not a bool), whole if ``integer``, and in ``[lo, hi]``
    when a range is given (NaN is in no range). ``name`` is how messages name it, e.g.
    ``"filter parameter `size`"``.

    Examples
    --------
    >>> check_number(2.0, "window parameter `sigma`", 0.01, 10.0)
    >>> check_number(True, "`x`")
    Traceback (most recent call last):
    ...
    TypeError: `x` must be a number, got True
    """
    ranged = lo is not None and hi is not None
    where = f" in [{lo}, {hi}]" if ranged else ""
    if not is_real_number(value):
        raise TypeError(f"{name} must be a number{where}, got {value!r}")
    if integer and float(value) != int(value):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if ranged and not lo <= value <= hi:  # NaN fails too
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def parse_max_bytes(value, name: str = "max_bytes") -> int | None:
    """A byte count from an int or a string such as ``"1GB"`` or ``"500 MiB"``
    (``dask.utils.parse_bytes``); None stays None.

    Examples
    --------
    >>> parse_max_bytes("1 KiB"), parse_max_bytes(2048), parse_max_bytes(None)
    (1024, 2048, None)
    """
    if value is None:
        return None
    if isinstance(value, str):
        from dask.utils import parse_bytes

        try:
            value = parse_bytes(value)
        except ValueError:
            raise ValueError(
                f"`{name}` must be a number of bytes or a size such as '1GB' or "
                f"'500 MiB', got {value!r}"
            ) from None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int (bytes), a size string or None, got {value!r}")
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1 byte, got {value!r}")
    return int(value)


def check_fill_value(value, dtype=None):
    """``fill_value`` must be a real number (or None), and fit an integer ``dtype``."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.number)):
        raise TypeError(f"`fill_value` must be a real number or None, got {value!r}")
    if dtype is not None and np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        if not (float(value).is_integer() and info.min <= value <= info.max):
            raise ValueError(
                f"`fill_value` must be an integer in [{info.min}, {info.max}] for "
                f"dtype {np.dtype(dtype)}, got {value!r}"
            )
    return value


def check_dtype(dtype):
    """The output dtype, if given: a real numeric dtype."""
    if dtype is None:
        return None
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"`dtype` must be a NumPy dtype, got {dtype!r}") from None
    if dtype.kind not in "biuf":
        raise TypeError(f"`dtype` must be a real numeric dtype (bool, int, float), got {dtype}")
    return dtype


def check_out(
    out,
    shape: tuple,
    dtype,
    avoid=(),
    name: str = "out",
    *,
    what: str = "the inputs",
    contiguous: bool = True,
) -> np.ndarray:
    """``out`` must be a writeable array of ``shape`` and ``dtype`` (a dtype, or a dtype kind
    such as ``"f"``), C-contiguous if ``contiguous``, sharing no memory with any array in
    ``avoid`` (``what`` names them in the message). ``name`` is the parameter's name.

    Examples
    --------
    >>> check_out(np.empty(3), (3,), np.float64, (np.zeros(3),), what="the image").shape
    (3,)
    >>> check_out(np.empty(3, np.float32), (3,), "f").dtype
    dtype('float32')
    """
    if isinstance(dtype, str):
        ok = isinstance(out, np.ndarray) and out.dtype.kind in dtype
        want = {"f": "a float dtype"}.get(dtype, f"dtype kind {dtype!r}")
    else:
        ok = isinstance(out, np.ndarray) and out.dtype == np.dtype(dtype)
        want = f"dtype {np.dtype(dtype)}"
    if not ok or out.shape != tuple(shape):
        got = f"{out.shape} {out.dtype}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"`{name}` must be an array of shape {tuple(shape)} and {want}, got {got}")
    if contiguous and not out.flags.c_contiguous:
        raise ValueError(f"`{name}` must be C-contiguous and writeable")
    if not out.flags.writeable:
        raise ValueError(f"`{name}` must be writeable")
    if any(a is not None and np.may_share_memory(out, a) for a in avoid):
        raise ValueError(f"`{name}` must not share memory with {what}")
    return out


def check_progress(progress) -> None:
    if progress is not None and not callable(progress):
        raise TypeError(
            f"`progress` must be a callable progress(done, total) or None, got {progress!r}"
        )


def check_image(image, grid: PatchGrid) -> np.ndarray:
    """Refuse masked arrays (their mask would be ignored), non-real dtypes and an RGB(A) image
    whose grid has no channel axis (with the fix in the message)."""
    if isinstance(image, np.ma.MaskedArray):
        raise TypeError(
            "`image` is a masked array, whose mask would be ignored: pass "
            "image.filled(np.nan) (float) to mark the masked pixels, or image.data"
        )
    image = np.asarray(image)
    if image.dtype.kind not in "biuf":
        raise TypeError(f"`image` must hold real numbers, got dtype {image.dtype}")
    if (
        grid.channel_axis is None
        and image.shape[:-1] == grid.image_shape
        and image.shape[-1] in (3, 4)
    ):
        raise ValueError(
            f"`image` shape {image.shape} is the grid's image_shape {grid.image_shape} plus "
            f"{image.shape[-1]} channels: for an RGB(A) image set channel_axis=-1, as in "
            f"PatchGrid(image.shape, patch_size, stride, channel_axis=-1)"
        )
    return image


def check_reduce_window(reduce, window) -> None:
    """Windows weight the mean only: ``reduce="max"``/``"min"`` needs the uniform window."""
    if reduce != "mean" and not (isinstance(window, str) and window == "uniform"):
        shown = window if isinstance(window, str) else "an array"
        raise ValueError(
            f"`window` must be 'uniform' with reduce={reduce!r} (windows weight "
            f"the mean only), got {shown!r}"
        )


def check_finite_for_integer(image: np.ndarray, dtype) -> None:
    """NaN or inf pixels cannot become an integer ``dtype``: refuse them up front."""
    if dtype is None or np.dtype(dtype).kind not in "biu" or image.dtype.kind != "f":
        return
    from .metrics import reduce_bands

    if not all(np.isfinite(part).all() for part in reduce_bands(image)):
        raise ValueError(
            f"`image` has NaN or inf pixels, which an integer `dtype` ({np.dtype(dtype)}) "
            f"cannot hold: leave `dtype` unset (float result), or replace them first "
            f"(np.nan_to_num)"
        )
