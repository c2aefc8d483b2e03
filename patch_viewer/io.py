"""Reading and writing image files for the command line: TIFF, PNG/JPEG, NumPy ``.npy`` and zarr.

Readers can open a file lazily (shape and dtype from the header, pixels on demand) so that a plan
can be made before anything is loaded, and large images can be streamed through dask. Writers
never leave a half-written file under the final name: they write to a hidden temporary name in
the same folder and rename it into place (an atomic step on one file system).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Suffix -> format name, for files the command line reads and writes.
FORMATS = {".tif": "tiff", ".tiff": "tiff", ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg",
           ".npy": "npy", ".zarr": "zarr"}
#: Formats that hold 8/16-bit integer pixels only.
INTEGER_ONLY = ("png", "jpeg")
#: Formats that can be read lazily (chunk by chunk) for images larger than memory.
LAZY = ("tiff", "npy", "zarr")


class ImageError(ValueError):
    """A file that cannot be read or written as an image (the message names the file)."""


def format_of(path) -> str | None:
    """The format name of ``path`` from its suffix, or None if unsupported."""
    return FORMATS.get(Path(path).suffix.lower())


def is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and (path.suffix.lower() == ".zarr" or (path / "zarr.json").exists()
                              or (path / ".zarray").exists())


@dataclass(frozen=True)
class ImageFile:
    """An input image known by its header: path, format, shape and dtype."""

    path: Path
    format: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self) -> np.ndarray:
        """All pixels, in memory."""
        try:
            if self.format == "npy":
                return np.load(self.path)
            if self.format == "tiff":
                import tifffile

                return tifffile.imread(self.path)
            if self.format == "zarr":
                return np.asarray(_open_zarr(self.path)[...])
            import imageio.v3 as iio

            return np.asarray(iio.imread(self.path))
        except Exception as exc:  # noqa: BLE001 - every reader failure becomes one message
            raise ImageError(f"cannot read {self.path}: {exc}") from None

    def lazy(self, chunk: int):
        """A dask array over the file, read chunk by chunk (TIFF, .npy and zarr)."""
        import dask.array as da

        if self.format == "zarr":
            z = _open_zarr(self.path)
            # Read whole stored chunks (each decoded once), then split them in memory.
            return da.from_array(z, chunks=_chunks(self.shape, chunk, z.chunks)).rechunk(
                _chunks(self.shape, chunk))
        if self.format == "npy":
            return da.from_array(np.load(self.path, mmap_mode="r"),
                                 chunks=_chunks(self.shape, chunk))
        if self.format == "tiff":
            import tifffile
            import zarr

            store = tifffile.imread(self.path, aszarr=True)
            return da.from_array(zarr.open(store, mode="r"), chunks=_chunks(self.shape, chunk))
        raise ImageError(f"{self.path}: {self.format} files cannot be read chunk by chunk")


def _chunks(shape, chunk: int, native=None):
    """Chunks of about ``chunk`` pixels per axis, aligned with the file's own chunks."""
    if native is None:
        return tuple(min(n, chunk) for n in shape)
    return tuple(min(n, max(c, chunk // c * c)) for n, c in zip(shape, native, strict=True))


def _open_zarr(path: Path):
    import zarr

    return zarr.open_array(str(path), mode="r")


def probe(path) -> ImageFile:
    """Read an image file's header (shape, dtype) without loading its pixels."""
    path = Path(path)
    fmt = "zarr" if is_zarr_dir(path) else format_of(path)
    if fmt is None or (fmt == "zarr" and not path.is_dir()):
        raise ImageError(
            f"{path}: unsupported format (supported: {', '.join(sorted(set(FORMATS)))})")
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    try:
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
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, dtype = series.shape, np.dtype(series.dtype)
        else:
            import imageio.v3 as iio

            props = iio.improps(path)
            shape, dtype = props.shape, np.dtype(props.dtype)
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes one message
        raise ImageError(f"cannot read {path}: {exc}") from None
    if dtype.kind not in "biuf":
        raise ImageError(f"{path}: pixels of dtype {dtype} are not real numbers")
    if len(shape) == 0 or 0 in shape:
        raise ImageError(f"{path}: empty image (shape {tuple(shape)})")
    return ImageFile(path, fmt, tuple(int(n) for n in shape), dtype)


def find_inputs(paths) -> list[Path]:
    """Expand the command line's inputs: files as given, folders to their supported images
    (sorted, not recursive), zarr folders as one image each."""
    out = []
    for p in map(Path, paths):
        if p.is_dir() and not is_zarr_dir(p):
            found = sorted(q for q in p.iterdir() if (format_of(q) and not q.name.startswith("."))
                           and (q.is_file() or is_zarr_dir(q)))
            if not found:
                raise ImageError(f"{p}: folder holds no supported images")
            out.extend(found)
        elif not p.exists():
            raise ImageError(f"{p}: no such file or folder")
        else:
            out.append(p)
    return out


# --------------------------------------------------------------------------- writing
def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _discard(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _replace(tmp: Path, path: Path) -> None:
    if path.is_dir():  # an existing zarr folder (--overwrite): a folder cannot be replaced
        shutil.rmtree(path)
    os.replace(tmp, path)


def write(path, array, fmt: str | None = None) -> Path:
    """Write an in-memory array to ``path`` atomically (temporary name, then rename)."""
    path = Path(path)
    fmt = fmt or format_of(path)
    tmp = _temporary(path)
    try:
        if fmt == "npy":
            with open(tmp, "wb") as f:
                np.save(f, array)
        elif fmt == "tiff":
            import tifffile

            rgb = array.ndim == 3 and array.shape[-1] in (3, 4) and array.dtype == np.uint8
            tifffile.imwrite(tmp, array, photometric="rgb" if rgb else "minisblack")
        elif fmt == "zarr":
            import zarr

            z = zarr.open_array(str(tmp), mode="w", shape=array.shape, dtype=array.dtype,
                                chunks=_chunks(array.shape, 1024))
            z[...] = array
        elif fmt in INTEGER_ONLY:
            import imageio.v3 as iio

            extra = {"quality": 95} if fmt == "jpeg" else {}  # JPEG is lossy: re-encode well
            iio.imwrite(tmp, array, extension=path.suffix, **extra)
        else:
            raise ImageError(f"{path}: cannot write format {fmt!r}")
        _replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    return path


def zarr_target(path):
    """A temporary zarr store for a lazy result: ``(store_path, commit, abort)``; ``commit``
    renames it into place, ``abort`` removes it."""
    path = Path(path)
    tmp = _temporary(path)
    return tmp, (lambda: _replace(tmp, path)), (lambda: _discard(tmp))
