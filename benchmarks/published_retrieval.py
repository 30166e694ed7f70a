"""A published-style CPR global retrieval, the baseline of the retrieval benchmark.

The published CPR code is not available on the offline machine this project is built on, so this is
a reconstruction from the paper's description (``DESIGN.md`` section 1, step 3), written the way that
description reads: a float32 bank of normalised histograms, per pair and block KL(q + eps || r + eps)
with a logarithm of a ratio per bin, the block values sorted, the smallest ``int(L * l_ratio)`` summed,
then the K smallest. The bank is processed in chunks so that ``[Q, chunk, L, bins]`` stays near 64 MB.
"""

from __future__ import annotations

import torch

from hetmm_kernels.reference import KL_EPS

CHUNK_ELEMENTS = 1 << 24


def retrieve_topk(query_hist: torch.Tensor, bank_hist: torch.Tensor, k: int, l_ratio: float = 0.8):
    """``(distances [Q, k], indices [Q, k])`` of float histograms ``query_hist [Q, L, bins]`` and
    ``bank_hist [R, L, bins]``."""
    queries, blocks, bins = query_hist.shape
    keep = int(blocks * l_ratio)
    q = query_hist.float()[:, None] + KL_EPS  # [Q, 1, L, bins]
    step = max(1, CHUNK_ELEMENTS // (queries * blocks * bins))
    parts = []
    for start in range(0, bank_hist.shape[0], step):
        r = bank_hist[start:start + step].float()[None] + KL_EPS  # [1, chunk, L, bins]
        per_block = (q * torch.log(q / r)).sum(dim=-1)  # [Q, chunk, L]
        parts.append(per_block.sort(dim=-1).values[..., :keep].sum(dim=-1))
    distances = torch.cat(parts, dim=1)
    return torch.topk(distances, k, dim=1, largest=False)
