""":func:`patch_viewer.process` for predictors and for chosen patches: batches of patches
(:func:`.batches.iter_batches`) -> the model -> one :class:`.accumulator.Accumulator` per
output, in O(image x output channels + batch) memory."""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from ._layout import check_bytes
from .accumulator import Accumulator
from .batches import flat_indices, iter_batches
from .filter_registry import PatchFilter
from .grid import PatchGrid
from .metrics import METRICS, compute_metrics, error_map
from .predict import PredictionError, Predictor
from .stream import Result, make_plan

__all__ = ["UNCOVERED", "as_predictor", "predict_run"]

#: What pixels no chosen patch covers get: ``fill_value``, or the input's value.
UNCOVERED = ("fill", "input")


def as_predictor(filt, params: dict, grid: PatchGrid) -> Predictor:
    """A filter run as a predictor on ``(N, *patch[, C])`` batches (for chosen patches)."""
    if isinstance(filt, Predictor):
        return filt
    axes = tuple(range(1, grid.ndim + 1))

    def run(batch, **p):
        out = filt(batch if grid.channel_axis is not None else batch[..., None], axes, **p)
        return out if grid.channel_axis is not None else np.asarray(out)[..., 0]

    return Predictor(run, name=filt.name, params=filt.params, doc=filt.doc)


def predict_run(
    image,
    grid,
    model: Predictor,
    params,
    *,
    batched,
    indices,
    uncovered,
    window,
    window_params,
    reduce,
    reference,
    dtype,
    fill_value,
    max_bytes,
    batch_bytes,
    ssim,
    metrics,
    filt=None,
):
    """Generator: yields ``(patches_done, total)`` after each batch; returns the
    :class:`~patch_viewer.core.stream.Result` (``outputs`` holds every output by name)."""
    start = time.perf_counter()
    images = image if batched else image[None]
    order = np.arange(grid.n_patches) if indices is None else flat_indices(indices, grid)
    run = _Run(
        grid,
        model,
        params,
        order,
        len(images),
        batched,
        {"window": window, "window_params": window_params, "reduce": reduce},
    )
    # In grid order (every patch, or chosen ones sorted) the rows above the current patch row
    # are final: they are finished and their sums recycled (see Accumulator._stream).
    run.in_order = bool(np.all(np.diff(order) > 0)) and uncovered == "fill"
    run.whole_grid, run.finish = indices is None, (dtype, fill_value, max_bytes)
    per_image = []
    for b, one in enumerate(images):
        per_image.append((yield from run.image(one, b)))
    outputs = {
        name: _stack([accs[name].result(dtype, fill_value) for accs in per_image], batched)
        for name in per_image[0]
    }
    first = next(iter(per_image[0].values()))
    if uncovered == "input":
        outputs = {
            name: _keep_input(m, image, per_image, name, batched) for name, m in outputs.items()
        }
    merged = next(iter(outputs.values()))
    ref = _reference(image, grid, model, params, reference, batched, first, filt)
    error = error_map(merged, ref) if ref is not None and ref.shape == merged.shape else None
    values = dict.fromkeys(METRICS + ("covered",), math.nan)
    if metrics and error is not None:
        channel_axis = None if first.channel_axis is None else first.channel_axis + batched
        values = compute_metrics(merged, ref, channel_axis=channel_axis, ssim=ssim, error=error)
    plan = make_plan(grid, len(images), batch_bytes=batch_bytes, dtype=image.dtype)
    return Result(
        merged,
        first.weights(),
        ref,
        error,
        values,
        grid,
        plan,
        time.perf_counter() - start,
        outputs,
    )


class _Run:
    """One predictor run's loop: batches of an image -> the model -> its accumulators."""

    in_order = whole_grid = False
    finish = (None, None, None)

    def __init__(self, grid, model, params, order, n_images, batched, merge):
        self.grid, self.model, self.params, self.order = grid, model, params, order
        self.n_images, self.batched, self.merge = n_images, batched, merge
        self.total = len(order) * n_images
        self.done = self.k = 0
        self.row_patches = math.prod(grid.grid_shape[1:])

    def image(self, one, b):
        """Generator over one image's batches; returns its accumulators by output name."""
        accs, specs = None, None
        model, grid = self.model, self.grid
        for batch in iter_batches(
            one, grid, model.batch_size, indices=self.order, channels_first=model.channels_first
        ):
            where = f"batch {self.k} (patches {batch.indices[0]}..{batch.indices[-1]}" + (
                f" of image {b})" if self.batched else ")"
            )
            out = model.run(batch.patches, self.params, where)
            if specs is None:
                specs = model.outputs(out, grid, len(batch.indices))
                accs = self._accumulators(specs)
            else:
                model.check(out, specs, grid, len(batch.indices), where)
            self._add(accs, out, batch.indices)
            self.done += len(batch.indices)
            self.k += 1
            yield self.done, self.total
        if accs is None:  # no patch chosen: ask the model once for the shapes of its output
            accs = _empty_accumulators(one, grid, model, self.params, self.merge)
        return accs

    def _accumulators(self, specs) -> dict:
        accs = self.model.accumulators(specs, self.grid, **self.merge)
        _check_memory(accs, self.n_images, self.finish[2])
        if self.in_order:  # finished rows are released as the stream goes
            for acc in accs.values():
                acc._stream(whole_grid=self.whole_grid, hold=True)
        return accs

    def _add(self, accs, out, indices) -> None:
        dtype, fill_value, _ = self.finish
        row = int(self.grid.origins[0][int(indices[-1]) // self.row_patches])
        for name, acc in accs.items():
            if acc._holds_batches() and not _exclusive(out, name):
                out[name] = np.array(out[name])  # held below: a copy the model cannot change
            acc.add(out[name], indices, channels_first=self.model.channels_first)
            if self.in_order:
                f = acc.scale[0]
                acc._release(row * f.numerator // f.denominator, dtype, fill_value)


def _exclusive(out: dict, name: str) -> bool:
    """Whether ``out[name]`` is an array that owns its memory and that nothing but ``out``
    refers to: a fresh output the model kept no hold on (so it cannot change it later)."""
    probe = {name: np.empty(0)}  # the count of an array only a dict refers to
    a = out[name]
    owns = isinstance(a, np.ndarray) and a.base is None and a.flags.owndata
    del a
    return owns and sys.getrefcount(out[name]) <= sys.getrefcount(probe[name])


def _check_memory(accs: dict, n_images: int, max_bytes) -> None:
    need = 0
    for acc in accs.values():
        elems = math.prod(acc.spatial_shape) * (acc.channels or 1)
        need += elems * 8 * 3 * n_images  # sums (16 B for anchored/split) + the result
    check_bytes(
        need,
        "the merged outputs of this predictor",
        max_bytes,
        "choose fewer output channels, a smaller scale, or the dask path",
    )


def _empty_accumulators(one, grid, model, params, merge) -> dict:
    batch = next(iter_batches(one, grid, 1, channels_first=model.channels_first))
    out = model.run(batch.patches, params, "a probe of one patch")
    return model.accumulators(model.outputs(out, grid, 1), grid, **merge)


def _stack(results: list[np.ndarray], batched: bool) -> np.ndarray:
    return np.stack(results) if batched else results[0]


def _keep_input(merged, image, per_image, name, batched):
    """``merged`` where some chosen patch covers a pixel, the input elsewhere."""
    if merged.shape != image.shape:
        raise ValueError(
            f"uncovered='input' keeps the input where no chosen patch reaches, so the output "
            f"must have the input's shape {image.shape}; output {name!r} has {merged.shape}: "
            f"use uncovered='fill'"
        )
    acc = per_image[0][name]
    covered = np.stack([accs[name].count > 0 for accs in per_image])
    if acc.channel_axis is not None:
        covered = np.expand_dims(covered, acc.channel_axis + 1)
    covered = covered if batched else covered[0]
    return np.where(covered, merged, image.astype(merged.dtype, copy=False))


def _reference(image, grid, model: Predictor, params, reference, batched, acc: Accumulator, filt):
    """The input, or the model run on the whole image (``reference="filter"``)."""
    if reference == "input":
        return image
    if isinstance(filt, PatchFilter):  # chosen patches of a filter: the filter, whole image
        from ._layout import from_canonical, to_canonical
        from .chunked import reference_axes

        canon = to_canonical(image, grid, batched)
        return from_canonical(
            np.asarray(filt(canon, reference_axes(grid), **params)), grid, batched
        )
    images = image if batched else image[None]
    refs = []
    for one in images:
        whole = one if grid.channel_axis is None else np.moveaxis(one, grid.channel_axis, -1)
        if model.channels_first:
            whole = whole[None] if grid.channel_axis is None else np.moveaxis(whole, -1, 0)
        out = model.run(np.ascontiguousarray(whole)[None], params, "the whole image")
        a = next(iter(out.values()))[0]
        want = (
            acc.shape
            if acc.channels is None or not model.channels_first
            else (acc.channels,) + acc.spatial_shape
        )
        if a.shape not in (want, acc.shape, acc.spatial_shape + (acc.channels or 1,)):
            raise PredictionError(
                f"reference='filter' runs predictor {model.name!r} on the whole image; it "
                f"returned {a.shape + ()} where {acc.shape} was expected (a per-patch or "
                f"fixed-size model cannot run on the whole image: use reference='input')"
            )
        axis = acc.channel_axis
        if acc.channels is not None and axis is not None:
            a = np.moveaxis(a, 0, -1) if model.channels_first else a
            a = np.moveaxis(a.reshape(acc.spatial_shape + (acc.channels,)), -1, axis)
        refs.append(a)
    return _stack(refs, batched)
