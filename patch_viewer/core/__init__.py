"""The array core: geometry, extraction, merging (compiled kernels, or NumPy), windows,
filters, metrics, pipeline.

Nothing here imports napari, Qt or magicgui.
"""

from .accumulator import Accumulator
from .batches import PatchBatch, iter_batches, select_patches
from .checks import format_bytes, is_lazy
from .extract import extract_patches, sliding_patches
from .filters import FILTERS, Param, PatchFilter, get_filter, register_filter
from .fused import elementwise
from .grid import EDGE_MODES, PAD_MODES, PatchGrid
from .merge import REDUCTIONS, Merger, backend, max_weight, merge_patches, weight_map
from .metrics import METRICS, compute_metrics, error_map
from .pipeline import REFERENCES, Plan, Result, iter_process, make_plan, process
from .plugins import load_entry_points
from .predict import PredictionError, Predictor, load_callable, register_predictor
from .warmup import warm_up
from .windows import WINDOW_PARAMS, WINDOWS, make_window

load_entry_points()  # filters and predictors other packages contribute (see .plugins)

__all__ = [
    "EDGE_MODES",
    "FILTERS",
    "METRICS",
    "PAD_MODES",
    "REDUCTIONS",
    "REFERENCES",
    "WINDOWS",
    "WINDOW_PARAMS",
    "Accumulator",
    "Merger",
    "Param",
    "PatchBatch",
    "PatchFilter",
    "PatchGrid",
    "Plan",
    "PredictionError",
    "Predictor",
    "Result",
    "backend",
    "compute_metrics",
    "elementwise",
    "error_map",
    "extract_patches",
    "format_bytes",
    "get_filter",
    "is_lazy",
    "iter_batches",
    "iter_process",
    "load_callable",
    "make_plan",
    "make_window",
    "max_weight",
    "merge_patches",
    "process",
    "register_filter",
    "register_predictor",
    "select_patches",
    "sliding_patches",
    "warm_up",
    "weight_map",
]
