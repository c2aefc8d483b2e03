"""Internal canonical layout shared by extraction and merging.

Every array is handled as ``(batch, *spatial, channels)``: a leading batch axis (1 for a single
image) and a trailing channel axis (1 when the image has none). Both are views, never copies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .checks import format_bytes as _fmt_bytes
from .checks import is_lazy
from .grid import PatchGrid

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DIRECT_MAX_STEPS",
    "ROWS_FIRST_ORDER",
    "block_depths",
    "canonical_into",
    "ceil_div",
    "check_bytes",
    "depth",
    "empty_in_order",
    "from_canonical",
    "is_batched",
    "is_direct",
    "is_lazy",
    "n_elements",
    "pad_canonical",
    "pad_constant",
    "patches_to_canonical",
    "regular_slices",
    "split_regular",
    "stack_order",
    "to_canonical",
    "window_view",
]

#: Default refusal threshold for materialising arrays (bytes); see ``max_bytes`` arguments.
DEFAULT_MAX_BYTES = 4 * 2**30


def check_bytes(nbytes: int, what: str, max_bytes: int | None, hint: str) -> None:
    """Refuse, with a message naming the size, to allocate more than ``max_bytes``."""
    limit = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    if nbytes > limit:
        raise MemoryError(
            f"{what} would take {_fmt_bytes(nbytes)}, over the limit of {_fmt_bytes(limit)} "
            f"(`max_bytes`); {hint}"
        )


def is_batched(shape: tuple[int, ...], grid: PatchGrid, name: str = "image") -> bool:
    """Whether an image array of ``shape`` is one image of the grid, or a batch of them."""
    if tuple(shape) == grid.image_shape:
        return False
    if tuple(shape[1:]) == grid.image_shape:
        return True
    raise ValueError(
        f"`{name}` shape {tuple(shape)} does not match the grid's image_shape {grid.image_shape} "
        f"(or a leading batch axis followed by it)"
    )


def to_canonical(image: Any, grid: PatchGrid, batched: bool) -> Any:
    """View ``image`` as ``(batch, *spatial, channels)`` (a dask array stays a dask array)."""
    if not batched:
        image = image[None]
    if grid.channel_axis is None:
        return image[..., None]
    return np.moveaxis(image, grid.channel_axis + 1, -1)


def canonical_into(out: np.ndarray, grid: PatchGrid, batched: bool) -> np.ndarray | None:
    """``out`` viewed as ``(batch, *spatial, channels)`` where that view is C-contiguous (so
    the compiled kernels can write through it: any channel axis last), else None."""
    canon = to_canonical(out, grid, batched)
    return canon if canon.flags.c_contiguous else None


def from_canonical(canon: np.ndarray, grid: PatchGrid, batched: bool) -> np.ndarray:
    """Inverse of :func:`to_canonical` (a view)."""
    if grid.channel_axis is None:
        out = canon[..., 0]
    else:
        out = np.moveaxis(canon, -1, grid.channel_axis + 1)
    return out if batched else out[0]


def patches_to_canonical(patches: np.ndarray, grid: PatchGrid) -> tuple[np.ndarray, bool]:
    """View a patch stack as ``(batch, *grid_shape, *patch_size, channels)``.

    Accepts ``(*grid_shape, *patch_shape)``, the flat ``(n_patches, *patch_shape)``, and either
    with a leading batch axis.
    """
    shape = tuple(patches.shape)
    ps = grid.patch_shape
    gs = grid.grid_shape
    forms = (gs + ps, (grid.n_patches,) + ps)
    if shape in forms:
        batched = False
    elif shape[1:] in forms:
        batched = True
    else:
        raise ValueError(
            f"`patches` shape {shape} does not match the grid: expected {gs + ps} "
            f"(grid_shape + patch_shape), {(grid.n_patches,) + ps} (flat), or either with a "
            f"leading batch axis"
        )
    if not batched:
        patches = patches[None]
    b = patches.shape[0]
    if grid.channel_axis is None:
        patches = patches[..., None]
    return patches.reshape((b,) + gs + grid.patch_size + (patches.shape[-1],)), batched


def pad_canonical(canon: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """Pad the far side of each spatial axis out to ``grid.padded_shape`` (a copy if needed)."""
    extra = [p - n for p, n in zip(grid.padded_shape, grid.spatial_shape)]
    if not any(extra):
        return canon
    widths = [(0, 0)] + [(0, e) for e in extra] + [(0, 0)]
    if grid.pad_mode == "constant":
        return np.pad(canon, widths, mode="constant", constant_values=pad_constant(grid, canon))
    return np.pad(canon, widths, mode=grid.pad_mode)


def pad_constant(grid: PatchGrid, canon) -> float:
    """``grid.pad_value`` checked against the image's dtype (it must be representable)."""
    value, dtype = grid.pad_value, np.dtype(canon.dtype)
    if dtype.kind in "biu":
        if dtype.kind == "b":
            ok = value in (0, 1)
            lo, hi = 0, 1
        else:
            info = np.iinfo(dtype)
            lo, hi = info.min, info.max
            ok = float(value).is_integer() and lo <= value <= hi
        if not ok:
            raise ValueError(
                f"`pad_value` must be an integer in {lo}..{hi} to pad a {dtype} "
                f"image, got {value!r}"
            )
    elif dtype.kind == "f" and abs(value) > np.finfo(dtype).max:
        raise ValueError(f"`pad_value` {value!r} overflows the image's dtype {dtype}")
    return value


def window_view(canon: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """Read-only view ``(batch, *positions, *patch_size, channels)`` of every patch position."""
    nd = grid.ndim
    spatial_axes = tuple(range(1, nd + 1))
    view = np.lib.stride_tricks.sliding_window_view(
        canon, grid.patch_size, axis=spatial_axes, writeable=False
    )
    # sliding_window_view puts the window axes last: (b, *pos, C, *p) -> (b, *pos, *p, C)
    return np.moveaxis(view, nd + 1, -1)


def regular_slices(origins: np.ndarray, stride: int) -> slice:
    """Slice selecting a run of regular origins ``o0, o0 + s, ...`` from a window view."""
    return slice(int(origins[0]), int(origins[-1]) + 1, stride)


def split_regular(origins: np.ndarray, stride: int) -> list[tuple[int, int]]:
    """Split one axis' origins into runs ``(start, stop)`` of grid indices with a constant step.

    A shifted last origin gets a run of its own.
    """
    g = len(origins)
    if g == 1 or origins[-1] - origins[-2] == stride:
        return [(0, g)]
    return [(0, g - 1), (g - 1, g)]


def n_elements(shape) -> int:
    return math.prod(shape)


# Use one product loop over all block offsets when it has at most this many steps.
DIRECT_MAX_STEPS = 8


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, exactly (no float rounding)."""
    return -(-a // b)


def block_depths(patch_size, stride) -> list[int]:
    """Block offsets per axis: how many stride blocks one patch spans (``ceil(p / s)``)."""
    return [ceil_div(p, s) for p, s in zip(patch_size, stride)]


def depth(grid: PatchGrid) -> list[int]:
    """:func:`block_depths` of the grid's patch size and stride."""
    return block_depths(grid.patch_size, grid.stride)


def is_direct(grid: PatchGrid) -> bool:
    """Whether the grid's overlap is shallow enough for one product loop over all block
    offsets (otherwise the axes are merged one after another, a cascade)."""
    return math.prod(depth(grid)) <= DIRECT_MAX_STEPS


#: Memory order of a 2-D stack ``(b, g0, g1, p0, p1, C)`` for :func:`_rows_first`: row offset,
#: grid row, image, then each patch row's column data.
ROWS_FIRST_ORDER = (3, 1, 0, 2, 4, 5)


def stack_order(grid: PatchGrid) -> tuple[int, ...] | None:
    """Memory order (axes of a canonical ``(b, *G, *p, C)`` stack, outermost first) in which
    the merge reads a stack fastest, or None where the plain patch-major order is best.

    Deep overlaps (stride 1) are merged by a cascade that reads the last axis' in-patch offset
    before its grid index (element-major, as ``torch.unfold`` lays patches out); a stack made
    in that order is merged without a transpose. The streaming pipeline extracts patches that
    way, and element-wise filters keep the order.
    """
    nd = grid.ndim
    if is_direct(grid):
        return None
    if nd == 2 and grid.stride[0] == 1:  # offset-major rows, see _rows_first
        return ROWS_FIRST_ORDER
    if depth(grid)[-1] <= 1:
        return None
    order = [0]
    for k in range(nd - 1):
        order += [1 + k, 1 + nd + k]
    return tuple(order + [2 * nd, nd, 2 * nd + 1])


def empty_in_order(shape, order, dtype) -> np.ndarray:
    """An uninitialised array of ``shape`` whose memory runs in ``order`` (see
    :func:`stack_order`)."""
    mem = np.empty([shape[a] for a in order], dtype)
    return mem.transpose(np.argsort(order))
