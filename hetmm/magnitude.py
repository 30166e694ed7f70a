"""Magnitude-aware features (a layer's ``_m=<k>``): the stereographic lift of the unnormalised features.

Cosine similarity ignores how strongly a pixel responds: a faint stain or tint that keeps the texture changes
the length of the features more than their direction. A layer with ``_m=<k>`` hands the matching, instead of
the unit direction ``f / |f|``, the lift of ``x = f / (k s)`` onto the unit sphere one dimension up,

    u = (2 x, |x|^2 - 1) / (|x|^2 + 1),

where ``s`` is the layer's RMS feature length over the first images the detector extracted (stored with the
bank). ``u`` is a unit vector, so every backend, the isolation, the coreset, PTS and the bank's checks take it
as they take any feature; and the cosine of two lifts is a function of the Euclidean distance of the features:

    cos(u, v) = 1 - 2 |x - y|^2 / ((1 + |x|^2) (1 + |y|^2)).

The larger ``k``, the closer this is to ``1 - 2 |x - y|^2`` (PatchCore's distance, squared, in units of
``k s``); ``k`` near 1 weighs length less. The lift keeps the features whole: ``directions`` recovers each
pixel's unit direction, for what reads the features as directions (image descriptors, shared content).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

def rms_length(features: torch.Tensor) -> float:
    """The RMS length of ``[N, C, h, w]`` features over all their pixels (the lift's scale ``s``)."""
    value = math.sqrt(features.double().pow(2).sum(1).mean().item())
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"features: their RMS length must be finite and positive to scale the lift; got {value}")
    return value


def scales_problem(scales, layers) -> str | None:
    """What is wrong with ``scales`` (layer -> RMS length ``s``) for the magnitude-aware ``layers``; None: nothing."""
    if not isinstance(scales, dict):
        return f"expected a finite positive length for each of {sorted(layers)}; got {scales!r}"
    missing = sorted(set(layers) - set(scales))
    invalid = {k: v for k, v in scales.items()
               if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < math.inf}
    if missing or invalid:
        return f"expected a finite positive length for each of {sorted(layers)}; missing {missing}, invalid {invalid}"
    return None


def lift(features: torch.Tensor, scale: float) -> torch.Tensor:
    """``[N, C, h, w]`` unnormalised features -> ``[N, C + 1, h, w]`` float32 unit vectors (see the module)."""
    x = features.float() / scale
    squared = x.pow(2).sum(1, keepdim=True)
    lifted = torch.cat([2 * x, squared - 1], 1) / (squared + 1)
    if features.is_contiguous(memory_format=torch.channels_last):
        lifted = lifted.contiguous(memory_format=torch.channels_last)
    return lifted


def directions(lifted: torch.Tensor) -> torch.Tensor:
    """The unit directions ``f / |f|`` ``[N, C, h, w]`` of lifted features ``[N, C + 1, h, w]``."""
    # u[:C] = 2x / (|x|^2 + 1) is x scaled by a positive number: its direction is f's
    return F.normalize(lifted[:, :-1].float(), dim=1)
