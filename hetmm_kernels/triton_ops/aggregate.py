"""Multi-layer map aggregation in one Triton pass over the output pixels.

Each program owns a ``BLOCK_H x BLOCK_W`` tile of one image's output map. For every layer
it combines the layer's fore and back similarities into ``lda * (1 - alpha*fore -
(1-alpha)*back)`` in registers and applies the separable resample-and-blur operators
(``A_y @ M @ A_x^T``, see ``torch_ops.aggregate``) with two ``tl.dot``; the layers
accumulate in place, the tile is written once, and the image maximum is merged across
tiles with one ``atomic_max``. The layers' maps arrive packed end to end (no padding to a
common size: each is read at its own size, masked); the row and column operators are
zero-padded to the largest map and cached per shape on the device.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import autotune
from ..torch_ops.aggregate import axis_matrix, image_scores


@triton.jit
def _aggregate_kernel(
    fore_ptr, back_ptr, weight_ptr, extent_ptr, start_ptr, rows_ptr, cols_ptr, out_ptr, score_ptr,
    layers, batch, height, width, n_tiles_w,
    MAP_H: tl.constexpr, MAP_W: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    SCORE_MAX: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    b = tl.program_id(1)
    y = (pid_tile // n_tiles_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    x = (pid_tile % n_tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    span = tl.arange(0, CHUNK)
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for layer in range(layers):
        alpha = tl.load(weight_ptr + 2 * layer)
        lda = tl.load(weight_ptr + 2 * layer + 1)
        # the layer's own map size, not the largest one: smaller layers cost less
        map_h = tl.load(extent_ptr + 2 * layer)
        map_w = tl.load(extent_ptr + 2 * layer + 1)
        base = tl.load(start_ptr + layer) + b.to(tl.int64) * map_h * map_w  # this image's map in the packing
        for j0 in range(0, map_w, CHUNK):
            j = j0 + span
            partial = tl.zeros((BLOCK_H, CHUNK), dtype=tl.float32)
            for i0 in range(0, map_h, CHUNK):
                i = i0 + span
                inside = (i[:, None] < map_h) & (j[None, :] < map_w)
                offs = base + i[:, None] * map_w + j[None, :]
                fore = tl.load(fore_ptr + offs, mask=inside, other=0.0)
                back = tl.load(back_ptr + offs, mask=inside, other=0.0)
                low = lda * (1.0 - alpha * fore - (1.0 - alpha) * back)  # outside: zero operator columns
                a_y = tl.load(rows_ptr + (layer * height + y[:, None]) * MAP_H + i[None, :],
                              mask=y[:, None] < height, other=0.0)
                partial = tl.dot(a_y, low, partial, input_precision="ieee")
            a_x = tl.load(cols_ptr + (layer * width + x[None, :]) * MAP_W + j[:, None], mask=x[None, :] < width, other=0.0)
            acc = tl.dot(partial, a_x, acc, input_precision="ieee")
    valid = (y[:, None] < height) & (x[None, :] < width)
    out_offs = (b.to(tl.int64) * height + y[:, None]) * width + x[None, :]
    tl.store(out_ptr + out_offs, acc, mask=valid)
    if SCORE_MAX:
        tl.atomic_max(score_ptr + b, tl.max(tl.max(tl.where(valid, acc, float("-inf")), axis=1), axis=0),
                      sem="relaxed")  # a maximum needs no ordering


CHUNK = 16  # the map side a product step covers (tl.dot's smallest)


@functools.lru_cache(maxsize=64)
def _layer_extents(shapes: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(shapes, dtype=torch.int32, device=device).reshape(-1, 2)


@functools.lru_cache(maxsize=64)
def _layer_starts(shapes: tuple, batch: int, device: torch.device) -> torch.Tensor:
    """Where each layer's ``[B, h, w]`` block starts in the packed maps (int64: cached on the device)."""
    sizes = [0] + [batch * h * w for h, w in shapes[:-1]]
    return torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(device)


@functools.lru_cache(maxsize=64)
def _layer_weights(alphas: tuple, ldas: tuple, device: torch.device) -> torch.Tensor:
    # cached per device: no host-to-device copy per call (a CUDA graph capture forbids them)
    return torch.tensor([[a, l] for a, l in zip(alphas, ldas)], dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=64)
def _padded_operators(shapes: tuple, height: int, width: int, map_h: int, map_w: int, blur, device: torch.device):
    """Every layer's row and column operators, zero-padded to the common map size: built once per
    shape (read-only; on the device, so a CUDA graph replays without host-to-device copies)."""
    rows = torch.zeros(len(shapes), height, map_h, device=device)
    cols = torch.zeros(len(shapes), width, map_w, device=device)
    for layer, (h, w) in enumerate(shapes):
        rows[layer, :, :h] = axis_matrix(height, h, blur, device)
        cols[layer, :, :w] = axis_matrix(width, w, blur, device)
    return rows, cols


def default_config(height: int, width: int) -> dict:
    return dict(BLOCK_H=32 if height > 16 else 16, BLOCK_W=32 if width > 16 else 16, num_warps=4, num_stages=3)


def valid_config(config: dict, map_h: int, map_w: int) -> bool:
    blocks = (config["BLOCK_H"], config["BLOCK_W"])
    if not all(isinstance(b, int) and 16 <= b <= 128 and b & (b - 1) == 0 for b in blocks):
        return False
    # registers: the output tile (the partial product is [BLOCK_H, CHUNK]); IEEE products keep each
    # thread's operand rows and columns in registers (sm_80: 64 x 64 at 8 warps spilled 24 bytes)
    return (blocks[0] * blocks[1] <= 2048
            and config["num_warps"] in (1, 2, 4, 8, 16) and 1 <= config["num_stages"] <= 5)


def config_space(height: int, width: int, map_h: int, map_w: int) -> list:
    space = [dict(BLOCK_H=bh, BLOCK_W=bw, num_warps=warps, num_stages=stages)
             for bh in (16, 32, 64) for bw in (16, 32, 64) for warps in (2, 4, 8) for stages in (2, 3)
             if bh <= max(16, triton.next_power_of_2(height)) and bw <= max(16, triton.next_power_of_2(width))]
    return [c for c in space if valid_config(c, map_h, map_w)]


def problem(batch: int, height: int, width: int, map_h: int, map_w: int, layers: int) -> str:
    return autotune.problem_key(h=height, w=width, map_h=map_h, map_w=map_w, layers=layers, b=autotune.bucket(batch))


def aggregate_maps(fores, backs, alphas, ldas, out_size, blur=None, image_score=None, config: dict | None = None):
    height, width = out_size
    device = fores[0].device
    batch = fores[0].shape[0]
    map_h = max(16, triton.next_power_of_2(max(f.shape[-2] for f in fores)))
    map_w = max(16, triton.next_power_of_2(max(f.shape[-1] for f in fores)))
    layers = len(fores)
    # packed end to end, each at its own size: one copy each, no zero padding
    fore_packed = torch.cat([f.reshape(-1) for f in fores]) if layers > 1 else fores[0].reshape(-1)
    back_packed = torch.cat([b.reshape(-1) for b in backs]) if layers > 1 else backs[0].reshape(-1)
    shapes = tuple(tuple(f.shape[-2:]) for f in fores)
    rows, cols = _padded_operators(shapes, height, width, map_h, map_w,
                                   None if blur is None else (float(blur[0]), int(blur[1])), device)
    weights = _layer_weights(tuple(map(float, alphas)), tuple(map(float, ldas)), device)
    out = torch.empty(batch, 1, height, width, device=device)
    scores = torch.full((batch,), float("-inf"), device=device)
    cfg = config or autotune.choose("aggregate", problem(batch, height, width, map_h, map_w, layers), device,
                                    default_config(height, width), lambda c: valid_config(c, map_h, map_w))
    n_tiles_w = triton.cdiv(width, cfg["BLOCK_W"])
    grid = (triton.cdiv(height, cfg["BLOCK_H"]) * n_tiles_w, batch)
    _aggregate_kernel[grid](
        fore_packed, back_packed, weights, _layer_extents(shapes, device), _layer_starts(shapes, batch, device), rows,
        cols, out, scores, layers, batch, height,
        width, n_tiles_w, MAP_H=map_h, MAP_W=map_w, SCORE_MAX=image_score == "max", CHUNK=CHUNK, **cfg,
    )
    if image_score == "max":
        return out, scores
    return out, image_scores(out, image_score)  # the k x k max-pool mean runs after the pass


def tune(fores, backs, alphas, ldas, out_size, blur=None, space: list | None = None, limit: int | None = None,
         save: bool = True, timer=None) -> autotune.TuneResult:
    """Tune ``aggregate_maps`` for these layer maps and output size."""
    height, width = out_size
    map_h = max(16, triton.next_power_of_2(max(f.shape[-2] for f in fores)))
    map_w = max(16, triton.next_power_of_2(max(f.shape[-1] for f in fores)))
    default = default_config(height, width)
    space = [c for c in (space or config_space(height, width, map_h, map_w)) if c != default][:limit]
    key = problem(fores[0].shape[0], height, width, map_h, map_w, len(fores))

    def same(expected, got):
        return all(torch.allclose(e, g, atol=1e-5, rtol=1e-5) for e, g in zip(expected, got))

    return autotune.tune("aggregate", key, fores[0].device, space, default,
                         lambda cfg: aggregate_maps(fores, backs, alphas, ldas, out_size, blur, "max", cfg),
                         same, timer=timer, save=save)
