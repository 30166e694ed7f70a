"""CPR global retrieval, vectorised: block histograms of codebook ids and trimmed-KL top-K.

The bank is kept as integer counts (uint8 while a block holds at most 255 pixels): 13 bins x
25 blocks is 325 bytes an image, so a million reference images fit in 325 MB. Distances are
computed a chunk of the bank at a time; only ``[Q, chunk]`` trimmed sums are kept and the
running top-K is merged after each chunk, ties going to the lower index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import KL_EPS, block_layout

# Bank entries per step: [L, Q, chunk] block distances of about this many elements (cache-sized).
PAIR_BLOCK_ELEMENTS = 1 << 19


def nearest_codes(features: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` nearest centre per pixel, equal to the reference's ``argmin sum((x - c)^2)``.

    Distances come from one matrix product (``|x|^2 - 2 x.c + |c|^2``); pixels whose best two
    centres are too close for that form's rounding to decide are settled with the difference
    form. Exact ties (equal centres) go to the first centre, as in the reference; centres closer
    than float32 rounding (~1e-7) may be told apart differently.
    """
    batch, channels, height, width = features.shape
    x = features.float().permute(0, 2, 3, 1).reshape(-1, channels)  # [P, C]
    c = centers.float()
    x_sq, c_sq = (x * x).sum(dim=1, keepdim=True), (c * c).sum(dim=1)
    dist = x_sq - 2 * (x @ c.t()) + c_sq  # [P, n]
    codes = dist.argmin(dim=1)
    if c.shape[0] > 1:
        two = dist.topk(2, dim=1, largest=False).values
        unsure = (two[:, 1] - two[:, 0]) <= 1e-4 * (x_sq[:, 0] + c_sq.max() + 1)
        if bool(unsure.any()):
            exact = ((x[unsure][:, None, :] - c[None]) ** 2).sum(dim=-1)
            codes[unsure] = exact.argmin(dim=1)
    return codes.view(batch, height, width)


def histograms_from_codes(codes: torch.Tensor, bins: int, S: int) -> torch.Tensor:
    """Block counts ``[B, L, bins]`` (int32) of ``codes + 1``, zero padding counted in bin 0."""
    batch, height, width = codes.shape
    block_h, block_w, pad_h, pad_w, blocks_h, blocks_w = block_layout(height, width, S)
    padded = F.pad(codes + 1, (pad_w, pad_w, pad_h, pad_h))[:, : blocks_h * block_h, : blocks_w * block_w]
    block_id = (torch.arange(blocks_h, device=codes.device).repeat_interleave(block_h)[:, None] * blocks_w
                + torch.arange(blocks_w, device=codes.device).repeat_interleave(block_w)[None, :])
    flat = (block_id[None] * bins + padded).reshape(batch, -1)
    counts = torch.zeros(batch, blocks_h * blocks_w * bins, dtype=torch.int32, device=codes.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.int32))
    return counts.view(batch, blocks_h * blocks_w, bins)


def block_histograms(features, centers, S: int = 5, return_codes: bool = False):
    codes = nearest_codes(features, centers)
    block_h, block_w, *_ = block_layout(codes.shape[1], codes.shape[2], S)
    hist = histograms_from_codes(codes, centers.shape[0] + 1, S).float() / (block_h * block_w)
    return (hist, codes) if return_codes else hist


def _bin_sum(terms) -> torch.Tensor:
    """Sum of the per-bin terms in bin order, one elementwise add at a time."""
    total = None
    for term in terms:
        total = term.clone() if total is None else total.add_(term)
    return total


def count_table(area: int, method: str, device=None) -> torch.Tensor:
    """float32 per count ``c`` (every uint8 value, at least): ``log(c / area + eps)`` for KL, ``c / area``
    for L2, with this path's operations in its order (division, then the epsilon, then the log): what
    the Triton top-K and the compiled CPU scan look a bank's counts up in."""
    values = torch.arange(max(256, area + 1), device=device, dtype=torch.float32) / area
    return torch.log(values + KL_EPS) if method == "kl" else values


def query_terms(query: torch.Tensor, method: str):
    """``(query [Q, L, bins], own [Q, L])``: for KL the query plus eps and its own sum
    ``sum_b q_b log q_b`` (bin by bin), for L2 the query and zeros."""
    if method != "kl":
        return query, query.new_zeros(query.shape[:2])
    query = query + KL_EPS
    return query, _bin_sum(query[..., b] * torch.log(query[..., b]) for b in range(query.shape[2]))


def trimmed_distances(query: torch.Tensor, bank: torch.Tensor, keep: int, method: str) -> torch.Tensor:
    """``[Q, R]`` for float histograms ``query [Q, L, n+1]`` and ``bank [L, n+1, R]`` (bank-minor:
    each bin's row over the bank is contiguous).

    Every pair's value comes from the same fixed sequence of elementwise operations (bin by
    bin on ``[L, Q, R]`` planes, then block by block): no matrix product or library reduction,
    whose summation order depends on the shapes. So a pair's distance does not depend on the
    batch, on the bank chunk or on how a bank is sharded across processes, and rankings
    merged across shards equal the unsharded one exactly. KL(q || r) = sum q log q - sum q log r,
    so the logarithms cost R*L*bins, not Q*R*L*bins. The ``L - keep`` largest block distances
    are then subtracted from the total.
    """
    blocks, bins = query.shape[1:]
    q, own = query_terms(query, method)
    q, own = q.permute(1, 2, 0), own.t()  # [L, bins, Q], [L, Q]
    if method == "kl":
        r = torch.log(bank + KL_EPS)  # [L, bins, R]
        cross = _bin_sum(q[:, b, :, None] * r[:, b, None, :] for b in range(bins))  # [L, Q, R]
        per_block = torch.sub(own[:, :, None], cross, out=cross)
    else:
        r = bank
        per_block = _bin_sum((q[:, b, :, None] - r[:, b, None, :]).square_() for b in range(bins)).sqrt_()
    total = per_block[0].clone()
    for l in range(1, blocks):
        total.add_(per_block[l])
    drop = blocks - keep
    if drop:
        largest = per_block.topk(drop, dim=0).values  # [drop, Q, R]: selection is exact
        for value in largest:
            total.sub_(value)
    return total


def chunk_topk(dist: torch.Tensor, k: int):
    """The ``k`` smallest of each row with their column indices, as a set that breaks boundary
    ties towards the lower index (``topk`` alone may not)."""
    k = min(k, dist.shape[1])
    # one more than k: a tie straddles the boundary exactly when the (k+1)-th smallest equals the k-th
    values, index = dist.topk(min(k + 1, dist.shape[1]), dim=1, largest=False)
    if values.shape[1] > k and bool((values[:, k] == values[:, k - 1]).any()):  # settle it by index
        index = dist.argsort(dim=1, stable=True)[:, :k]
        return dist.gather(1, index), index
    return values[:, :k], index[:, :k]


def merge_topk(best_d, best_i, dist, offset: int, k: int):
    """Fold the distances of bank entries ``offset ..`` into the running top-K (ties: lower index first)."""
    dist, index = chunk_topk(dist, k)
    index = index + offset
    if best_d is not None:
        dist, index = torch.cat([best_d, dist], dim=1), torch.cat([best_i, index], dim=1)
    return smallest_k(dist, index, k)


def smallest_k(distances: torch.Tensor, indices: torch.Tensor, k: int):
    """The ``k`` smallest of ``distances [Q, M]``, ascending, ties to the lower ``indices [Q, M]``."""
    by_index = indices.argsort(dim=1, stable=True)
    distances, indices = distances.gather(1, by_index), indices.gather(1, by_index)
    order = distances.argsort(dim=1, stable=True)[:, :k]
    return distances.gather(1, order), indices.gather(1, order)


def retrieve_topk(query_hist, bank_counts, area: int, k: int, l_ratio: float, method: str):
    keep = int(query_hist.shape[1] * l_ratio)
    query = query_hist.float()
    step = max(256, PAIR_BLOCK_ELEMENTS // (query.shape[0] * query.shape[1]))
    best_d = best_i = None
    for start in range(0, bank_counts.shape[0], step):
        # transposed while still integer counts (a quarter of the bytes of floats)
        chunk = bank_counts[start:start + step].permute(1, 2, 0).contiguous().float() / area
        best_d, best_i = merge_topk(best_d, best_i, trimmed_distances(query, chunk, keep, method), start, k)
    return best_d, best_i
