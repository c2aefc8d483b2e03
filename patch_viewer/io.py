"""Reading and writing image files: TIFF, PNG/JPEG, NumPy ``.npy`` and zarr.

The one image reader of the package (the command line, the launcher and the bundled samples all
use it). Readers open a file by its header first (shape, dtype, channel axis and the metadata
worth keeping) so that a plan can be made before anything is loaded, and large images can be
streamed through dask. Pixels come back in native byte order.

The one atomic writer: nothing is ever written under a final name. Files go to a hidden
temporary name in the same folder (``.NAME.tmp-PID``, PID of the run that writes it) and are
renamed into place, an atomic step on one file system. Temporary files of runs that died (a
SIGKILL, a power cut) are removed by :func:`clean_stale` on the next run into the folder. A
folder is never deleted unless it is a zarr store being replaced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Suffix -> format name, for files the command line reads and writes.
FORMATS = {
    ".tif": "tiff",
    ".tiff": "tiff",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".npy": "npy",
    ".zarr": "zarr",
}
#: Formats that hold 8/16-bit integer pixels only.
INTEGER_ONLY = ("png", "jpeg")
#: Formats that can be read lazily (chunk by chunk) for images larger than memory.
LAZY = ("tiff", "npy", "zarr")
#: TIFF axis letters that mean channels (tifffile: S samples, C channels).
CHANNEL_AXES = "SC"

#: The PID that names this run's temporary files; worker processes are given their parent's.
RUN_PID = os.getpid()
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


class ImageError(ValueError):
    """A file that cannot be read or written as an image (the message names the file)."""


class DiskFullError(OSError):
    """A write failed because the disk is full (the message names the path). One base class
    only: exceptions travel back from worker processes by pickle, and tblib's pickling (which
    dask installs) cannot rebuild an exception with two built-in bases."""


def format_of(path) -> str | None:
    """The format name of ``path`` from its suffix, or None if unsupported."""
    return FORMATS.get(Path(path).suffix.lower())


def is_zarr_dir(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (
        path.suffix.lower() == ".zarr"
        or (path / "zarr.json").exists()
        or (path / ".zarray").exists()
    )


@dataclass(frozen=True)
class ImageFile:
    """An input image known by its header: path, format, shape, dtype (native byte order),
    the channel axis its format and metadata imply, and TIFF metadata worth keeping."""

    path: Path
    format: str
    shape: tuple[int, ...]
    dtype: np.dtype
    channel_axis: int | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def read(self) -> np.ndarray:
        """All pixels, in memory, in native byte order."""
        try:
            if self.format == "npy":
                arr = np.load(self.path)
            elif self.format == "tiff":
                import tifffile

                arr = tifffile.imread(self.path)
            elif self.format == "zarr":
                arr = np.asarray(_open_zarr(self.path)[...])
            else:
                import imageio.v3 as iio

                arr = np.asarray(iio.imread(self.path))
        except Exception as exc:  # noqa: BLE001 - every reader failure becomes one message
            raise ImageError(_reader_message(self.path, exc)) from None
        arr = _native(arr)
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ImageError(
                f"{self.path}: read {arr.shape} {arr.dtype}, but its header said "
                f"{self.shape} {self.dtype}; the file is damaged"
            )
        return arr

    def lazy(self, chunk: int):
        """A dask array over the file, read chunk by chunk (TIFF, .npy and zarr)."""
        import dask.array as da

        if self.format == "zarr":
            z = _open_zarr(self.path)
            # Read whole stored chunks (each decoded once), then split them in memory.
            arr = da.from_array(z, chunks=_chunks(self.shape, chunk, z.chunks)).rechunk(
                _chunks(self.shape, chunk)
            )
        elif self.format == "npy":
            arr = da.from_array(
                np.load(self.path, mmap_mode="r"), chunks=_chunks(self.shape, chunk)
            )
        elif self.format == "tiff":
            import tifffile
            import zarr

            store = tifffile.imread(self.path, aszarr=True)
            arr = da.from_array(zarr.open(store, mode="r"), chunks=_chunks(self.shape, chunk))
        else:
            raise ImageError(f"{self.path}: {self.format} files cannot be read chunk by chunk")
        return arr if arr.dtype == self.dtype else arr.astype(self.dtype)


def _native(arr: np.ndarray) -> np.ndarray:
    """``arr`` in native byte order (a big-endian ``.npy`` is read as such)."""
    native = arr.dtype.newbyteorder("=")
    return arr if arr.dtype == native else arr.astype(native)


def _reader_message(path: Path, exc: Exception) -> str:
    """One line saying why ``path`` cannot be read, without imageio's plugin advice."""
    try:
        if path.is_file() and path.stat().st_size == 0:
            return f"cannot read {path}: the file is empty (0 bytes)"
    except OSError:
        pass
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "Could not find a backend" in text or "plugin" in text.lower():
        text = f"not a readable {format_of(path) or 'image'} file (damaged or truncated?)"
    return f"cannot read {path}: {text}"


def _chunks(shape, chunk: int, native=None):
    """Chunks of about ``chunk`` pixels per axis, aligned with the file's own chunks."""
    if native is None:
        return tuple(min(n, chunk) for n in shape)
    return tuple(min(n, max(c, chunk // c * c)) for n, c in zip(shape, native, strict=True))


def _open_zarr(path: Path):
    import zarr

    return zarr.open_array(str(path), mode="r")


def _guess_channels(shape, fmt: str, axes: str | None) -> int | None:
    """The channel axis from format and metadata: PNG/JPEG with 3 axes hold channels last
    (gray+alpha, RGB, RGBA); TIFF axes say S/C for channels; otherwise a 3-axis image whose
    first or last axis has 2-4 entries beside two wider ones is taken as channels."""
    if len(shape) != 3:
        return None
    if fmt in INTEGER_ONLY:
        return 2
    if axes:
        found = [i for i, a in enumerate(axes) if a in CHANNEL_AXES]
        if found:
            return found[0]
        if any(a in "ZT" for a in axes):
            return None
    for ax in (2, 0):
        others = [n for i, n in enumerate(shape) if i != ax]
        if 2 <= shape[ax] <= 4 and min(others) > 4 * shape[ax]:
            return ax
    return None


def _probe_tiff(path: Path):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        page = tif.pages[0]
        meta = {"axes": series.axes}
        resolution = getattr(page, "resolution", None)
        unit = getattr(page, "resolutionunit", None)
        if resolution and tuple(resolution) != (1, 1):
            meta["resolution"] = tuple(float(r) for r in resolution)
            meta["resolutionunit"] = int(unit) if unit is not None else None
        return series.shape, np.dtype(series.dtype), meta


def _probe_header(path: Path, fmt: str):
    meta = {}
    if fmt == "npy":
        with open(path, "rb") as f:  # the header only
            fmt_ = np.lib.format
            major, _ = fmt_.read_magic(f)
            read = fmt_.read_array_header_1_0 if major == 1 else fmt_.read_array_header_2_0
            shape, _, dtype = read(f)
    elif fmt == "zarr":
        z = _open_zarr(path)
        shape, dtype = z.shape, np.dtype(z.dtype)
    elif fmt == "tiff":
        shape, dtype, meta = _probe_tiff(path)
    else:
        import imageio.v3 as iio

        props = iio.improps(path)
        shape, dtype = props.shape, np.dtype(props.dtype)
    return tuple(int(n) for n in shape), np.dtype(dtype).newbyteorder("="), meta


def probe(path) -> ImageFile:
    """Read an image file's header (shape, dtype, channel axis, metadata) without loading its
    pixels."""
    path = Path(path)
    fmt = "zarr" if is_zarr_dir(path) else format_of(path)
    if fmt is None or (fmt == "zarr" and not path.is_dir()):
        raise ImageError(
            f"{path}: unsupported format (supported: {', '.join(sorted(set(FORMATS)))})"
        )
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_file() and path.stat().st_size == 0:  # before a reader opens (and leaks) it
        raise ImageError(f"cannot read {path}: the file is empty (0 bytes)")
    try:
        shape, dtype, meta = _probe_header(path, fmt)
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one message
        raise ImageError(_reader_message(path, exc)) from None
    if dtype.kind not in "biuf":
        raise ImageError(f"{path}: pixels of dtype {dtype} are not real numbers")
    if len(shape) == 0 or 0 in shape:
        raise ImageError(f"{path}: empty image (shape {tuple(shape)})")
    channels = _guess_channels(shape, fmt, meta.get("axes"))
    return ImageFile(path, fmt, shape, dtype, channels, meta)


def read_image(path) -> np.ndarray:
    """All pixels of an image file (``.npy``, TIFF, PNG, JPEG or a zarr folder) in memory.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = write(Path(d) / "a.npy", np.arange(6, dtype=">u2").reshape(2, 3))
    ...     read_image(Path(d) / "a.npy").dtype.byteorder in "=|<"
    True
    """
    return probe(path).read()


def find_inputs(paths) -> list[Path]:
    """Expand the command line's inputs: files as given, folders to their supported images
    (sorted, not recursive, hidden files left out), zarr folders as one image each."""
    out = []
    for p in map(Path, paths):
        if p.is_dir() and not is_zarr_dir(p):
            found = sorted(
                q
                for q in p.iterdir()
                if (format_of(q) and not q.name.startswith(".")) and (q.is_file() or is_zarr_dir(q))
            )
            if not found:
                raise ImageError(f"{p}: folder holds no supported images")
            out.extend(found)
        elif not p.exists():
            raise ImageError(f"{p}: no such file or folder")
        else:
            out.append(p)
    return out


# --------------------------------------------------------------------------- writing
def temporary(path: Path) -> Path:
    """The hidden temporary name ``path`` is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{RUN_PID}")


def _alive(pid: int) -> bool:
    if pid == os.getpid() or pid == RUN_PID:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(folder) -> list[Path]:
    """Remove the temporary files and stores that runs which died left in ``folder`` (their
    PID no longer runs); returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMPORARY.match(entry.name)
        if m and not _alive(int(m.group(1))):
            _discard(entry)
            removed.append(entry)
    return removed


def clean_own(folder) -> None:
    """Remove this run's temporary files from ``folder`` (after an interruption)."""
    folder = Path(folder)
    if folder.is_dir():
        for entry in folder.glob(f".*.tmp-{RUN_PID}"):
            _discard(entry)


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``. An existing file is replaced atomically; an existing zarr
    store is moved aside first and removed after; any other folder is never touched."""
    if path.is_dir() and not path.is_symlink():
        if not is_zarr_dir(path) or not tmp.is_dir():
            raise ImageError(f"{path}: is a folder, not an output of ours; not replacing it")
        aside = path.with_name(f".{path.name}.old-tmp-{RUN_PID}")
        os.replace(path, aside)
        os.replace(tmp, path)
        shutil.rmtree(aside, ignore_errors=True)
        return
    os.replace(tmp, path)


def _disk_full(exc: BaseException, path: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # numpy's tofile reports a short write as "N requested and M written", with no errno.
    return isinstance(exc, OSError) and "requested and" in str(exc) and "written" in str(exc)


def _free(folder: Path) -> str:
    from dask.utils import format_bytes

    try:
        return f"{format_bytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        return "free space unknown"


@contextlib.contextmanager
def atomic(path):
    """Write ``path`` atomically: yields the temporary path to write to; on success it is
    renamed into place, on any failure removed (a full disk raises :class:`DiskFullError`
    naming ``path``)."""
    path = Path(path)
    tmp = temporary(path)
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException as exc:
        _discard(tmp)
        if _disk_full(exc, path):
            raise DiskFullError(f"disk full: cannot write {path} ({_free(path.parent)})") from exc
        raise


def write(path, array, fmt: str | None = None, meta: dict | None = None) -> Path:
    """Write an in-memory array to ``path`` atomically (temporary name, then rename).
    ``meta`` keeps TIFF metadata read by :func:`probe` (resolution, axes)."""
    path = Path(path)
    fmt = fmt or format_of(path)
    with atomic(path) as tmp:
        _write_format(tmp, path, array, fmt, meta or {})
    return path


def _write_format(tmp: Path, path: Path, array, fmt: str, meta: dict) -> None:
    if fmt == "npy":
        with open(tmp, "wb") as f:
            np.save(f, array)
    elif fmt == "tiff":
        _write_tiff(tmp, array, meta)
    elif fmt == "zarr":
        import zarr

        z = zarr.open_array(
            str(tmp),
            mode="w",
            shape=array.shape,
            dtype=array.dtype,
            chunks=_chunks(array.shape, 1024),
        )
        z[...] = array
    elif fmt in INTEGER_ONLY:
        import imageio.v3 as iio

        extra = {"quality": 95} if fmt == "jpeg" else {}  # JPEG is lossy: re-encode well
        iio.imwrite(tmp, array, extension=path.suffix, **extra)
    else:
        raise ImageError(f"{path}: cannot write format {fmt!r}")


def _write_tiff(tmp: Path, array, meta: dict) -> None:
    import tifffile

    axes = meta.get("axes")
    rgb = (
        array.ndim == 3
        and array.shape[-1] in (3, 4)
        and array.dtype == np.uint8
        and (axes is None or axes.endswith("S"))
    )
    extra = {}
    if axes and len(axes) == array.ndim:
        extra["metadata"] = {"axes": axes}
    if "resolution" in meta:
        extra["resolution"] = meta["resolution"]
        if meta.get("resolutionunit") is not None:
            extra["resolutionunit"] = meta["resolutionunit"]
    planar = "separate" if axes and axes[0] == "S" and array.ndim == 3 else None
    tifffile.imwrite(
        tmp, array, photometric="rgb" if rgb else "minisblack", planarconfig=planar, **extra
    )


def write_text(path, text: str) -> Path:
    """Write a text file atomically (see :func:`atomic`)."""
    with atomic(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def zarr_target(path):
    """A temporary zarr store for a lazy result: ``(store_path, commit, abort)``; ``commit``
    renames it into place, ``abort`` removes it."""
    path = Path(path)
    tmp = temporary(path)
    return tmp, (lambda: _replace(tmp, path)), (lambda: _discard(tmp))
