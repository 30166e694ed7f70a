"""PTS in Triton: one program per pixel runs the published selection rules in registers.

The per-pixel Gram matrices come from one batched matrix product (cuBLAS is the right
tool for that); each program then streams its pixel's Gram rows (``G`` is symmetric, so a
row is also a column) to build the cluster sums and totals, walks the clusters in order
of first appearance, falls back to the global centre, and fills the remaining slots with
hard-normal prototypes, writing the picked indices. The features are gathered after.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import autotune

from ..torch_ops.pts import gather, gram_chunks


@triton.jit
def _pts_select_kernel(gram_ptr, labels_ptr, picked_ptr, count, tsize, BLOCK_N: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_N)
    in_range = k < count
    labels = tl.load(labels_ptr + p * count + k, mask=in_range, other=-1)
    gram = gram_ptr + p * count * count
    picked = picked_ptr + p * tsize
    member = tl.zeros((BLOCK_N,), dtype=tl.float32)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m in range(count):
        row = tl.load(gram + m * count + k, mask=in_range, other=0.0)
        label_m = tl.load(labels_ptr + p * count + m)
        total += row
        member += tl.where((labels == label_m) & (label_m != -1), row, 0.0)
    free = in_range
    accumulated = tl.zeros((BLOCK_N,), dtype=tl.float32)
    filled = 0
    # 1. one centre per cluster, clusters in order of first appearance
    for j in range(count):
        label_j = tl.load(labels_ptr + p * count + j)
        earlier = tl.sum(((labels == label_j) & (k < j)).to(tl.int32), axis=0)
        if (label_j != -1) & (earlier == 0) & (filled < tsize):
            choose = tl.argmax(tl.where(labels == label_j, member, float("-inf")), axis=0)
            tl.store(picked + filled, choose)
            free = free & (k != choose)
            accumulated += tl.load(gram + choose * count + k, mask=in_range, other=0.0)
            filled += 1
    # 2. no cluster: the global centre
    if filled == 0:
        choose = tl.argmax(tl.where(in_range, total, float("-inf")), axis=0)
        tl.store(picked, choose)
        free = free & (k != choose)
        accumulated += tl.load(gram + choose * count + k, mask=in_range, other=0.0)
        filled = 1
    # 3. hard-normal prototypes: least similar to everything picked so far
    for s in range(filled, tsize):
        if tl.sum(free.to(tl.int32), axis=0) > 0:
            choose = tl.argmin(tl.where(free, accumulated, float("inf")), axis=0)
            tl.store(picked + s, choose)
            free = free & (k != choose)
            accumulated += tl.load(gram + choose * count + k, mask=in_range, other=0.0)


SPACE = [dict(num_warps=w) for w in (1, 2, 4, 8)]


def problem(count: int, tsize: int) -> str:
    return autotune.problem_key(n=autotune.bucket(count), tsize=tsize)


def PTS(temp: torch.Tensor, clus: torch.Tensor, tsize: int, config: dict | None = None) -> torch.Tensor:
    count = temp.shape[0]
    block_n = max(16, triton.next_power_of_2(count))
    cfg = config or autotune.choose("pts", problem(count, tsize), temp.device, dict(num_warps=4), lambda c: c in SPACE)
    picked_parts = []
    for _, gram, labels in gram_chunks(temp, clus):
        picked = torch.full((gram.shape[0], tsize), -1, dtype=torch.int64, device=temp.device)
        _pts_select_kernel[(gram.shape[0],)](gram.contiguous(), labels.contiguous(), picked, count, tsize,
                                             BLOCK_N=block_n, **cfg)
        picked_parts.append(picked)
    return gather(temp, torch.cat(picked_parts), tsize)


def tune(temp: torch.Tensor, clus: torch.Tensor, tsize: int, save: bool = True, timer=None):
    """Tune the per-pixel selection's warps (the selection must not change)."""
    default = dict(num_warps=4)
    return autotune.tune("pts", problem(temp.shape[0], tsize), temp.device, [c for c in SPACE if c != default],
                         default, lambda cfg: PTS(temp, clus, tsize, cfg), torch.equal, timer=timer, save=save)
