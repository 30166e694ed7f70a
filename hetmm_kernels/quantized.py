"""Features rounded to int8, one scale per pixel: what the int8 matching multiplies.

Every pixel's feature vector ``x`` (unit length, or shorter) becomes ``round(x / s)`` with ``s = max|x| / 127``
(symmetric, round half to even; an all-zero vector keeps ``s = 0`` and zeros). A similarity is then
``s_q * s_t * sum(q8 * t8)``: the integer sum is exact (int32 accumulation), so the only error is the rounding
of each side to 127 levels of its own largest component. A template pixel may carry a float ``bias`` added to
every similarity it takes part in (the isolation term, ``hetmm.scoring``), kept beside the integers rather than
as one more channel: a channel holding it would set that pixel's scale.

``QuantizedTemplates`` and ``QuantizedRows`` stand wherever the matching ops take templates (``mutual_match``)
or template-pixel rows (``global_match``): passing one asks for int8 products.
"""

from __future__ import annotations

from typing import Callable

import torch

from .validation import check_feature_tensor, checking_values, all_finite

LEVELS = 127  # the largest magnitude of a quantised component (symmetric: -127..127)


def quantize_int8(x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values int8, scales float32)``: ``x`` rounded per vector along ``dim`` (the channels), the scales with
    ``dim`` removed. ``values * scales`` (broadcast back along ``dim``) is the int8 approximation of ``x``."""
    x = x.float()
    peak = x.abs().amax(dim, keepdim=True)
    scale = peak / LEVELS
    values = torch.where(scale > 0, torch.round(x / torch.where(scale > 0, scale, 1)), 0).to(torch.int8)
    return values, scale.squeeze(dim)


def dequantize(values: torch.Tensor, scales: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """float64 ``values * scales``: exactly what the int8 products multiply (each product exact in float64)."""
    return values.double() * scales.double().unsqueeze(dim)


def _check_bias(name: str, bias, shape: tuple) -> torch.Tensor | None:
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != shape:
        raise ValueError(f"{name} must be a float tensor {list(shape)} (one value per template pixel) or None; got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if checking_values() and bias.numel() and not all_finite(bias):
        raise ValueError(f"{name} contains NaN or inf values")
    return bias.float().contiguous()


class _Quantized:
    """int8 ``values``, float32 ``scales`` (one per vector), an optional float32 ``bias`` (one per vector), and
    the layouts kernels build from them once (``layout``)."""

    values: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None
    _layouts: dict

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __len__(self) -> int:
        return self.values.shape[0]

    def dequantized(self) -> torch.Tensor:
        """float64: the vectors as the int8 products see them (without the bias)."""
        return dequantize(self.values, self.scales, 1)

    def with_bias_channel(self) -> torch.Tensor:
        """float32 vectors as the int8 products see them, the bias (if any) as one more channel: what a float
        kernel multiplies with a query that carries a channel of ones to give the same similarities."""
        vectors = self.dequantized().float()
        if self.bias is None:
            return vectors
        return torch.cat([vectors, self.bias.unsqueeze(1).to(vectors.device)], 1)

    def layout(self, key: str, build: Callable):
        """The layout named ``key``, built from this set by ``build`` on first use."""
        if key not in self._layouts:
            self._layouts[key] = build(self)
        return self._layouts[key]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, bias={self.bias is not None}, device={self.device})"


class QuantizedTemplates(_Quantized):
    """Templates ``[T, C, H, W]`` rounded to int8 per pixel, with an optional ``bias [T, H, W]``; quantised once,
    laid out for the kernels once (``layout``), as ``PreparedTemplates`` does for float templates.

    >>> bank = QuantizedTemplates(torch.nn.functional.normalize(torch.randn(40, 24, 8, 8), dim=1))
    >>> bank.values.dtype, tuple(bank.scales.shape)
    (torch.int8, (40, 8, 8))
    """

    def __init__(self, temp: torch.Tensor, bias: torch.Tensor | None = None):
        check_feature_tensor("temp", temp)
        self.values, self.scales = quantize_int8(temp)
        self.bias = _check_bias("bias", bias, (temp.shape[0], *temp.shape[2:]))
        self._layouts = {}


class QuantizedRows(_Quantized):
    """Template pixels ``rows [N, C]`` (e.g. a coreset) rounded to int8 per row, with an optional ``bias [N]``."""

    def __init__(self, rows: torch.Tensor, bias: torch.Tensor | None = None):
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[0] < 1 or not rows.is_floating_point():
            raise ValueError(f"rows must be a float tensor [N >= 1, C] of template pixels; got "
                             f"{tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__}")
        if checking_values() and not all_finite(rows):
            raise ValueError("rows contains NaN or inf values; features must be finite")
        self.values, self.scales = quantize_int8(rows)
        self.bias = _check_bias("bias", bias, (rows.shape[0],))
        self._layouts = {}

    def take(self, index: torch.Tensor) -> "QuantizedRows":
        """The rows ``index`` selects (a boolean mask or indices), as they were rounded: nothing is quantised again."""
        taken = object.__new__(QuantizedRows)
        taken.values, taken.scales = self.values[index], self.scales[index]
        taken.bias = None if self.bias is None else self.bias[index]
        taken._layouts = {}
        return taken
