"""CPR-style global retrieval for the detector: a k-means codebook and block histograms.

"Target before shooting": each query is matched only against the K training images whose
block histograms of codebook ids are closest to its own (trimmed KL), instead of all N.
"""

from __future__ import annotations

import numpy as np
import torch

import hetmm_kernels as hk
from hetmm_kernels.reference import block_layout

N_CLUSTERS = 12  # as published
SAMPLES = 50_000  # pixels sampled to fit the codebook, as published
S = 5  # blocks per side


class Codebook:
    """K-means centres ``[n, C]`` over pixel features, and the block histograms they induce."""

    def __init__(self, centers: torch.Tensor, S: int = S):
        self.centers, self.S = centers.float().contiguous(), int(S)

    @classmethod
    def fit(cls, features: torch.Tensor, n_clusters: int = N_CLUSTERS, samples: int = SAMPLES,
            seed: int = 0, S: int = S) -> "Codebook":
        """Fit on a seeded random sample of the pixels of ``features [N, C, H, W]``."""
        from sklearn.cluster import KMeans  # here: scikit-learn takes ~1 s to import

        count, channels, height, width = features.shape
        pixels = features.float().permute(0, 2, 3, 1).reshape(-1, channels).cpu().numpy()
        rng = np.random.RandomState(seed)
        chosen = pixels[rng.permutation(pixels.shape[0])[:samples]]
        n_clusters = min(n_clusters, len(chosen))
        kmeans = KMeans(n_clusters, n_init=10, random_state=rng).fit(chosen)
        return cls(torch.from_numpy(kmeans.cluster_centers_).float(), S)

    def area(self, height: int, width: int) -> int:
        block_h, block_w, *_ = block_layout(height, width, self.S)
        return block_h * block_w

    def histograms(self, features: torch.Tensor) -> torch.Tensor:
        return hk.block_histograms(features.float(), self.centers.to(features.device), self.S)

    def bank(self, features: torch.Tensor) -> hk.HistogramBank:
        """The compact histogram bank of reference ``features [N, C, H, W]``."""
        return hk.HistogramBank.from_histograms(self.histograms(features), self.area(*features.shape[2:]))
