"""Compiled merge kernels (numba): plain loop nests over flat arrays, no mode flags.

Every kernel reads patches from one canonical *source*, whatever the grid's dimensions:

* ``flat``: memory as a read-only 1-D array, either a patch stack's or an image's (then the
  patches are read where they lie, with no stack made); ``st = (image, row, middle row)``
  element strides, and ``f0``, ``f1``, ``f2``: the offset of each grid index along the three
  grid axes. A patch's run of ``L = p_last * C`` elements (its last axis fused with the
  channels) is contiguous. 1-D and 2-D grids have size-1 axes inserted (see :mod:`.plan`).
* ``geo = (p0, p1, L, g1, g2)`` and the origins ``o0``, ``o1`` and ``o2c`` (the last axis'
  origins times ``C``, i.e. in fused units).
* a band: image ``bi``, output rows ``y0 .. y1`` of the first spatial axis, and the grid rows
  ``i0 .. i1`` whose patches touch it. ``acc`` holds the band's sums, flat and contiguous, as
  ``(y1 - y0, n1, WC)``.

A pixel's contributions are added in one fixed order (middle grid axis, grid rows, grid
columns), however the image is cut into bands, so the bits never depend on the number of
threads. Offsets in the
innermost loops are unsigned (numba then drops its negative-index checks and LLVM vectorises
the loop). A CUDA port maps one thread to one output pixel of a band: the loops below become
its body, the band its block.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = [
    "JIT",
    "U",
    "band_anchored",
    "band_anchored_plain",
    "band_gather",
    "band_max",
    "band_min",
    "band_sum",
    "band_sum_split",
    "band_weighted",
    "copy_band",
    "run_add",
    "run_add_split",
    "run_add_weighted",
    "run_max",
    "run_min",
    "weigh",
    "weigh_scaled",
]

JIT = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}
U = np.uint64


# --------------------------------------------------------------------------- innermost runs
@njit(inline="always", **JIT)
def run_add(acc, a, flat, f, n):
    for k in range(n):
        acc[a + k] += flat[f + k]


@njit(inline="always", **JIT)
def run_add_split(hi, lo, a, flat, f, n):
    for k in range(n):  # 64-bit integers as two exact 32-bit halves
        v = flat[f + k]
        hi[a + k] += v >> 32
        lo[a + k] += v & 0xFFFFFFFF


@njit(inline="always", **JIT)
def run_add_weighted(acc, a, flat, f, w, wo, n):
    for k in range(n):
        acc[a + k] += w[wo + k] * flat[f + k]


@njit(inline="always", **JIT)
def run_add_anchored(acc, ref, a, flat, f, w, wo, n):
    for k in range(n):
        acc[a + k] += w[wo + k] * (np.float64(flat[f + k]) - np.float64(ref[a + k]))


@njit(inline="always", **JIT)
def run_add_anchored_plain(acc, ref, a, flat, f, n):
    for k in range(n):
        acc[a + k] += np.float64(flat[f + k]) - np.float64(ref[a + k])


@njit(inline="always", **JIT)
def run_max(acc, a, flat, f, n):
    for k in range(n):
        acc[a + k] = np.maximum(acc[a + k], flat[f + k])


@njit(inline="always", **JIT)
def run_min(acc, a, flat, f, n):
    for k in range(n):
        acc[a + k] = np.minimum(acc[a + k], flat[f + k])


# --------------------------------------------------------------------------- band loops
# One loop nest per operation (the innermost call is the only difference; numba inlines it).
# The middle axis' grid index m and in-patch offset q run outermost, so that the hot nest
# (grid rows, grid columns, patch rows) is the same simple one for 1-, 2- and 3-D grids:
# with size-1 loops inside it, LLVM compiled 2-D merges 1.5-2.5x slower (measured).
@njit(**JIT)
def band_sum(flat, st, f0, f1, f2, geo, o0, o1, o2c, bi, i0, i1, y0, y1, n1, wc, acc):
    p0, p1, ln, g1, g2 = geo[0], geo[1], geo[2], geo[3], geo[4]
    sr = st[1]
    n = U(ln)
    for m in range(g1):
        for q in range(p1):
            fm = bi * st[0] + f1[m] + q * st[2]
            am = (o1[m] + q) * wc
            for i in range(i0, i1):
                oi, fi = o0[i], f0[i]  # locals: loads after a store to acc are not hoisted
                r0, r1 = max(y0 - oi, 0), min(y1 - oi, p0)
                for j in range(g2):
                    fj = fm + fi + f2[j]
                    aj = am + o2c[j]
                    for r in range(r0, r1):
                        ao = U((oi + r - y0) * n1 * wc + aj)
                        fo = U(fj + r * sr)
                        run_add(acc, ao, flat, fo, n)


@njit(**JIT)
def band_sum_split(flat, st, f0, f1, f2, geo, o0, o1, o2c, bi, i0, i1, y0, y1, n1, wc, hi, lo):
    p0, p1, ln, g1, g2 = geo[0], geo[1], geo[2], geo[3], geo[4]
    sr = st[1]
    n = U(ln)
    for m in range(g1):
        for q in range(p1):
            fm = bi * st[0] + f1[m] + q * st[2]
            am = (o1[m] + q) * wc
            for i in range(i0, i1):
                oi, fi = o0[i], f0[i]  # locals: loads after a store to acc are not hoisted
                r0, r1 = max(y0 - oi, 0), min(y1 - oi, p0)
                for j in range(g2):
                    fj = fm + fi + f2[j]
                    aj = am + o2c[j]
                    for r in range(r0, r1):
                        ao = U((oi + r - y0) * n1 * wc + aj)
                        fo = U(fj + r * sr)
                        run_add_split(hi, lo, ao, flat, fo, n)


@njit(**JIT)
def band_weighted(flat, st, f0, f1, f2, geo, o0, o1, o2c, bi, i0, i1, y0, y1, n1, wc, win, acc):
    """``win`` is the window, flat ``(p0, p1, L)`` (float64, repeated over the channels)."""
    p0, p1, ln, g1, g2 = geo[0], geo[1], geo[2], geo[3], geo[4]
    sr = st[1]
    n = U(ln)
    for m in range(g1):
        for q in range(p1):
            fm = bi * st[0] + f1[m] + q * st[2]
            am = (o1[m] + q) * wc
            for i in range(i0, i1):
                oi, fi = o0[i], f0[i]  # locals: loads after a store to acc are not hoisted
                r0, r1 = max(y0 - oi, 0), min(y1 - oi, p0)
                for j in range(g2):
                    fj = fm + fi + f2[j]
                    aj = am + o2c[j]
                    for r in range(r0, r1):
                        ao = U((oi + r - y0) * n1 * wc + aj)
                        fo = U(fj + r * sr)
                        run_add_weighted(acc, ao, flat, fo, win, U((r * p1 + q) * ln), n)


@njit(**JIT)
def band_anchored(
    flat, st, f0, f1, f2, geo, o0, o1, o2c, bi, i0, i1, y0, y1, n1, wc, win, ref, acc
):
    """Sums ``w * (v - ref)``; ``ref`` is laid out like ``acc`` (see :func:`band_gather`)."""
    p0, p1, ln, g1, g2 = geo[0], geo[1], geo[2], geo[3], geo[4]
    sr = st[1]
    n = U(ln)
    for m in range(g1):
        for q in range(p1):
            fm = bi * st[0] + f1[m] + q * st[2]
            am = (o1[m] + q) * wc
            for i in range(i0, i1):
                oi, fi = o0[i], f0[i]  # locals: loads after a store to acc are not hoisted
                r0, r1 = max(y0 - oi, 0), min(y1 - oi, p0)
                for j in range(g2):
                    fj = fm + fi + f2[j]
                    aj = am + o2c[j]
                    for r in range(r0, r1):
                        ao = U((oi + r - y0) * n1 * wc + aj)
                        fo = U(fj + r * sr)
                        run_add_anchored(acc, ref, ao, flat, fo, win, U((r * p1 + q) * ln), n)


@njit(**JIT)
def band_anchored_plain(
    flat, st, f0, f1, f2, geo, o0, o1, o2c, bi, i0, i1, y0, y1, n1, wc, ref, acc
):
    """:func:`band_anchored` for the uniform window: sums ``v - ref`` (the same bits as
    ``1.0 * (v - ref)``, without reading a window of ones: 1.6x faster on W1-f64)."""
    p0, p1, ln, g1, g2 = geo[0], geo[1], geo[2], geo[3], geo[4]
    sr = st[1]
    n = U(ln)
    for m in range(g1):
        for q in range(p1):
            fm = bi * st[0] + f1[m] + q * st[2]
            am = (o1[m] + q) * wc
            for i in range(i0, i1):
                oi, fi = o0[i], f0[i]  # locals: loads after a store to acc are not hoisted
                r0, r1 = max(y0 - oi, 0), min(y1 - oi, p0)
                for j in range(g2):
                    fj = fm + fi + f2[j]
                    aj = am + o2c[j]
                    for r in range(r0, r1):
                        ao = U((oi + r - y0) * n1 * wc + aj)
                        fo = U(fj + r * sr)
                        run_add_anchored_plain(acc, ref, ao, flat, fo, n)


@njit(**JIT)
def band_max(flat, st, f0, f1, f2, geo, o0, o1, o2c, bi, i0, i1, y0, y1, n1, wc, acc):
    p0, p1, ln, g1, g2 = geo[0], geo[1], geo[2], geo[3], geo[4]
    sr = st[1]
    n = U(ln)
    for m in range(g1):
        for q in range(p1):
            fm = bi * st[0] + f1[m] + q * st[2]
            am = (o1[m] + q) * wc
            for i in range(i0, i1):
                oi, fi = o0[i], f0[i]  # locals: loads after a store to acc are not hoisted
                r0, r1 = max(y0 - oi, 0), min(y1 - oi, p0)
                for j in range(g2):
                    fj = fm + fi + f2[j]
                    aj = am + o2c[j]
                    for r in range(r0, r1):
                        ao = U((oi + r - y0) * n1 * wc + aj)
                        fo = U(fj + r * sr)
                        run_max(acc, ao, flat, fo, n)


@njit(**JIT)
def band_min(flat, st, f0, f1, f2, geo, o0, o1, o2c, bi, i0, i1, y0, y1, n1, wc, acc):
    p0, p1, ln, g1, g2 = geo[0], geo[1], geo[2], geo[3], geo[4]
    sr = st[1]
    n = U(ln)
    for m in range(g1):
        for q in range(p1):
            fm = bi * st[0] + f1[m] + q * st[2]
            am = (o1[m] + q) * wc
            for i in range(i0, i1):
                oi, fi = o0[i], f0[i]  # locals: loads after a store to acc are not hoisted
                r0, r1 = max(y0 - oi, 0), min(y1 - oi, p0)
                for j in range(g2):
                    fj = fm + fi + f2[j]
                    aj = am + o2c[j]
                    for r in range(r0, r1):
                        ao = U((oi + r - y0) * n1 * wc + aj)
                        fo = U(fj + r * sr)
                        run_min(acc, ao, flat, fo, n)


@njit(**JIT)
def band_gather(flat, st, bi, y0, y1, rows0, rows1, cols, out):
    """``out`` (laid out like a band's ``acc``) = the value each pixel takes from the one patch
    that owns it: ``rows0[y]`` / ``rows1[z]`` are the stack offsets of the owning patch's grid
    index and in-patch offset along the first two axes (-1 where no patch owns the pixel), and
    ``cols[k]`` the same along the fused last axis. Unowned pixels are left as they are."""
    n1, wc = rows1.shape[0], cols.shape[0]
    for y in range(y0, y1):
        if rows0[y] < 0:
            continue
        for z in range(n1):
            if rows1[z] < 0:
                continue
            base = bi * st[0] + rows0[y] + rows1[z]
            a = ((y - y0) * n1 + z) * wc
            for k in range(wc):
                if cols[k] >= 0:
                    out[a + k] = flat[base + cols[k]]


# --------------------------------------------------------------------------- weighing
@njit(**JIT)
def weigh(acc, y0, y1, n1, wc, den0, den1, denk, out):
    """``out[y - y0, z, k] = acc / (den0[y] * den1[z] * denk[r, k])`` for the rows, columns
    and fused elements ``out`` holds (it may be cropped), and ``acc = 0`` there for the next
    band. ``denk`` has one row, or one per ``(y, z)`` for windows that do not separate. 0/0
    gives NaN: callers mark uncovered pixels."""
    per_row = denk.shape[0] > 1
    for y in range(y0, y0 + out.shape[0]):
        for z in range(out.shape[1]):
            d = den0[y] * den1[z]
            dk = denk[y * n1 + z] if per_row else denk[0]
            a = U(((y - y0) * n1 + z) * wc)
            o = out[y - y0, z]
            for k in range(U(o.shape[0])):
                o[k] = acc[a + k] / (d * dk[k])
                acc[a + k] = 0
    _clear_outside(acc, y0, y1, n1, wc, out.shape[0], out.shape[1], out.shape[2])


@njit(**JIT)
def weigh_scaled(acc, y0, y1, n1, wc, inv0, inv1, invk, out):
    """:func:`weigh` by multiplying with reciprocals, for weights that are all powers of two
    (then exact, so the same bits as dividing, at a fraction of the cost)."""
    for y in range(y0, y0 + out.shape[0]):
        for z in range(out.shape[1]):
            d = inv0[y] * inv1[z]
            dk = invk[0]
            a = U(((y - y0) * n1 + z) * wc)
            o = out[y - y0, z]
            for k in range(U(o.shape[0])):
                o[k] = acc[a + k] * (d * dk[k])
                acc[a + k] = 0
    _clear_outside(acc, y0, y1, n1, wc, out.shape[0], out.shape[1], out.shape[2])


@njit(inline="always", **JIT)
def _clear_outside(acc, y0, y1, n1, wc, rows, cols, width):
    """Zero what a cropped ``out`` did not take of a band (the padding of ``edge="pad"``)."""
    for y in range(y1 - y0):
        for z in range(n1):
            a = (y * n1 + z) * wc
            start = width if y < rows and z < cols else 0
            for k in range(start, wc):
                acc[a + k] = 0


@njit(**JIT)
def copy_band(acc, y0, n1, wc, out):
    """``out[y - y0, z, k] = acc[...]`` (cast to ``out``'s dtype) for the part ``out`` holds."""
    for y in range(y0, y0 + out.shape[0]):
        for z in range(out.shape[1]):
            a = U(((y - y0) * n1 + z) * wc)
            o = out[y - y0, z]
            for k in range(U(o.shape[0])):
                o[k] = acc[a + k]
