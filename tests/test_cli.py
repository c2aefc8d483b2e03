"""`patch-viewer process`: formats, batching, streaming, metrics, progress and every refusal."""

import csv
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import zarr

import patch_viewer as pv
from patch_viewer import batch, register_filter
from patch_viewer.cli import main
from patch_viewer.core import FILTERS


def _run(capsys, *argv):
    code = main(["process", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    arrays = {}
    for i in range(5):
        arrays[f"a{i}.npy"] = rng.random((60, 50), dtype=np.float32)
        np.save(folder / f"a{i}.npy", arrays[f"a{i}.npy"])
    arrays["rgb.png"] = rng.integers(0, 256, (40, 45, 3), dtype=np.uint8)
    iio.imwrite(folder / "rgb.png", arrays["rgb.png"])
    arrays["t.tif"] = rng.integers(0, 60000, (70, 64), dtype=np.uint16)
    tifffile.imwrite(folder / "t.tif", arrays["t.tif"])
    arrays["g.jpg"] = rng.integers(0, 256, (48, 48), dtype=np.uint8)
    iio.imwrite(folder / "g.jpg", arrays["g.jpg"])
    z = zarr.open_array(
        str(folder / "v.zarr"), mode="w", shape=(30, 32, 28), chunks=(16, 16, 16), dtype=np.float64
    )
    arrays["v.zarr"] = rng.random((30, 32, 28))
    z[...] = arrays["v.zarr"]
    return folder, arrays


def _metric_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _read(path):
    return batch.io.probe(path).read()


def test_every_format_round_trips_exactly_with_metrics(images, tmp_path, capsys):
    folder, arrays = images
    out = tmp_path / "out"
    code, stdout, err = _run(
        capsys,
        folder,
        "-o",
        out,
        "--patch-size",
        "16",
        "--stride",
        "5",
        "--errors",
        "--metrics",
        tmp_path / "m.csv",
        "--batch-images",
        "2",
    )
    assert code == 0, err
    assert stdout.startswith("plan: 9 image(s)") and "batch(es)" in stdout
    assert "done:" in err and "patches/s" in err and "ETA" in err
    jpg = iio.imread(folder / "g.jpg")  # JPEG is lossy: compare with what was decoded
    for name, arr in arrays.items():
        stem, ext = name.rsplit(".", 1)
        merged = _read(out / name)
        expected = jpg if ext == "jpg" else arr
        assert merged.dtype == expected.dtype
        if ext == "jpg":  # JPEG re-encodes lossily (quality 95); the error map stays exact
            assert np.abs(merged.astype(int) - expected).mean() < 3
        else:
            np.testing.assert_array_equal(merged, expected)  # identity filter: exact
        err_ext = "tif" if ext in ("png", "jpg") else ext
        assert not _read(out / f"{stem}_error.{err_ext}").any()
    rows = _metric_rows(tmp_path / "m.csv")
    assert [r["input"].rsplit("/", 1)[1] for r in rows] == sorted(arrays)
    assert all(float(r["max_abs"]) == 0 and r["psnr"] == "inf" for r in rows)
    rgb = next(r for r in rows if r["input"].endswith("rgb.png"))
    assert int(rgb["patches"]) == pv.PatchGrid((40, 45, 3), 16, 5, channel_axis=-1).n_patches
    assert not list(out.glob(".*"))  # no temporary files left


def test_filtered_results_and_metrics_equal_the_api(images, tmp_path, capsys):
    folder, arrays = images
    out = tmp_path / "out"
    code, _, err = _run(
        capsys,
        folder / "a0.npy",
        folder / "a1.npy",
        "-o",
        out,
        "--patch-size",
        "12",
        "--stride",
        "4",
        "--filter",
        "gaussian",
        "--param",
        "sigma=1.5",
        "--window",
        "hann",
        "--metrics",
        out / "m.csv",
        "--reference",
        "filter",
    )
    assert code == 0, err
    rows = _metric_rows(out / "m.csv")
    for name, row in zip(("a0.npy", "a1.npy"), rows):
        grid = pv.PatchGrid(arrays[name].shape, 12, 4)
        r = pv.process(
            arrays[name],
            grid,
            "gaussian",
            filter_params={"sigma": 1.5},
            window="hann",
            reference="filter",
        )
        np.testing.assert_array_equal(np.load(out / name), r.merged)
        for k in ("max_abs", "rmse", "psnr", "ssim"):
            assert float(row[k]) == pytest.approx(r.metrics[k], rel=1e-8)


def test_large_images_stream_through_dask_to_zarr(tmp_path, capsys):
    rng = np.random.default_rng(1)
    image = rng.random((1000, 900), dtype=np.float32)
    tifffile.imwrite(tmp_path / "big.tif", image, tile=(128, 128))
    out = tmp_path / "out"
    code, stdout, err = _run(
        capsys,
        tmp_path / "big.tif",
        "-o",
        out,
        "--patch-size",
        "48",
        "--stride",
        "32",
        "--filter",
        "median",
        "--max-memory",
        "50MB",
        "--workers",
        "2",
        "--chunk",
        "256",
        "--errors",
        "--metrics",
        tmp_path / "m.csv",
    )
    assert code == 0, err
    assert "streamed through dask: 1 image(s)" in stdout
    r = pv.process(image, pv.PatchGrid(image.shape, 48, 32), "median")
    np.testing.assert_array_equal(zarr.open_array(str(out / "big.zarr"))[...], r.merged)
    np.testing.assert_array_equal(zarr.open_array(str(out / "big_error.zarr"))[...], r.error)
    row = _metric_rows(tmp_path / "m.csv")[0]
    assert float(row["ssim"]) == pytest.approx(r.metrics["ssim"], rel=1e-8)
    assert f"{r.grid.n_patches:,}/{r.grid.n_patches:,}" in err


def test_many_small_images_are_batched(tmp_path, capsys):
    folder = tmp_path / "many"
    folder.mkdir()
    stack = np.random.default_rng(2).integers(0, 255, (40, 20, 20), dtype=np.uint8)
    for i, im in enumerate(stack):
        np.save(folder / f"{i:03d}.npy", im)
    plan = batch.make_batch_plan(
        [folder], batch.Options(output=tmp_path / "o", patch_size=(9,), stride=(1,))
    )
    assert len(plan.batches) == 1 and len(plan.batches[0]) == 40
    code, _, err = _run(
        capsys,
        folder,
        "-o",
        tmp_path / "o",
        "--patch-size",
        "9",
        "--stride",
        "1",
        "--filter",
        "invert",
        "-q",
    )
    assert code == 0 and err == ""
    grid = pv.PatchGrid((20, 20), 9, 1)
    expected = pv.process(stack, grid, "invert", dtype=np.uint8).merged
    got = np.stack([np.load(tmp_path / "o" / f"{i:03d}.npy") for i in range(40)])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.tif"], "no such file"),
        (["notes.txt"], "unsupported format"),
        (["broken.npy"], "cannot read"),
        (["a.npy", "--patch-size", "4", "4", "4"], "patch_size"),
        (["a.npy", "--patch-size", "65"], "larger than the image"),
        (["a.npy", "--param", "sigma=2"], "takes parameters"),
        (["a.npy", "--filter", "gaussian", "--param", "sigma=99"], "sigma"),
        (["a.npy", "--channel-axis", "x"], "--channel-axis"),
        (["a.npy", "--channel-axis", "5"], "channel_axis"),
        (["a.npy", "--format", "png", "--dtype", "float32"], "8- or 16-bit"),
        (["photo.png", "--max-memory", "100KB"], "cannot be streamed"),
        (["a.npy", "--metrics", "a.npy"], "would overwrite an input"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(
    tmp_path, capsys, monkeypatch, argv, message
):
    monkeypatch.chdir(tmp_path)
    np.save("a.npy", np.zeros((64, 64), np.float32))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.npy").write_bytes(b"not a numpy file")
    iio.imwrite("photo.png", np.zeros((200, 200), np.uint8))
    code, _, err = _run(capsys, *argv, "-o", "out")
    assert code == 2
    assert message in err
    assert not (tmp_path / "out").exists()


def test_output_over_an_input_or_an_existing_file(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((64, 64), np.float32))
    code, _, err = _run(capsys, tmp_path / "a.npy", "-o", tmp_path)
    assert code == 2 and "would overwrite an input" in err
    out = tmp_path / "out"
    assert _run(capsys, tmp_path / "a.npy", "-o", out)[0] == 0
    code, _, err = _run(capsys, tmp_path / "a.npy", "-o", out)
    assert code == 2 and "--overwrite" in err
    assert _run(capsys, tmp_path / "a.npy", "-o", out, "--overwrite")[0] == 0


@pytest.mark.parametrize("fail_fast", [False, True])
def test_a_failing_image_is_logged_and_the_rest_goes_on(tmp_path, capsys, fail_fast):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        np.save(folder / f"{i}.npy", np.full((20, 20), i, np.float32))

    @register_filter("explode_on_4")
    def explode(stack, spatial_axes):
        if (stack == 4).any():
            raise RuntimeError("filter failed on image 4")
        return stack

    try:
        code, _, err = _run(
            capsys,
            folder,
            "-o",
            tmp_path / "out",
            "--patch-size",
            "5",
            "--stride",
            "2",
            "--filter",
            "explode_on_4",
            "--batch-images",
            "1",
            "--workers",
            "1",
            "--metrics",
            tmp_path / "m.csv",
            *(["--fail-fast"] if fail_fast else []),
        )
    finally:
        del FILTERS["explode_on_4"]
    assert code == 1 and "filter failed on image 4" in err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    expected = ["0.npy", "1.npy", "2.npy", "3.npy"] + ([] if fail_fast else ["5.npy"])
    assert written == expected  # complete, nothing half-written
    for name in written:
        np.testing.assert_array_equal(np.load(tmp_path / "out" / name), np.load(folder / name))
    rows = _metric_rows(tmp_path / "m.csv")
    assert [r["input"].rsplit("/", 1)[1] for r in rows] == expected  # rows earned are kept
    if not fail_fast:
        assert "1 of 6 image(s) failed" in err and "4.npy" in err


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((100, 100), np.float32))
    code, stdout, _ = _run(
        capsys,
        tmp_path / "a.npy",
        "-o",
        tmp_path / "out",
        "--patch-size",
        "39",
        "--stride",
        "1",
        "--dry-run",
    )
    assert code == 0 and "3,844 patches of 39x39" in stdout and "peak memory" in stdout
    assert not (tmp_path / "out").exists()


def test_command_line_entry_point(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((30, 30), np.float32))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "patch_viewer",
            "process",
            str(tmp_path / "a.npy"),
            "-o",
            str(tmp_path / "out"),
            "--patch-size",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "a.npy").is_file()
    helped = subprocess.run(
        [sys.executable, "-m", "patch_viewer", "process", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0 and "--max-memory" in helped.stdout


def test_launcher_opens_zarr_lazily(tmp_path):
    import dask.array as da

    from patch_viewer.cli import read_image

    z = zarr.open_array(
        str(tmp_path / "im.zarr"), mode="w", shape=(300, 200), chunks=(100, 100), dtype=np.uint8
    )
    z[...] = 7
    data = read_image(str(tmp_path / "im.zarr"))
    assert isinstance(data, da.Array) and int(data[5, 5].compute()) == 7
    np.save(tmp_path / "a.npy", np.ones((4, 4)))
    assert isinstance(read_image(str(tmp_path / "a.npy")), np.ndarray)


# --------------------------------------------------------------------------- issue 12
def test_the_plan_lists_every_parameter_problem_before_any_work(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((64, 64), np.float32))
    (tmp_path / "file").write_text("x")
    code, _, err = _run(
        capsys,
        tmp_path / "a.npy",
        "-o",
        tmp_path / "file" / "out",
        "--window",
        "hann",
        "--reduce",
        "max",
        "--metrics",
        tmp_path / "nowhere" / "m.csv",
        "--filter",
        "gaussian",
        "--param",
        "sigma=99",
        "--dry-run",
    )
    assert code == 2
    for part in ("--window", "reduce='max'", "nowhere", "is a file, not a folder", "sigma"):
        assert part in err, part
    code, _, err = _run(
        capsys,
        tmp_path / "a.npy",
        "-o",
        tmp_path / "out",
        "--window",
        "gaussian",
        "--window-sigma",
        "50",
        "--metrics",
        tmp_path,
        "--dry-run",
    )
    assert code == 2 and "--window-sigma" in err and "is a folder" in err


def test_uncovered_pixels_in_an_integer_output_need_a_fill_value(tmp_path, capsys):
    image = np.random.default_rng(0).integers(0, 255, (50, 50), dtype=np.uint8)
    iio.imwrite(tmp_path / "a.png", image)
    code, _, err = _run(
        capsys,
        tmp_path / "a.png",
        "-o",
        tmp_path / "out",
        "--patch-size",
        "16",
        "--stride",
        "16",
        "--edge",
        "drop",
        "--dry-run",
    )
    assert code == 2 and "--fill-value" in err and not (tmp_path / "out").exists()
    code, _, err = _run(
        capsys,
        tmp_path / "a.png",
        "-o",
        tmp_path / "out",
        "--patch-size",
        "16",
        "--stride",
        "16",
        "--edge",
        "drop",
        "--fill-value",
        "7",
    )
    assert code == 0, err
    merged = iio.imread(tmp_path / "out" / "a.png")
    assert (merged[48:] == 7).all() and (merged[:48, :48] == image[:48, :48]).all()


def test_skip_existing_resumes_and_completes_the_metrics(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        np.save(folder / f"{i}.npy", np.full((20, 20), i, np.float32))
    out, m = tmp_path / "out", tmp_path / "m.csv"
    argv = [folder, "-o", out, "--patch-size", "5", "--stride", "5", "--metrics", m]
    assert _run(capsys, *argv)[0] == 0
    (out / "2.npy").unlink()
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "--skip-existing" in err and err.count("exists") == 4  # 3 + the CSV
    code, stdout, err = _run(capsys, *argv, "--skip-existing")
    assert code == 0, err
    assert "skipped (already done): 3" in stdout and "1 image(s)" in stdout.splitlines()[-1]
    rows = _metric_rows(m)
    assert [r["input"].rsplit("/", 1)[1] for r in rows] == ["0.npy", "1.npy", "2.npy", "3.npy"]


def test_overwrite_replaces_files_never_folders(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((30, 30), np.float32))
    (tmp_path / "out" / "a.npy").mkdir(parents=True)
    (tmp_path / "out" / "a.npy" / "precious.txt").write_text("keep me")
    code, _, err = _run(
        capsys, tmp_path / "a.npy", "-o", tmp_path / "out", "--patch-size", "8", "--overwrite"
    )
    assert code == 2 and "never folders" in err
    assert (tmp_path / "out" / "a.npy" / "precious.txt").read_text() == "keep me"


def test_quiet_is_quiet(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((30, 30), np.float32))
    assert _run(capsys, tmp_path / "a.npy", "-o", tmp_path / "out", "--patch-size", "8", "-q") == (
        0,
        "",
        "",
    )


def test_many_workers_get_a_budget_that_makes_sense(tmp_path, capsys):
    iio.imwrite(tmp_path / "a.png", np.zeros((300, 300), np.uint8))
    code, stdout, _ = _run(
        capsys, tmp_path / "a.png", "-o", tmp_path / "out", "--workers", "1000", "--dry-run"
    )
    assert code == 0 and "on 1 process(es)" in stdout
    code, _, err = _run(
        capsys,
        tmp_path / "a.png",
        "-o",
        tmp_path / "out",
        "--workers",
        "1000",
        "--max-memory",
        "1MB",
    )
    assert code == 2 and "share of each of 1 process(es)" in err


def test_max_memory_takes_sizes(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((30, 30), np.float32))
    code, stdout, _ = _run(
        capsys,
        tmp_path / "a.npy",
        "-o",
        tmp_path / "out",
        "--max-memory",
        "1.5GB",
        "--stride",
        "8",
        "--patch-size",
        "8",
        "--dry-run",
    )
    assert code == 0 and "1.40 GiB budget" in stdout
    with pytest.raises(SystemExit):
        main(["process", str(tmp_path / "a.npy"), "-o", "x", "--max-memory", "-1"])
    assert "--max-memory" in capsys.readouterr().err


def test_big_endian_npy_is_read(tmp_path, capsys):
    image = np.arange(64 * 64, dtype=">u2").reshape(64, 64)
    np.save(tmp_path / "be.npy", image)
    code, _, err = _run(
        capsys, tmp_path / "be.npy", "-o", tmp_path / "out", "--patch-size", "8", "--stride", "4"
    )
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "be.npy"), image)


def test_tiff_resolution_and_axes_are_kept(tmp_path, capsys):
    image = np.random.default_rng(0).integers(0, 999, (5, 40, 40), dtype=np.uint16)
    tifffile.imwrite(
        tmp_path / "z.tif",
        image,
        resolution=(2.0, 4.0),
        resolutionunit="CENTIMETER",
        metadata={"axes": "ZYX"},
    )
    code, _, err = _run(
        capsys, tmp_path / "z.tif", "-o", tmp_path / "out", "--patch-size", "4", "--stride", "2"
    )
    assert code == 0, err
    with tifffile.TiffFile(tmp_path / "out" / "z.tif") as tif:
        assert tif.series[0].axes == "ZYX"
        assert tif.pages[0].resolution == (2.0, 4.0) and tif.pages[0].resolutionunit == 3
        np.testing.assert_array_equal(tif.asarray(), image)


def test_channels_are_decided_by_format_and_metadata(tmp_path, capsys):
    iio.imwrite(tmp_path / "la.png", np.zeros((40, 40, 2), np.uint8))  # gray + alpha
    tifffile.imwrite(
        tmp_path / "c.tif",
        np.zeros((4, 96, 96), np.uint16),
        photometric="rgb",
        planarconfig="separate",
    )
    plan = batch.make_batch_plan(
        [tmp_path / "la.png", tmp_path / "c.tif"],
        batch.Options(output=tmp_path / "o", patch_size=(8,), stride=(4,)),
    )
    assert [it.grid.channel_axis for it in plan.items] == [2, 0]
    plan = batch.make_batch_plan(
        [tmp_path / "c.tif"],
        batch.Options(output=tmp_path / "o", patch_size=(4,), stride=(4,), channel_axis="none"),
    )
    assert plan.items[0].grid.channel_axis is None and plan.items[0].grid.ndim == 3
    code, _, err = _run(
        capsys, tmp_path / "c.tif", "-o", tmp_path / "out", "--patch-size", "8", "--stride", "8"
    )
    assert code == 0, err
    assert tifffile.imread(tmp_path / "out" / "c.tif").shape == (4, 96, 96)


def test_default_dtype_keeps_the_input_but_bool_becomes_float(tmp_path, capsys):
    mask = np.random.default_rng(0).random((40, 40)) > 0.5
    np.save(tmp_path / "m.npy", mask)
    code, _, err = _run(
        capsys,
        tmp_path / "m.npy",
        "-o",
        tmp_path / "out",
        "--patch-size",
        "8",
        "--stride",
        "4",
        "--filter",
        "gaussian",
    )
    assert code == 0, err
    merged = np.load(tmp_path / "out" / "m.npy")
    expected = pv.process(mask, pv.PatchGrid(mask.shape, 8, 4), "gaussian").merged
    assert merged.dtype == np.float32
    np.testing.assert_array_equal(merged, expected)
    code, _, _ = _run(
        capsys,
        tmp_path / "m.npy",
        "-o",
        tmp_path / "out2",
        "--patch-size",
        "8",
        "--stride",
        "8",
        "--dtype",
        "input",
    )
    assert code == 0 and np.load(tmp_path / "out2" / "m.npy").dtype == np.bool_


class _Counter:
    """Stands in for the shared multiprocessing counter: records every value it takes."""

    def __init__(self):
        self.value, self.seen = 0, []

    def get_lock(self):
        import contextlib

        return contextlib.nullcontext()

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "value" and hasattr(self, "seen"):
            self.seen.append(value)


def test_progress_moves_within_batches(tmp_path, monkeypatch):
    """A worker counts patches into the shared counter after every streamed batch of
    patches, not once per image: the parent's progress line moves during a long image.
    (Checked on the counter itself: how often the parent happens to poll it depends on
    how fast this machine is.)"""
    from patch_viewer import batch_run

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        np.save(folder / f"{i}.npy", np.random.default_rng(i).random((300, 300), np.float32))
    opts = batch.Options(
        output=tmp_path / "out",
        patch_size=(16,),
        stride=(2,),
        batch_images=2,
        patch_filter="gaussian",
    )
    plan = batch.make_batch_plan([folder], opts)
    (job,) = plan.batches
    counter = _Counter()
    monkeypatch.setattr(batch_run, "_COUNTER", counter)
    (opts.output).mkdir()
    results = batch_run._batch_job(job, opts)
    assert [kind for kind, _ in results] == ["row", "row"]
    total = sum(it.grid.n_patches for it in job)
    assert counter.seen == sorted(counter.seen) and counter.seen[-1] == total
    assert len([v for v in counter.seen if 0 < v < total]) >= 3, counter.seen


def test_a_registered_predictor_runs_from_the_command_line(tmp_path, capsys):
    """K class probabilities from a uint8 image: written as float32 (not cast back to uint8),
    equal to the in-memory run; --errors is refused (nothing to compare with)."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(3)
    images = {f"{i}.npy": rng.integers(0, 256, (30 + i, 40), dtype=np.uint8) for i in range(3)}
    for name, a in images.items():
        np.save(folder / name, a)

    @pv.register_predictor("probs3", channels=3)
    def probs3(batch):
        p = batch.astype(np.float32) / 255
        return np.stack([p, 1 - p, np.full_like(p, 0.5)], axis=-1)

    try:
        code, _, err = _run(
            capsys,
            folder,
            "-o",
            tmp_path / "out",
            "--patch-size",
            "8",
            "--stride",
            "4",
            "--filter",
            "probs3",
            "--window",
            "hann",
            "--metrics",
            tmp_path / "m.csv",
        )
        assert code == 0, err
        for name, a in images.items():
            got = np.load(tmp_path / "out" / name)
            want = pv.process(a, pv.PatchGrid(a.shape, 8, stride=4), "probs3", window="hann").merged
            assert got.dtype == np.float32 and got.shape == a.shape + (3,)
            np.testing.assert_array_equal(got, want)
        code, _, err = _run(
            capsys,
            folder,
            "-o",
            tmp_path / "out2",
            "--patch-size",
            "8",
            "--filter",
            "probs3",
            "--errors",
        )
        assert code != 0 and "--errors" in err and "probs3" in err
    finally:
        del FILTERS["probs3"]
