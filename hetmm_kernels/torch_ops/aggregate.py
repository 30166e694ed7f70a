"""Multi-layer map aggregation as separable matrix products.

Bilinear upsampling (align_corners=True) and a zero-padded Gaussian blur are both linear
and separable, so for each layer ``blur(up(M))`` is ``A_y @ M @ A_x^T`` with
``A = Blur @ Resample`` (``[H, h]`` and ``[W, w]``), and the weighted sum over layers
folds into the same products: one pass, no full-size intermediate per layer.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=64)
def _axis_matrix_cpu(out_len: int, in_len: int, blur: tuple | None) -> torch.Tensor:
    """``[out_len, in_len]`` float64: bilinear align_corners=True resampling, then the blur."""
    resample = torch.zeros(out_len, in_len, dtype=torch.float64)
    scale = (in_len - 1) / (out_len - 1) if out_len > 1 else 0.0
    src = torch.arange(out_len, dtype=torch.float64) * scale
    lo = src.floor().long().clamp(max=in_len - 1)
    hi = (lo + 1).clamp(max=in_len - 1)
    frac = src - lo
    rows = torch.arange(out_len)
    resample.index_put_((rows, lo), 1 - frac, accumulate=True)
    resample.index_put_((rows, hi), frac, accumulate=True)
    if blur is None:
        return resample
    sigma, k = blur
    offsets = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * sigma * sigma))
    g = g / g.sum()
    # out[y] = sum_d g[d] * in[y + d - k // 2] with zeros outside the map
    band = torch.zeros(out_len, out_len, dtype=torch.float64)
    for d in range(k):
        shift = d - k // 2
        lo_y, hi_y = max(0, -shift), min(out_len, out_len - shift)
        if lo_y < hi_y:
            y = torch.arange(lo_y, hi_y)
            band[y, y + shift] += g[d]
    return band @ resample


def axis_matrix(out_len: int, in_len: int, blur, device) -> torch.Tensor:
    """The ``[out_len, in_len]`` resample-and-blur operator on ``device`` (cached: read-only)."""
    return _axis_matrix_on(out_len, in_len, None if blur is None else (float(blur[0]), int(blur[1])),
                           torch.device(device))


@functools.lru_cache(maxsize=256)
def _axis_matrix_on(out_len: int, in_len: int, blur, device: torch.device) -> torch.Tensor:
    # cached per device: no host-to-device copy per call (a CUDA graph capture forbids them)
    return _axis_matrix_cpu(out_len, in_len, blur).to(device=device, dtype=torch.float32)


def combine(fore: torch.Tensor, back: torch.Tensor, alpha: float, lda: float) -> torch.Tensor:
    """The layer's low-resolution map ``lda * (alpha * (1 - fore) + (1 - alpha) * (1 - back))``."""
    return lda * (1 - alpha * fore.float() - (1 - alpha) * back.float())


def image_scores(maps: torch.Tensor, image_score) -> torch.Tensor | None:
    if image_score is None:
        return None
    if image_score == "max":
        return maps.amax(dim=(1, 2, 3))
    k = min(int(image_score), maps.shape[-2], maps.shape[-1])
    return F.max_pool2d(maps, k).mean(dim=(1, 2, 3))


def aggregate_maps(fores, backs, alphas, ldas, out_size, blur=None, image_score=None):
    """``sum_l rows_l @ map_l @ cols_l^T`` as one product: the layers' ``rows_l @ map_l`` side by side times their
    ``cols_l`` stacked (the sum over layers is the product's own inner sum; batch 1, lite0: one output-sized
    product instead of three and their additions)."""
    height, width = out_size
    lefts, rights = [], []
    for fore, back, alpha, lda in zip(fores, backs, alphas, ldas):
        rows = axis_matrix(height, fore.shape[-2], blur, fore.device)
        lefts.append(rows @ combine(fore, back, alpha, lda))  # [B, H, w_l]
        rights.append(axis_matrix(width, fore.shape[-1], blur, fore.device))  # [W, w_l]
    if len(lefts) == 1:
        total = lefts[0] @ rights[0].t()
    else:
        total = torch.cat(lefts, -1) @ torch.cat(rights, -1).t()
    total = total[:, None]
    return total, image_scores(total, image_score)
