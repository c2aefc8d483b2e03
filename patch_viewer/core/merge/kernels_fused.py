"""Compiled kernels of the fused stream and of extraction (numba), on the same canonical
*source* as :mod:`.kernels_numba` (read its docstring first).

``process()`` filters patches inside the merge where the filter allows it: ``(v - c) / d`` with
one ``(c, d)`` per patch (invert, minmax, zscore, a scale; the per-patch statistics by
:func:`patch_range` and :func:`patch_moments`), or ``fn(v)`` for a compiled element-wise
function (:func:`band_map`), so that no filtered patch is ever stored. :func:`copy_patches`
copies patches out of a source in C order (copying extraction, and batches for other filters).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .kernels_numba import JIT, U

__all__ = [
    "band_affine",
    "band_affine_scaled",
    "band_affine_weighted",
    "band_map",
    "copy_patches",
    "patch_moments",
    "patch_range",
]


# --------------------------------------------------------------------------- the fused stream
# process() filters patches inside the merge where the filter allows it: ``(v - c) / d`` with
# one (c, d) per patch (invert, minmax, zscore, a scale) computed in the filter's dtype, so
# that no filtered patch is ever stored.
@njit(inline="always", **JIT)
def run_add_scaled(acc, a, flat, f, c, e, n):
    for k in range(n):
        acc[a + k] += (flat[f + k] - c) * e


@njit(inline="always", **JIT)
def run_add_affine(acc, a, flat, f, c, d, n):
    for k in range(n):
        acc[a + k] += (flat[f + k] - c) / d


@njit(inline="always", **JIT)
def run_add_affine_weighted(acc, a, flat, f, c, d, w, wo, n):
    for k in range(n):
        acc[a + k] += w[wo + k] * ((flat[f + k] - c) / d)


@njit(**JIT)
def band_affine(flat, st, f0, f1, f2, geo, o0, o1, o2c, bi, i0, i1, y0, y1, n1, wc, cen, den, acc):
    """:func:`band_sum` of ``(v - cen[p]) / den[p]`` for each patch ``p = (bi, i, m, j)``
    (``cen`` and ``den`` are ``(b, rows, g1, g2)``, in the data's dtype)."""
    p0, p1, ln, g1, g2 = geo[0], geo[1], geo[2], geo[3], geo[4]
    sr = st[1]
    n = U(ln)
    for m in range(g1):
        for q in range(p1):
            fm = bi * st[0] + f1[m] + q * st[2]
            am = (o1[m] + q) * wc
            for i in range(i0, i1):
                oi, fi = o0[i], f0[i]
                r0, r1 = max(y0 - oi, 0), min(y1 - oi, p0)
                for j in range(g2):
                    fj = fm + fi + f2[j]
                    aj = am + o2c[j]
                    c, d = cen[bi, i, m, j], den[bi, i, m, j]
                    for r in range(r0, r1):
                        run_add_affine(
                            acc, U((oi + r - y0) * n1 * wc + aj), flat, U(fj + r * sr), c, d, n
                        )


@njit(**JIT)
def band_affine_scaled(
    flat, st, f0, f1, f2, geo, o0, o1, o2c, bi, i0, i1, y0, y1, n1, wc, cen, inv, acc
):
    """:func:`band_affine` multiplying by ``inv = 1 / den``, for denominators that are powers
    of two (then exact: the same bits, without a division per value)."""
    p0, p1, ln, g1, g2 = geo[0], geo[1], geo[2], geo[3], geo[4]
    sr = st[1]
    n = U(ln)
    for m in range(g1):
        for q in range(p1):
            fm = bi * st[0] + f1[m] + q * st[2]
            am = (o1[m] + q) * wc
            for i in range(i0, i1):
                oi, fi = o0[i], f0[i]
                r0, r1 = max(y0 - oi, 0), min(y1 - oi, p0)
                for j in range(g2):
                    fj = fm + fi + f2[j]
                    aj = am + o2c[j]
                    c, d = cen[bi, i, m, j], inv[bi, i, m, j]
                    for r in range(r0, r1):
                        run_add_scaled(
                            acc, U((oi + r - y0) * n1 * wc + aj), flat, U(fj + r * sr), c, d, n
                        )


@njit(**JIT)
def band_affine_weighted(
    flat, st, f0, f1, f2, geo, o0, o1, o2c, bi, i0, i1, y0, y1, n1, wc, cen, den, win, acc
):
    p0, p1, ln, g1, g2 = geo[0], geo[1], geo[2], geo[3], geo[4]
    sr = st[1]
    n = U(ln)
    for m in range(g1):
        for q in range(p1):
            fm = bi * st[0] + f1[m] + q * st[2]
            am = (o1[m] + q) * wc
            for i in range(i0, i1):
                oi, fi = o0[i], f0[i]
                r0, r1 = max(y0 - oi, 0), min(y1 - oi, p0)
                for j in range(g2):
                    fj = fm + fi + f2[j]
                    aj = am + o2c[j]
                    c, d = cen[bi, i, m, j], den[bi, i, m, j]
                    for r in range(r0, r1):
                        run_add_affine_weighted(
                            acc,
                            U((oi + r - y0) * n1 * wc + aj),
                            flat,
                            U(fj + r * sr),
                            c,
                            d,
                            win,
                            U((r * p1 + q) * ln),
                            n,
                        )


@njit(**JIT)
def patch_range(flat, st, f0, f1, f2, geo, b, lo, hi):
    """Per patch ``(b, rows, g1, g2)``: its minimum and maximum (NaN if it holds one)."""
    p0, p1, ln, g1, g2 = geo[0], geo[1], geo[2], geo[3], geo[4]
    for bi in range(b):
        for i in range(f0.shape[0]):
            for m in range(g1):
                for j in range(g2):
                    base = bi * st[0] + f0[i] + f1[m] + f2[j]
                    a = flat[base]
                    z = a
                    for r in range(p0):
                        for q in range(p1):
                            f = base + r * st[1] + q * st[2]
                            for k in range(ln):
                                v = flat[f + k]
                                a = np.minimum(a, v)
                                z = np.maximum(z, v)
                    lo[bi, i, m, j] = a
                    hi[bi, i, m, j] = z


@njit(fastmath={"reassoc", "contract"}, **JIT)  # sums in any order: vectorised
def patch_moments(flat, st, f0, f1, f2, geo, b, mean, std):
    """Per patch ``(b, rows, g1, g2)``: its mean and standard deviation (float64 sums)."""
    p0, p1, ln, g1, g2 = geo[0], geo[1], geo[2], geo[3], geo[4]
    size = p0 * p1 * ln
    for bi in range(b):
        for i in range(f0.shape[0]):
            for m in range(g1):
                for j in range(g2):
                    base = bi * st[0] + f0[i] + f1[m] + f2[j]
                    s = 0.0
                    for r in range(p0):
                        for q in range(p1):
                            f = base + r * st[1] + q * st[2]
                            for k in range(ln):
                                s += flat[f + k]
                    mean[bi, i, m, j] = s / size
                    mu = mean[bi, i, m, j]  # rounded to the filter's dtype, as its own mean
                    s2 = 0.0
                    for r in range(p0):
                        for q in range(p1):
                            f = base + r * st[1] + q * st[2]
                            for k in range(ln):
                                e = np.float64(flat[f + k] - mu)
                                s2 += e * e
                    std[bi, i, m, j] = np.sqrt(s2 / size)


@njit(**JIT)
def copy_patches(flat, st, f0, f1, f2, geo, b, out):
    """The source's patches into ``out``, C-ordered ``(b, rows, g1, g2, p0, p1, L)`` flat."""
    p0, p1, ln, g1, g2 = geo[0], geo[1], geo[2], geo[3], geo[4]
    n = U(ln)
    o = U(0)
    for bi in range(b):
        for i in range(f0.shape[0]):
            for m in range(g1):
                for j in range(g2):
                    base = bi * st[0] + f0[i] + f1[m] + f2[j]
                    for r in range(p0):
                        for q in range(p1):
                            f = U(base + r * st[1] + q * st[2])
                            for k in range(n):
                                out[o + k] = flat[f + k]
                            o += n


def _band_map(flat, st, f0, f1, f2, geo, o0, o1, o2c, bi, i0, i1, y0, y1, n1, wc, fn, acc):
    """:func:`band_sum` of ``fn(v)``, ``fn`` a compiled element-wise function."""
    p0, p1, ln, g1, g2 = geo[0], geo[1], geo[2], geo[3], geo[4]
    sr = st[1]
    for m in range(g1):
        for q in range(p1):
            fm = bi * st[0] + f1[m] + q * st[2]
            am = (o1[m] + q) * wc
            for i in range(i0, i1):
                oi, fi = o0[i], f0[i]
                r0, r1 = max(y0 - oi, 0), min(y1 - oi, p0)
                for j in range(g2):
                    fj = fm + fi + f2[j]
                    aj = am + o2c[j]
                    for r in range(r0, r1):
                        a = U((oi + r - y0) * n1 * wc + aj)
                        f = U(fj + r * sr)
                        for k in range(U(ln)):
                            acc[a + k] += fn(flat[f + k])


# Takes a function: compiled once per process and function (numba cannot cache it).
band_map = njit(nogil=True, error_model="numpy", boundscheck=False)(_band_map)
