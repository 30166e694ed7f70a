"""ATMM scoring: per-layer mutual matching, then the fused weighted aggregation."""

from __future__ import annotations

import torch

import hetmm_kernels as hk

from .parameters import PostProcess, parse_params


class LayerMatches:
    """Each active layer's fore and back maxima ``[B, h, w]`` with its alpha and lambda."""

    def __init__(self, query_feats: dict, temp_feats: dict, params, indices: torch.Tensor | None = None):
        params = parse_params(params)
        self.fores, self.backs, self.alphas, self.ldas = [], [], [], []
        for layer, p in params.active_layers.items():
            if layer not in query_feats or layer not in temp_feats:
                raise KeyError(f"params use {layer}, but the features have {sorted(query_feats)} / {sorted(temp_feats)}")
            fore, back = hk.mutual_match(query_feats[layer], temp_feats[layer], p.fore, p.back, indices=indices)
            self.fores.append(fore)
            self.backs.append(back)
            self.alphas.append(p.alpha)
            self.ldas.append(p.lda)

    def aggregate(self, out_size, post: PostProcess = PostProcess(), image_score=None) -> hk.Aggregated:
        """The anomaly map at ``out_size``, blurred as ``post`` says, with an optional image score."""
        blur = (post.sigma, post.k) if post.kind == "blur" else None
        return hk.aggregate_maps(self.fores, self.backs, self.alphas, self.ldas, out_size,
                                 blur=blur, image_score=image_score)

    def image_scores(self, out_size, post: PostProcess) -> torch.Tensor:
        """``[B]``: the maximum of the post-processed map, or for ``mp`` the mean of its k x k max-pool."""
        if post.kind == "mp":
            return self.aggregate(out_size, PostProcess(), image_score=post.k).scores
        return self.aggregate(out_size, post, image_score="max").scores


def atmm_score(query_feats: dict, temp_feats: dict, params, out_size=256) -> torch.Tensor:
    """Anomaly map ``[B, 1, H, W]`` (float32) of already-extracted, L2-normalised features.

    For each layer whose windows are non-zero: ``fore, back = mutual_match(...)``, both
    turned into dissimilarities ``1 - x``, upsampled bilinearly (align_corners=True) to
    ``out_size`` and summed as ``lambda * (alpha * fore + (1 - alpha) * back)``.
    ``temp_feats`` values may be raw ``[N, C, h, w]`` tensors or ``PreparedTemplates``.
    """
    return LayerMatches(query_feats, temp_feats, params).aggregate(out_size).maps
