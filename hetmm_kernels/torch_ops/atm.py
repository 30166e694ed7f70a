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


class UnfoldedTemplates:
    """Templates cut into the window unions of ``th x tw`` query tiles, once per bank: ``[tiles, U*T, C]``.

    The map is padded to whole tiles plus ``reach`` on every side, and tile ``i``'s union
    (``U = (th + 2*reach) * (tw + 2*reach)`` positions, each with its T templates) is one contiguous
    ``[U*T, C]`` block, so every tile of a batch is multiplied in one ``bmm`` call instead of one
    Python step per tile. ``invalid [tiles, U]`` is 0 inside the map and -inf on the padding;
    ``position [tiles * U]`` is each union position's index in the padded map (for the backward
    maxima, which fall on union positions). Costs ``U / (th*tw)`` times the bank's memory.
    """

    def __init__(self, temp: torch.Tensor, tile: tuple[int, int], reach: int):
        count, channels, height, width = temp.shape
        th, tw = tile
        self.tile, self.reach, self.count, self.channels = tile, reach, count, channels
        self.height, self.width = height, width
        self.tiles_y, self.tiles_x = -(-height // th), -(-width // tw)
        pad_h, pad_w = self.tiles_y * th - height + reach, self.tiles_x * tw - width + reach
        self.union = (th + 2 * reach, tw + 2 * reach)
        padded = torch.nn.functional.pad(temp.to(compute_dtype(temp.dtype, temp.device)),
                                         (reach, pad_w, reach, pad_h))
        # [T, C, ty, tx, uh, uw] -> [ty, tx, uh, uw, T, C]
        windows = padded.unfold(2, self.union[0], th).unfold(3, self.union[1], tw)
        self.data = windows.permute(2, 3, 4, 5, 0, 1).reshape(self.tiles_y * self.tiles_x, -1, channels).contiguous()
        inside = torch.zeros(padded.shape[2], padded.shape[3], device=temp.device)
        inside[reach:reach + height, reach:reach + width] = 1
        index = torch.arange(inside.numel(), device=temp.device).view(inside.shape).float()
        cut = lambda m: m.unfold(0, self.union[0], th).unfold(1, self.union[1], tw).reshape(self.tiles_y * self.tiles_x, -1)
        self.invalid = torch.zeros_like(cut(inside)).masked_fill_(cut(inside) == 0, float("-inf"))
        self.position = cut(index).long().reshape(-1)
        self.padded_shape = (padded.shape[2], padded.shape[3])
        self._masks: dict = {}

    def window_mask(self, radius: int) -> torch.Tensor:
        """Additive ``[U, th*tw]`` mask: 0 where a union position lies in a tile pixel's window."""
        if radius not in self._masks:
            th, tw = self.tile
            uy = torch.arange(self.union[0], device=self.data.device) - self.reach
            ux = torch.arange(self.union[1], device=self.data.device) - self.reach
            near_y = (uy[:, None] - torch.arange(th, device=uy.device)[None]).abs() <= radius  # [uh, th]
            near_x = (ux[:, None] - torch.arange(tw, device=ux.device)[None]).abs() <= radius  # [uw, tw]
            near = near_y[:, None, :, None] & near_x[None, :, None, :]  # [uh, uw, th, tw]
            mask = torch.zeros(near.shape, device=uy.device).masked_fill_(~near, float("-inf"))
            self._masks[radius] = mask.reshape(self.union[0] * self.union[1], th * tw).to(self.data.dtype)
        return self._masks[radius]


# Similarity block per bmm call (elements); larger blocks measured faster up to ~1M on 2 AVX-512 cores.
TILE_BLOCK = 1 << 20
# Largest unfolded bank (elements) that pick_unfold_tile may ask for; larger banks use the tile loop.
MAX_UNFOLDED = 1 << 28
# Tile shapes by query batch, fastest first, measured on a 2-core AVX-512 machine over the lite0 layer
# shapes (C = 24/40/112, 64/32/16 px maps, windows 5-13, 40 templates, float32 and bfloat16): with several
# queries a tile's union is already reused by every query, and small tiles keep each product block in cache;
# a single query needs the larger tile to fill its rows.
TILES_BY_BATCH = {True: ((2, 4), (2, 2), (1, 2), (1, 1)), False: ((8, 8), (4, 8), (4, 4), (2, 4), (2, 2), (1, 1))}


def pick_unfold_tile(height: int, width: int, reach: int, count: int, channels: int, batch: int):
    """Tile for ``UnfoldedTemplates``: the measured preference for this batch size whose unfolded bank
    stays within MAX_UNFOLDED; ``None`` when none does (the caller then loops over tiles in place)."""
    for th, tw in TILES_BY_BATCH[batch >= 4]:
        th, tw = min(th, max(1, height)), min(tw, max(1, width))
        union = (th + 2 * reach) * (tw + 2 * reach)
        tiles = -(-height // th) * -(-width // tw)
        if tiles * union * count * channels <= MAX_UNFOLDED:
            return th, tw
    return None


def mutual_max_unfolded(query: torch.Tensor, bank: UnfoldedTemplates, fore_radius: int, back_radius: int):
    """``mutual_max`` over an ``UnfoldedTemplates`` bank: every tile in a few batched products.

    ``query [B, C, H, W]``; returns float32 ``(fore, back)``, each ``[B, H, W]``.
    """
    batch = query.shape[0]
    th, tw = bank.tile
    ty, tx, channels = bank.tiles_y, bank.tiles_x, bank.channels
    q = map_major(query)  # [B, H, W, C]
    q = torch.nn.functional.pad(q, (0, 0, 0, tx * tw - bank.width, 0, ty * th - bank.height))
    # rows of tile i: (b, y, x) -> [tiles, B * th * tw, C]
    q = q.view(batch, ty, th, tx, tw, channels).permute(1, 3, 0, 2, 4, 5).reshape(ty * tx, -1, channels)
    tiles, union = q.shape[0], bank.union[0] * bank.union[1]
    rows = q.shape[1]
    fore_mask = bank.window_mask(fore_radius)[:, None, :]  # [U, 1, th*tw]
    back_mask = bank.window_mask(back_radius)[:, None, :]
    result = _result(q)
    fore = torch.empty(tiles, batch, th * tw, device=q.device, dtype=result)
    back_parts = torch.empty(tiles, union, batch, device=q.device, dtype=result)
    step = max(1, TILE_BLOCK // (union * bank.count * rows))
    for t0 in range(0, tiles, step):
        t1 = min(tiles, t0 + step)
        sims = torch.bmm(bank.data[t0:t1], q[t0:t1].transpose(1, 2))  # [n, U*T, rows]
        # the maximum over templates first: the window masks do not depend on the template
        best = sims.view(t1 - t0, union, bank.count, rows).amax(dim=2)
        best = (best + bank.invalid[t0:t1, :, None]).view(t1 - t0, union, batch, th * tw)
        fore[t0:t1] = (best + fore_mask).amax(dim=1)
        back_parts[t0:t1] = (best + back_mask).amax(dim=3)
    fore = fore.view(ty, tx, batch, th, tw).permute(2, 0, 3, 1, 4).reshape(batch, ty * th, tx * tw)
    fore = fore[:, :bank.height, :bank.width].clamp_min(MATCH_FLOOR)
    back = torch.full((batch, bank.padded_shape[0] * bank.padded_shape[1]), MATCH_FLOOR, device=q.device, dtype=result)
    back.scatter_reduce_(1, bank.position.expand(batch, -1), back_parts.view(-1, batch).t(), "amax")
    reach = bank.reach
    back = back.view(batch, *bank.padded_shape)[:, reach:reach + bank.height, reach:reach + bank.width]
    return fore.contiguous(), back.contiguous()


def forward_ATM(query: torch.Tensor, t_groups: list[torch.Tensor], patch: int) -> torch.Tensor:
    return window_max(map_major(query), t_groups, patch // 2)


def backward_ATM(query: torch.Tensor, t_groups: list[torch.Tensor], patch: int) -> torch.Tensor:
    return window_max(map_major(query), t_groups, patch // 2, reverse=True)


def mutual_match(query: torch.Tensor, bank, fore_patch: int, back_patch: int):
    """``bank``: a ``PreparedTemplates``; its unfolded layout for this window is built on first use."""
    fore_radius, back_radius = fore_patch // 2, back_patch // 2
    count, channels, height, width = bank.shape
    reach = max(fore_radius, back_radius)
    tile = pick_unfold_tile(height, width, reach, count, channels, query.shape[0])
    if tile is None:  # the unfolded bank would be too large: one step per tile over the bank in place
        return mutual_max(map_major(query), bank.layout("torch", template_groups), fore_radius, back_radius)
    unfolded = bank.layout(f"torch-unfolded-{tile[0]}x{tile[1]}-{reach}", lambda t: UnfoldedTemplates(t, tile, reach))
    return mutual_max_unfolded(query, unfolded, fore_radius, back_radius)


def mutual_match_subset(query: torch.Tensor, temp_pm: torch.Tensor, fore_patch: int, back_patch: int,
                        indices: torch.Tensor):
    """Query b against its own templates ``indices[b]`` of pixel-major ``temp_pm [H, W, T, C]``.

    Only the K selected templates of each query are gathered (``[H, W, K, C]``), never the bank.
    """
    q = map_major(query)
    fores, backs = zip(*(mutual_max(q[b:b + 1], [temp_pm.index_select(2, indices[b])], fore_patch // 2,
                                    back_patch // 2) for b in range(q.shape[0])))
    return torch.cat(fores), torch.cat(backs)
