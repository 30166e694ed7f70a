"""Windowed pixel-to-patch matching on the CPU: tiled matrix products in PyTorch.

A tile of P query pixels (times a chunk of the query batch) is multiplied with the
*union* of their windows in the templates: ``[U*T, C] x [C, P*B]``, one batched BLAS
call per tile. With pixel-major templates (``[H, W, T, C]``) every row of that union
is a contiguous ``[U_w * T, C]`` block, so the call reads the templates in place.
Each pixel then keeps the maximum inside its own ``k x k`` window of the union
(an additive 0/-inf mask, separable in y and x). ``mutual_match`` reduces over
templates *before* masking (the window mask does not depend on the template), so
both directions cost one small reduction per tile. Useful products are a fraction
``k^2 / U`` of those computed; the tile shape trades that against the BLAS
efficiency of the ``P * B`` rows.
"""

from __future__ import annotations

import math

import torch

MATCH_FLOOR = -1.0
# Templates per BLAS call: bounds the [U_h, U_w*T, P*B] similarity block.
TEMPLATE_GROUP = 64
# Query rows per BLAS call (P * batch chunk).
MAX_ROWS = 256


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the products run in: float32, except bfloat16 on the CPU (and float64 for float64).

    CPU BLAS multiplies bfloat16 natively with float32 accumulation (2-3x the float32
    rate on AVX512-BF16 cores). Each similarity is then rounded to bfloat16 once; as
    rounding is monotonic, the maximum of rounded values equals the rounded maximum,
    which is what a bfloat16 caller gets anyway. float16 has no fast CPU kernels and
    runs in float32.
    """
    if dtype == torch.float64:
        return torch.float64
    return torch.bfloat16 if (dtype == torch.bfloat16 and device.type == "cpu") else torch.float32


def _result(x: torch.Tensor) -> torch.dtype:
    """Results are kept in float32 (float64 for float64 products)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def map_major(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` -> contiguous ``[N, H, W, C]`` (free for channels-last input)."""
    return x.to(compute_dtype(x.dtype, x.device)).permute(0, 2, 3, 1).contiguous()


def pixel_major(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` -> contiguous ``[H, W, N, C]``: every union row is one contiguous block."""
    return x.to(compute_dtype(x.dtype, x.device)).permute(2, 3, 0, 1).contiguous()


def template_groups(temp: torch.Tensor, group: int = TEMPLATE_GROUP) -> list[torch.Tensor]:
    """Templates ``[T, C, H, W]`` as contiguous pixel-major groups ``[H, W, T_g, C]`` of near-equal size."""
    count = temp.shape[0]
    n_groups = max(1, math.ceil(count / group))
    bounds = [round(i * count / n_groups) for i in range(n_groups + 1)]
    return [pixel_major(temp[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


# Rows at which a BLAS block reaches half its peak rate, fitted per compute dtype on a
# 2-core AVX-512 machine (bfloat16 kernels want taller blocks).
HALF_RATE_ROWS = {torch.float32: 12, torch.bfloat16: 48}


def pick_tile(height: int, width: int, radius: int, rows_per_pixel: int, dtype=torch.float32) -> tuple[int, int]:
    """Tile shape (th, tw) minimising the estimated cost per query pixel.

    Every pixel of a tile is multiplied with the whole union of U positions, so the
    cost per pixel is ``U / efficiency(M)`` for a BLAS block of ``M = P * rows`` rows,
    with ``efficiency(M) = M / (M + HALF_RATE_ROWS)``.
    """
    half_rate = HALF_RATE_ROWS.get(dtype, 12)
    best, best_cost = (1, 1), float("inf")
    for th in (1, 2, 4, 8):
        for tw in (1, 2, 4, 8):
            if th > 2 * height or tw > 2 * width:
                continue
            union = min(th + 2 * radius, height) * min(tw + 2 * radius, width)
            pixels = min(th, height) * min(tw, width)
            rows = pixels * min(rows_per_pixel, max(1, MAX_ROWS // pixels))
            cost = union * (rows + half_rate) / rows
            if cost < best_cost - 1e-9:
                best, best_cost = (th, tw), cost
    return best


def _window_masks(extent: int, tile: int, radius: int, reach: int, like: torch.Tensor):
    """Per tile along one axis: (start, stop, union start, union stop, additive mask [rows, union])."""
    spans = []
    for start in range(0, extent, tile):
        stop = min(extent, start + tile)
        u_start, u_stop = max(0, start - reach), min(extent, stop + reach)
        rows = torch.arange(start, stop, device=like.device).view(-1, 1)
        cols = torch.arange(u_start, u_stop, device=like.device).view(1, -1)
        mask = like.new_zeros(rows.shape[0], cols.shape[1])
        mask.masked_fill_((rows - cols).abs() > radius, float("-inf"))
        spans.append((start, stop, u_start, u_stop, mask))
    return spans


def _tile_products(x_tile: torch.Tensor, y: torch.Tensor, uy0, uy1, ux0, ux1) -> torch.Tensor:
    """The union ``y[uy0:uy1, ux0:ux1]`` against ``x_tile [M, C]`` -> ``[U_h, U_w * N, M]``.

    Union rows on the left: each is a contiguous ``[U_w * N, C]`` block, read in place
    (with the union on the right, CPU bfloat16 BLAS copies it first: 3x slower).
    """
    union = y[uy0:uy1, ux0:ux1]  # [U_h, U_w, N, C], each row contiguous
    union = union.reshape(uy1 - uy0, -1, union.shape[-1])  # a view, no copy
    return torch.matmul(union, x_tile.t())


def window_max(x: torch.Tensor, y_groups: list[torch.Tensor], radius: int, reverse: bool = False) -> torch.Tensor:
    """Per-pair window maxima of ``<x[a, i, j], y[i2, j2, n]>`` over ``|i2-i|, |j2-j| <= radius``, floored at -1.

    ``x`` is map-major ``[A, H, W, C]`` (the query), ``y_groups`` pixel-major ``[H, W, N_g, C]``
    pieces (the templates). Forward: the maximum for each x pixel over its window in y.
    ``reverse``: the maximum for each y pixel over its window in x (``backward_ATM``); the
    products are the same, only the masked reduction runs over the other axes and merges
    across tiles. Returns float32 ``[A, N, H, W]``.
    """
    count_a, height, width, channels = x.shape
    count_n = sum(g.shape[2] for g in y_groups)
    th, tw = pick_tile(height, width, radius, count_a, x.dtype)
    a_chunk = max(1, MAX_ROWS // (th * tw))
    if reverse:
        out = torch.full((count_a, count_n, height, width), MATCH_FLOOR, device=x.device, dtype=_result(x))
    else:
        out = torch.empty(count_n, count_a, height, width, device=x.device, dtype=_result(x))
    rows_y = _window_masks(height, th, radius, radius, x)
    rows_x = _window_masks(width, tw, radius, radius, x)
    # additive masks per (tile row, tile column), shaped [U_h, U_w, 1, 1, th, tw]
    masks = [[my.t()[:, None, None, None, :, None] + mx.t()[None, :, None, None, None, :]
              for *_, mx in rows_x] for *_, my in rows_y]
    for a0 in range(0, count_a, a_chunk):
        a1 = min(count_a, a0 + a_chunk)
        for iy, (y0, y1, uy0, uy1, _) in enumerate(rows_y):
            for ix, (x0, x1, ux0, ux1, _) in enumerate(rows_x):
                x_tile = x[a0:a1, y0:y1, x0:x1].reshape(-1, channels)  # rows (a, y, x)
                n0 = 0
                for group in y_groups:
                    n1 = n0 + group.shape[2]
                    sims = _tile_products(x_tile, group, uy0, uy1, ux0, ux1)
                    sims = sims.view(uy1 - uy0, ux1 - ux0, n1 - n0, a1 - a0, y1 - y0, x1 - x0) + masks[iy][ix]
                    if reverse:
                        target = out[a0:a1, n0:n1, uy0:uy1, ux0:ux1]
                        torch.maximum(target, sims.amax(dim=(4, 5)).permute(3, 2, 0, 1), out=target)
                    else:
                        out[n0:n1, a0:a1, y0:y1, x0:x1] = sims.amax(dim=(0, 1))
                    n0 = n1
    if reverse:
        return out
    return out.clamp_min_(MATCH_FLOOR).transpose(0, 1).contiguous()


def mutual_max(q: torch.Tensor, t_groups: list[torch.Tensor], fore_radius: int, back_radius: int):
    """``(max_t forward map, max_t backward map)`` for map-major ``q [B, H, W, C]``; float32 ``[B, H, W]`` each."""
    batch, height, width, channels = q.shape
    reach = max(fore_radius, back_radius)
    th, tw = pick_tile(height, width, reach, batch, q.dtype)
    b_chunk = max(1, MAX_ROWS // (th * tw))
    fore = torch.empty(batch, height, width, device=q.device, dtype=_result(q))
    back = torch.full((batch, height, width), MATCH_FLOOR, device=q.device, dtype=_result(q))
    spans_y = _window_masks(height, th, fore_radius, reach, q)
    spans_x = _window_masks(width, tw, fore_radius, reach, q)
    back_y = _window_masks(height, th, back_radius, reach, q)
    back_x = _window_masks(width, tw, back_radius, reach, q)

    # additive masks per (tile row, tile column), shaped [U_h, U_w, 1, th, tw]
    def combine(rows, cols):
        return [[my.t()[:, None, None, :, None] + mx.t()[None, :, None, None, :] for *_, mx in cols] for *_, my in rows]

    fore_masks, back_masks = combine(spans_y, spans_x), combine(back_y, back_x)
    for b0 in range(0, batch, b_chunk):
        b1 = min(batch, b0 + b_chunk)
        for iy, (y0, y1, uy0, uy1, _) in enumerate(spans_y):
            for ix, (x0, x1, ux0, ux1, _) in enumerate(spans_x):
                x_tile = q[b0:b1, y0:y1, x0:x1].reshape(-1, channels)  # rows (b, y, x)
                best = None
                for group in t_groups:
                    sims = _tile_products(x_tile, group, uy0, uy1, ux0, ux1)
                    # max over templates first: the window masks do not depend on the template
                    sims = sims.view(uy1 - uy0, ux1 - ux0, group.shape[2], -1)
                    group_best = sims.amax(dim=2)
                    best = group_best if best is None else torch.maximum(best, group_best, out=best)
                best = best.view(uy1 - uy0, ux1 - ux0, b1 - b0, y1 - y0, x1 - x0)
                fore[b0:b1, y0:y1, x0:x1] = (best + fore_masks[iy][ix]).amax(dim=(0, 1))
                back_tile = (best + back_masks[iy][ix]).amax(dim=(3, 4))  # [U_h, U_w, b]
                target = back[b0:b1, uy0:uy1, ux0:ux1]
                torch.maximum(target, back_tile.permute(2, 0, 1), out=target)
    return fore.clamp_min_(MATCH_FLOOR), back


def forward_ATM(query: torch.Tensor, t_groups: list[torch.Tensor], patch: int) -> torch.Tensor:
    return window_max(map_major(query), t_groups, patch // 2)


def backward_ATM(query: torch.Tensor, t_groups: list[torch.Tensor], patch: int) -> torch.Tensor:
    return window_max(map_major(query), t_groups, patch // 2, reverse=True)


def mutual_match(query: torch.Tensor, t_groups: list[torch.Tensor], fore_patch: int, back_patch: int):
    return mutual_max(map_major(query), t_groups, fore_patch // 2, back_patch // 2)


def mutual_match_subset(query: torch.Tensor, temp_pm: torch.Tensor, fore_patch: int, back_patch: int,
                        indices: torch.Tensor):
    """Query b against its own templates ``indices[b]`` of pixel-major ``temp_pm [H, W, T, C]``.

    Only the K selected templates of each query are gathered (``[H, W, K, C]``), never the bank.
    """
    q = map_major(query)
    fores, backs = zip(*(mutual_max(q[b:b + 1], [temp_pm.index_select(2, indices[b])], fore_patch // 2,
                                    back_patch // 2) for b in range(q.shape[0])))
    return torch.cat(fores), torch.cat(backs)
