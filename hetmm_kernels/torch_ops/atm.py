"""Windowed pixel-to-patch matching on the CPU: tiled matrix products in PyTorch.

``forward_ATM`` / ``backward_ATM`` (the per-template published ops): a tile of P query pixels is
multiplied with the *union* of their windows in pixel-major templates (``[H, W, T, C]``, every
union row one contiguous ``[U_w * T, C]`` block), ``[U*T, C] x [C, P*B]``, and each pixel keeps the
maximum inside its own ``k x k`` window of the union (an additive 0/-inf mask).

``mutual_match`` (both directions, reduced over templates) turns this around: a tile of P
*template* pixels, all T templates (``P*T`` rows of a ``TiledTemplates`` layout, no pixel copied
twice), is multiplied with the query's union around the tile, every tile of a batch in a few
``bmm`` calls. The maximum over templates comes first (the window masks do not depend on the
template); the backward map then falls on the tile's own pixels and the forward map on the
union's, merged across tiles. Useful products are a fraction ``k^2 / U`` of those computed; the
tile shape trades that against the BLAS efficiency of the ``P * T`` rows. When the unions would be
larger than the map itself (a wide window on a small map), ``mutual_max_dense`` multiplies every
template pixel with every query pixel instead and applies the windows as masks.
"""

from __future__ import annotations

import math
import threading

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


_SCRATCH = threading.local()


def scratch(shape: tuple, dtype: torch.dtype, device: torch.device, purpose: str = "products") -> torch.Tensor:
    """An uninitialised ``shape`` block for intermediates, reused by this thread's later calls for ``purpose``.

    A fresh multi-megabyte block per call pays its page faults every time: measured on 2 cores, sixteen
    ``[8192, 256]`` bfloat16 products ran 5x slower into new tensors than into one reused block. The block
    is only ever an intermediate (nothing returned aliases it); each thread keeps one per purpose, dtype and
    device (blocks of different purposes are alive at once).
    """
    numel = math.prod(shape)
    blocks = getattr(_SCRATCH, "blocks", None)
    if blocks is None:
        blocks = _SCRATCH.blocks = {}
    key = (purpose, dtype, str(device))
    block = blocks.get(key)
    if block is None or block.numel() < numel:
        block = blocks[key] = torch.empty(numel, dtype=dtype, device=device)
    return block[:numel].view(shape)


def amax(x: torch.Tensor, dim, masked_nonnegative: bool = False) -> torch.Tensor:
    """``x.amax(dim)``; for CPU bfloat16 computed on the bit patterns as int16, ~3-9x faster there.

    torch reduces bfloat16 through float32 conversions; int16 maxima run on whole vectors. A finite or
    infinite bfloat16 orders as its int16 bit pattern among non-negative values, and in reverse among
    negative ones: where the int16 maximum is negative every value is, and the float maximum is then the
    int16 *minimum* (the smallest magnitude). NaN is not ordered (the matching's inputs are checked finite).
    ``masked_nonnegative``: the caller knows ``x`` is non-negative values plus a 0/-inf mask
    (``nonnegative``), so a negative int16 maximum is -inf, a row the mask covers whole, and is right as it is.
    """
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return x.amax(dim)
    bits = x.view(torch.int16)
    high = bits.amax(dim)
    # rows with no non-negative value are rare in matching, but a mask's padding rows are all -inf: without
    # the caller's word every such call paid this second pass (1.02x / 1.01x predict at batch 1 / 8 on real images)
    if not masked_nonnegative and high.numel() and high.min() < 0:
        high = torch.where(high < 0, bits.amin(dim), high)
    return high.view(torch.bfloat16)


def nonnegative(x: torch.Tensor) -> bool:
    """Whether CPU bfloat16 ``x`` holds no negative value (nor -0.0): then ``amax(x + mask, dim,
    masked_nonnegative=True)`` is exact for a 0/-inf ``mask``. False for other dtypes and devices."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return False
    return x.numel() == 0 or bool(x.view(torch.int16).min() >= 0)


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


def _outside(plane: tuple[int, int], origin: int, size: tuple[int, int], device) -> torch.Tensor:
    """Additive mask over a ``plane``: 0 on the map (``size`` from ``(origin, origin)``), -inf on the padding."""
    mask = torch.full(plane, float("-inf"), device=device)
    mask[origin:origin + size[0], origin:origin + size[1]] = 0
    return mask


class TiledTemplates:
    """Templates cut into ``th x tw`` tiles, once per bank: ``[tiles, th*tw*T, C]``, no copy of any pixel twice.

    The matching runs *template tile by template tile*: the ``P = th*tw`` template pixels of a tile
    (with all T templates: ``P*T`` rows) are multiplied with the window union of the *query* around
    the tile (``U = (th + 2*reach) * (tw + 2*reach)`` query pixels per image, cut from the query on the
    fly). Only the query is duplicated (``U / P`` times, one small map per call), never the bank.
    ``invalid [tiles, P]`` is 0 inside the map and -inf on the padding that completes the last tiles.
    """

    def __init__(self, temp: torch.Tensor, tile: tuple[int, int]):
        count, channels, height, width = temp.shape
        th, tw = tile
        self.tile, self.count, self.channels, self.height, self.width = tile, count, channels, height, width
        self.tiles_y, self.tiles_x = -(-height // th), -(-width // tw)
        padded = torch.nn.functional.pad(temp.to(compute_dtype(temp.dtype, temp.device)),
                                         (0, self.tiles_x * tw - width, 0, self.tiles_y * th - height))
        # [T, C, ty, th, tx, tw] -> [ty, tx, th, tw, T, C]
        padded = padded.view(count, channels, self.tiles_y, th, self.tiles_x, tw)
        self.data = padded.permute(2, 4, 3, 5, 0, 1).reshape(self.tiles_y * self.tiles_x, th * tw * count, channels)
        self.data = self.data.contiguous()
        plane = (self.tiles_y * th, self.tiles_x * tw)
        self.invalid = self._tiles(_outside(plane, 0, (height, width), temp.device))  # [tiles, P]
        self._geometry: dict = {}

    def _tiles(self, plane: torch.Tensor) -> torch.Tensor:
        """``[ty*th, tx*tw]`` -> ``[tiles, th*tw]``, pixels in the data's order."""
        th, tw = self.tile
        return plane.view(self.tiles_y, th, self.tiles_x, tw).permute(0, 2, 1, 3).reshape(-1, th * tw)

    def geometry(self, fore_radius: int, back_radius: int):
        """Per window pair, built once: the query padding, the masks and where each union pixel lies.

        Returns ``(reach, union, fore_mask, back_mask, position)``: additive ``[tiles, P, U]`` masks,
        0 where a union pixel is in a template pixel's window (and both are inside the map), -inf
        elsewhere; ``position [tiles * U]`` is each union pixel's index in the padded query map.
        """
        key = (fore_radius, back_radius)
        if key not in self._geometry:
            th, tw = self.tile
            reach = max(fore_radius, back_radius)
            union = (th + 2 * reach, tw + 2 * reach)
            device = self.data.device
            height, width = self.tiles_y * th + 2 * reach, self.tiles_x * tw + 2 * reach
            cut = lambda m: m.unfold(0, union[0], th).unfold(1, union[1], tw).reshape(self.tiles_y * self.tiles_x, -1)
            query_invalid = cut(_outside((height, width), reach, (self.height, self.width), device))  # [tiles, U]
            uy = torch.arange(union[0], device=device) - reach
            ux = torch.arange(union[1], device=device) - reach

            def window(radius):  # [P, U]
                near_y = (torch.arange(th, device=device)[:, None] - uy[None]).abs() <= radius  # [th, uh]
                near_x = (torch.arange(tw, device=device)[:, None] - ux[None]).abs() <= radius  # [tw, uw]
                near = (near_y[:, None, :, None] & near_x[None, :, None, :]).reshape(th * tw, -1)
                return torch.zeros(near.shape, device=device).masked_fill_(~near, float("-inf"))

            both = self.invalid[:, :, None] + query_invalid[:, None, :]
            masks = [(window(r)[None] + both).to(self.data.dtype) for r in (fore_radius, back_radius)]
            index = torch.arange(height * width, device=device).view(height, width).float()
            self._geometry[key] = (reach, union, *masks, cut(index).long().reshape(-1))
        return self._geometry[key]


# Similarity block per bmm call (elements, 8 MB in bfloat16). Allocated once per call and reused by
# every chunk; larger chunks cut the Python steps per call (measured best at 2-4M elements on 2 AVX-512
# cores). A fresh block of 32 MB or more would pay its page faults on every call (5x the product).
TILE_BLOCK = 1 << 22
# bfloat16 reductions over the template axis vectorise only when the rows they run along are a
# whole number of vector lengths: the query columns are padded to a multiple of this (10x on AVX-512).
COLUMN_ALIGN = 32


# Candidate template tiles for ``mutual_max_tiled`` (th, tw), and the rows at which its float32 products
# (with the masked maxima after them) reach half their rate, fitted on the shapes below.
TILES = ((1, 1), (1, 2), (2, 2), (1, 4), (2, 4), (4, 4))
TILE_HALF_RATE_ROWS = 24


def pick_tile_shape(height: int, width: int, reach: int, batch: int, templates: int = 40, channels: int = 0,
                    dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """Template tile for ``mutual_max_tiled``, measured fastest on a 2-core AVX-512 machine over the
    lite0 layer shapes (C = 25/41/113, 64/32/16 px maps, 40 templates, windows 5-13, batch 1-16) and the
    paper's (C = 256/512/1024, 60 templates).

    Every template pixel of a tile meets the tile's whole query union, ``(th + 2*reach) * (tw + 2*reach)``
    columns per image padded to COLUMN_ALIGN, in products *and* in the masked maxima after them; larger tiles
    give each product more rows (``P * T``). float32 BLAS runs near its peak from a few dozen rows: the tile
    with the fewest padded union columns per image, weighted by ``(rows + 24) / rows``, wins (1x2 at a 5x5
    or 9x9 window: 1.3-1.4x the fixed 4x4/2x4 choice at batch 1, 1.1-1.25x at batch 8). bfloat16 products
    want tall blocks on small channel counts (lite0: 4x4, or 2x4 from batch 4), and at 128 channels or more
    a 2x2 tile from batch 4 (1.15x 2x4 at the paper's shapes).
    """
    if dtype != torch.bfloat16:
        def cost(tile):
            th, tw = min(tile[0], max(1, height)), min(tile[1], max(1, width))
            columns = batch * min(th + 2 * reach, height + 2 * reach) * min(tw + 2 * reach, width + 2 * reach)
            rows = th * tw * max(1, templates)
            return -(-columns // COLUMN_ALIGN) * COLUMN_ALIGN * (rows + TILE_HALF_RATE_ROWS) / rows
        tile = min(TILES, key=cost)
    elif batch >= 4:
        tile = (2, 2) if channels >= 128 else (2, 4)
    elif reach == 3:
        tile = (2, 2)  # an 8x8 union
    elif reach == 4 and batch == 1:
        tile = (2, 4)  # 10x12: 120 of 128 columns
    else:
        tile = (4, 4)
    return min(tile[0], max(1, height)), min(tile[1], max(1, width))


def _query_windows(query: torch.Tensor, bank: TiledTemplates, reach: int, union) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[tiles, columns, C]``: each tile's query union, columns (b, u) padded to COLUMN_ALIGN.

    Channels stay innermost, as in the (padded) map-major query: each union pixel is one contiguous copy (with
    the channels outermost the gather strode by C per element: 2.4 GB/s, a quarter of a bfloat16 match at the
    paper's layer 1), and the products take the block transposed (no slower in BLAS, measured).
    """
    batch, channels, height, width = query.shape
    th, tw = bank.tile
    dtype = compute_dtype(query.dtype, query.device)
    padded = scratch((batch, bank.tiles_y * th + 2 * reach, bank.tiles_x * tw + 2 * reach, channels), dtype,
                     query.device, "padded query").zero_()
    padded[:, reach:reach + height, reach:reach + width].copy_(query.permute(0, 2, 3, 1))
    windows = padded.unfold(1, union[0], th).unfold(2, union[1], tw)  # [B, ty, tx, C, uh, uw]
    tiles, columns = bank.tiles_y * bank.tiles_x, batch * union[0] * union[1]
    out = scratch((tiles, -(-columns // COLUMN_ALIGN) * COLUMN_ALIGN, channels), dtype, query.device, "query windows")
    out[:, columns:] = 0  # only the padding: the rest is written next
    out[:, :columns].view(bank.tiles_y, bank.tiles_x, batch, union[0], union[1], channels).copy_(
        windows.permute(1, 2, 0, 4, 5, 3))
    return out


def mutual_max_tiled(query: torch.Tensor, bank: TiledTemplates, fore_radius: int, back_radius: int,
                     data: torch.Tensor | None = None, count: int | None = None):
    """``(max_t forward map, max_t backward map)`` of ``query [B, C, H, W]`` over a tiled bank.

    ``data``/``count`` (optional) replace the bank's rows, e.g. by a subset of its templates in the
    same tile layout. Returns float32 (float64 for float64) ``(fore, back)``, each ``[B, H, W]``.
    """
    data = bank.data if data is None else data
    count = bank.count if count is None else count
    batch = query.shape[0]
    th, tw = bank.tile
    reach, union, fore_mask, back_mask, position = bank.geometry(fore_radius, back_radius)
    windows = _query_windows(query, bank, reach, union)  # [tiles, columns, C]
    tiles, pixels, positions = data.shape[0], th * tw, union[0] * union[1]
    columns = batch * positions
    back = torch.empty(tiles, pixels, batch, device=query.device, dtype=data.dtype)
    fore_parts = torch.empty(tiles, batch, positions, device=query.device, dtype=data.dtype)
    step = max(1, TILE_BLOCK // (data.shape[1] * windows.shape[1]))
    block = scratch((min(step, tiles), data.shape[1], windows.shape[1]), data.dtype, query.device)
    for t0 in range(0, tiles, step):
        t1 = min(tiles, t0 + step)
        sims = torch.bmm(data[t0:t1], windows[t0:t1].transpose(1, 2), out=block[:t1 - t0])  # [n, P*T, columns]
        # the maximum over templates first: the window masks do not depend on the template
        best = amax(sims.view(t1 - t0, pixels, count, -1), 2)[..., :columns]
        best = best.reshape(t1 - t0, pixels, batch, positions)
        signs_known = nonnegative(best)
        back[t0:t1] = amax(best + back_mask[t0:t1, :, None], 3, signs_known)
        fore_parts[t0:t1] = amax(best + fore_mask[t0:t1, :, None], 1, signs_known)
    result = _result(data)
    ty, tx = bank.tiles_y, bank.tiles_x
    back = back.view(ty, tx, th, tw, batch).permute(4, 0, 2, 1, 3).reshape(batch, ty * th, tx * tw)
    back = back[:, :bank.height, :bank.width].to(result).clamp_min_(MATCH_FLOOR)
    height, width = ty * th + 2 * reach, tx * tw + 2 * reach
    fore = torch.full((batch, height * width), MATCH_FLOOR, device=query.device, dtype=result)
    fore.scatter_reduce_(1, position.expand(batch, -1), fore_parts.permute(1, 0, 2).reshape(batch, -1).to(result),
                         "amax")
    fore = fore.view(batch, height, width)[:, reach:reach + bank.height, reach:reach + bank.width]
    return fore.contiguous(), back.contiguous()


def forward_ATM(query: torch.Tensor, t_groups: list[torch.Tensor], patch: int) -> torch.Tensor:
    return window_max(map_major(query), t_groups, patch // 2)


ARGMAX_ELEMENTS = 1 << 22  # products held at once by forward_argmax (16 MiB of float32)


def forward_argmax(query: torch.Tensor, temp: torch.Tensor, patch: int,
                   pixels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(forward maxima, where)`` as ``reference.forward_argmax``: a chunk of query pixels against every template
    pixel in one product, those outside each pixel's window masked, then ``torch.argmax`` over the template's
    pixels in row-major order (the first of equal maxima). ``pixels`` (flat query pixels): only those, as
    ``[B, T, P]``. Dense, so its cost grows with the pixels asked for times the map's area: meant for
    explanations (a region's few dozen cells), not for the hot path."""
    radius = patch // 2
    accumulate = torch.float64 if query.dtype == torch.float64 else torch.float32
    batch, channels, height, width = query.shape
    count, area = temp.shape[0], height * width
    wanted = torch.arange(area, device=query.device) if pixels is None else pixels.to(query.device)
    q = query.to(accumulate).flatten(2)[:, :, wanted]  # [B, C, P]
    t = temp.to(accumulate).permute(1, 0, 2, 3).reshape(channels, count * area)  # [C, T * HW]
    ys = torch.arange(height, device=query.device).repeat_interleave(width)
    xs = torch.arange(width, device=query.device).repeat(height)
    best = torch.empty(batch, count, len(wanted), device=query.device, dtype=accumulate)
    where = torch.empty(best.shape, device=query.device, dtype=torch.int64)
    chunk = max(1, ARGMAX_ELEMENTS // (count * area))
    for b in range(batch):
        for p0 in range(0, len(wanted), chunk):
            p1 = min(len(wanted), p0 + chunk)
            sims = (q[b, :, p0:p1].t() @ t).view(p1 - p0, count, area)
            rows, cols = ys[wanted[p0:p1], None], xs[wanted[p0:p1], None]
            sims.masked_fill_((((rows - ys).abs() > radius) | ((cols - xs).abs() > radius))[:, None, :], float("-inf"))
            first = sims.argmax(2)  # [P, T]
            best[b, :, p0:p1] = sims.gather(2, first[..., None])[..., 0].t()
            where[b, :, p0:p1] = first.t()
    best.clamp_min_(MATCH_FLOOR)
    if pixels is not None:
        return best, where
    return best.view(batch, count, height, width), where.view(batch, count, height, width)


def backward_ATM(query: torch.Tensor, t_groups: list[torch.Tensor], patch: int) -> torch.Tensor:
    return window_max(map_major(query), t_groups, patch // 2, reverse=True)


def tiled_layout(bank, reach: int, batch: int) -> TiledTemplates:
    """``bank``'s (a ``PreparedTemplates``) tiled layout for this window and batch, built on first use."""
    count, channels, height, width = bank.shape
    tile = pick_tile_shape(height, width, reach, batch, count, channels, compute_dtype(bank.dtype, bank.temp.device))
    return bank.layout(f"torch-tiled-{tile[0]}x{tile[1]}", lambda t: TiledTemplates(t, tile))


def _window_mask(height: int, width: int, radius: int, device, dtype) -> torch.Tensor | None:
    """Additive ``[H*W, H*W]`` mask (rows template pixels, columns query pixels): 0 within ``radius``
    (Chebyshev), -inf beyond; None when the window covers the whole map from every pixel."""
    if radius >= max(height, width) - 1:
        return None
    y, x = torch.arange(height, device=device), torch.arange(width, device=device)
    near_y = (y[:, None] - y[None]).abs() <= radius
    near_x = (x[:, None] - x[None]).abs() <= radius
    near = (near_y[:, None, :, None] & near_x[None, :, None, :]).reshape(height * width, height * width)
    return torch.zeros(near.shape, device=device, dtype=dtype).masked_fill_(~near, float("-inf"))


class DenseTemplates:
    """Templates as one ``[T*H*W, C]`` matrix (template-major) for ``mutual_max_dense``, with its window masks."""

    def __init__(self, temp: torch.Tensor):
        count, channels, height, width = temp.shape
        self.count, self.height, self.width = count, height, width
        self.data = map_major(temp).reshape(count * height * width, channels)
        self._masks: dict = {}

    def mask(self, radius: int):
        if radius not in self._masks:
            self._masks[radius] = _window_mask(self.height, self.width, radius, self.data.device, self.data.dtype)
        return self._masks[radius]


# Elements of the dense path's [template pixel, query, query pixel] maximum per call (32 MB in bfloat16):
# larger batches are split (lite0's layer 3 at 256 px: 256 images a call).
DENSE_BLOCK = 1 << 24


def mutual_max_dense(query: torch.Tensor, bank: DenseTemplates, fore_radius: int, back_radius: int,
                     data: torch.Tensor | None = None, count: int | None = None):
    """``mutual_max_tiled``'s result from every query pixel against every template pixel.

    Wide windows make the tiled unions larger than the map itself (a ``31 x 31`` window on a 16 x 16
    map: each union is 4x the map), so one product per template group over the whole map computes
    fewer similarities; the windows become masks on the template-pixel x query-pixel maximum.
    ``data``/``count`` (optional) replace the bank's rows, e.g. by a subset of its templates.
    """
    data = bank.data if data is None else data
    count = bank.count if count is None else count
    batch, channels, height, width = query.shape
    pixels = height * width
    per_query = max(1, DENSE_BLOCK // (pixels * pixels))
    if batch > per_query:  # bound the [HW, B, HW] maximum (and its masked copies) for large batches or maps
        parts = [mutual_max_dense(query[b:b + per_query], bank, fore_radius, back_radius, data, count)
                 for b in range(0, batch, per_query)]
        return torch.cat([f for f, _ in parts]), torch.cat([b for _, b in parts])
    q = map_major(query).reshape(batch * pixels, channels).t()  # [C, B*HW]
    per_template = max(1, pixels * batch * pixels)
    step = max(1, TILE_BLOCK // per_template)
    best = None
    block = scratch((min(step, count) * pixels, batch * pixels), data.dtype, query.device)
    for t0 in range(0, count, step):
        t1 = min(count, t0 + step)
        sims = torch.mm(data[t0 * pixels:t1 * pixels], q, out=block[:(t1 - t0) * pixels])
        group_best = amax(sims.view(t1 - t0, pixels, batch * pixels), 0)  # the maximum over templates first
        best = group_best if best is None else torch.maximum(best, group_best, out=best)
    best = best.view(pixels, batch, pixels)  # [template pixel, b, query pixel]
    result = _result(data)
    fore_mask, back_mask = bank.mask(fore_radius), bank.mask(back_radius)
    signs_known = nonnegative(best)
    fore = amax(best if fore_mask is None else best + fore_mask[:, None], 0, signs_known)  # [B, HW]
    back = amax(best if back_mask is None else best + back_mask[:, None], 2, signs_known).t()  # [B, HW]
    fore = fore.to(result).clamp_min_(MATCH_FLOOR).view(batch, height, width)
    back = back.to(result).clamp_min_(MATCH_FLOOR).view(batch, height, width)
    return fore.contiguous(), back.contiguous()


def prefers_dense(height: int, width: int, reach: int, batch: int) -> bool:
    """Whether ``mutual_max_dense`` beats the tiled products: their union per template tile must hold at
    least ``HW * sqrt(HW / 256)`` query pixels. Measured on 2 AVX-512 cores, 40 templates, batch 1 and 8:
    the crossover lies at 0.6-0.7x the map's pixels on a 16 x 16 map (113 channels) and at 1.1-1.9x on
    a 32 x 32 one (41 channels), where the dense maximum over ``[HW, B, HW]`` runs out of cache."""
    th, tw = pick_tile_shape(height, width, reach, batch)
    pixels = height * width
    return (th + 2 * reach) * (tw + 2 * reach) >= pixels * math.sqrt(pixels / 256)


def mutual_match(query: torch.Tensor, bank, fore_patch: int, back_patch: int):
    """``bank``: a ``PreparedTemplates``."""
    fore_radius, back_radius = fore_patch // 2, back_patch // 2
    reach, (height, width) = max(fore_radius, back_radius), bank.shape[2:]
    if prefers_dense(height, width, reach, query.shape[0]):
        return mutual_max_dense(query, bank.layout("torch-dense", DenseTemplates), fore_radius, back_radius)
    tiled = tiled_layout(bank, reach, query.shape[0])
    return mutual_max_tiled(query, tiled, fore_radius, back_radius)


def mutual_match_subset(query: torch.Tensor, bank, fore_patch: int, back_patch: int, indices: torch.Tensor):
    """Query b against its own templates ``indices[b]`` of ``bank`` (a ``PreparedTemplates``).

    Only the K selected templates of each query are gathered from the tiled (or dense) layout, never the bank.
    """
    fore_radius, back_radius = fore_patch // 2, back_patch // 2
    reach, (height, width), k = max(fore_radius, back_radius), bank.shape[2:], indices.shape[1]
    if prefers_dense(height, width, reach, 1):
        dense = bank.layout("torch-dense", DenseTemplates)
        rows = dense.data.view(dense.count, height * width, -1)  # [T, HW, C]
        fores, backs = zip(*(mutual_max_dense(query[b:b + 1], dense, fore_radius, back_radius,
                                              data=rows.index_select(0, indices[b]).view(k * height * width, -1),
                                              count=k)
                             for b in range(query.shape[0])))
        return torch.cat(fores), torch.cat(backs)
    tiled = tiled_layout(bank, reach, 1)
    rows = tiled.data.view(tiled.data.shape[0], -1, tiled.count, tiled.channels)  # [tiles, P, T, C]
    fores, backs = zip(*(mutual_max_tiled(query[b:b + 1], tiled, fore_radius, back_radius,
                                          data=rows.index_select(2, indices[b]).view(rows.shape[0], -1, tiled.channels),
                                          count=k)
                         for b in range(query.shape[0])))
    return torch.cat(fores), torch.cat(backs)
