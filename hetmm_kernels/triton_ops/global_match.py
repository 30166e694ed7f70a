"""Global matching in Triton: each query pixel's largest dot product with a set of template pixels.

One program per block of query pixels streams the rows in blocks, multiplies on the tensor cores and
keeps a running maximum in registers: the [pixels, rows] similarities are never written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import autotune
from ..reference import MATCH_FLOOR
from .atm import _dot_precision, pixel_major


@triton.jit
def _global_max_kernel(query_ptr, rows_ptr, out_ptr, pixels, count, channels,
                       DOT_PRECISION: tl.constexpr, FLOOR: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < pixels
    query_rows = query_ptr + m[:, None].to(tl.int64) * channels
    best = tl.full((BLOCK_M,), FLOOR, tl.float32)
    for n0 in range(0, count, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < count
        template_rows = rows_ptr + n[None, :].to(tl.int64) * channels
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, channels, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < channels
            a = tl.load(query_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(template_rows + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        best = tl.maximum(best, tl.max(tl.where(n_ok[None, :], acc, float("-inf")), axis=1))
    tl.store(out_ptr + m, best, mask=m_ok)


SPACE = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
         for bm in (64, 128) for bn in (32, 64, 128) for bk in (32, 64) for w in (4, 8) for s in (2, 3)]
DEFAULT = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
# float32 multiplies on the CUDA cores (no TF32: the reference's products): a 64 x 64 tile of 32 channels on
# 4 warps spills on sm_80 (255 registers, 32 bytes; kstats), on 8 warps with 16 channels it does not (112)
DEFAULT_FP32 = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2)


def default_config(dtype: torch.dtype) -> dict:
    return DEFAULT_FP32 if dtype == torch.float32 else DEFAULT


def problem(pixels: int, count: int, channels: int, dtype) -> str:
    return autotune.problem_key(p=autotune.bucket(pixels), n=autotune.bucket(count), c=autotune.bucket(channels),
                                dtype=str(dtype).split(".")[-1])


def global_match(query: torch.Tensor, rows: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """``[B, H, W]`` float32: see ``hetmm_kernels.reference.global_match``."""
    batch, channels, height, width = query.shape
    pixels = batch * height * width
    q = pixel_major(query).reshape(pixels, channels)
    r = rows.contiguous()
    default = default_config(query.dtype)
    cfg = config or autotune.choose("global_match", problem(pixels, r.shape[0], channels, query.dtype), query.device,
                                    default, lambda c: set(c) == set(default))
    constexprs, launch = autotune.launch_options(cfg)
    out = torch.empty(pixels, device=query.device, dtype=torch.float32)
    grid = (triton.cdiv(pixels, constexprs["BLOCK_M"]),)
    _global_max_kernel[grid](q, r, out, pixels, r.shape[0], channels, DOT_PRECISION=_dot_precision(query.dtype),
                             FLOOR=MATCH_FLOOR, **constexprs, **launch)
    return out.view(batch, height, width)


def tune(query: torch.Tensor, rows: torch.Tensor, space: list | None = None, save: bool = True, timer=None):
    """Tune the block shapes for this problem (the maxima must not change beyond rounding)."""
    key = problem(query.shape[0] * query.shape[2] * query.shape[3], rows.shape[0], query.shape[1], query.dtype)
    default = default_config(query.dtype)
    return autotune.tune("global_match", key, query.device, [c for c in (space or SPACE) if c != default], default,
                         lambda cfg: global_match(query, rows, cfg),
                         lambda a, b: torch.allclose(a, b, atol=1e-2 if query.dtype != torch.float32 else 1e-5),
                         timer=timer, save=save)
