"""hetmm_kernels: fast template mutual matching for training-free anomaly detection.

A drop-in for the published HETMM CUDA extension (``forward_ATM``, ``backward_ATM``,
``PTS``) plus the fused ops the detector uses (``mutual_match``, ``global_match``, ``aggregate_maps``). Every op has three implementations behind one
contract: ``reference`` (naive PyTorch, the ground truth), ``torch`` (vectorised,
the CPU path) and ``triton`` (the GPU path). See ``set_backend``. Templates given as ``QuantizedTemplates``
(rows as ``QuantizedRows``) are matched with int8 products (compiled for CPUs with AVX512-VNNI).
"""

from . import reference
from .backend import BACKENDS, get_backend, set_backend, use_backend
from .ops import (
    PTS,
    Aggregated,
    HistogramBank,
    aggregate_maps,
    backward_ATM,
    block_histograms,
    forward_ATM,
    global_match,
    mutual_match,
    retrieve_topk,
)
from .quantized import QuantizedRows, QuantizedTemplates, quantize_int8
from .templates import PreparedTemplates, prepare_templates
from .validation import trusted_values

__all__ = [
    "Aggregated",
    "BACKENDS",
    "HistogramBank",
    "PTS",
    "PreparedTemplates",
    "QuantizedRows",
    "QuantizedTemplates",
    "aggregate_maps",
    "backward_ATM",
    "block_histograms",
    "forward_ATM",
    "get_backend",
    "global_match",
    "mutual_match",
    "prepare_templates",
    "quantize_int8",
    "reference",
    "retrieve_topk",
    "set_backend",
    "trusted_values",
    "use_backend",
]

__version__ = "0.1.0"
