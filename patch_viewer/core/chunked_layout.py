"""The dask layout of the chunked path: which pixels each block holds, and which patches.

Arrays become dask arrays (zarr keeps its on-disk chunks); the far side of each axis is
padded exactly as ``np.pad`` pads it in memory; chunks are made at least as wide as the halo
they exchange; and for each block, :func:`block_grid` finds the run of the GLOBAL grid's
patches that touch its core and re-grids it locally, which is what makes the chunked result
equal the in-memory one. Shared by the filter path (:mod:`.chunked`) and the predictor path
(:mod:`.chunked_predict`).
"""

from __future__ import annotations

import numpy as np

from .grid import PatchGrid

__all__ = ["DEFAULT_CHUNK", "as_dask", "block_grid", "chunk_starts", "min_chunks", "pad_lazy"]

#: Chunk edge (pixels per spatial axis) used for arrays that come without useful chunks.
DEFAULT_CHUNK = 2048


def as_dask(array):
    """A dask array for a dask, zarr or NumPy array (zarr keeps its on-disk chunks)."""
    import dask.array as da

    if isinstance(array, da.Array):
        return array
    chunks = getattr(array, "chunks", None)
    if not isinstance(chunks, tuple) or not all(isinstance(c, int) for c in chunks):
        chunks = tuple(min(n, DEFAULT_CHUNK) for n in np.shape(array))
    return da.from_array(array, chunks=chunks)


def pad_lazy(canon, grid: PatchGrid):
    """Pad the far side of each spatial axis to ``grid.padded_shape`` exactly as ``np.pad``
    does (dask's own reflect/wrap differ from NumPy's once the pad is wider than the image)."""
    import dask.array as da

    for ax, (n, m) in enumerate(zip(grid.spatial_shape, grid.padded_shape), start=1):
        if m == n:
            continue
        if grid.pad_mode == "constant":
            widths = [(0, 0)] * canon.ndim
            widths[ax] = (0, m - n)
            from ._layout import pad_constant

            canon = da.pad(
                canon, widths, mode="constant", constant_values=pad_constant(grid, canon)
            )
        else:
            # reflect/edge/wrap only move pixels: pad the indices, then gather them.
            index = np.pad(np.arange(n), (0, m - n), mode=grid.pad_mode)[n:]
            tail = da.take(canon, index, axis=ax)
            canon = da.concatenate([canon, tail], axis=ax)
    return canon


def min_chunks(canon, depth: tuple[int, ...]):
    """Rechunk so that every spatial chunk is at least as wide as its halo."""
    from dask.array.overlap import ensure_minimum_chunksize

    chunks = list(canon.chunks)
    for ax, d in enumerate(depth, start=1):
        chunks[ax] = ensure_minimum_chunksize(max(d, 1), chunks[ax])
    return canon.rechunk(tuple(chunks)) if tuple(chunks) != canon.chunks else canon


def chunk_starts(chunks) -> list[np.ndarray]:
    return [np.concatenate([[0], np.cumsum(c)]) for c in chunks]


def block_grid(grid: PatchGrid, starts, block_id, depth):
    """For the spatial block ``block_id``: which part of the halo'd block holds the patches of
    the global grid touching the block's core, and where their merge lands in the core.

    Returns ``(local_grid, in_block, from_local, to_core, first)`` (slices per spatial axis;
    ``first``: the global grid index of the local grid's first patch per axis), or None when
    no patch touches the core (every core pixel is uncovered).
    """
    in_block, from_local, to_core, shape, first = [], [], [], [], []
    for ax, i in enumerate(block_id):
        s, e = int(starts[ax][i]), int(starts[ax][i + 1])
        halo_before = 0 if i == 0 else depth[ax]
        o, p = grid.origins[ax], grid.patch_size[ax]
        k0 = int(np.searchsorted(o, s - p + 1))  # first origin with o + p > s
        k1 = int(np.searchsorted(o, e))  # origins before the core's end
        if k0 >= k1:
            return None
        first.append(k0)
        a, z = int(o[k0]), int(o[k1 - 1]) + p
        in_block.append(slice(a - s + halo_before, z - s + halo_before))
        lo, hi = max(s, a), min(e, z)
        from_local.append(slice(lo - a, hi - a))
        to_core.append(slice(lo - s, hi - s))
        shape.append(z - a)
    # The touching origins are a run of the global ones; re-gridding the region they span with
    # edge="shift" gives back exactly that run (including a shifted last patch).
    local = PatchGrid(tuple(shape), grid.patch_size, grid.stride, edge="shift")
    return local, tuple(in_block), tuple(from_local), tuple(to_core), tuple(first)
