"""ATMM scoring: per-layer mutual matching, weighted aggregation, post-processing."""

from __future__ import annotations


import torch
import torch.nn.functional as F

import hetmm_kernels as hk

from .parameters import PostProcess, ScoringParams, parse_params


def _size(out_size) -> tuple[int, int]:
    if isinstance(out_size, int):
        out_size = (out_size, out_size)
    if len(out_size) != 2 or any(int(s) < 1 for s in out_size):
        raise ValueError(f"out_size must be a positive int or (height, width); got {out_size!r}")
    return int(out_size[0]), int(out_size[1])


def atmm_score(query_feats: dict, temp_feats: dict, params, out_size=256) -> torch.Tensor:
    """Anomaly map ``[B, 1, H, W]`` (float32) of already-extracted, L2-normalised features.

    For each layer whose windows are non-zero: ``fore, back = mutual_match(...)``, both
    turned into dissimilarities ``1 - x``, upsampled bilinearly (align_corners=True) to
    ``out_size`` and summed as ``lambda * (alpha * fore + (1 - alpha) * back)``.
    ``temp_feats`` values may be raw ``[N, C, h, w]`` tensors or ``PreparedTemplates``.
    """
    params = parse_params(params)
    height, width = _size(out_size)
    total = None
    for layer, p in params.active_layers.items():
        if layer not in query_feats or layer not in temp_feats:
            raise KeyError(f"params use {layer}, but the features have only {sorted(query_feats)} / {sorted(temp_feats)}")
        fore, back = hk.mutual_match(query_feats[layer], temp_feats[layer], p.fore, p.back)
        maps = torch.stack([1 - fore.float(), 1 - back.float()], dim=1)  # [B, 2, h, w]
        maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=True)
        layer_map = p.lda * (p.alpha * maps[:, :1] + (1 - p.alpha) * maps[:, 1:])
        total = layer_map if total is None else total + layer_map
    return total


def gaussian_blur(maps: torch.Tensor, sigma: float, k: int) -> torch.Tensor:
    """Gaussian blur of ``[B, 1, H, W]`` maps: a ``k x k`` normalised kernel, zero padding ``k // 2``."""
    offsets = torch.arange(k, dtype=torch.float32, device=maps.device) - (k - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * sigma * sigma))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None].to(maps.dtype)
    out = F.conv2d(maps, kernel, padding=k // 2)
    return out[..., : maps.shape[-2], : maps.shape[-1]]  # an even k pads one extra row and column


def post_process(maps: torch.Tensor, post: PostProcess) -> torch.Tensor:
    """A map post-processed for a pixel metric (``mp`` leaves the map as it is)."""
    return gaussian_blur(maps, post.sigma, post.k) if post.kind == "blur" else maps


def image_scores(maps: torch.Tensor, post: PostProcess) -> torch.Tensor:
    """One score per image ``[B]``: the maximum of the post-processed map, or for ``mp`` the
    mean of a ``k x k`` max-pool (stride k) of it."""
    if post.kind == "mp":
        k = min(post.k, maps.shape[-2], maps.shape[-1])
        return F.max_pool2d(maps, k).mean(dim=(1, 2, 3))
    return post_process(maps, post).amax(dim=(1, 2, 3))


def describe(params: ScoringParams) -> str:
    """A one-line summary of the layers in use."""
    return ", ".join(f"{n}: {p.fore}x{p.back} a={p.alpha:g} l={p.lda:g}" for n, p in params.active_layers.items())


__all__ = ["atmm_score", "describe", "gaussian_blur", "image_scores", "post_process"]
