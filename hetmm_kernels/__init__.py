"""hetmm_kernels: fast template mutual matching for training-free anomaly detection.

A drop-in for the published HETMM CUDA extension (``forward_ATM``, ``backward_ATM``)
plus the fused ``mutual_match``. Every op has three implementations behind one
contract: ``reference`` (naive PyTorch, the ground truth), ``torch`` (vectorised,
the CPU path) and ``triton`` (the GPU path). See ``set_backend``.
"""

from . import reference
from .backend import BACKENDS, get_backend, set_backend, use_backend
from .ops import Aggregated, aggregate_maps, backward_ATM, forward_ATM, mutual_match
from .templates import PreparedTemplates, prepare_templates

__all__ = [
    "Aggregated",
    "BACKENDS",
    "PreparedTemplates",
    "aggregate_maps",
    "backward_ATM",
    "forward_ATM",
    "get_backend",
    "mutual_match",
    "prepare_templates",
    "reference",
    "set_backend",
    "use_backend",
]

__version__ = "0.1.0"
