"""A stream in grid order summed band by band: batches held until the rows they reach are final.

:class:`~.scatter.Sums` adds each batch into image-wide bands of sums as it comes: every
pixel's sum is read and written back once per patch that covers it, far from the cache (a
many-channel output at 256/192 keeps about 100 MiB of sums). When patches arrive in grid
order, as :func:`patch_viewer.process` feeds a predictor's outputs, :class:`Held` instead
keeps the batches themselves (references, no copy) until the canvas rows they reach are
final, then sums those rows a cache-sized band at a time, from every held batch that reaches
the band, and divides the band straight into the output: each pixel is summed in the cache and
written once. The kernels are the accumulator's own (:mod:`.kernels_scatter`), called batch by
batch in the order the batches came, so each pixel sums the same values in the same order, and
the bits are those of :class:`~.scatter.Sums`. Batches no unfinished row needs are let go.
"""

from __future__ import annotations

import math

import numpy as np

from .plan import default_workers
from .precision import checked_fill
from .threads import share

__all__ = ["CANVAS_BYTES", "Held"]

#: Bytes of sums one band holds while it is summed (fits the L2 cache with the rows it reads).
CANVAS_BYTES = 1 << 20


class Held:
    """Batches ``(flat, o3, lo, hi)`` of a stream in grid order (``o3`` in fused units, rows
    ``lo .. hi`` of the canvas reached), with the canvas rows ``0 .. done`` finished.

    ``kernel``, ``geo`` and the dtype of the sums ``acc`` are those of the
    :class:`~.scatter.Sums` whose mode (``"sum"`` or ``"weighted"``, with window ``win``) is
    held; ``extent`` and ``crop`` (three axes) and ``c`` channels as there.
    """

    def __init__(self, kernel, geo, win, acc: np.dtype, extent, crop, c: int):
        self.kernel, self.geo, self.win, self.acc = kernel, geo, win, acc
        self.extent, self.crop, self.c = extent, crop, c
        self.row = int(extent[1] * extent[2] * c)
        self.rows = max(1, CANVAS_BYTES // (self.row * acc.itemsize))
        self.batches: list[tuple[np.ndarray, np.ndarray, int, int]] = []
        self.done = 0
        self._free: list[np.ndarray] = []

    def add(self, flat: np.ndarray, o3: np.ndarray, lo: int, hi: int) -> None:
        self.batches.append((flat, o3, lo, hi))

    def finish(self, y0: int, y1: int, den_of, target: np.dtype, fill_value, out) -> None:
        """Rows ``y0 .. y1`` (of the image) finished into ``out`` (``(crop0, crop1, crop2 *
        c)``, float ``target``) from the held batches, band by band; ``den_of(a, z)`` gives
        the weights of rows ``a .. z``."""
        if y1 <= y0:
            return
        den = np.ascontiguousarray(den_of(y0, y1), np.float64)
        fill = target.type(checked_fill(fill_value, target, True))
        bands = [(a, min(a + self.rows, y1)) for a in range(y0, y1, self.rows)]
        workers = default_workers((y1 - y0) * self.row * 8)
        share(bands, workers, lambda it: self._sum_bands(it, y0, den, fill, out))

    def _sum_bands(self, bands, y0: int, den: np.ndarray, fill, out) -> None:
        """One thread's bands: each summed from every held batch that reaches it (in the
        order they came), then divided into ``out`` (and its canvas left cleared)."""
        from .kernels_scatter import divide_into  # (numba: imported on first use)

        canvas = self._free.pop() if self._free else np.zeros(self.rows * self.row, self.acc)
        args = (canvas,) if self.win is None else (self.win, canvas)
        e1, e2 = self.extent[1], self.extent[2]
        for a, z in bands:
            for flat, o3, lo, hi in self.batches:
                if lo < z and hi > a:
                    self.kernel(flat, o3, self.geo, a, z, a, *args)
            ext = np.array([z - a, e1, e2], np.int64)
            crop = np.array([z - a, self.crop[1], self.crop[2]], np.int64)
            d = den[a - y0 : z - y0].reshape(-1)
            divide_into(canvas, d, ext, crop, self.c, fill, 0, z - a, 0, True, out[a:z].reshape(-1))
        self._free.append(canvas)

    def drop(self, below: int) -> None:
        """Let go of the batches that reach no row from ``below`` on."""
        self.batches = [b for b in self.batches if b[3] > below]


def holds(o0: np.ndarray, patch, grid_shape, c: int, itemsize: int, extent) -> bool:
    """Whether holding a stream in grid order takes no more memory than its sums (float64 or
    int64 over ``extent`` with ``c`` channels). A grid row (first-axis output origins ``o0``,
    ``patch`` in output pixels) is held while a later row's patches can still reach its rows:
    about ``ceil(patch / stride) + 1`` rows at once, and a batch."""
    o0 = np.asarray(o0, np.int64)
    reach = np.searchsorted(o0, o0 + patch[0], side="left") - np.arange(len(o0))
    rows = int(reach.max(initial=0)) + 1
    per_row = math.prod(grid_shape[1:])
    held = rows * per_row * math.prod(patch) * c * itemsize
    return held <= math.prod(extent) * c * 8
