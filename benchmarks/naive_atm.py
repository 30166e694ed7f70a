"""The baseline: one thread per output, in the style of the published CUDA extension.

The published ``forward_ATM``/``backward_ATM`` kernels give each CUDA thread one output
``(b, t, i, j)``: it walks the window and, for every position, the C channels of the two
NCHW feature maps, keeping a running maximum; the detector then reduces ``[B, T, H, W]``
over templates with ``max``. This Triton kernel does exactly that, one lane per output (no
tiles, no tensor cores, no reuse between neighbouring outputs), so that the fused kernel's
speed-up is a ratio measured in one run rather than a comparison with a paper.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _naive_window_max_kernel(x_ptr, y_ptr, out_ptr, count_a, count_n, channels, height, width,
                             RADIUS: tl.constexpr, BLOCK: tl.constexpr):
    # one lane = one output (a, n, i, j): max over the window of y[n] around (i, j) of <x[a, :, i, j], y[n, :, .., ..]>
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    total = count_a * count_n * height * width  # (count_a may arrive as the constant 1: no .to())
    valid = offs < total
    j = offs % width
    i = (offs // width) % height
    n = (offs // (width * height)) % count_n
    a = offs // (width * height * count_n)
    hw = height * width
    best = tl.full((BLOCK,), -1.0, dtype=tl.float32)
    for di in range(-RADIUS, RADIUS + 1):
        for dj in range(-RADIUS, RADIUS + 1):
            i2, j2 = i + di, j + dj
            inside = valid & (i2 >= 0) & (i2 < height) & (j2 >= 0) & (j2 < width)
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for c in range(channels):
                xv = tl.load(x_ptr + (a * channels + c) * hw + i * width + j, mask=inside, other=0.0)
                yv = tl.load(y_ptr + (n * channels + c) * hw + i2 * width + j2, mask=inside, other=0.0)
                acc += xv.to(tl.float32) * yv.to(tl.float32)
            best = tl.where(inside, tl.maximum(best, acc), best)
    tl.store(out_ptr + offs, best, mask=valid)


def naive_window_max(x: torch.Tensor, y: torch.Tensor, patch: int) -> torch.Tensor:
    """``x [A, C, H, W]``, ``y [N, C, H, W]`` -> float32 ``[A, N, H, W]``: the published forward_ATM."""
    x, y = x.contiguous(), y.contiguous()
    count_a, channels, height, width = x.shape
    out = torch.empty((count_a, y.shape[0], height, width), device=x.device, dtype=torch.float32)
    block = 256
    grid = (triton.cdiv(out.numel(), block),)
    _naive_window_max_kernel[grid](x, y, out, count_a, y.shape[0], channels, height, width,
                                   RADIUS=patch // 2, BLOCK=block)
    return out


def naive_mutual_match(query: torch.Tensor, temp: torch.Tensor, fore_patch: int, back_patch: int):
    """What the published pipeline runs per layer: both [B, T, H, W] maps, then the max over templates."""
    fore = naive_window_max(query, temp, fore_patch).amax(dim=1)
    back = naive_window_max(temp, query, back_patch).transpose(0, 1).amax(dim=1)
    return fore, back
