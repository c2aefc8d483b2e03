"""Load (or compile) the compiled kernels before the first real call needs them.

The first compiled call in a process pays numba's start-up: importing numba, initialising its
code generator, and loading each kernel from the on-disk cache (or compiling it, 2-4 s a
signature, when the cache is cold: right after installing, or after an upgrade). Measured in
``benchmarks/bench_startup.py``. :func:`warm_up` pays it up front: the Patch Explorer runs it in
a worker thread when it docks, so a user never waits on a compile; a script may call it at
start, or in a thread of its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from .merge.plan import backend

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

__all__ = ["is_warm", "warm_up"]

#: What warm_up loads by default: the dtypes images most often come in, and the filters whose
#: kernels differ from the merge's (identity and the other element-wise ones run in the fused
#: stream).
WARM_DTYPES = ("uint8", "uint16", "float32", "float64")
WARM_FILTERS = ("identity", "gaussian", "invert")


_WARM: set = set()  # the (dtypes, filters) already loaded in this process


def is_warm(dtypes=WARM_DTYPES, filters=WARM_FILTERS) -> bool:
    """Whether :func:`warm_up` has loaded these kernels in this process already."""
    return (tuple(dtypes), tuple(filters)) in _WARM or backend() != "numba"


def warm_up(
    dtypes: Iterable[DTypeLike] = WARM_DTYPES, filters: Iterable[str] = WARM_FILTERS
) -> float:
    """Load the compiled kernels a merge and a ``process`` of these dtypes and filters use.

    Runs tiny merges (every window family: uniform and weighted; mean and max) and
    ``process`` calls, so every kernel they dispatch to is loaded from numba's cache, or
    compiled and cached. Safe to call from any thread, any number of times (later calls cost
    about a millisecond). On the NumPy backend it does nothing.

    Returns the seconds it took.

    Examples
    --------
    >>> seconds = warm_up(dtypes=("float32",), filters=("identity",))
    >>> seconds >= 0
    True
    """
    start = time.perf_counter()
    if backend() != "numba":
        return 0.0
    from .extract import extract_patches
    from .grid import PatchGrid
    from .merge import merge_patches
    from .pipeline import process

    grid = PatchGrid((12, 12), 5, stride=2)
    for dtype in dtypes:
        image = (np.arange(144).reshape(12, 12) % 97).astype(dtype)
        patches = extract_patches(image, grid)
        merge_patches(patches, grid)
        merge_patches(patches, grid, window="hann")
        merge_patches(patches, grid, reduce="max")
        for name in filters:
            process(image, grid, name, ssim=False)
    from .accumulator import Accumulator

    acc = Accumulator(grid)  # the scatter, index and finishing kernels of patch-wise inference
    acc.add(np.zeros((grid.n_patches, 5, 5), np.float32), np.arange(grid.n_patches))
    acc.result()
    _WARM.add((tuple(dtypes), tuple(filters)))
    return time.perf_counter() - start
