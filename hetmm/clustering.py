"""Per-pixel OPTICS clustering of the templates, for PTS, computed for all pixels at once.

The published code runs scikit-learn's OPTICS at every pixel with a Python-callable cosine
metric (hours per category). Here the OPTICS graph (ordering, reachability, core distances,
predecessors) follows scikit-learn's ``_compute_optics_graph`` step for step, but on all
pixels together in torch: cosine distances from one batched float64 product, core
distances by ``kthvalue``, and the sequential loop over the N points vectorised across
pixels, with scikit-learn's rounding (``np.around`` to float64 precision) and tie rules
(smallest reachability, then smallest index). The clusters are then extracted by
scikit-learn's own ``cluster_optics_xi``, so the labels are scikit-learn's.
"""

from __future__ import annotations

import numpy as np
import torch

DECIMALS = np.finfo(np.float64).precision  # 15, as scikit-learn rounds distances


def min_samples_for(count: int, tsize: int) -> int | None:
    """OPTICS ``min_samples = N // K`` as published; at least 2 (scikit-learn's minimum).

    With fewer than 2 templates there is nothing to cluster: None (every template is noise,
    and PTS falls back to the global centre).
    """
    if count < 2:
        return None
    return min(count, max(2, count // max(1, tsize)))


def _around(x: torch.Tensor) -> torch.Tensor:
    scale = 10.0**DECIMALS
    return torch.round(x * scale) / scale  # round half to even, like np.around


def cosine_distances(feats: torch.Tensor) -> torch.Tensor:
    """``[P, N, C]`` -> ``[P, N, N]`` float64 ``1 - cos``, clipped to [0, 2] as scikit-learn does."""
    x = feats.double()
    norms = x.pow(2).sum(dim=-1, keepdim=True).sqrt()
    x = x / torch.where(norms == 0, torch.ones_like(norms), norms)
    return (1 - torch.bmm(x, x.transpose(1, 2))).clamp_(0, 2)


def optics_graph(feats: torch.Tensor, min_samples: int):
    """OPTICS for every pixel at once: ``feats [P, N, C]`` -> ordering, core distances,
    reachability, predecessor, each ``[P, N]`` (scikit-learn's ``_compute_optics_graph``)."""
    pixels, count, _ = feats.shape
    dist = cosine_distances(feats)
    core = _around(dist.kthvalue(min_samples, dim=-1).values)
    reach = torch.full((pixels, count), float("inf"), dtype=torch.float64, device=feats.device)
    predecessor = torch.full((pixels, count), -1, dtype=torch.long, device=feats.device)
    processed = torch.zeros(pixels, count, dtype=torch.bool, device=feats.device)
    ordering = torch.empty(pixels, count, dtype=torch.long, device=feats.device)
    rows = torch.arange(pixels, device=feats.device)
    for step in range(count):
        # the unprocessed point of smallest reachability, the smallest index on ties (inf included)
        masked = torch.where(processed, float("inf"), reach)
        smallest = masked.min(dim=-1, keepdim=True).values
        point = ((~processed) & (masked == smallest)).float().argmax(dim=-1)
        ordering[:, step] = point
        processed[rows, point] = True
        candidate = _around(torch.maximum(dist[rows, point], core[rows, point][:, None]))
        improved = (~processed) & (candidate < reach)
        reach = torch.where(improved, candidate, reach)
        predecessor = torch.where(improved, point[:, None], predecessor)
    return ordering, core, reach, predecessor


def optics_labels(temp: torch.Tensor, tsize: int, xi: float = 0.05, pixels_per_chunk: int = 1024) -> torch.Tensor:
    """Cluster ids ``[N, H, W]`` (-1 = noise) of the templates ``[N, C, H, W]`` at every pixel,
    as ``sklearn.cluster.OPTICS(min_samples=N // tsize, metric="cosine", xi=xi)`` labels them."""
    from sklearn.cluster import cluster_optics_xi  # here: scikit-learn takes ~1 s to import

    count, channels, height, width = temp.shape
    min_samples = min_samples_for(count, tsize)
    labels = np.full((height * width, count), -1, dtype=np.int64)
    if min_samples is not None:
        feats = temp.reshape(count, channels, height * width).permute(2, 0, 1)
        for start in range(0, height * width, pixels_per_chunk):
            ordering, _, reach, predecessor = optics_graph(feats[start:start + pixels_per_chunk], min_samples)
            ordering, reach, predecessor = ordering.cpu().numpy(), reach.cpu().numpy(), predecessor.cpu().numpy()
            # zero reachabilities (duplicate features) make the xi ratios divide by zero, harmlessly
            with np.errstate(divide="ignore", invalid="ignore"):
                for i in range(ordering.shape[0]):
                    labels[start + i] = cluster_optics_xi(
                        reachability=reach[i], predecessor=predecessor[i], ordering=ordering[i],
                        min_samples=min_samples, xi=xi,
                    )[0]
    return torch.from_numpy(labels.T.reshape(count, height, width).copy()).to(temp.device)


def compress(temp: torch.Tensor, tsize: int) -> torch.Tensor:
    """The PTS tiny set of ``temp [N, C, H, W]``: OPTICS per pixel, then ``hetmm_kernels.PTS``.

    With ``tsize >= N`` nothing is dropped: the templates come back as they are (PTS would
    only append empty slots).
    """
    import hetmm_kernels as hk

    if tsize >= temp.shape[0]:
        return temp
    return hk.PTS(temp, optics_labels(temp, tsize), tsize)
