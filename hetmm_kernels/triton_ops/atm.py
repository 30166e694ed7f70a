"""Windowed pixel-to-patch matching in Triton: tensor-core tiles.

Each program owns a tile of ``TILE_H x TILE_W`` query pixels for ``BLOCK_A`` maps of
the query side and multiplies them with the union of their windows in one map of
the other side: ``[BLOCK_A * P, C] x [C, U]`` with ``tl.dot`` (fp32 accumulation),
then keeps each pixel's maximum inside its own window. The union is clamped to the
map, so a window larger than the map costs no more than the map.

* ``_window_max_kernel``: one program per (tile, query block, template); writes the
  per-template map ``[A, N, H, W]`` (``forward_ATM``; ``backward_ATM`` swaps roles).
* ``_mutual_kernel``: one program per (tile, query block, template chunk); reduces
  over its templates in registers and computes each product once for both
  directions. The forward maximum of a pixel and the backward maximum of a
  template position are merged across programs with one ``atomic_max`` each.

Feature maps are pixel-major ``[N, H, W, C]`` so that the ``C`` axis of every load
is contiguous. Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import autotune

MATCH_FLOOR = -1.0
_FLOOR = tl.constexpr(MATCH_FLOOR)  # kernels may only read constexpr globals


@triton.jit
def _tile_rows(pid_tile, pid_block, n_tiles_w, count, height, width,
               TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK: tl.constexpr):
    """Rows ``m = map * P + pixel`` of a program: map index, pixel y, pixel x, validity."""
    P: tl.constexpr = TILE_H * TILE_W
    m = tl.arange(0, BLOCK * P)
    index = pid_block * BLOCK + m // P
    y = (pid_tile // n_tiles_w) * TILE_H + (m % P) // TILE_W
    x = (pid_tile % n_tiles_w) * TILE_W + m % TILE_W
    return index, y, x, (index < count) & (y < height) & (x < width)


@triton.jit
def _tile_union(pid_tile, n_tiles_w, height, width, reach, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                UNION_H: tl.constexpr, UNION_W: tl.constexpr, BLOCK_U: tl.constexpr):
    """Map coordinates of the union of a tile's windows, flattened to ``[BLOCK_U]``."""
    # origin clamped into the map: [origin, origin + UNION) still covers every window
    uy0 = tl.minimum(tl.maximum((pid_tile // n_tiles_w) * TILE_H - reach, 0), height - UNION_H)
    ux0 = tl.minimum(tl.maximum((pid_tile % n_tiles_w) * TILE_W - reach, 0), width - UNION_W)
    u = tl.arange(0, BLOCK_U)
    return uy0 + u // UNION_W, ux0 + u % UNION_W, u < UNION_H * UNION_W


@triton.jit
def _union_products(x_ptr, y_ptr, x_rows, x_valid, y_cols, y_valid, channels,
                    BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``sum_c x[row, c] * y[col, c]`` for ``[M]`` row offsets and ``[BLOCK_U]`` column offsets."""
    acc = tl.zeros((x_rows.shape[0], y_cols.shape[0]), dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_valid = c < channels
        xb = tl.load(x_ptr + x_rows[:, None] + c[None, :], mask=x_valid[:, None] & c_valid[None, :], other=0.0)
        yb = tl.load(y_ptr + y_cols[None, :] + c[:, None], mask=y_valid[None, :] & c_valid[:, None], other=0.0)
        acc = tl.dot(xb, yb, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _window_max_kernel(
    x_ptr, y_ptr, out_ptr,
    count_a, count_n, height, width, channels, n_tiles_w,
    RADIUS: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    UNION_H: tl.constexpr, UNION_W: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_a = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    a, row_y, row_x, row_valid = _tile_rows(pid_tile, pid_a, n_tiles_w, count_a, height, width,
                                            TILE_H, TILE_W, BLOCK_A)
    uy, ux, u_valid = _tile_union(pid_tile, n_tiles_w, height, width, RADIUS,
                                  TILE_H, TILE_W, UNION_H, UNION_W, BLOCK_U)
    pixel = (row_y * width + row_x).to(tl.int64)
    hw = height * width
    x_rows = (a.to(tl.int64) * hw + pixel) * channels
    y_cols = (n * hw + (uy * width + ux).to(tl.int64)) * channels
    sims = _union_products(x_ptr, y_ptr, x_rows, row_valid, y_cols, u_valid, channels, BLOCK_C, DOT_PRECISION)
    in_window = (tl.abs(row_y[:, None] - uy[None, :]) <= RADIUS) & (tl.abs(row_x[:, None] - ux[None, :]) <= RADIUS)
    in_window = in_window & u_valid[None, :]
    best = tl.max(tl.where(in_window, sims, float("-inf")), axis=1)
    best = tl.maximum(best, _FLOOR)
    out_offs = (a.to(tl.int64) * count_n + n) * hw + pixel
    tl.store(out_ptr + out_offs, best.to(out_ptr.dtype.element_ty), mask=row_valid)


@triton.jit
def _mutual_kernel(
    q_ptr, t_ptr, fore_ptr, back_ptr, index_ptr,
    batch, count_t, templates_per_program, height, width, channels, n_tiles_w,
    FORE_R: tl.constexpr, BACK_R: tl.constexpr, REACH: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, UNION_H: tl.constexpr, UNION_W: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_INDEX: tl.constexpr,
):
    # HAS_INDEX: query b is matched only against templates index[b, :count_t] (BLOCK_B == 1)
    pid_tile = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_t = tl.program_id(2)
    P: tl.constexpr = TILE_H * TILE_W
    b, row_y, row_x, row_valid = _tile_rows(pid_tile, pid_b, n_tiles_w, batch, height, width,
                                            TILE_H, TILE_W, BLOCK_B)
    uy, ux, u_valid = _tile_union(pid_tile, n_tiles_w, height, width, REACH,
                                  TILE_H, TILE_W, UNION_H, UNION_W, BLOCK_U)
    pixel = (row_y * width + row_x).to(tl.int64)
    hw = height * width
    q_rows = (b.to(tl.int64) * hw + pixel) * channels
    union_pixel = (uy * width + ux).to(tl.int64)

    best = tl.full((BLOCK_B * P, BLOCK_U), float("-inf"), dtype=tl.float32)
    t_start = pid_t * templates_per_program
    t_stop = tl.minimum(t_start + templates_per_program, count_t)
    t_cols = union_pixel * channels
    template = t_ptr + t_start.to(tl.int64) * hw * channels
    for i in range(t_start, t_stop):
        if HAS_INDEX:
            template = t_ptr + tl.load(index_ptr + pid_b.to(tl.int64) * count_t + i).to(tl.int64) * hw * channels
        sims = _union_products(q_ptr, template, q_rows, row_valid, t_cols, u_valid, channels, BLOCK_C, DOT_PRECISION)
        best = tl.maximum(best, sims)
        if not HAS_INDEX:
            template += hw * channels

    dy = tl.abs(row_y[:, None] - uy[None, :])
    dx = tl.abs(row_x[:, None] - ux[None, :])
    pair_valid = row_valid[:, None] & u_valid[None, :]
    # forward: each query pixel's best template position inside its window
    fore_win = (dy <= FORE_R) & (dx <= FORE_R) & pair_valid
    fore = tl.max(tl.where(fore_win, best, float("-inf")), axis=1)
    tl.atomic_max(fore_ptr + b.to(tl.int64) * hw + pixel, fore, mask=row_valid)
    # backward: each template position's best query pixel (of this tile) inside its window
    back_win = (dy <= BACK_R) & (dx <= BACK_R) & pair_valid
    back = tl.where(back_win, best, float("-inf"))
    back = tl.max(tl.reshape(back, (BLOCK_B, P, BLOCK_U)), axis=1)
    b_block = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    back_offs = b_block.to(tl.int64)[:, None] * hw + union_pixel[None, :]
    tl.atomic_max(back_ptr + back_offs, back, mask=(b_block < batch)[:, None] & u_valid[None, :])


# ----------------------------------------------------------------------------- launchers


def pixel_major(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` -> contiguous ``[N, H, W, C]`` (same dtype)."""
    return x.permute(0, 2, 3, 1).contiguous()


def _pow2_at_most(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(1, n)))


# Registers: the fp32 [rows, BLOCK_U] product tile and running maximum live in the program's
# registers; past ~192 of them per thread they spill. 2 arrays / (32 * warps) threads <= 192.
TILE_ELEMENTS_PER_WARP = 3072


def _warps_for(elements: int) -> int:
    """The fewest warps (4, 8 or 16) that hold a ``[rows, BLOCK_U]`` tile without spilling."""
    return next((w for w in (4, 8) if elements <= TILE_ELEMENTS_PER_WARP * w), 16)


def tile_config(height: int, width: int, reach: int, count_a: int, channels: int, one_map: bool = False) -> dict:
    """The heuristic config of one problem (tl.dot needs every dimension >= 16).

    ``one_map``: one query map per program (per-query template sets), so the tile alone
    must supply the 16 rows.
    """
    tile_h = 4 if one_map else _pow2_at_most(height, 4)
    tile_w = 4 if one_map else _pow2_at_most(width, 4)
    pixels = tile_h * tile_w
    block_a = 1 if one_map else max(16 // pixels, min(_pow2_at_most(count_a, 4), max(1, 64 // pixels)))
    config = dict(TILE_H=tile_h, TILE_W=tile_w, BLOCK=block_a, BLOCK_C=max(16, _pow2_at_most(channels, 64)))
    block_u = union_shape(config, height, width, reach)["BLOCK_U"]
    while config["BLOCK"] * pixels >= 32 and config["BLOCK"] * pixels * block_u > TILE_ELEMENTS_PER_WARP * 16:
        config["BLOCK"] //= 2  # wide windows: fewer maps per program rather than spilled registers
    return dict(config, num_warps=_warps_for(config["BLOCK"] * pixels * block_u), num_stages=3)


def union_shape(config: dict, height: int, width: int, reach: int) -> dict:
    """The union of a tile's windows, clamped to the map, and its power-of-two block."""
    union_h = min(config["TILE_H"] + 2 * reach, height)
    union_w = min(config["TILE_W"] + 2 * reach, width)
    return dict(UNION_H=union_h, UNION_W=union_w, BLOCK_U=max(16, triton.next_power_of_2(union_h * union_w)))


def valid_config(config: dict, height: int, width: int, reach: int, one_map: bool = False) -> bool:
    """Whether ``config`` compiles and fits for this problem (also checks cached entries)."""
    pow2 = all(isinstance(config[k], int) and config[k] >= 1 and config[k] & (config[k] - 1) == 0
               for k in ("TILE_H", "TILE_W", "BLOCK", "BLOCK_C", "num_warps"))
    if not pow2 or not 1 <= config["num_stages"] <= 5 or config["num_warps"] > 16 or config["BLOCK_C"] < 16:
        return False
    rows = config["BLOCK"] * config["TILE_H"] * config["TILE_W"]
    block_u = union_shape(config, height, width, reach)["BLOCK_U"]
    fits = rows * block_u <= TILE_ELEMENTS_PER_WARP * config["num_warps"]
    return rows >= 16 and fits and (config["BLOCK"] == 1 or not one_map)


def config_space(height: int, width: int, reach: int, count_a: int, channels: int, one_map: bool = False) -> list:
    """The search space of one problem: tile shape, query block, channel block, warps, stages.

    Ordered most promising first (a static estimate), so a tuning budget of the first few
    configs spends its time where the winners usually are.
    """
    space = []
    for tile_h in (2, 4, 8):
        for tile_w in (2, 4, 8, 16):
            if tile_h > triton.next_power_of_2(height) or tile_w > triton.next_power_of_2(width):
                continue  # tiles larger than the map only add masked rows
            for block in ((1,) if one_map else (1, 2, 4, 8, 16)):
                if block > 1 and block > triton.next_power_of_2(count_a):
                    continue
                for block_c in (32, 64):
                    if block_c > max(16, triton.next_power_of_2(channels)):
                        continue
                    for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3), (16, 2)):
                        config = dict(TILE_H=tile_h, TILE_W=tile_w, BLOCK=block, BLOCK_C=block_c,
                                      num_warps=warps, num_stages=stages)
                        if valid_config(config, height, width, reach, one_map):
                            space.append(config)
    return sorted(space, key=lambda c: -_estimated_efficiency(c, height, width, reach))


def _estimated_efficiency(config: dict, height: int, width: int, reach: int) -> float:
    """Useful share of the products (window area over the union block) times tensor-core fill (rows/64)."""
    window = min(2 * reach + 1, height) * min(2 * reach + 1, width)
    rows = config["BLOCK"] * config["TILE_H"] * config["TILE_W"]
    return window / union_shape(config, height, width, reach)["BLOCK_U"] * min(1.0, rows / 64)


def mutual_problem(q_shape, count_t: int, fore_radius: int, back_radius: int, dtype, one_map: bool) -> str:
    batch, height, width, channels = q_shape
    return autotune.problem_key(h=height, w=width, c=autotune.bucket(channels), fore=fore_radius, back=back_radius,
                                b=autotune.bucket(batch), t=autotune.bucket(count_t), dtype=str(dtype).split(".")[-1],
                                indexed=int(one_map))


def window_problem(x_shape, count_n: int, radius: int, dtype) -> str:
    count_a, height, width, channels = x_shape
    return autotune.problem_key(h=height, w=width, c=autotune.bucket(channels), r=radius, a=autotune.bucket(count_a),
                                n=autotune.bucket(count_n), dtype=str(dtype).split(".")[-1])


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 must match the published fp32 kernel: no TF32 rounding.
    return "ieee" if dtype == torch.float32 else "tf32"


def window_config(x: torch.Tensor, count_n: int, radius: int) -> dict:
    count_a, height, width, channels = x.shape
    default = tile_config(height, width, radius, count_a, channels)
    return autotune.choose("window_max", window_problem(x.shape, count_n, radius, x.dtype), x.device, default,
                           lambda c: valid_config(c, height, width, radius))


def window_max(x: torch.Tensor, y: torch.Tensor, radius: int, out_dtype: torch.dtype, config: dict | None = None):
    """Pixel-major ``x [A, H, W, C]``, ``y [N, H, W, C]`` -> ``[A, N, H, W]`` window maxima."""
    count_a, height, width, channels = x.shape
    count_n = y.shape[0]
    out = torch.empty((count_a, count_n, height, width), device=x.device, dtype=out_dtype)
    cfg = config or window_config(x, count_n, radius)
    _, options = autotune.launch_options(cfg)
    n_tiles_w = triton.cdiv(width, cfg["TILE_W"])
    grid = (triton.cdiv(height, cfg["TILE_H"]) * n_tiles_w, triton.cdiv(count_a, cfg["BLOCK"]), count_n)
    _window_max_kernel[grid](
        x, y, out, count_a, count_n, height, width, channels, n_tiles_w,
        RADIUS=radius, TILE_H=cfg["TILE_H"], TILE_W=cfg["TILE_W"], BLOCK_A=cfg["BLOCK"], BLOCK_C=cfg["BLOCK_C"],
        DOT_PRECISION=_dot_precision(x.dtype), **union_shape(cfg, height, width, radius), **options,
    )
    return out


def mutual_config(q: torch.Tensor, count_t: int, fore_radius: int, back_radius: int, one_map: bool) -> dict:
    batch, height, width, channels = q.shape
    reach = max(fore_radius, back_radius)
    default = tile_config(height, width, reach, batch, channels, one_map=one_map)
    return autotune.choose("mutual", mutual_problem(q.shape, count_t, fore_radius, back_radius, q.dtype, one_map),
                           q.device, default, lambda c: valid_config(c, height, width, reach, one_map))


def mutual_max(q: torch.Tensor, t: torch.Tensor, fore_radius: int, back_radius: int,
               templates_per_program: int | None = None, indices: torch.Tensor | None = None,
               config: dict | None = None):
    """Pixel-major ``q [B, H, W, C]``, ``t [T, H, W, C]`` -> float32 ``(fore, back)``, each ``[B, H, W]``.

    ``indices [B, K]``: query b is matched only against templates ``indices[b]``.
    ``config``: tile shape, blocks, warps and stages (default: tuned for this GPU, else heuristic).
    """
    batch, height, width, channels = q.shape
    count_t = t.shape[0] if indices is None else indices.shape[1]
    reach = max(fore_radius, back_radius)
    fore = torch.full((batch, height, width), MATCH_FLOOR, device=q.device, dtype=torch.float32)
    back = torch.full((batch, height, width), MATCH_FLOOR, device=q.device, dtype=torch.float32)
    cfg = config or mutual_config(q, count_t, fore_radius, back_radius, indices is not None)
    _, options = autotune.launch_options(cfg)
    n_tiles_w = triton.cdiv(width, cfg["TILE_W"])
    n_tiles = triton.cdiv(height, cfg["TILE_H"]) * n_tiles_w
    n_b = triton.cdiv(batch, cfg["BLOCK"])
    if templates_per_program is None:
        # split the templates only as far as needed to give every multiprocessor work
        target = 4 * _multiprocessors(q.device)
        chunks = max(1, min(count_t, target // max(1, n_tiles * n_b)))
        templates_per_program = triton.cdiv(count_t, chunks)
    grid = (n_tiles, n_b, triton.cdiv(count_t, templates_per_program))
    index = indices.contiguous() if indices is not None else fore  # any pointer when unused
    _mutual_kernel[grid](
        q, t, fore, back, index, batch, count_t, templates_per_program, height, width, channels, n_tiles_w,
        FORE_R=fore_radius, BACK_R=back_radius, REACH=reach, TILE_H=cfg["TILE_H"], TILE_W=cfg["TILE_W"],
        BLOCK_B=cfg["BLOCK"], BLOCK_C=cfg["BLOCK_C"], DOT_PRECISION=_dot_precision(q.dtype),
        HAS_INDEX=indices is not None, **union_shape(cfg, height, width, reach), **options,
    )
    return fore, back


def _same_maps(expected, got) -> bool:
    # other tiles sum the channels in other orders: fp32 rounding, scaled by the dtype's
    tol = 1e-4 if expected[0].dtype == torch.float32 else 2e-2
    return all(torch.allclose(e.float(), g.float(), atol=tol, rtol=0) for e, g in zip(expected, got))


def tune_mutual(q: torch.Tensor, t: torch.Tensor, fore_radius: int, back_radius: int,
                indices: torch.Tensor | None = None, space: list | None = None, limit: int | None = None,
                save: bool = True, timer=None) -> autotune.TuneResult:
    """Tune ``mutual_max`` on pixel-major ``q``/``t`` (see ``hetmm tune``); ``limit``: first N configs of the space."""
    batch, height, width, channels = q.shape
    count_t = t.shape[0] if indices is None else indices.shape[1]
    reach, one_map = max(fore_radius, back_radius), indices is not None
    if space is None:
        space = config_space(height, width, reach, batch, channels, one_map)
    default = tile_config(height, width, reach, batch, channels, one_map=one_map)
    space = [c for c in space if c != default][:limit]
    return autotune.tune(
        "mutual", mutual_problem(q.shape, count_t, fore_radius, back_radius, q.dtype, one_map), q.device, space,
        default, lambda cfg: mutual_max(q, t, fore_radius, back_radius, indices=indices, config=cfg), _same_maps,
        timer=timer, save=save)


def tune_window(x: torch.Tensor, y: torch.Tensor, radius: int, space: list | None = None, limit: int | None = None,
                save: bool = True, timer=None) -> autotune.TuneResult:
    """Tune ``window_max`` (``forward_ATM``/``backward_ATM``) on pixel-major ``x``/``y``."""
    count_a, height, width, channels = x.shape
    if space is None:
        space = config_space(height, width, radius, count_a, channels)
    default = tile_config(height, width, radius, count_a, channels)
    space = [c for c in space if c != default][:limit]
    return autotune.tune(
        "window_max", window_problem(x.shape, y.shape[0], radius, x.dtype), x.device, space, default,
        lambda cfg: (window_max(x, y, radius, x.dtype, config=cfg),), _same_maps, timer=timer, save=save)


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one by one: fewer, larger programs are faster


def forward_ATM(query: torch.Tensor, temp_pm: torch.Tensor, patch: int) -> torch.Tensor:
    return window_max(pixel_major(query), temp_pm, patch // 2, query.dtype)


def backward_ATM(query: torch.Tensor, temp_pm: torch.Tensor, patch: int) -> torch.Tensor:
    # R(query, temp)[b, t] is the forward map with the roles swapped, transposed
    return window_max(temp_pm, pixel_major(query), patch // 2, query.dtype).transpose(0, 1)


def mutual_match(query: torch.Tensor, temp_pm: torch.Tensor, fore_patch: int, back_patch: int,
                 templates_per_program: int | None = None, indices: torch.Tensor | None = None,
                 config: dict | None = None):
    return mutual_max(pixel_major(query), temp_pm, fore_patch // 2, back_patch // 2, templates_per_program, indices,
                      config)
