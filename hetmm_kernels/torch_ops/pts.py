"""PTS vectorised over pixels: batched Gram matrices, then the selection as masked arg-reductions."""

from __future__ import annotations

import torch

# Bound on the per-chunk Gram block [P, N, N] (float32 elements).
GRAM_ELEMENTS = 1 << 24


def select(gram: torch.Tensor, labels: torch.Tensor, tsize: int) -> torch.Tensor:
    """Picked template indices ``[P, tsize]`` (-1 where a slot stays empty) from Gram ``[P, N, N]``."""
    pixels, count, _ = gram.shape
    index = torch.arange(count, device=gram.device)
    valid = labels != -1
    same = (labels[:, :, None] == labels[:, None, :]) & valid[:, :, None]
    member_sum = torch.where(same, gram, 0.0).sum(dim=-1)
    # clusters in order of first appearance: rank of the cluster each member belongs to
    first = torch.where(same, index, count).amin(dim=-1).clamp(max=count - 1)
    is_first = (first == index) & valid
    rank_at = torch.cumsum(is_first.long(), dim=-1) - 1
    cluster_rank = torch.where(valid, rank_at.gather(1, first), -1)
    picked = torch.full((pixels, tsize), -1, dtype=torch.long, device=gram.device)
    for r in range(min(tsize, count)):
        in_cluster = cluster_rank == r
        choose = torch.where(in_cluster, member_sum, float("-inf")).argmax(dim=-1)  # first on ties
        picked[:, r] = torch.where(in_cluster.any(dim=-1), choose, -1)
    filled = (picked >= 0).sum(dim=-1)
    centre = gram.sum(dim=-1).argmax(dim=-1)
    picked[:, 0] = torch.where(filled == 0, centre, picked[:, 0])
    filled = filled.clamp(min=1)
    taken = torch.zeros(pixels, count, dtype=torch.bool, device=gram.device)
    rows = torch.arange(pixels, device=gram.device)
    for s in range(tsize):
        mark = picked[:, s] >= 0
        taken[rows[mark], picked[mark, s]] = True
    accumulated = (gram * taken[:, None, :]).sum(dim=-1)
    for s in range(tsize):
        free = ~taken
        active = (filled == s) & free.any(dim=-1)
        if not bool(active.any()):
            continue
        choose = torch.where(free, accumulated, float("inf")).argmin(dim=-1)  # first on ties
        picked[active, s] = choose[active]
        taken[rows[active], choose[active]] = True
        accumulated[active] += gram[rows[active], :, choose[active]]
        filled = filled + active.long()
    return picked


def gather(temp: torch.Tensor, picked: torch.Tensor, tsize: int) -> torch.Tensor:
    """``out[s, :, p] = temp[picked[p, s], :, p]`` (zeros where picked is -1) as ``[tsize, C, H, W]``."""
    count, channels, height, width = temp.shape
    flat = temp.reshape(count, channels, height * width)
    safe = picked.clamp(min=0).t()  # [tsize, P]
    out = flat.gather(0, safe[:, None, :].expand(tsize, channels, -1))
    out = out * (picked.t() >= 0)[:, None, :].to(out.dtype)
    return out.reshape(tsize, channels, height, width)


def gram_chunks(temp: torch.Tensor, clus: torch.Tensor):
    """Yield (pixel slice, Gram ``[P, N, N]`` float32, labels ``[P, N]``) in memory-bounded chunks."""
    count, channels, height, width = temp.shape
    flat = temp.reshape(count, channels, height * width)
    labels = clus.reshape(count, height * width).t()
    step = max(1, GRAM_ELEMENTS // (count * count))
    for start in range(0, height * width, step):
        # pixel-major [P, N, C], transposed a chunk at a time (cache-sized copies)
        block = flat[:, :, start:start + step].permute(2, 0, 1)
        block = block.to(torch.float64 if temp.dtype == torch.float64 else torch.float32).contiguous()
        yield slice(start, start + step), torch.bmm(block, block.transpose(1, 2)), labels[start:start + step]


def PTS(temp: torch.Tensor, clus: torch.Tensor, tsize: int) -> torch.Tensor:
    picked = torch.cat([select(gram, labels, tsize) for _, gram, labels in gram_chunks(temp, clus)])
    return gather(temp, picked, tsize)
