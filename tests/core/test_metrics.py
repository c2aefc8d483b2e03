import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from patch_viewer import compute_metrics, error_map


def test_hand_computed():
    ref = np.zeros((8, 8))
    merged = ref.copy()
    merged[0, 0] = 2
    ref[7, 7] = 4  # data range 4
    m = compute_metrics(merged, ref)
    assert m["max_abs"] == 4
    assert math.isclose(m["rmse"], math.sqrt((4 + 16) / 64))
    assert math.isclose(m["psnr"], 10 * math.log10(16 / ((4 + 16) / 64)))
    assert error_map(merged, ref)[0, 0] == 2 and error_map(merged, ref)[7, 7] == -4


def test_matches_skimage():
    rng = np.random.default_rng(0)
    ref = rng.random((32, 32, 3))
    merged = ref + rng.normal(0, 0.05, ref.shape)
    m = compute_metrics(merged, ref, channel_axis=-1)
    dr = ref.max() - ref.min()
    assert math.isclose(m["psnr"], peak_signal_noise_ratio(ref, merged, data_range=dr))
    assert math.isclose(
        m["ssim"], structural_similarity(ref, merged, data_range=dr, channel_axis=-1)
    )
    u8 = (ref * 255).astype(np.uint8)
    m = compute_metrics(u8.astype(np.float32) + 1, u8, channel_axis=-1)
    assert math.isclose(m["psnr"], 20 * math.log10(255))


def test_perfect_and_uncovered():
    ref = np.random.default_rng(1).random((16, 16))
    assert compute_metrics(ref, ref) == {
        "max_abs": 0.0,
        "rmse": 0.0,
        "psnr": math.inf,
        "ssim": 1.0,
        "covered": 1.0,
    }
    merged = ref.copy()
    merged[:, 12:] = np.nan  # uncovered by edge="drop"
    m = compute_metrics(merged, ref)
    assert m["covered"] == 0.75 and m["max_abs"] == 0 and m["ssim"] == 1.0
    assert math.isnan(compute_metrics(np.full((4, 4), np.nan), ref[:4, :4])["rmse"])


def test_tiny_images_have_no_ssim_but_other_metrics():
    m = compute_metrics(np.array([1.0, 2.0]), np.array([1.0, 3.0]))
    assert m["max_abs"] == 1 and math.isnan(m["ssim"])


def test_bad_input():
    with pytest.raises(ValueError, match=r"merged.*shape.*reference"):
        compute_metrics(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="data_range"):
        compute_metrics(np.zeros(3), np.zeros(3), data_range=0)


def test_ssim_can_be_deferred():
    rng = np.random.default_rng(3)
    ref = rng.random((24, 24))
    merged = ref + rng.normal(0, 0.1, ref.shape)
    fast = compute_metrics(merged, ref, ssim=False)
    full = compute_metrics(merged, ref)
    assert math.isnan(fast["ssim"])
    assert {k: v for k, v in fast.items() if k != "ssim"} == {
        k: v for k, v in full.items() if k != "ssim"
    }
    from patch_viewer.core.metrics import ssim_of

    assert ssim_of(merged, ref) == full["ssim"]


@pytest.mark.parametrize(
    "shape, channel_axis",
    [((700, 500), None), ((400, 300, 3), -1), ((40, 90, 80), None), ((130, 20), None)],
)
def test_banded_ssim_equals_whole_image_ssim_and_can_stop(shape, channel_axis):
    from patch_viewer.core.metrics import iter_ssim, ssim_of

    rng = np.random.default_rng(1)
    a = rng.random(shape)
    b = a + rng.normal(0, 0.1, shape)
    b[3, 5] = np.nan  # uncovered pixels take the reference's value, as in ssim_of
    gen = iter_ssim(b, a, channel_axis=channel_axis, band=50)
    steps = 0
    while True:
        try:
            next(gen)
            steps += 1
        except StopIteration as stop:
            value = stop.value
            break
    assert value == pytest.approx(ssim_of(b, a, channel_axis=channel_axis), abs=1e-12)
    assert steps == (0 if shape[0] <= 56 + 6 else -(-(shape[0] - 6) // 50))
    gen = iter_ssim(b, a, channel_axis=channel_axis, band=50)
    if shape[0] > 56:
        next(gen)
        gen.close()  # stopping between bands is clean


def test_metrics_take_the_error_the_caller_has():
    rng = np.random.default_rng(7)
    ref = rng.random((20, 30))
    merged = ref + rng.standard_normal(ref.shape) * 0.01
    merged[3, 4] = np.nan
    err = error_map(merged, ref)
    assert compute_metrics(merged, ref, error=err) == compute_metrics(merged, ref)
