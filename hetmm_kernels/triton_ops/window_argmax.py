"""The forward window maxima with their places, in Triton: which template pixel each query pixel matched.

``_window_argmax_kernel``: one program per (block of query pixels, template, query). It walks the window's
offsets in row-major order; for each, every pixel's product with the template pixel at that offset is summed
over channel blocks in float32, and a strictly larger product takes the running maximum and its place, so the
first of equal maxima stays (the reference's tie rule). Elementwise products, not ``tl.dot``: explanations
run on flagged images at one layer, where a simple kernel is fast enough and exact to the reference's rule.

Feature maps are pixel-major ``[N, H, W, C]`` (the ``C`` axis of every load contiguous); offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .atm import MATCH_FLOOR, pixel_major

_FLOOR = tl.constexpr(MATCH_FLOOR)
BLOCK_P = 32  # query pixels a program (with BLOCK_C channels: 8 registers a thread per loaded tile)


@triton.jit(do_not_specialize=["radius"])
def _window_argmax_kernel(q_ptr, t_ptr, best_ptr, where_ptr, count_t, height, width, channels, radius,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_b = tl.program_id(2)
    hw = height * width
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = p < hw
    i = p // width
    j = p % width
    lanes = tl.arange(0, BLOCK_C)
    q_rows = q_ptr + (pid_b.to(tl.int64) * hw + p)[:, None] * channels
    t_map = t_ptr + pid_t.to(tl.int64) * hw * channels
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    where = tl.zeros([BLOCK_P], tl.int64)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            y2 = i + dy
            x2 = j + dx
            inside = valid & (y2 >= 0) & (y2 < height) & (x2 >= 0) & (x2 < width)
            place = (y2 * width + x2).to(tl.int64)
            total = tl.zeros([BLOCK_P], tl.float32)
            for c0 in range(0, channels, BLOCK_C):
                c = c0 + lanes
                in_c = (c < channels)[None, :]
                q = tl.load(q_rows + c[None, :], mask=valid[:, None] & in_c, other=0.0).to(tl.float32)
                t = tl.load(t_map + place[:, None] * channels + c[None, :], mask=inside[:, None] & in_c,
                            other=0.0).to(tl.float32)
                total += tl.sum(q * t, axis=1)
            better = inside & (total > best)
            best = tl.where(better, total, best)
            where = tl.where(better, place, where)
    out = (pid_b.to(tl.int64) * count_t + pid_t) * hw + p
    tl.store(best_ptr + out, tl.maximum(best, _FLOOR), mask=valid)
    tl.store(where_ptr + out, where, mask=valid)


def forward_argmax(query: torch.Tensor, temp_pm: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query ``[B, C, H, W]``, pixel-major templates ``[T, H, W, C]`` -> float32 maxima ``[B, T, H, W]`` and their
    template pixels ``y2 * W + x2`` (int64)."""
    batch, channels, height, width = query.shape
    count_t = temp_pm.shape[0]
    best = torch.empty((batch, count_t, height, width), device=query.device, dtype=torch.float32)
    where = torch.empty(best.shape, device=query.device, dtype=torch.int64)
    grid = (triton.cdiv(height * width, BLOCK_P), count_t, batch)
    _window_argmax_kernel[grid](pixel_major(query), temp_pm, best, where, count_t, height, width, channels,
                                patch // 2, BLOCK_P=BLOCK_P, BLOCK_C=min(32, triton.next_power_of_2(channels)),
                                num_warps=4)
    return best, where
