"""Windowed pixel-to-patch matching in Triton: tensor-core tiles.

Each program owns a tile of ``TILE_H x TILE_W`` query pixels for ``BLOCK`` maps of the query
side and multiplies them with the union of their windows in one map of the other side:
``[BLOCK * P, C] x [C, U]`` with ``tl.dot`` (fp32 accumulation), then keeps each pixel's
maximum inside its own window. The union is clamped to the map, so a window larger than the
map costs no more than the map.

* ``_window_max_kernel``: one program per (tile, query block, template); writes the
  per-template map ``[A, N, H, W]`` (``forward_ATM``; ``backward_ATM`` swaps roles).
* ``_mutual_kernel`` (streaming): one program per (tile, query block, template chunk); per
  template, the query tile and the whole union (a power-of-two block) stream in channel blocks.
* ``_mutual_resident_kernel``: one program per (query block x union part, tile, template
  chunk); the query tile is loaded once with all its channels, and every template's part of
  the union (``BLOCK_U`` positions of it) streams past: each template byte read serves all
  the program's rows, and the union is split into parts instead of rounded up to a power of two.

Both fused kernels reduce over their templates in registers, compute each product once for
both directions, and merge the forward maximum of a pixel and the backward maximum of a
template position across programs with one relaxed ``atomic_max`` each. Window radii and
union sizes are run-time arguments (the paper's window pairs share compilations). The config
(which kernel, tiles, blocks, warps, stages) is sized to the register file and shared memory
(``valid_config``) and ordered by the traffic model (``hetmm_kernels.traffic``).

Feature maps are pixel-major ``[N, H, W, C]`` so that the ``C`` axis of every load
is contiguous. Offsets are int64.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import autotune, traffic

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
def _tile_union(pid_tile, n_tiles_w, height, width, reach, union_h, union_w, first,
                TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_U: tl.constexpr):
    """Map coordinates of union positions ``first .. first + BLOCK_U`` (row-major) of a tile's windows."""
    # origin clamped into the map: [origin, origin + union) still covers every window
    uy0 = tl.minimum(tl.maximum((pid_tile // n_tiles_w) * TILE_H - reach, 0), height - union_h)
    ux0 = tl.minimum(tl.maximum((pid_tile % n_tiles_w) * TILE_W - reach, 0), width - union_w)
    u = first + tl.arange(0, BLOCK_U)
    return uy0 + u // union_w, ux0 + u % union_w, u < union_h * union_w


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


@triton.jit(do_not_specialize=["radius", "union_h", "union_w"])
def _window_max_kernel(
    x_ptr, y_ptr, out_ptr,
    count_a, count_n, height, width, channels, n_tiles_w, radius, union_h, union_w,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_a = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    a, row_y, row_x, row_valid = _tile_rows(pid_tile, pid_a, n_tiles_w, count_a, height, width,
                                            TILE_H, TILE_W, BLOCK_A)
    uy, ux, u_valid = _tile_union(pid_tile, n_tiles_w, height, width, radius, union_h, union_w, 0,
                                  TILE_H, TILE_W, BLOCK_U)
    pixel = (row_y * width + row_x).to(tl.int64)
    hw = height * width
    x_rows = (a.to(tl.int64) * hw + pixel) * channels
    y_cols = (n * hw + (uy * width + ux).to(tl.int64)) * channels
    sims = _union_products(x_ptr, y_ptr, x_rows, row_valid, y_cols, u_valid, channels, BLOCK_C, DOT_PRECISION)
    in_window = (tl.abs(row_y[:, None] - uy[None, :]) <= radius) & (tl.abs(row_x[:, None] - ux[None, :]) <= radius)
    in_window = in_window & u_valid[None, :]
    best = tl.max(tl.where(in_window, sims, float("-inf")), axis=1)
    best = tl.maximum(best, _FLOOR)
    out_offs = (a.to(tl.int64) * count_n + n) * hw + pixel
    tl.store(out_ptr + out_offs, best.to(out_ptr.dtype.element_ty), mask=row_valid)


@triton.jit
def _template_at(t_ptr, index_ptr, pid_b, count_t, i, first, map_size, HAS_INDEX: tl.constexpr):
    """Start of the ``i``-th template of this program's query (``index[pid_b, i]`` with per-query sets)."""
    if HAS_INDEX:
        return t_ptr + tl.load(index_ptr + pid_b.to(tl.int64) * count_t + i).to(tl.int64) * map_size
    # int64 offsets: a large bank passes 2**31 elements
    return t_ptr + (first.to(tl.int64) + (i - first)) * map_size


@triton.jit
def _merge_windows(best, b, row_y, row_x, row_valid, uy, ux, u_valid, pid_b, batch, width, hw,
                   fore_ptr, back_ptr, fore_r, back_r, BLOCK_B: tl.constexpr, P: tl.constexpr):
    """Reduce ``best [BLOCK_B * P, U]`` inside the windows; merge into ``fore``/``back`` (atomic max)."""
    dy = tl.abs(row_y[:, None] - uy[None, :])
    dx = tl.abs(row_x[:, None] - ux[None, :])
    pair_valid = row_valid[:, None] & u_valid[None, :]
    # forward: each query pixel's best template position inside its window.
    # Relaxed atomics: a maximum needs atomicity, not ordering with other memory.
    fore_win = (dy <= fore_r) & (dx <= fore_r) & pair_valid
    fore = tl.max(tl.where(fore_win, best, float("-inf")), axis=1)
    pixel = (row_y * width + row_x).to(tl.int64)
    tl.atomic_max(fore_ptr + b.to(tl.int64) * hw + pixel, fore, mask=row_valid, sem="relaxed")
    # backward: each template position's best query pixel (of this tile) inside its window
    back_win = (dy <= back_r) & (dx <= back_r) & pair_valid
    back = tl.where(back_win, best, float("-inf"))
    back = tl.max(tl.reshape(back, (BLOCK_B, P, best.shape[1])), axis=1)
    b_block = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    back_offs = b_block.to(tl.int64)[:, None] * hw + (uy * width + ux).to(tl.int64)[None, :]
    tl.atomic_max(back_ptr + back_offs, back, mask=(b_block < batch)[:, None] & u_valid[None, :], sem="relaxed")


# Window radii and union sizes are run-time values: the paper's 15 window pairs share compilations.
_WINDOW_ARGS = ["fore_r", "back_r", "reach", "union_h", "union_w"]


@triton.jit(do_not_specialize=_WINDOW_ARGS)
def _mutual_kernel(
    q_ptr, t_ptr, fore_ptr, back_ptr, index_ptr,
    batch, count_t, templates_per_program, height, width, channels, n_tiles_w,
    fore_r, back_r, reach, union_h, union_w,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_INDEX: tl.constexpr,
):
    """Streaming: per template, the query tile and the template's union stream through in channel blocks."""
    # HAS_INDEX: query b is matched only against templates index[b, :count_t] (BLOCK_B == 1)
    pid_tile = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_t = tl.program_id(2)
    b, row_y, row_x, row_valid = _tile_rows(pid_tile, pid_b, n_tiles_w, batch, height, width,
                                            TILE_H, TILE_W, BLOCK_B)
    uy, ux, u_valid = _tile_union(pid_tile, n_tiles_w, height, width, reach, union_h, union_w, 0,
                                  TILE_H, TILE_W, BLOCK_U)
    hw = height * width
    q_rows = (b.to(tl.int64) * hw + (row_y * width + row_x).to(tl.int64)) * channels
    t_cols = (uy * width + ux).to(tl.int64) * channels

    best = tl.full((BLOCK_B * TILE_H * TILE_W, BLOCK_U), float("-inf"), dtype=tl.float32)
    t_start = pid_t * templates_per_program
    for i in range(t_start, tl.minimum(t_start + templates_per_program, count_t)):
        template = _template_at(t_ptr, index_ptr, pid_b, count_t, i, t_start, hw * channels, HAS_INDEX)
        sims = _union_products(q_ptr, template, q_rows, row_valid, t_cols, u_valid, channels, BLOCK_C, DOT_PRECISION)
        best = tl.maximum(best, sims)
    _merge_windows(best, b, row_y, row_x, row_valid, uy, ux, u_valid, pid_b, batch, width, hw,
                   fore_ptr, back_ptr, fore_r, back_r, BLOCK_B, TILE_H * TILE_W)


@triton.jit(do_not_specialize=_WINDOW_ARGS + ["n_parts"])
def _mutual_resident_kernel(
    q_ptr, t_ptr, fore_ptr, back_ptr, index_ptr,
    batch, count_t, templates_per_program, height, width, channels, n_tiles_w,
    fore_r, back_r, reach, union_h, union_w, n_parts,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, CHANNELS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_INDEX: tl.constexpr,
):
    """Resident query tile: loaded once (all ``CHANNELS``), then the templates stream past it.

    The union of the tile's windows is split into ``n_parts`` parts of ``BLOCK_U`` positions
    (one per program), so each template part read serves all ``BLOCK_B * P`` rows and the
    query tile is never re-read: global traffic per template is the part alone.
    """
    # query block and union part innermost: the programs that share a tile's template parts run side by side
    pid_b = tl.program_id(0) // n_parts
    part = tl.program_id(0) % n_parts
    pid_tile = tl.program_id(1)
    pid_t = tl.program_id(2)
    b, row_y, row_x, row_valid = _tile_rows(pid_tile, pid_b, n_tiles_w, batch, height, width,
                                            TILE_H, TILE_W, BLOCK_B)
    uy, ux, u_valid = _tile_union(pid_tile, n_tiles_w, height, width, reach, union_h, union_w, part * BLOCK_U,
                                  TILE_H, TILE_W, BLOCK_U)
    hw = height * width
    c = tl.arange(0, CHANNELS)
    c_valid = c < channels
    q_rows = (b.to(tl.int64) * hw + (row_y * width + row_x).to(tl.int64)) * channels
    query = tl.load(q_ptr + q_rows[:, None] + c[None, :], mask=row_valid[:, None] & c_valid[None, :], other=0.0)
    t_offs = (uy * width + ux).to(tl.int64)[None, :] * channels + c[:, None]
    t_mask = u_valid[None, :] & c_valid[:, None]

    best = tl.full((BLOCK_B * TILE_H * TILE_W, BLOCK_U), float("-inf"), dtype=tl.float32)
    t_start = pid_t * templates_per_program
    for i in range(t_start, tl.minimum(t_start + templates_per_program, count_t)):
        template = _template_at(t_ptr, index_ptr, pid_b, count_t, i, t_start, hw * channels, HAS_INDEX)
        part_tile = tl.load(template + t_offs, mask=t_mask, other=0.0)
        best = tl.maximum(best, tl.dot(query, part_tile, input_precision=DOT_PRECISION))
    _merge_windows(best, b, row_y, row_x, row_valid, uy, ux, u_valid, pid_b, batch, width, hw,
                   fore_ptr, back_ptr, fore_r, back_r, BLOCK_B, TILE_H * TILE_W)


# ----------------------------------------------------------------------------- launchers


def pixel_major(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` -> contiguous ``[N, H, W, C]`` (same dtype)."""
    return x.permute(0, 2, 3, 1).contiguous()


def _pow2_at_most(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(1, n)))


# Budgets of one program on the GPU. Registers: past 255 a thread, or its share of the SM's
# 65,536 (128 at 16 warps), ptxas spills. Estimated per thread: three fp32 values per element of
# the [rows, BLOCK_U] tile (the products, the running maximum, the window masks' temporaries in
# the epilogue), the operand fragments, and a fixed part (addresses, indices); calibrated with the
# compile check (tests/kernel_stats.py) on sm_80 and sm_90 over the whole tuning space.
FIXED_REGISTERS = 48
SHARED_BYTES = {(9, 0): 232448, (8, 0): 166912}  # opt-in shared memory per block
DEFAULT_SHARED_BYTES = 101376  # sm_86/sm_89 and unknown GPUs
MAX_GRID_Y = 65535
SHARED_MARGIN = 16384


def thread_registers(config: dict, block_u: int, channels: int, element_bytes: int,
                     running_max: bool = True) -> float:
    """Estimated registers a thread needs for ``config`` (streaming or resident; ``running_max`` False:
    the per-template window kernel, which keeps no maximum across templates)."""
    threads = 32 * config["num_warps"]
    rows = config["BLOCK"] * config["TILE_H"] * config["TILE_W"]
    arrays = (3 if running_max else 2) * rows * block_u / threads
    if element_bytes > 2:
        # IEEE float32 products run on the CUDA cores with both operands in registers: each thread holds
        # the channel block of its rows and columns (16 products a thread over 16 channels compile without
        # spills on sm_80 and sm_90; 32 products, or 64 channels, spill)
        fits = rows * block_u <= 16 * threads and config.get("BLOCK_C", 16) <= 16
        return arrays + FIXED_REGISTERS if fits else float("inf")
    if config.get("KERNEL") == "resident":
        # the template part comes from shared memory a k-step at a time; part of the resident query tile
        # may stay in registers as mma.sync's A fragments (counted at half its size: sm_80 held 128 rows x
        # 256 channels at 4 warps in 72 registers, at 8 warps in 80-136)
        query = rows * max(16, triton.next_power_of_2(channels)) * element_bytes / 8 / threads
        return arrays + query + FIXED_REGISTERS
    # the operand tiles pass through registers a k-step at a time (counted at half their size: the window
    # kernel's 16 x 64 and 256 x 64 tiles at 4 warps compiled to 148-152 registers, not the 180 in full)
    operands = (rows + block_u) * config["BLOCK_C"] * element_bytes / 8 / threads
    return arrays + operands + FIXED_REGISTERS


def register_limit(warps: int) -> int:
    """Registers a thread may plan for. ptxas may settle below its 255 (or the SM's share) and spill a
    few bytes rather than use them: at 4 warps the whole-space compile check saw sm_80 stop at 168
    (a 176-register estimate), at 8 warps at 128 (to fit two blocks an SM); 16 warps get 128 at most."""
    return 160 if warps <= 4 else 128


def shared_bytes(config: dict, block_u: int, channels: int, element_bytes: int) -> int:
    """Shared memory of ``config``: pipelined operand buffers (and the resident query tile)."""
    rows = config["BLOCK"] * config["TILE_H"] * config["TILE_W"]
    if config.get("KERNEL") == "resident":
        padded = max(16, triton.next_power_of_2(channels))
        return (rows + config["num_stages"] * block_u) * padded * element_bytes
    return config["num_stages"] * (rows + block_u) * config["BLOCK_C"] * element_bytes


def device_shared_bytes(device: torch.device) -> int:
    """Shared memory a block may use on ``device`` (the interpreter plays an H100/H200)."""
    if device.type != "cuda":
        return SHARED_BYTES[(9, 0)]
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    return optin or SHARED_BYTES.get((props.major, props.minor), DEFAULT_SHARED_BYTES)


def tile_config(height: int, width: int, reach: int, count_a: int, channels: int, one_map: bool = False,
                dtype: torch.dtype = torch.float16, running_max: bool = True) -> dict:
    """The streaming kernel's heuristic config of one problem (tl.dot needs every dimension >= 16).

    ``one_map``: one query map per program (per-query template sets), so the tile alone
    must supply the 16 rows. float32 (IEEE products on the CUDA cores, operands in
    registers) takes narrower channel blocks than 16-bit types.
    """
    element_bytes = dtype.itemsize
    tile_h = 4 if one_map else _pow2_at_most(height, 4)
    tile_w = 4 if one_map else _pow2_at_most(width, 4)
    pixels = tile_h * tile_w
    block_a = 1 if one_map else max(16 // pixels, min(_pow2_at_most(count_a, 4), max(1, 64 // pixels)))
    block_c = max(16, _pow2_at_most(channels, 64 if element_bytes <= 2 else 16))
    # wide windows: fewer maps per program, then narrower channel blocks, rather than spilled registers
    # or loads narrower than 16 bytes
    candidates = []
    while True:
        candidates.append(dict(TILE_H=tile_h, TILE_W=tile_w, BLOCK=block_a, BLOCK_C=block_c, num_stages=3))
        if block_a * pixels > 16:
            block_a //= 2
        elif block_c > 16:
            block_c //= 2
        else:
            break
    for config in candidates:
        for warps in (4, 8, 16):
            if valid_config(dict(config, num_warps=warps), height, width, reach, one_map, channels, dtype,
                            running_max=running_max):
                return dict(config, num_warps=warps)
    return dict(candidates[-1], num_warps=4)  # nothing fits the budgets: the smallest tile


def mutual_default(height: int, width: int, reach: int, batch: int, channels: int, dtype: torch.dtype,
                   one_map: bool = False, shared: int = SHARED_BYTES[(9, 0)]) -> dict:
    """The untuned config of ``mutual_max``: the tuning space's first (the traffic model's fastest) config."""
    return dict(_mutual_default(height, width, reach, batch, channels, dtype, one_map, shared))


@functools.lru_cache(maxsize=512)
def _mutual_default(height, width, reach, batch, channels, dtype, one_map, shared) -> tuple:
    space = config_space(height, width, reach, batch, channels, one_map, dtype, shared)
    chosen = space[0] if space else tile_config(height, width, reach, batch, channels, one_map, dtype)
    return tuple(chosen.items())


def valid_config(config: dict, height: int, width: int, reach: int, one_map: bool = False, channels: int = 64,
                 dtype: torch.dtype = torch.float16, shared: int | None = None, running_max: bool = True) -> bool:
    """Whether ``config`` compiles, fits and does not spill for this problem (also checks cached entries)."""
    resident = config.get("KERNEL") == "resident"
    keys = ("TILE_H", "TILE_W", "BLOCK", "BLOCK_U" if resident else "BLOCK_C", "num_warps")
    if set(config) - set(keys) - {"KERNEL", "num_stages"} or config.get("KERNEL", "resident") != "resident":
        return False
    pow2 = all(isinstance(config.get(k), int) and config[k] >= 1 and config[k] & (config[k] - 1) == 0 for k in keys)
    if not pow2 or not isinstance(config.get("num_stages"), int) or not 1 <= config["num_stages"] <= 5:
        return False
    if config["num_warps"] > 16 or (config["BLOCK_U"] if resident else config["BLOCK_C"]) < 16:
        return False
    element_bytes = dtype.itemsize
    tiles = triton.cdiv(height, config["TILE_H"]) * triton.cdiv(width, config["TILE_W"])
    if resident and (element_bytes > 2 or tiles > MAX_GRID_Y):
        return False
    rows = config["BLOCK"] * config["TILE_H"] * config["TILE_W"]
    block_u = traffic.union_shape(config, height, width, reach)["BLOCK_U"]
    # 16-byte loads (tensor-core path): every thread gets at least 16 bytes of each operand tile a step
    # (float32 is bound by its CUDA-core products and needs the warps for its registers)
    depth = max(16, triton.next_power_of_2(channels)) if resident else config["BLOCK_C"]
    if element_bytes <= 2 and min(rows, block_u) * depth * element_bytes < 16 * 32 * config["num_warps"]:
        return False
    # what the whole-space compile check found ptxas to do below these estimates:
    if element_bytes > 2 and (config["num_warps"], config["num_stages"]) == (8, 2):
        return False  # float32: settles at 128 registers and spills (sm_90)
    if resident and config["BLOCK_U"] == 16 and (config["num_warps"], config["num_stages"]) != (4, 3):
        return False  # 16-position parts: sm_80 settled at 64-72 registers and spilled, but at 4 warps, 3 stages
    fits = thread_registers(config, block_u, channels, element_bytes, running_max) <= register_limit(
        config["num_warps"])
    # shared memory: the estimate is what Triton 3.8 allocates; 16 KB are left for other versions' scratch
    budget = (shared or SHARED_BYTES[(9, 0)]) - SHARED_MARGIN
    fits = fits and shared_bytes(config, block_u, channels, element_bytes) <= budget
    return rows >= 16 and fits and (config["BLOCK"] == 1 or not one_map)


def config_space(height: int, width: int, reach: int, count_a: int, channels: int, one_map: bool = False,
                 dtype: torch.dtype = torch.float16, shared: int | None = None, kernels=("stream", "resident"),
                 running_max: bool = True) -> list:
    """The search space of one problem: kernel, tile shape, query block, channel or union block, warps, stages.

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
                shapes = []
                if "stream" in kernels:
                    shapes += [dict(BLOCK_C=block_c) for block_c in (16, 32, 64)
                               if block_c <= max(16, triton.next_power_of_2(channels))]
                if "resident" in kernels:
                    shapes += [dict(KERNEL="resident", BLOCK_U=block_u) for block_u in (16, 32, 64, 128)]
                for shape in shapes:
                    for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3), (16, 2)):
                        config = dict(shape, TILE_H=tile_h, TILE_W=tile_w, BLOCK=block, num_warps=warps,
                                      num_stages=stages)
                        if valid_config(config, height, width, reach, one_map, channels, dtype, shared,
                                        running_max):
                            space.append(config)
    # most promising first: the traffic model's predicted time (60 templates, the default GPU); among equals,
    # deeper pipelines, then fewer warps
    per_query = 10 if one_map else None

    def predicted(config):
        seconds = traffic.matching(config, count_a, height, width, channels, 60, reach, reach, dtype,
                                   per_query=per_query).seconds
        return round(seconds, 9), -config["num_stages"], config["num_warps"]

    return sorted(space, key=predicted)


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
    default = tile_config(height, width, radius, count_a, channels, dtype=x.dtype, running_max=False)
    shared = device_shared_bytes(x.device)
    return autotune.choose("window_max", window_problem(x.shape, count_n, radius, x.dtype), x.device, default,
                           lambda c: "KERNEL" not in c and valid_config(c, height, width, radius, False, channels,
                                                                        x.dtype, shared, running_max=False))


def window_max(x: torch.Tensor, y: torch.Tensor, radius: int, out_dtype: torch.dtype, config: dict | None = None):
    """Pixel-major ``x [A, H, W, C]``, ``y [N, H, W, C]`` -> ``[A, N, H, W]`` window maxima."""
    count_a, height, width, channels = x.shape
    count_n = y.shape[0]
    out = torch.empty((count_a, count_n, height, width), device=x.device, dtype=out_dtype)
    cfg = config or window_config(x, count_n, radius)
    _, options = autotune.launch_options(cfg)
    n_tiles_w = triton.cdiv(width, cfg["TILE_W"])
    grid = (triton.cdiv(height, cfg["TILE_H"]) * n_tiles_w, triton.cdiv(count_a, cfg["BLOCK"]), count_n)
    union = traffic.union_shape(cfg, height, width, radius)
    _window_max_kernel[grid](
        x, y, out, count_a, count_n, height, width, channels, n_tiles_w, radius, union["union_h"], union["union_w"],
        TILE_H=cfg["TILE_H"], TILE_W=cfg["TILE_W"], BLOCK_A=cfg["BLOCK"], BLOCK_U=union["BLOCK_U"],
        BLOCK_C=cfg["BLOCK_C"], DOT_PRECISION=_dot_precision(x.dtype), **options,
    )
    return out


def mutual_config(q: torch.Tensor, count_t: int, fore_radius: int, back_radius: int, one_map: bool) -> dict:
    batch, height, width, channels = q.shape
    reach = max(fore_radius, back_radius)
    shared = device_shared_bytes(q.device)
    default = mutual_default(height, width, reach, batch, channels, q.dtype, one_map, shared)
    return autotune.choose("mutual", mutual_problem(q.shape, count_t, fore_radius, back_radius, q.dtype, one_map),
                           q.device, default,
                           lambda c: valid_config(c, height, width, reach, one_map, channels, q.dtype, shared))


def mutual_max(q: torch.Tensor, t: torch.Tensor, fore_radius: int, back_radius: int,
               templates_per_program: int | None = None, indices: torch.Tensor | None = None,
               config: dict | None = None):
    """Pixel-major ``q [B, H, W, C]``, ``t [T, H, W, C]`` -> float32 ``(fore, back)``, each ``[B, H, W]``.

    ``indices [B, K]``: query b is matched only against templates ``indices[b]``.
    ``config``: kernel, tile shape, blocks, warps and stages (default: tuned for this GPU, else heuristic).
    """
    batch, height, width, channels = q.shape
    count_t = t.shape[0] if indices is None else indices.shape[1]
    reach = max(fore_radius, back_radius)
    fore = torch.full((batch, height, width), MATCH_FLOOR, device=q.device, dtype=torch.float32)
    back = torch.full((batch, height, width), MATCH_FLOOR, device=q.device, dtype=torch.float32)
    cfg = config or mutual_config(q, count_t, fore_radius, back_radius, indices is not None)
    _, options = autotune.launch_options(cfg)
    union = traffic.union_shape(cfg, height, width, reach)
    n_tiles_w = triton.cdiv(width, cfg["TILE_W"])
    n_tiles = triton.cdiv(height, cfg["TILE_H"]) * n_tiles_w
    n_programs = n_tiles * triton.cdiv(batch, cfg["BLOCK"]) * union.get("n_parts", 1)
    if templates_per_program is None:
        # split the templates only as far as needed to give every multiprocessor work
        chunks = max(1, min(count_t, 4 * _multiprocessors(q.device) // max(1, n_programs)))
        templates_per_program = triton.cdiv(count_t, chunks)
    grid = (n_tiles, n_programs // n_tiles, triton.cdiv(count_t, templates_per_program))
    if cfg.get("KERNEL") == "resident":
        grid = (grid[1], grid[0], grid[2])
    index = indices.contiguous() if indices is not None else fore  # any pointer when unused
    common = (q, t, fore, back, index, batch, count_t, templates_per_program, height, width, channels, n_tiles_w,
              fore_radius, back_radius, reach, union["union_h"], union["union_w"])
    blocks = dict(TILE_H=cfg["TILE_H"], TILE_W=cfg["TILE_W"], BLOCK_B=cfg["BLOCK"], BLOCK_U=union["BLOCK_U"],
                  DOT_PRECISION=_dot_precision(q.dtype), HAS_INDEX=indices is not None, **options)
    if cfg.get("KERNEL") == "resident":
        _mutual_resident_kernel[grid](*common, union["n_parts"], CHANNELS=max(16, triton.next_power_of_2(channels)),
                                      **blocks)
    else:
        _mutual_kernel[grid](*common, BLOCK_C=cfg["BLOCK_C"], **blocks)
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
    shared = device_shared_bytes(q.device)
    if space is None:
        space = config_space(height, width, reach, batch, channels, one_map, q.dtype, shared)
    default = mutual_default(height, width, reach, batch, channels, q.dtype, one_map, shared)
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
        space = config_space(height, width, radius, count_a, channels, dtype=x.dtype,
                             shared=device_shared_bytes(x.device), kernels=("stream",), running_max=False)
    default = tile_config(height, width, radius, count_a, channels, dtype=x.dtype, running_max=False)
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
