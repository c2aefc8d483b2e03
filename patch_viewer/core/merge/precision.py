"""Dtype rules of the merge: what sums are kept in, and how a result becomes the output dtype.

The rules, for ``reduce="mean"`` (max and min compare values in the stack's own dtype):

=========================================  ==================================  ===============
patches                                    sums                                exact because
=========================================  ==================================  ===============
bool, 8/16/32-bit integers, uniform        int32 or int64 (wide enough)        integers
64-bit integers, uniform                   two int64: the high and low 32 bits integers
float16/32, 8/16-bit ints, any window      float64                             53-bit mantissa
float64, 32/64-bit integers with a window  float64 of ``w * (v - anchor)``     equal values
                                                                               sum to 0
=========================================  ==================================  ===============

The anchor is the value the first patch covering a pixel gives it: where all contributions
agree every term is exactly zero, so identity round trips are bit-exact. Integer outputs are
rounded half to even and saturate at the dtype's limits; they never wrap.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "accumulation",
    "anchored_finish",
    "check_dtype",
    "checked_fill",
    "finish",
    "is_wide_int",
    "kernel_data",
    "narrow_sums_exact",
    "reduce_identity",
    "split_mean",
    "sum_dtype",
    "to_integer",
    "work_dtype",
]


def work_dtype(dtype) -> np.dtype:
    """Float dtype results are returned in by default: float32 for float32/16 and integers up
    to 16 bits, float64 otherwise.

    Examples
    --------
    >>> work_dtype(np.uint8), work_dtype(np.int64)
    (dtype('float32'), dtype('float64'))
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.dtype(np.float32 if dtype.itemsize <= 4 else np.float64)
    if dtype.kind in "biu":
        return np.dtype(np.float32 if dtype.itemsize <= 2 else np.float64)
    raise TypeError(f"patches must be real numbers (bool, int or float), got dtype {dtype}")


def _bits(dtype: np.dtype) -> int:
    return 1 if dtype.kind == "b" else 8 * dtype.itemsize


def sum_dtype(dtype, uniform: bool, max_cover: int) -> tuple[np.dtype, str]:
    """The dtype a mean's sums are kept in, and how: ``"plain"``, ``"split"`` (64-bit
    integers as two 32-bit halves) or ``"anchored"`` (see the module docstring).

    Examples
    --------
    >>> sum_dtype(np.uint8, True, 1521)
    (dtype('int32'), 'plain')
    >>> sum_dtype(np.float64, True, 4)
    (dtype('float64'), 'anchored')
    """
    dtype = np.dtype(dtype)
    cover = math.log2(max(max_cover, 1))
    if uniform and dtype.kind in "biu":
        if dtype.itemsize == 8:
            return np.dtype(np.int64), "split"
        need = _bits(dtype) + (dtype.kind == "u") + cover  # bits, the sign included
        return np.dtype(np.int32 if need < 31 else np.int64), "plain"
    narrow = (dtype.kind == "f" and dtype.itemsize <= 4) or (
        dtype.kind in "bui" and _bits(dtype) <= 16
    )
    if narrow and (not uniform or _bits(dtype) + 1 + cover <= 53):
        return np.dtype(np.float64), "plain"
    return np.dtype(np.float64), "anchored"


def split_mean(hi: np.ndarray, lo: np.ndarray, count: np.ndarray, dtype, unsigned: bool):
    """The mean of 64-bit integers from the sums of their high (``v >> 32``) and low
    (``v & 0xFFFFFFFF``) halves, exactly: rounded half to even into an integer ``dtype``
    (saturating), or within one ulp into a float ``dtype``.

    Examples
    --------
    >>> v = np.array([2**63 - 1, 2**63 - 3])
    >>> int(split_mean(np.array([(v >> 32).sum()]), np.array([(v & 0xFFFFFFFF).sum()]),
    ...                np.array([2]), np.int64, False)[0]) == 2**63 - 2
    True
    """
    count = np.asarray(count, np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(count > 0, count, 1)
        q_hi, r_hi = np.divmod(hi, c)  # r_hi < c: r_hi * 2**32 + lo < c * 2**33 fits
        q_lo, rem = np.divmod(r_hi * 2**32 + lo, c)
    base = (q_hi.astype(np.uint64) << np.uint64(32)) + q_lo.astype(np.uint64)  # floor, mod 2**64
    floor = base if unsigned else base.view(np.int64)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return (floor.astype(np.float64) + rem / c).astype(dtype)
    up = (2 * rem > c) | ((2 * rem == c) & (floor % 2 == 1))
    return _saturate(floor, dtype, up)


def _saturate(values: np.ndarray, dtype: np.dtype, up=None) -> np.ndarray:
    """Integers (``values + up``, ``up`` a 0/1 mask that never overflows them) clipped to
    ``dtype``'s range: they saturate, never wrap."""
    if up is not None:
        values = values + up.astype(values.dtype)
    if dtype.kind == "b":
        return values != 0
    info, src = np.iinfo(dtype), np.iinfo(values.dtype)
    kind = values.dtype.type  # both bounds are representable in the source dtype
    return np.clip(values, kind(max(info.min, src.min)), kind(min(info.max, src.max))).astype(dtype)


def to_integer(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float values rounded half to even and saturated into an integer ``dtype`` (NaN is
    refused by the caller first)."""
    if dtype.kind == "b":
        return np.rint(values) != 0
    info = np.iinfo(dtype)
    v = np.rint(values.astype(np.float64, copy=False))
    # float64(info.max) rounds up past the limit for 64-bit types (2**63 for int64): clip to
    # the largest float64 inside the range, cast, then set the saturated pixels exactly
    top = np.nextafter(float(info.max), -np.inf) if float(info.max) > info.max else info.max
    out = np.clip(v, float(info.min), float(top)).astype(dtype)
    out[v >= float(info.max)] = info.max
    return out


def finish(out: np.ndarray, covered: np.ndarray | None, dtype, fill_value, work: np.dtype):
    """Mark uncovered pixels with ``fill_value`` and convert a float result to ``dtype``
    (integers rounded half to even and saturated).

    ``covered`` is None where every pixel is covered, a boolean array broadcastable to
    ``out``, or per-axis masks (see :func:`_missing`).
    """
    dtype = np.dtype(work if dtype is None else dtype)
    check_dtype(dtype)
    missing = _missing(covered)
    fill = checked_fill(fill_value, dtype, missing is not None)
    if out.dtype.kind in "biu":  # max, min or picked integers: exact, saturated if need be
        result = _saturate(out, dtype) if dtype.kind in "biu" else out.astype(dtype)
        return _mark(result, missing, fill)
    if dtype.kind in "biu":
        out = _zeroed(out, missing)
        if np.isnan(out).any():
            raise ValueError(
                f"the merged image has NaN pixels, which the integer `dtype` {dtype} cannot "
                "hold: merge into a float dtype, or clean the patches first"
            )
        return _mark(to_integer(out, dtype), missing, fill)
    result = out.astype(dtype, copy=False)
    if missing is not None and result is out and not result.flags.writeable:
        result = result.copy()
    return _mark(result, missing, fill)


def _missing(covered) -> np.ndarray | tuple | None:
    """The uncovered pixels, or None where every pixel is covered.

    ``covered`` is None, a boolean array broadcastable to the result, or a tuple of 1-D
    boolean masks, one per result axis from axis 1 on, where coverage separates (a pixel is
    covered where every axis covers it); the tuple becomes the uncovered indices per axis.
    """
    if covered is None:
        return None
    if isinstance(covered, tuple):
        holes = tuple(np.flatnonzero(~np.asarray(c, bool)) for c in covered)
        return holes if any(len(h) for h in holes) else None
    missing = ~np.asarray(covered, bool)
    return missing if missing.any() else None


def _mark(result: np.ndarray, missing, fill) -> np.ndarray:
    """Write ``fill`` where ``missing`` (see :func:`_missing`), in place. Neither form makes
    an image-sized index: a boolean index the size of the image cost more than the merge
    itself on edge='drop' grids."""
    if isinstance(missing, tuple):
        for ax, holes in enumerate(missing, start=1):
            if len(holes):
                result[(slice(None),) * ax + (holes,)] = fill
    elif missing is not None:
        np.copyto(result, fill, where=missing)
    return result


def _zeroed(values: np.ndarray, missing) -> np.ndarray:
    """``values`` with 0 where ``missing`` (a new array; ``values`` is left as it is)."""
    if missing is None:
        return values
    if isinstance(missing, tuple):
        return _mark(values.copy(), missing, 0)
    return np.where(missing, 0, values)


def check_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise TypeError(f"`dtype` must be a real numeric dtype, got {dtype}")
    return dtype


def checked_fill(fill_value, dtype: np.dtype, needed: bool):
    """``fill_value`` checked against ``dtype`` (NaN by default for floats)."""
    if fill_value is None:
        if needed and dtype.kind != "f":
            raise ValueError(
                "some pixels are covered by no patch (edge='drop' or stride > patch_size) or "
                f"only by zero window weights: pass `fill_value` to mark them in an integer "
                f"output dtype ({dtype})"
            )
        return np.nan
    try:
        value = np.asarray(fill_value).item()
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`fill_value` must be a number, got {fill_value!r}") from None
    if isinstance(value, (str, bytes)):
        raise TypeError(f"`fill_value` must be a number, got {fill_value!r}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if math.isnan(number) or not (int(value) == value and info.min <= int(value) <= info.max):
            raise ValueError(
                f"`fill_value` must be an integer in {info.min}..{info.max} for dtype {dtype}, "
                f"got {fill_value!r}"
            )
        return int(value)
    return value


def anchored_finish(
    ref: np.ndarray, delta: np.ndarray, covered, dtype, fill_value, work: np.dtype
) -> np.ndarray:
    """Finish an anchored mean ``ref + delta``: for integer anchors into an integer ``dtype``
    in the integer domain, ``ref + round(delta)`` (exact where all values agree, whatever
    their size), saturated; otherwise ``ref + delta`` in float64, then :func:`finish`."""
    target = np.dtype(work if dtype is None else dtype)
    if not (target.kind in "biu" and ref.dtype.kind in "iu"):
        return finish(ref.astype(np.float64) + delta, covered, dtype, fill_value, work)
    check_dtype(target)
    missing = _missing(covered)
    delta = _zeroed(delta, missing)
    if np.isnan(delta).any():
        raise ValueError(
            f"the merged image has NaN pixels, which the integer `dtype` {target} "
            "cannot hold: merge into a float dtype, or clean the patches first"
        )
    step = np.rint(delta)
    small = np.abs(step) < 2.0**62
    native = ref.astype(ref.dtype.newbyteorder("="), copy=False)
    signed = native.view(np.int64) if native.dtype.itemsize == 8 else native.astype(np.int64)
    exact = signed + np.where(small, step, 0).astype(np.int64)  # wraps only past the range
    exact = exact.view(np.uint64) if native.dtype == np.uint64 else exact
    result = _saturate(exact, target)
    if not small.all():  # steps too large for 64-bit integers: through float64
        result = np.where(small, result, to_integer(ref.astype(np.float64) + delta, target))
    return _mark(result, missing, checked_fill(fill_value, target, missing is not None))


# --------------------------------------------------------------------------- NumPy engine
def accumulation(dtype, work: np.dtype, uniform: bool, max_cover: int) -> tuple[np.dtype, bool]:
    """The dtype sums are kept in, and whether they need the anchor (see the table above).

    A sum of ``m`` copies of a value with ``b`` significant bits is exact in a float whose
    mantissa has at least ``b + log2(m)`` bits; then ``sum / m`` gives the value back and no
    anchor is needed. That holds in the work dtype for small integers, and in float64 for
    float32/float16 patches (24 + log2(m) <= 53 bits): the plain sum is exact and cheaper than
    subtracting an anchor. Non-uniform windows and float64 patches need the anchor.
    """
    dtype = np.dtype(dtype)
    if not uniform:
        return work, True
    cover = math.log2(max(max_cover, 1))
    if dtype.kind in "biu":
        bits = 1 if dtype.kind == "b" else 8 * dtype.itemsize
        return work, bits + cover > np.finfo(work).nmant + 1
    if dtype.kind == "f" and np.finfo(dtype).nmant + 1 + cover <= np.finfo(np.float64).nmant + 1:
        return np.dtype(np.float64), False
    return work, True


def is_wide_int(dtype) -> bool:
    dtype = np.dtype(dtype)
    return dtype.kind in "iu" and dtype.itemsize == 8


def narrow_sums_exact(grid) -> bool:
    """Whether float32 sums give the mean of float32 values exactly where they all agree.

    Checked for every float32 in [1, 2) (so for all but overflowing values): adding ``c``
    copies of a value one after another and dividing by ``c`` gives it back for c = 1, 2, 4,
    and not for 3, 5, 6, 7 or 8. Coverage counts are products of per-axis counts.
    """
    counts = {1}
    for c in grid.coverage_1d():
        counts = {a * int(b) for a in counts for b in np.unique(c)}
    return counts <= {0, 1, 2, 4}


def reduce_identity(dtype, mode: str):
    """The value a ``max`` (``min``) reduction starts from: the dtype's lowest (highest)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return -np.inf if mode == "max" else np.inf
    info = np.iinfo(dtype)
    return info.min if mode == "max" else info.max


def kernel_data(dtype) -> np.dtype:
    """The dtype the compiled kernels read a stack of ``dtype`` in: bool as uint8, float16 as
    float32 (both exact), byte order native."""
    dtype = np.dtype(dtype)
    data = {"b": np.dtype(np.uint8)}.get(dtype.kind, dtype)
    data = np.dtype(np.float32) if data == np.float16 else data
    return data.newbyteorder("=")
