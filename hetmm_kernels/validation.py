"""Input checks shared by every public op: clear errors instead of kernel crashes."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

_state = threading.local()


@contextmanager
def trusted_values():
    """Skip the checks that read tensor values (finite, in range, normalised) inside this block.

    Reading a value synchronises with the GPU, which a CUDA graph capture forbids. For inputs
    that were checked once already (the graph's eager warm-up): shapes, dtypes and devices are
    still checked.
    """
    before = getattr(_state, "trusted", False)
    _state.trusted = True
    try:
        yield
    finally:
        _state.trusted = before


def checking_values() -> bool:
    return not getattr(_state, "trusted", False)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_feature_tensor(name: str, x, *, allow_empty_batch: bool = False) -> None:
    """``x`` must be a finite floating-point tensor (16, 32 or 64 bits) of shape ``[N, C, H, W]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [N, C, H, W]; got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64; got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions [N, C, H, W]; got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if n == 0 and not allow_empty_batch:
        raise ValueError(f"{name} is empty: it needs at least one feature map; got shape {tuple(x.shape)}")
    if c == 0 or h == 0 or w == 0:
        raise ValueError(f"{name} must have C, H and W of at least 1; got shape {tuple(x.shape)}")
    if x.numel() and x.device.type != "meta" and checking_values() and not all_finite(x):
        raise ValueError(f"{name} contains NaN or inf values; features must be finite")


def check_same_maps(query: torch.Tensor, temp_shape, temp_dtype, temp_device) -> None:
    """Query and templates must agree in C, H, W, dtype and device."""
    for axis, label in ((1, "channels C"), (2, "height H"), (3, "width W")):
        if query.shape[axis] != temp_shape[axis]:
            raise ValueError(
                f"query and temp must have the same {label}: query is {tuple(query.shape)}, "
                f"temp is {tuple(temp_shape)}"
            )
    if query.device != temp_device:
        raise ValueError(f"query and temp must be on the same device: query on {query.device}, temp on {temp_device}")
    if query.dtype != temp_dtype:
        raise TypeError(f"query and temp must have the same dtype: query is {query.dtype}, temp is {temp_dtype}")


def check_window(name: str, value) -> int:
    """A window size: a non-negative int (``k // 2`` is the radius, as in the published kernels)."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
        except ImportError:  # pragma: no cover - numpy ships with torch
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int window size; got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative window size; got {value}")
    return value


def all_finite(x: torch.Tensor) -> bool:
    """One reduction pass, no full-size temporary: NaN and inf propagate to the extremes."""
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))
