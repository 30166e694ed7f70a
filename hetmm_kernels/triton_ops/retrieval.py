"""CPR global retrieval in Triton.

``_block_histogram_kernel``: one program per (image, block): the nearest centre of each of
the block's pixels (the same ``sum((x - c)^2)`` as the reference, first centre on ties; every
centre's distance from one read of each feature chunk), then the block's histogram of ids + 1
with padding in bin 0, in one pass over the features.

``_trimmed_topk_kernel``: one program per (query block, bank block) streams the compact
bank (integer counts) once: per-block KL or L2 for every (query, entry) pair in registers, no
logarithm or division per pair (a count's logarithm comes from a table, the query's own sum is
computed once), summed over the blocks while the ``L - keep`` largest are kept aside and then
subtracted (as the torch path does); then each query keeps its best ``CAND`` entries of the block
as int64 keys ``(float bits << 32) | index`` (distances are non-negative, so integer order is
(distance, index) order: ties go to the lower index). Only those candidates are written (never
``[Q, R, L]``, nor ``[Q, R]`` when k is small); a top-k of the candidates gives the global top-K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import autotune

from ..reference import KL_EPS, block_layout
from ..torch_ops.retrieval import count_table

_EPS = tl.constexpr(KL_EPS)


@triton.jit
def _block_histogram_kernel(
    feat_ptr, center_ptr, hist_ptr, code_ptr,
    channels, height, width, centers, blocks_w, blocks,
    block_h, block_w, pad_h, pad_w,
    BLOCK_PIX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK_K: tl.constexpr,
    WRITE_CODES: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    i = tl.arange(0, BLOCK_PIX)
    in_block = i < block_h * block_w
    y = (block // blocks_w) * block_h + i // block_w - pad_h
    x = (block % blocks_w) * block_w + i % block_w - pad_w
    inside = in_block & (y >= 0) & (y < height) & (x >= 0) & (x < width)
    pixel = (y * width + x).to(tl.int64)
    column = tl.arange(0, BLOCK_K)
    # every centre's distance at once, so each feature chunk is read once (not once per centre); each
    # (pixel, centre) sum still grows chunk by chunk in the same order: the same floats as centre by centre
    dist = tl.zeros((BLOCK_PIX, BLOCK_K), dtype=tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < channels
        feats = tl.load(feat_ptr + (b * channels + c[None, :]) * height * width + pixel[:, None],
                        mask=inside[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        for j in tl.static_range(BLOCK_K):
            centre = tl.load(center_ptr + j * channels + c, mask=c_ok & (j < centers), other=0.0).to(tl.float32)
            diff = tl.where(c_ok[None, :], feats - centre[None, :], 0.0)
            dist = tl.where(column[None, :] == j, dist + tl.sum(diff * diff, axis=1)[:, None], dist)
    dist = tl.where(column[None, :] < centers, dist, float("inf"))
    best = tl.min(dist, axis=1)
    # the first centre at the smallest distance (ties to the first, as the reference)
    code = tl.min(tl.where(dist == best[:, None], column[None, :], BLOCK_K), axis=1)
    value = tl.where(inside, code + 1, 0)  # padding counts in bin 0
    bins = tl.arange(0, BLOCK_BINS)
    counts = tl.sum(((value[:, None] == bins[None, :]) & in_block[:, None]).to(tl.float32), axis=0)
    hist_offs = (b * blocks + block) * (centers + 1) + bins
    tl.store(hist_ptr + hist_offs, counts / (block_h * block_w), mask=bins < centers + 1)
    if WRITE_CODES:
        tl.store(code_ptr + b * height * width + pixel, code.to(tl.int64), mask=inside)


@triton.jit
def _trimmed_topk_kernel(
    query_ptr, own_ptr, table_ptr, bank_ptr, key_ptr, queries, entries, blocks, bins, drop, n_bank_blocks,
    USE_KL: tl.constexpr, COUNTS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_BINS: tl.constexpr, CAND: tl.constexpr, PADDED: tl.constexpr,
):
    # PADDED: every block of a bank entry is BLOCK_BINS wide in memory (zero counts past ``bins``), so a
    # block's bins are one aligned vector load (16 bytes of uint8 counts) instead of ``bins`` single bytes
    pid_r = tl.program_id(1)
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    col = tl.arange(0, BLOCK_R)
    r = pid_r * BLOCK_R + col
    k = tl.arange(0, BLOCK_BINS)
    lanes = tl.arange(0, BLOCK_D)
    q_ok, r_ok, k_ok = q < queries, r < entries, k < bins
    total = tl.zeros((BLOCK_Q, BLOCK_R), dtype=tl.float32)
    # the ``drop`` largest block distances so far (unused lanes +inf: never the smallest, never summed)
    largest = tl.where(lanes[None, None, :] < drop, float("-inf"), float("inf")) + \
        tl.zeros((BLOCK_Q, BLOCK_R, BLOCK_D), dtype=tl.float32)
    for l in range(blocks):
        qh = tl.load(query_ptr + (q[:, None].to(tl.int64) * blocks + l) * bins + k[None, :],
                     mask=q_ok[:, None] & k_ok[None, :], other=0.0)
        if PADDED:
            data = tl.load(bank_ptr + (r[:, None].to(tl.int64) * blocks + l) * BLOCK_BINS + k[None, :],
                           mask=r_ok[:, None], other=0)
        else:
            data = tl.load(bank_ptr + (r[:, None].to(tl.int64) * blocks + l) * bins + k[None, :],
                           mask=r_ok[:, None] & k_ok[None, :], other=0)
        if USE_KL:
            # KL(q || r) = sum (q+eps) log(q+eps) - sum (q+eps) log(r+eps): the first sum per query
            # (own), the logarithms of a count from a table (counts are integers up to a block's area)
            if COUNTS:
                log_r = tl.load(table_ptr + data.to(tl.int32))
            else:
                log_r = tl.log(data + _EPS)
            cross = tl.sum(tl.where(k_ok[None, None, :], qh[:, None, :] * log_r[None, :, :], 0.0), axis=2)
            own = tl.load(own_ptr + q.to(tl.int64) * blocks + l, mask=q_ok, other=0.0)
            d = own[:, None] - cross
        else:
            rh = tl.load(table_ptr + data.to(tl.int32)) if COUNTS else data  # count / area, from the table
            diff = qh[:, None, :] - rh[None, :, :]
            d = tl.sqrt(tl.sum(diff * diff, axis=2))
        total += d
        # d replaces the smallest of the kept largest when it is larger (ties: any one of equal values)
        smallest = tl.min(largest, axis=2)
        lane = tl.argmin(largest, axis=2)
        swap = (lanes[None, None, :] == lane[:, :, None]) & (d > smallest)[:, :, None]
        largest = tl.where(swap, d[:, :, None], largest)
    trimmed = total - tl.sum(tl.where(lanes[None, None, :] < drop, largest, 0.0), axis=2)
    trimmed = tl.where(r_ok[None, :], tl.maximum(trimmed, 0.0), float("inf"))  # rounding may dip below 0
    bits = trimmed.to(tl.int32, bitcast=True).to(tl.int64)
    keys = tl.sort((bits << 32) | r[None, :].to(tl.int64), dim=1)
    out = (q[:, None].to(tl.int64) * n_bank_blocks + pid_r) * CAND + col[None, :]
    tl.store(key_ptr + out, keys, mask=q_ok[:, None] & (col[None, :] < CAND))


def _warps_valid(config: dict) -> bool:
    return config["num_warps"] in (1, 2, 4, 8, 16)


def histogram_problem(features, centers) -> str:
    batch, channels, height, width = features.shape
    return autotune.problem_key(h=height, w=width, c=autotune.bucket(channels), centers=centers.shape[0],
                                b=autotune.bucket(batch), dtype=str(features.dtype).split(".")[-1])


def histogram_space(channels: int) -> list:
    return [dict(BLOCK_C=c, num_warps=w) for c in (16, 32, 64, 128) for w in (2, 4, 8)
            if c <= max(16, triton.next_power_of_2(channels))]


def histogram_default(channels: int) -> dict:
    # sm_90, a 7x7 block (64 pixels), 12 centres: 80 registers, no spill (BLOCK_C 64 with 4 warps spilled 112 bytes)
    return dict(BLOCK_C=min(32, triton.next_power_of_2(channels)), num_warps=8)


def _histogram_valid(config: dict, block_pix: int = 64) -> bool:
    # registers: the [BLOCK_PIX, BLOCK_C] feature chunk per thread, beside the [BLOCK_PIX, BLOCK_K] distances
    # (kstats, sm_90, 64 pixels: 16 values a thread compile to 168-190 registers, 32 spill)
    per_thread = block_pix * config["BLOCK_C"] // (32 * config["num_warps"])
    return _warps_valid(config) and config["BLOCK_C"] in (16, 32, 64, 128) and per_thread <= 16


def block_histograms(features, centers, S: int = 5, return_codes: bool = False, config: dict | None = None):
    batch, channels, height, width = features.shape
    block_h, block_w, pad_h, pad_w, blocks_h, blocks_w = block_layout(height, width, S)
    count = centers.shape[0]
    hist = torch.empty(batch, blocks_h * blocks_w, count + 1, device=features.device)
    codes = torch.empty(batch, height, width, dtype=torch.int64, device=features.device)
    grid = (batch, blocks_h * blocks_w)
    cfg = config or autotune.choose("block_histograms", histogram_problem(features, centers), features.device,
                                    histogram_default(channels),
                                    lambda c: _histogram_valid(c, triton.next_power_of_2(block_h * block_w)))
    _block_histogram_kernel[grid](
        features.contiguous(), centers.contiguous(), hist, codes,
        channels, height, width, count, blocks_w, blocks_h * blocks_w, block_h, block_w, pad_h, pad_w,
        BLOCK_PIX=triton.next_power_of_2(block_h * block_w), BLOCK_BINS=triton.next_power_of_2(count + 1),
        BLOCK_K=triton.next_power_of_2(count), WRITE_CODES=return_codes, **cfg,
    )
    return (hist, codes) if return_codes else hist


def topk_problem(queries: int, entries: int, blocks: int, bins: int, k: int, method: str) -> str:
    return autotune.problem_key(q=autotune.bucket(queries), r=autotune.bucket(entries), blocks=blocks, bins=bins,
                                k=autotune.bucket(k), method=method)


def topk_valid(config: dict, blocks: int) -> bool:
    bq, br = config["BLOCK_Q"], config["BLOCK_R"]
    pow2 = all(isinstance(v, int) and v >= 1 and v & (v - 1) == 0 for v in (bq, br))
    # registers: the [BLOCK_Q, BLOCK_R, BLOCK_D] largest block distances and the [BLOCK_Q, BLOCK_R, BLOCK_BINS]
    # products of one block
    return pow2 and br >= 16 and bq * br <= 1024 and _warps_valid(config)


def topk_default(queries: int) -> dict:
    return dict(BLOCK_Q=min(16, triton.next_power_of_2(queries)), BLOCK_R=32, num_warps=4)


def topk_space(queries: int, blocks: int) -> list:
    space = [dict(BLOCK_Q=bq, BLOCK_R=br, num_warps=w) for bq in (1, 2, 4, 8, 16) for br in (16, 32, 64, 128)
             for w in (2, 4, 8) if bq <= triton.next_power_of_2(queries)]
    return [c for c in space if topk_valid(c, blocks)]


def padded_counts(counts: torch.Tensor) -> torch.Tensor:
    """``[R, L, bins]`` counts laid out ``[R, L, next_pow2(bins)]`` with zero counts past ``bins``: each
    block's bins one aligned vector load (13 bins: 16 bytes; the bank grows by 23%)."""
    width = triton.next_power_of_2(counts.shape[2])
    return torch.nn.functional.pad(counts, (0, width - counts.shape[2])).contiguous()


def retrieve_topk(query_hist, bank_counts, area: int, k: int, l_ratio: float, method: str, config: dict | None = None):
    """``bank_counts [R, L, bins]``, or ``[R, L, next_pow2(bins)]`` as ``padded_counts`` lays it out."""
    queries, blocks, bins = query_hist.shape
    entries = bank_counts.shape[0]
    padded = bank_counts.shape[2] != bins
    cfg = config or autotune.choose("retrieve_topk", topk_problem(queries, entries, blocks, bins, k, method),
                                    query_hist.device, topk_default(queries), lambda c: topk_valid(c, blocks))
    block_q, block_r = cfg["BLOCK_Q"], cfg["BLOCK_R"]
    cand = min(block_r, triton.next_power_of_2(k))
    n_bank_blocks = triton.cdiv(entries, block_r)
    keys = torch.empty(queries, n_bank_blocks * cand, dtype=torch.int64, device=query_hist.device)
    grid = (triton.cdiv(queries, block_q), n_bank_blocks)
    query, own, table, counts = _topk_operands(query_hist, bank_counts, area, method)
    drop = blocks - int(blocks * l_ratio)
    _trimmed_topk_kernel[grid](
        query, own, table, bank_counts.contiguous(), keys, queries, entries, blocks, bins, drop, n_bank_blocks,
        USE_KL=method == "kl", COUNTS=counts, BLOCK_D=triton.next_power_of_2(max(drop, 1)),
        BLOCK_BINS=triton.next_power_of_2(bins), CAND=cand, PADDED=padded, **cfg,
    )
    best = torch.topk(keys, min(k, keys.shape[1]), dim=1, largest=False).values  # (distance, index) order
    distances = (best >> 32).to(torch.int32).view(torch.float32)
    return distances, best & 0xFFFFFFFF


def _topk_operands(query_hist, bank_counts, area: int, method: str):
    """What the kernel reads besides the bank: the query (plus eps for KL), its own sum per block
    (KL), and the per-count table (log(count / area + eps) for KL, count / area for L2) when the bank
    holds integer counts."""
    query = query_hist.float()
    counts = not bank_counts.is_floating_point()
    own = query.new_zeros(1)
    if method == "kl":
        query = query + KL_EPS
        own = (query * torch.log(query)).sum(dim=2).contiguous()  # [Q, L]
    table = query.new_zeros(1)
    if counts:
        table = count_table(area, method, query.device)
    return query.contiguous(), own, table, counts


def _same_ranking(expected, got) -> bool:
    return torch.equal(expected[1], got[1]) and torch.allclose(expected[0], got[0], atol=1e-6, rtol=1e-6)


def tune_topk(query_hist, bank_counts, area: int, k: int, l_ratio: float = 0.8, method: str = "kl",
              space: list | None = None, limit: int | None = None, save: bool = True, timer=None):
    """Tune ``retrieve_topk`` for this query count, bank size and k (the ranking must not change)."""
    queries, blocks, bins = query_hist.shape
    default = topk_default(queries)
    space = [c for c in (space or topk_space(queries, blocks)) if c != default][:limit]
    return autotune.tune("retrieve_topk", topk_problem(queries, bank_counts.shape[0], blocks, bins, k, method),
                         query_hist.device, space, default,
                         lambda cfg: retrieve_topk(query_hist, bank_counts, area, k, l_ratio, method, cfg),
                         _same_ranking, timer=timer, save=save)


def tune_histograms(features, centers, S: int = 5, space: list | None = None, save: bool = True, timer=None):
    """Tune ``block_histograms`` for this feature shape (the codes must not change)."""
    default = histogram_default(features.shape[1])
    block_h, block_w, *_ = block_layout(*features.shape[2:], S)
    pixels = triton.next_power_of_2(block_h * block_w)
    space = [c for c in (space or histogram_space(features.shape[1])) if c != default and _histogram_valid(c, pixels)]
    return autotune.tune("block_histograms", histogram_problem(features, centers), features.device, space, default,
                         lambda cfg: block_histograms(features, centers, S, True, cfg),
                         lambda e, g: torch.equal(e[1], g[1]) and torch.allclose(e[0], g[0]), timer=timer, save=save)
