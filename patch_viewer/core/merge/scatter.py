"""The sums behind :class:`patch_viewer.Accumulator`, kept in bands of canvas rows.

The canvas (``(n0, n1, n2 * C)`` on the kernels' three axes) is cut into bands of rows along
its first axis, each allocated when a patch first reaches it. A stream that arrives in grid
order (as :func:`patch_viewer.process` feeds it) lets finished bands go: :meth:`Sums.release`
divides every band above a row into the output and recycles its memory for the bands below,
so a run holds about ``patch + stride`` rows of sums instead of the whole image's. On these
machines a fresh page costs far more than a reused one (touching 512 MiB for the first time:
0.6 s; again: 0.02 s), so recycling is most of the speed of a large, many-channel merge.

Per pixel, patches are summed in the order they were added, whatever the bands and threads,
so the bits never depend on either. The dtype rules are the merge's (see
:mod:`.precision`); the compiled kernels are in :mod:`.kernels_scatter`, and a NumPy loop does
the same sums where numba is missing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .held import Held
from .plan import backend, default_workers
from .precision import (
    anchored_finish,
    checked_fill,
    finish,
    kernel_data,
    reduce_identity,
    split_mean,
)
from .threads import PIECES_PER_THREAD, each, pieces

__all__ = ["BAND_BYTES", "Sums", "sum_mode"]

#: Bytes of sums in one band (a few MiB: bands recycle, and a thread takes a band).
BAND_BYTES = 8 << 20


def sum_mode(dtype: np.dtype, reduce: str, uniform: bool) -> tuple[str, np.dtype, np.dtype]:
    """``(mode, data, acc)``: the kernel, the dtype it reads and the dtype it sums in."""
    data = kernel_data(dtype)
    if reduce != "mean":
        return reduce, data, data
    narrow = (dtype.kind == "f" and dtype.itemsize <= 4) or (
        dtype.kind in "bui" and (dtype.kind == "b" or dtype.itemsize <= 2)
    )
    if uniform and dtype.kind in "biu":
        if dtype.itemsize == 8:
            return "split", data, np.dtype(np.int64)
        return "sum", data, np.dtype(np.int64)
    if narrow:
        return ("sum" if uniform else "weighted"), data, np.dtype(np.float64)
    return "anchored", data, np.dtype(np.float64)


class _Band:
    """The arrays of one band of rows (flat): sums, and the anchor or low halves if needed."""

    def __init__(self, sums: Sums, size: int):
        # fresh pages come zeroed: no pass over them (only max and min start elsewhere)
        self.acc = np.zeros(size, sums.acc_dtype)
        self.lo = np.zeros(size, np.int64) if sums.mode == "split" else None
        self.seen = np.zeros(size, np.bool_) if sums.mode == "anchored" else None
        self.ref = np.empty(size, sums.data) if sums.mode == "anchored" else None
        if sums.mode in ("max", "min"):
            self.acc[:] = reduce_identity(self.acc.dtype, sums.mode)
        #: whether the arrays are as :meth:`reset` leaves them (a finished band may be
        #: cleared by the kernel that finishes it)
        self.clean = True
        #: the kernel's arguments after the patches' (see :mod:`.kernels_scatter`)
        self.args = {
            "sum": (self.acc,),
            "split": (self.acc, self.lo),
            "max": (self.acc,),
            "min": (self.acc,),
            "weighted": (sums.win, self.acc),
            "anchored": (sums.win, self.seen, self.ref, self.acc),
        }[sums.mode]

    def reset(self, mode: str) -> None:
        if self.clean:
            return
        self.acc[:] = reduce_identity(self.acc.dtype, mode) if mode in ("max", "min") else 0
        for a in (self.lo, self.seen):
            if a is not None:
                a[:] = 0
        self.clean = True


class Sums:
    """Sums of patches on a canvas of ``extent`` (three kernel axes) with ``c`` channels.

    ``crop`` is the part that is the image (the rest is padding); ``win`` the window over
    ``(p0, p1, p2 * c)`` for weighted means (None: uniform); ``patch3`` the patch on the three
    axes.
    """

    def __init__(self, dtype, reduce: str, win, extent, crop, patch3, c: int):
        self.mode, self.data, self.acc_dtype = sum_mode(np.dtype(dtype), reduce, win is None)
        self.unsigned = np.dtype(dtype).kind == "u"  # (64-bit split sums)
        self.extent, self.crop, self.c = tuple(extent), tuple(crop), c
        self.row = extent[1] * extent[2] * c  # elements of one canvas row
        self.rows = max(1, min(extent[0], BAND_BYTES // (self.row * self.acc_dtype.itemsize)))
        self.bands: list[_Band | None] = [None] * math.ceil(extent[0] / self.rows)
        self.released = 0  # bands 0 .. released - 1 are finished into ``out`` and gone
        self.out: np.ndarray | None = None
        self.out_key: tuple | None = None
        self.free: list[_Band] = []
        self.compiled = backend() == "numba"
        self.p0 = int(patch3[0])
        self.kernel: Any = None  # the compiled kernel of this mode
        if self.compiled:
            from . import kernels_scatter

            self.kernel = getattr(kernels_scatter, "scatter_" + self.mode)
        self.geo = np.array(
            [patch3[0], patch3[1], patch3[2] * c, extent[1], extent[2] * c], np.int64
        )
        self.held: Held | None = None
        self.win = None
        if self.mode in ("weighted", "anchored"):
            w = np.ones(tuple(patch3)) if win is None else np.asarray(win).reshape(patch3)
            self.win = np.ascontiguousarray(np.repeat(w, c, axis=-1).reshape(-1), np.float64)

    # ------------------------------------------------------------------ adding
    def hold(self) -> None:
        """Promise a stream in grid order: batches are then held and summed band by band
        as their rows become final (:mod:`.held`), where the compiled sum or weighted sum
        runs; elsewhere nothing changes. Before the first :meth:`add`."""
        if self.compiled and self.mode in ("sum", "weighted"):
            self.held = Held(
                self.kernel, self.geo, self.win, self.acc_dtype, self.extent, self.crop, self.c
            )

    @property
    def final(self) -> int:
        """Canvas rows ``0 .. final`` are finished and no patch may reach them any more."""
        return self.held.done if self.held is not None else self.released * self.rows

    def check_rows(self, lo: int) -> None:
        """Refuse patches (whose least origin row is ``lo``) that reach rows already
        released (before anything is added)."""
        if self.final and lo < self.final:
            raise ValueError(
                f"rows above {self.final} were finished and released (the "
                "stream promised grid order); patches cannot be added there any more"
            )

    def add(self, data: np.ndarray, o3: np.ndarray, lo: int, top: int) -> None:
        """Add patches ``data`` (any shape of ``N`` patches, C order) at kernel origins
        ``o3`` (``(N, 3)``, the last axis in pixels; checked by the caller), whose origin
        rows span ``lo .. top``."""
        if not len(o3):
            return
        if data.dtype != self.data:
            data = data.view(np.uint8) if data.dtype.kind == "b" else data.astype(self.data)
        flat = np.ascontiguousarray(data).reshape(-1)
        if self.c != 1:
            o3 = o3.copy()
            o3[:, 2] *= self.c
        hi = top + self.p0
        if self.held is not None:
            self.held.add(flat, o3, lo, hi)
        else:
            self._add_bands(flat, o3, lo, hi)

    def _add_bands(self, flat: np.ndarray, o3: np.ndarray, lo: int, hi: int) -> None:
        """Add ``flat``'s patches (``o3`` in fused units) to the bands of rows ``lo .. hi``."""
        tasks = [
            (self._band(b), max(b * self.rows, lo), min((b + 1) * self.rows, hi), b * self.rows)
            for b in range(lo // self.rows, -(-hi // self.rows))
        ]
        workers = default_workers(flat.nbytes)
        if not self.compiled:
            for band, y0, y1, base in tasks:
                self._numpy(flat, o3, band, y0, y1, base)
        elif workers == 1:  # the common small batch: no thread machinery
            for band, y0, y1, base in tasks:
                self.kernel(flat, o3, self.geo, y0, y1, base, *band.args)
        else:
            self._compiled(flat, o3, tasks, workers)

    def _band(self, b: int) -> _Band:
        band = self.bands[b]
        if band is None:
            if self.free:
                band = self.free.pop()
                band.reset(self.mode)
            else:
                band = _Band(self, self.rows * self.row)
            self.bands[b] = band
        band.clean = False  # to be added to
        return band

    def _compiled(self, flat, o3, tasks, workers: int) -> None:
        kernel = self.kernel
        if workers > 1 and len(tasks) < workers * PIECES_PER_THREAD:  # few bands: cut rows
            tasks = [
                (band, a, z, base)
                for band, y0, y1, base in tasks
                for a, z in pieces(y0, y1, workers)
            ]

        def run(task):
            band, y0, y1, base = task
            kernel(flat, o3, self.geo, y0, y1, base, *band.args)

        each(tasks, workers, run)

    def _numpy(self, flat, o3, band: _Band, y0: int, y1: int, base: int) -> None:
        """The kernels' sums with NumPy slices, in the same order per pixel (the fallback)."""
        p0, p1, ln, n1, wc = (int(v) for v in self.geo)
        view = lambda a: a.reshape(-1, n1, wc)  # noqa: E731
        patches = flat.reshape(-1, p0, p1, ln)
        win = None if self.win is None else self.win.reshape(p0, p1, ln)
        acc = view(band.acc)
        for k, (a, b, c) in enumerate(o3):
            r0, r1 = max(y0 - a, 0), min(y1 - a, p0)
            if r1 <= r0:
                continue
            region = (slice(a + r0 - base, a + r1 - base), slice(b, b + p1), slice(c, c + ln))
            v = patches[k, r0:r1]
            w = None if win is None else win[r0:r1]
            if self.mode == "sum":
                acc[region] += v
            elif self.mode == "split":
                v = v.astype(np.int64) if v.dtype != np.uint64 else v
                acc[region] += (v >> 32).astype(np.int64)
                view(band.lo)[region] += (v & 0xFFFFFFFF).astype(np.int64)
            elif self.mode == "weighted":
                acc[region] += w * v
            elif self.mode == "anchored":
                seen, ref = view(band.seen)[region], view(band.ref)[region]
                ref[~seen] = v[~seen]
                seen[...] = True
                acc[region] += w * (v.astype(np.float64) - ref.astype(np.float64))
            elif self.mode == "max":
                np.maximum(acc[region], v, out=acc[region])
            else:
                np.minimum(acc[region], v, out=acc[region])

    # ------------------------------------------------------------------ results
    def release(self, below: int, den_of, target: np.dtype, fill_value, work) -> None:
        """Finish every band wholly above canvas row ``below`` into the output and recycle
        it (``den_of(y0, y1)`` gives those rows' weights)."""
        key = (np.dtype(target), "nan" if _is_nan(fill_value) else fill_value)
        if self.out is None:
            self.out = np.empty(self.crop[:1] + self.crop[1:2] + (self.crop[2] * self.c,), target)
            self.out_key = key
        elif key != self.out_key:
            raise ValueError("a streamed accumulator finishes into one dtype and fill value")
        held = self.held
        if held is not None and target.kind != "f":  # (only float means are held)
            self._spill()
        elif held is not None:
            y1 = min(below, self.crop[0])
            held.finish(held.done, y1, den_of, target, fill_value, self.out)
            held.done = max(held.done, y1)
            held.drop(held.done)
            return
        while (
            self.released < len(self.bands)
            and min((self.released + 1) * self.rows, self.extent[0]) <= below
        ):
            b = self.released
            self._finish(b, den_of, target, fill_value, work, self.out, clear=True)
            band = self.bands[b]
            if band is not None:
                self.free.append(band)
                self.bands[b] = None
            self.released += 1

    def result(self, den_of, dtype, fill_value, work) -> np.ndarray:
        """The finished image ``(crop0, crop1, crop2 * c)`` (released bands included)."""
        target = np.dtype(work if dtype is None else dtype)
        if self.held is not None and target.kind != "f" and self.out is None:
            self._spill()
        if (
            (self.released or self.held is not None)
            and self.out is not None
            and self.out_key is not None
        ):
            key = (target, "nan" if _is_nan(fill_value) else fill_value)
            if key != self.out_key:
                raise ValueError(
                    "this accumulator streamed part of its result into "
                    f"{self.out_key[0]}: ask for the same dtype and fill value"
                )
            out = self.out
        else:
            out = np.empty(self.crop[:2] + (self.crop[2] * self.c,), target)
        if self.held is not None:  # (not let go: more may be added)
            self.held.finish(self.held.done, self.crop[0], den_of, target, fill_value, out)
            return out
        for b in range(self.released, len(self.bands)):
            self._finish(b, den_of, target, fill_value, work, out)
        return out

    def _spill(self) -> None:
        """Stop holding: the held batches (none finished yet) are added to bands, in the
        order they came, as if never held."""
        held, self.held = self.held, None
        assert held is not None and held.done == 0
        for flat, o3, lo, hi in held.batches:
            self._add_bands(flat, o3, lo, hi)

    def _finish(self, b, den_of, target, fill_value, work, out, clear=False) -> None:
        """Rows of band ``b`` finished into ``out``; ``clear``: the band is released after
        (its sums may then be cleared on the way)."""
        y0, y1 = b * self.rows, min((b + 1) * self.rows, self.crop[0])
        if y1 <= y0:
            return
        band = self.bands[b]
        ext1, ext2 = self.extent[1], self.extent[2]
        s1, s2 = self.crop[1], self.crop[2]
        if band is None:  # no patch reached these rows
            out[y0:y1] = target.type(checked_fill(fill_value, target, True))
            return
        canon = lambda a: a.reshape(-1, ext1, ext2 * self.c)[: y1 - y0, :s1, : s2 * self.c]  # noqa: E731
        if self.mode in ("sum", "weighted", "anchored") and target.kind == "f" and self.compiled:
            self._divide(band, den_of(y0, y1), y0, y1, target, fill_value, out, clear)
            return
        den = den_of(y0, y1)[:, :s1, :s2]
        shape = (y1 - y0, s1, s2, self.c)
        cov = np.repeat(den > 0, self.c, axis=-1).reshape(shape[:2] + (-1,))
        if self.mode in ("max", "min"):
            out[y0:y1] = finish(canon(band.acc).copy(), cov, target, fill_value, work)
        elif self.mode == "split":
            count = np.repeat(np.rint(den).astype(np.int64), self.c, axis=-1).reshape(cov.shape)
            mean = split_mean(
                canon(band.acc), canon(band.lo), np.maximum(count, 1), target, self.unsigned
            )
            out[y0:y1] = finish(mean, cov, target, fill_value, work)
        else:
            d = np.repeat(den, self.c, axis=-1).reshape(cov.shape)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = canon(band.acc) / d
            if self.mode == "anchored":
                out[y0:y1] = anchored_finish(canon(band.ref), mean, cov, target, fill_value, work)
            else:
                out[y0:y1] = finish(mean, cov, target, fill_value, work)

    def _divide(self, band, den, y0, y1, target, fill_value, out, clear: bool) -> None:
        """Sums over weights, straight into the float output, in one compiled pass
        (``clear``: a band of sums alone is left zeroed, for the next rows)."""
        from . import kernels_scatter as S

        den = np.ascontiguousarray(den, np.float64).reshape(-1)
        ext = np.array([y1 - y0, self.extent[1], self.extent[2]], np.int64)
        crop = np.array([y1 - y0, self.crop[1], self.crop[2]], np.int64)
        fill = target.type(checked_fill(fill_value, target, True))
        flat = out[y0:y1].reshape(-1)
        clears = clear and self.mode in ("sum", "weighted")  # (anchored: `seen` is reset)

        def run(a: int, z: int) -> None:
            if self.mode == "anchored":
                S.anchored_into(band.ref, band.acc, den, ext, crop, self.c, fill, a, z, 0, flat)
            else:
                S.divide_into(band.acc, den, ext, crop, self.c, fill, a, z, 0, clears, flat)

        workers = default_workers(flat.nbytes)
        each(pieces(0, y1 - y0, workers), workers, lambda r: run(*r))
        band.clean = clears and y1 - y0 == self.rows  # every row of the band was cleared


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)
