import numpy as np
import pytest
from hypothesis import given, settings

from patch_viewer import PatchGrid

from .reference import brute_coverage
from .strategies import grids


def test_classic_case():
    g = PatchGrid((100, 100), 39, stride=1)
    assert g.grid_shape == (62, 62)
    assert g.n_patches == 3844
    assert g.patches_shape == (62, 62, 39, 39)
    assert g.is_regular and g.is_covering
    assert g.coverage_range() == (1, 39 * 39)


@pytest.mark.parametrize(
    "edge, origins, padded",
    [("shift", [0, 3, 6, 7], 11), ("drop", [0, 3, 6], 11), ("pad", [0, 3, 6, 9], 13)],
)
def test_edge_modes_hand_computed(edge, origins, padded):
    # 11 pixels, patch 4, stride 3: the regular grid 0, 3, 6 stops one pixel short.
    g = PatchGrid((11,), 4, stride=3, edge=edge)
    assert g.origins[0].tolist() == origins
    assert g.padded_shape == (padded,)
    assert g.is_regular == (edge != "shift")
    assert PatchGrid((10,), 4, stride=3, edge=edge).origins[0].tolist() == [0, 3, 6]


def test_shift_moves_last_patch_flush():
    g = PatchGrid((11,), 4, stride=3, edge="shift")
    assert g.origins[0].tolist() == [0, 3, 6, 7]
    assert not g.is_regular
    assert g.coverage_1d()[0].tolist() == [1, 1, 1, 2, 1, 1, 2, 2, 2, 2, 1]
    assert g.coverage_range() == (1, 2)


def test_drop_leaves_uncovered_tail_and_gaps():
    g = PatchGrid((10,), 3, stride=4, edge="drop")
    assert g.origins[0].tolist() == [0, 4]
    assert g.coverage_1d()[0].tolist() == [1, 1, 1, 0, 1, 1, 1, 0, 0, 0]
    assert g.coverage_range() == (0, 1)
    assert not g.is_covering


def test_pad_allows_patch_larger_than_image():
    g = PatchGrid((5, 3), (8, 4), stride=2, edge="pad")
    assert g.grid_shape == (1, 1)
    assert g.padded_shape == (8, 4)


def test_channel_axis_is_not_patched():
    g = PatchGrid((3, 20, 30), (5, 6), stride=(5, 3), channel_axis=0)
    assert g.spatial_shape == (20, 30)
    assert g.n_channels == 3
    assert g.patch_shape == (5, 6, 3)
    assert PatchGrid((20, 30, 3), 5, channel_axis=-1).channel_axis == 2


def test_patch_at_picks_nearest_covering_origin():
    g = PatchGrid((10, 10), 4, stride=2)
    assert g.patch_at((5.5, 0.2)) == (2, 0)
    assert g.patch_at((-1, 0)) is None
    assert g.patch_at((0, 10)) is None
    assert PatchGrid((10,), 2, stride=4, edge="drop").patch_at((3,)) is None
    assert g.patch_origin((2, 0)) == (4, 0)
    assert g.patch_index(7) == (1, 3)
    assert g.patch_origin(7) == g.patch_origin((1, 3)) == (2, 6)


@settings(max_examples=150, deadline=None)
@given(grids())
def test_coverage_matches_brute_force(grid):
    cov = grid.coverage_1d()
    expected = brute_coverage(grid)
    got = cov[0]
    for c in cov[1:]:
        got = np.multiply.outer(got, c)
    np.testing.assert_array_equal(got, expected)
    # Origins are sorted, inside the padded image, and the grid reaches the far edge.
    for o, p, n, _s, padded in zip(
        grid.origins, grid.patch_size, grid.spatial_shape, grid.stride, grid.padded_shape
    ):
        assert np.all(np.diff(o) > 0) and o[0] == 0 and o[-1] + p <= padded
        if grid.edge != "drop":
            assert o[-1] + p >= n


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(image_shape=(10, 10), patch_size=0), ValueError, "patch_size.*>= 1"),
        (dict(image_shape=(10, 10), patch_size=-3), ValueError, "patch_size"),
        (dict(image_shape=(10, 10), patch_size=2.5), TypeError, "patch_size"),
        (dict(image_shape=(10, 10), patch_size=(2, 2.0)), TypeError, "patch_size"),
        (dict(image_shape=(10, 10), patch_size=True), TypeError, "patch_size"),
        (
            dict(image_shape=(10, 10), patch_size=(2, 2, 2)),
            ValueError,
            "one entry per spatial axis",
        ),
        (dict(image_shape=(10, 10), patch_size=3, stride=0), ValueError, "stride.*>= 1"),
        (dict(image_shape=(10, 10), patch_size=3, stride=1.5), TypeError, "stride"),
        (dict(image_shape=(10, 10), patch_size=11), ValueError, r"patch_size.*1\.\.10.*edge='pad'"),
        (
            dict(image_shape=(10, 10), patch_size=11, edge="drop"),
            ValueError,
            "larger than the image",
        ),
        (dict(image_shape=(10, 10), patch_size=3, edge="wrap"), ValueError, "edge.*shift"),
        (
            dict(image_shape=(10, 10), patch_size=3, edge="pad", pad_mode="mirror"),
            ValueError,
            "pad_mode",
        ),
        (
            dict(image_shape=(10, 10), patch_size=3, channel_axis=2),
            ValueError,
            r"channel_axis.*-2\.\.1",
        ),
        (dict(image_shape=(10, 10), patch_size=3, channel_axis="0"), TypeError, "channel_axis"),
        (dict(image_shape=(), patch_size=3), ValueError, "0-d"),
        (dict(image_shape=(0, 5), patch_size=3), ValueError, "empty"),
        (dict(image_shape=(2, 2, 2, 2), patch_size=1), ValueError, "1 to 3 spatial axes"),
        (dict(image_shape=(3,), patch_size=1, channel_axis=0), ValueError, "1 to 3 spatial axes"),
        (dict(image_shape="abc", patch_size=1), TypeError, "image_shape"),
    ],
)
def test_bad_input_names_the_parameter(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PatchGrid(**kwargs)


def test_index_helpers_validate():
    g = PatchGrid((10, 10), 4, stride=2)
    with pytest.raises(ValueError, match=r"flat_index.*0\.\.15"):
        g.patch_index(16)
    with pytest.raises(ValueError, match="grid_shape"):
        g.patch_origin((4, 0))
    with pytest.raises(ValueError, match="2 coordinates"):
        g.patch_at((1,))
