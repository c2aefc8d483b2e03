"""Fault injection: the batch command line is killed, interrupted, starved of disk and fed
corrupt files, and must leave only complete files, keep the metric rows it earned, leave no
process behind its parent, and leave no temporary file past the next run.

Each run is a real ``python -m patch_viewer process`` in its own process group (a session).
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from patch_viewer import batch, io

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

SHAPE = (400, 400)
ARGS = [
    "--patch-size",
    "16",
    "--stride",
    "2",
    "--filter",
    "gaussian",
    "--batch-images",
    "1",
    "--workers",
    "2",
    "-q",
]


@pytest.fixture
def folder(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        np.save(inputs / f"im{i:02d}.npy", rng.random(SHAPE, dtype=np.float32))
    return inputs


def _start(inputs, out, *extra):
    cmd = [
        sys.executable,
        "-m",
        "patch_viewer",
        "process",
        str(inputs),
        "-o",
        str(out),
        "--metrics",
        str(out / "m.csv"),
        *ARGS,
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": _root()},
    )


def _metric_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _root():
    return str(Path(__file__).resolve().parents[1])


def _wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _finished(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*.npy")) if out.is_dir() else []


def _group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _check_outputs(out: Path, inputs: Path, expect_all: bool):
    """Every final file is whole and right; the CSV rows are whole and name real outputs;
    no temporary file is left."""
    import patch_viewer as pv

    for path in _finished(out):
        image = np.load(inputs / path.name)
        expected = pv.process(image, pv.PatchGrid(SHAPE, 16, 2), "gaussian", metrics=False)
        np.testing.assert_array_equal(np.load(path), expected.merged)
    rows = _metric_rows(out / "m.csv")
    assert all(r["ssim"] not in ("", None) for r in rows)  # every row complete
    assert {Path(r["output"]).name for r in rows} <= {p.name for p in _finished(out)}
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    if expect_all:
        assert len(_finished(out)) == 12 and len(rows) == 12
    return rows


@pytest.mark.parametrize("target", ["group", "parent"])
def test_ctrl_c_stops_cleanly_and_keeps_the_rows_earned(folder, tmp_path, target):
    out = tmp_path / "out"
    proc = _start(folder, out)
    assert _wait_for(lambda: len(_finished(out)) >= 2)
    (os.killpg if target == "group" else os.kill)(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert _wait_for(lambda: not _group_alive(proc.pid), timeout=5)
    rows = _check_outputs(out, folder, expect_all=False)
    assert len(rows) == len(_finished(out)) >= 2


@pytest.mark.parametrize("target", ["group", "parent"])
def test_sigkill_leaves_no_orphan_and_the_next_run_finishes(folder, tmp_path, target):
    out = tmp_path / "out"
    proc = _start(folder, out)
    assert _wait_for(lambda: len(_finished(out)) >= 2)
    (os.killpg if target == "group" else os.kill)(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    # Workers notice their parent's death through a pipe and exit within moments.
    assert _wait_for(lambda: not _group_alive(proc.pid), timeout=5), _group_alive(proc.pid)
    rows = _metric_rows(out / "m.csv")  # the rows earned survive a SIGKILL
    assert len(rows) >= 2
    # A stale temporary file of the dead run (as a kill mid-write leaves) is cleaned.
    (out / f".im11.npy.tmp-{proc.pid}").write_bytes(b"partial")
    again = _start(folder, out, "--skip-existing")
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    _check_outputs(out, folder, expect_all=True)


def test_sigkill_while_streaming_to_zarr_is_cleaned_next_run(tmp_path):
    import tifffile

    image = np.random.default_rng(1).random((1500, 1500), dtype=np.float32)
    tifffile.imwrite(tmp_path / "big.tif", image, tile=(256, 256))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "patch_viewer",
        "process",
        str(tmp_path / "big.tif"),
        "-o",
        str(out),
        "--patch-size",
        "32",
        "--stride",
        "4",
        "--filter",
        "median",
        "--max-memory",
        "60MB",
        "--chunk",
        "256",
        "--workers",
        "2",
        "-q",
    ]
    env = {**os.environ, "PYTHONPATH": _root()}
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, stderr=subprocess.PIPE)
    assert _wait_for(lambda: any(".tmp-" in p.name for p in out.glob(".*")), timeout=60)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert [p for p in out.iterdir() if ".tmp-" in p.name]  # what a hard kill leaves
    done = subprocess.run(
        cmd + ["--stride", "16"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["big.zarr"]
    assert zarr.open_array(str(out / "big.zarr")).shape == image.shape


def _fake_full_disk(monkeypatch, after: int, numpy_style: bool):
    """Writes succeed ``after`` times, then fail as a full disk does: half the bytes land."""
    calls = {"n": 0}
    real = io._write_format

    def write(tmp, path, array, fmt, meta):
        calls["n"] += 1
        if calls["n"] <= after:
            return real(tmp, path, array, fmt, meta)
        Path(tmp).write_bytes(b"\0" * 100)
        if numpy_style:
            raise OSError("262144 requested and 261088 written")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "_write_format", write)


@pytest.mark.parametrize("numpy_style", [False, True])
def test_a_full_disk_says_so_and_leaves_only_complete_files(
    folder, tmp_path, capsys, monkeypatch, numpy_style
):
    from patch_viewer.cli import main

    _fake_full_disk(monkeypatch, after=3, numpy_style=numpy_style)
    out = tmp_path / "out"
    code = main(
        [
            "process",
            str(folder),
            "-o",
            str(out),
            "--metrics",
            str(out / "m.csv"),
            *ARGS[:-3],
            "--workers",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "disk full: cannot write" in err and str(out) in err and "requested" not in err
    assert len(_finished(out)) == 3
    _check_outputs(out, folder, expect_all=False)


@pytest.mark.parametrize("kind", ["npy", "png", "tif"])
def test_a_corrupt_file_mid_folder_is_logged_and_the_rest_written(tmp_path, capsys, kind):
    import imageio.v3 as iio
    import tifffile

    from patch_viewer.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(2)
    for i in range(9):
        image = rng.integers(0, 255, (64, 64), dtype=np.uint8)
        name = inputs / f"im{i}.{kind}"
        {"npy": np.save, "png": iio.imwrite, "tif": tifffile.imwrite}[kind](name, image)
    bad = inputs / f"im4.{kind}"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated
    (inputs / f"im6.{kind}").write_bytes(b"")  # empty
    out = tmp_path / "out"
    code = main(
        [
            "process",
            str(inputs),
            "-o",
            str(out),
            "--patch-size",
            "8",
            "--stride",
            "4",
            "--metrics",
            str(tmp_path / "m.csv"),
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "2 of 9 image(s) failed" in err and f"im4.{kind}" in err and f"im6.{kind}" in err
    assert "pip install" not in err and "empty (0 bytes)" in err
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"im{i}.{kind}" for i in (0, 1, 2, 3, 5, 7, 8))
    rows = _metric_rows(tmp_path / "m.csv")
    assert len(rows) == 7
    code = main(
        [
            "process",
            str(inputs),
            "-o",
            str(out),
            "--patch-size",
            "8",
            "--stride",
            "4",
            "--fail-fast",
            "--overwrite",
        ]
    )
    assert code == 2 and "im6" in capsys.readouterr().err  # unreadable header: refused first
    assert batch.make_batch_plan(
        [inputs], batch.Options(output=out, overwrite=True, patch_size=(8,), stride=(4,))
    )
