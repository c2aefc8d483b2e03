"""Hypothesis strategies: random grids over 1-3 spatial axes, with or without channels."""

import numpy as np
from hypothesis import strategies as st

from patch_viewer import EDGE_MODES, PAD_MODES, PatchGrid

DTYPES = [np.uint8, np.uint16, np.int16, np.int32, np.float16, np.float32, np.float64]


@st.composite
def grids(draw, max_side=None, edges=EDGE_MODES, channels=(None, 1, 3)):
    nd = draw(st.integers(1, 3))
    side = max_side or {1: 24, 2: 13, 3: 7}[nd]
    spatial = [draw(st.integers(1, side)) for _ in range(nd)]
    edge = draw(st.sampled_from(edges))
    patch = [draw(st.integers(1, n + (3 if edge == "pad" else 0))) for n in spatial]
    stride = [draw(st.integers(1, p + 2)) for p in patch]
    c = draw(st.sampled_from(channels))
    shape, channel_axis = list(spatial), None
    if c is not None:
        channel_axis = draw(st.integers(0, nd))
        shape.insert(channel_axis, c)
        if draw(st.booleans()):
            channel_axis -= nd + 1  # negative form
    return PatchGrid(
        tuple(shape),
        tuple(patch),
        tuple(stride),
        edge=edge,
        pad_mode=draw(st.sampled_from(PAD_MODES)),
        channel_axis=channel_axis,
    )


def images(grid, dtype, seed):
    """Random image of the grid's shape; values span the dtype (floats: signed, mixed scale)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, grid.image_shape, endpoint=True, dtype=dtype)
    scale = 10.0 ** rng.integers(-3, 4, grid.image_shape)
    return (rng.standard_normal(grid.image_shape) * scale).astype(dtype)
