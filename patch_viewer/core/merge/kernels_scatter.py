"""Compiled kernels of the :class:`patch_viewer.Accumulator`: patches added at any origins.

Patches come as one flat C-order array of ``N`` patches of ``(p0, p1, L)`` elements (``L`` is
the last spatial axis fused with the channels), their origins as ``(N, 3)`` in the same fused
units, and a band of the canvas as a flat ``(rows, n1, WC)`` array whose first row is canvas
row ``base``. ``geo = (p0, p1, L, n1, WC)``. Only canvas rows ``y0 .. y1`` are written, so
threads can take bands (or parts of one) and each pixel still sums its patches in the order
they were added: the bits do not depend on the thread count. Origins are checked by the
caller; the kernels never fail half-way.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .kernels_numba import JIT, U, run_add, run_add_split, run_add_weighted, run_max, run_min

__all__ = [
    "scatter_anchored",
    "scatter_max",
    "scatter_min",
    "scatter_split",
    "scatter_sum",
    "scatter_weighted",
    "scatter_window",
]


@njit(inline="always", **JIT)
def _rows(org, k, p0, y0, y1):
    o = org[k, 0]
    return o, max(y0 - o, 0), min(y1 - o, p0)


@njit(**JIT)
def scatter_sum(flat, org, geo, y0, y1, base, acc):
    p0, p1, ln, n1, wc = geo[0], geo[1], geo[2], geo[3], geo[4]
    size = p0 * p1 * ln
    n = U(ln)
    for k in range(org.shape[0]):
        o, r0, r1 = _rows(org, k, p0, y0, y1)
        for r in range(r0, r1):
            for q in range(p1):
                a = U(((o + r - base) * n1 + org[k, 1] + q) * wc + org[k, 2])
                run_add(acc, a, flat, U(k * size + (r * p1 + q) * ln), n)


@njit(**JIT)
def scatter_split(flat, org, geo, y0, y1, base, hi, lo):
    p0, p1, ln, n1, wc = geo[0], geo[1], geo[2], geo[3], geo[4]
    size = p0 * p1 * ln
    n = U(ln)
    for k in range(org.shape[0]):
        o, r0, r1 = _rows(org, k, p0, y0, y1)
        for r in range(r0, r1):
            for q in range(p1):
                a = U(((o + r - base) * n1 + org[k, 1] + q) * wc + org[k, 2])
                run_add_split(hi, lo, a, flat, U(k * size + (r * p1 + q) * ln), n)


@njit(**JIT)
def scatter_weighted(flat, org, geo, y0, y1, base, win, acc):
    p0, p1, ln, n1, wc = geo[0], geo[1], geo[2], geo[3], geo[4]
    size = p0 * p1 * ln
    n = U(ln)
    for k in range(org.shape[0]):
        o, r0, r1 = _rows(org, k, p0, y0, y1)
        for r in range(r0, r1):
            for q in range(p1):
                a = U(((o + r - base) * n1 + org[k, 1] + q) * wc + org[k, 2])
                wo = U((r * p1 + q) * ln)
                run_add_weighted(acc, a, flat, U(k * size) + wo, win, wo, n)


@njit(**JIT)
def scatter_anchored(flat, org, geo, y0, y1, base, win, seen, ref, acc):
    """``acc += w * (v - ref)``, where ``ref`` is the value the first patch added gave the
    pixel (set here, on first sight): equal values add exactly zero."""
    p0, p1, ln, n1, wc = geo[0], geo[1], geo[2], geo[3], geo[4]
    size = p0 * p1 * ln
    for k in range(org.shape[0]):
        o, r0, r1 = _rows(org, k, p0, y0, y1)
        for r in range(r0, r1):
            for q in range(p1):
                a = U(((o + r - base) * n1 + org[k, 1] + q) * wc + org[k, 2])
                wo = U((r * p1 + q) * ln)
                f = U(k * size) + wo
                for t in range(U(ln)):
                    v = flat[f + t]
                    if not seen[a + t]:
                        seen[a + t] = True
                        ref[a + t] = v
                    acc[a + t] += win[wo + t] * (np.float64(v) - np.float64(ref[a + t]))


@njit(**JIT)
def scatter_max(flat, org, geo, y0, y1, base, acc):
    p0, p1, ln, n1, wc = geo[0], geo[1], geo[2], geo[3], geo[4]
    size = p0 * p1 * ln
    n = U(ln)
    for k in range(org.shape[0]):
        o, r0, r1 = _rows(org, k, p0, y0, y1)
        for r in range(r0, r1):
            for q in range(p1):
                a = U(((o + r - base) * n1 + org[k, 1] + q) * wc + org[k, 2])
                run_max(acc, a, flat, U(k * size + (r * p1 + q) * ln), n)


@njit(**JIT)
def scatter_min(flat, org, geo, y0, y1, base, acc):
    p0, p1, ln, n1, wc = geo[0], geo[1], geo[2], geo[3], geo[4]
    size = p0 * p1 * ln
    n = U(ln)
    for k in range(org.shape[0]):
        o, r0, r1 = _rows(org, k, p0, y0, y1)
        for r in range(r0, r1):
            for q in range(p1):
                a = U(((o + r - base) * n1 + org[k, 1] + q) * wc + org[k, 2])
                run_min(acc, a, flat, U(k * size + (r * p1 + q) * ln), n)


@njit(**JIT)
def scatter_window(win, org, geo, out):
    """The weight map: ``win`` (one patch's spatial weights, ``(p0, p1, p2)``) added at every
    origin (here in plain, unfused units: ``geo = (p0, p1, p2, n1, n2)``)."""
    p0, p1, p2, n1, n2 = geo[0], geo[1], geo[2], geo[3], geo[4]
    n = U(p2)
    for k in range(org.shape[0]):
        for r in range(p0):
            for q in range(p1):
                a = U(((org[k, 0] + r) * n1 + org[k, 1] + q) * n2 + org[k, 2])
                wo = U((r * p1 + q) * p2)
                for t in range(n):
                    out[a + t] += win[wo + t]


@njit(**JIT)
def divide_into(acc, den, ext, crop, c, fill, y0, y1, base, clear, out):
    """``out = acc / den`` over the crop (``den`` per pixel, ``fill`` where it is 0), rows
    ``y0 .. y1``: the mean finished straight into the output dtype in one pass. ``ext`` and
    ``crop`` are ``(n0, n1, n2)`` of the canvas and of the image; ``c`` channels. ``clear``:
    zero each row of ``acc`` once it is read (padding included), so that a recycled band
    needs no pass of its own to be reset."""
    e1, e2 = ext[1], ext[2]
    s1, s2 = crop[1], crop[2]
    row = U(e1 * e2 * c)
    for y in range(y0, y1):
        for x in range(s1):
            a = U(((y - base) * e1 + x) * e2 * c)
            o = U((y * s1 + x) * s2 * c)
            d = U((y * e1 + x) * e2)
            for z in range(U(s2)):
                w = den[d + z]
                t = z * U(c)
                if w != 0:
                    for k in range(U(c)):
                        out[o + t + k] = acc[a + t + k] / w
                else:
                    for k in range(U(c)):
                        out[o + t + k] = fill
        if clear:
            r = U(y - base) * row
            for k in range(row):
                acc[r + k] = 0


@njit(**JIT)
def anchored_into(ref, acc, den, ext, crop, c, fill, y0, y1, base, out):
    """``out = ref + acc / den`` (the anchored mean), as :func:`divide_into`."""
    e1, e2 = ext[1], ext[2]
    s1, s2 = crop[1], crop[2]
    for y in range(y0, y1):
        for x in range(s1):
            a = U(((y - base) * e1 + x) * e2 * c)
            o = U((y * s1 + x) * s2 * c)
            d = U((y * e1 + x) * e2)
            for z in range(U(s2)):
                w = den[d + z]
                t = z * U(c)
                if w != 0:
                    for k in range(U(c)):
                        out[o + t + k] = np.float64(ref[a + t + k]) + acc[a + t + k] / w
                else:
                    for k in range(U(c)):
                        out[o + t + k] = fill


@njit(**JIT)
def grid_origins(idx, n, g, o0, o1, o2c, out):
    """Kernel origins ``(N, 3)`` of flat grid indices ``idx`` on a grid of ``n`` patches,
    ``g = (g0, g1, g2)`` per kernel axis, with per-axis origins ``o0``, ``o1``, ``o2c`` (output
    pixels). Returns ``(ok, lo, hi)``: whether every index lies in ``0 .. n - 1``
    (nothing is written otherwise), and the least and greatest first-axis origin."""
    for k in range(idx.shape[0]):
        if idx[k] < 0 or idx[k] >= n:
            return False, 0, 0
    g12 = g[1] * g[2]
    lo, hi = o0[o0.shape[0] - 1], o0[0]
    for k in range(idx.shape[0]):
        i = idx[k]
        v = o0[i // g12]
        out[k, 0] = v
        lo, hi = min(lo, v), max(hi, v)
        out[k, 1] = o1[(i // g[2]) % g[1]]
        out[k, 2] = o2c[i % g[2]]
    return True, lo, hi
