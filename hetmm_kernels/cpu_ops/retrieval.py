"""CPR's trimmed-KL top-K over a compact bank, compiled for the CPU (numba).

The elementwise torch path (``torch_ops.retrieval``) makes ~30 passes over ``[L, Q, chunk]`` planes
and takes a logarithm of every bank count on every call: 0.25 GB/s of the compact bank on 2 cores.
Here one compiled pass streams the bank once: the bank is laid out in tiles of ``TILE`` entries side
by side (``tiled_counts``: ``[tiles, L, bins, TILE]``, built once per bank), each tile's counts become
their logarithms through a table (a count is an integer up to a block's area), and every lane (bank
entry) then runs the same fixed sequence as the torch path: per block ``own - sum_b q_b log r_b`` bin by
bin, the block distances added in block order, the ``drop`` largest kept by insertion and subtracted
largest first. So a pair's distance does not depend on its tile, its lane, the batch or how the bank is
sharded (rankings merge exactly across shards). KL distances equal the torch path's to the bit; L2's
differ by an ulp where torch's float32 square root (not always correctly rounded on AVX-512 CPUs) does
(tests/test_retrieval.py checks both).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

try:
    import numba
except ImportError:  # the elementwise torch path serves without it
    numba = None

# Bank entries a tile holds side by side: the innermost loops run over a tile's lanes, which the
# compiler turns into vector instructions (16 float32 lanes a zmm register, 4 of them).
TILE = 64
# numba's default thread pool (workqueue) must not be entered by two threads at once; a scan uses
# every core anyway, so concurrent callers take turns.
_POOL = threading.Lock()
# Distances one scan call writes ([Q, entries] float32): a chunk of the bank at a time beyond this.
SCAN_ELEMENTS = 1 << 22


def available() -> bool:
    return numba is not None


def tiled_counts(counts: torch.Tensor, area: int) -> torch.Tensor:
    """``[R, L, bins]`` integer counts as ``[ceil(R / TILE), L, bins, TILE]`` (zero past R)."""
    if counts.dtype != torch.uint8 and (counts.min() < 0 or counts.max() > area):
        raise ValueError(f"bank counts must lie in [0, area={area}]; got {int(counts.min())}..{int(counts.max())}")
    entries, blocks, bins = counts.shape
    padded = torch.nn.functional.pad(counts.cpu(), (0, 0, 0, 0, 0, -entries % TILE))
    return padded.view(-1, TILE, blocks, bins).permute(0, 2, 3, 1).contiguous()


def count_table(area: int, method: str) -> torch.Tensor:
    """float32 per count ``c`` (every uint8 value, at least): ``log(c / area + eps)`` for KL, ``c / area``
    for L2, with the torch path's operations in its order (division, then the epsilon, then the log)."""
    from ..reference import KL_EPS

    values = torch.arange(max(256, area + 1), dtype=torch.float32) / area
    return torch.log(values + KL_EPS) if method == "kl" else values


if numba is not None:
    @numba.njit(parallel=True, cache=True, boundscheck=False, nogil=True)
    def _scan_kernel(tiled, first_tile, query, own, table, drop, use_kl, out):  # pragma: no cover - compiled
        tiles = out.shape[1] // TILE
        queries, blocks, bins = query.shape
        for t in numba.prange(tiles):
            tile = tiled[first_tile + t]
            values = np.empty((blocks, bins, TILE), np.float32)  # the tile's counts through the table
            for l in range(blocks):
                for b in range(bins):
                    for j in range(TILE):
                        values[l, b, j] = table[tile[l, b, j]]
            total = np.empty(TILE, np.float32)
            block = np.empty(TILE, np.float32)
            largest = np.empty((max(drop, 1), TILE), np.float32)
            for q in range(queries):
                total[:] = 0
                largest[:] = -np.inf
                for l in range(blocks):
                    block[:] = 0
                    for b in range(bins):
                        x = query[q, l, b]
                        if use_kl:
                            for j in range(TILE):
                                block[j] += x * values[l, b, j]
                        else:
                            for j in range(TILE):
                                diff = x - values[l, b, j]
                                block[j] += diff * diff
                    if use_kl:
                        for j in range(TILE):
                            block[j] = own[q, l] - block[j]
                    else:
                        for j in range(TILE):
                            block[j] = np.sqrt(block[j])
                    for j in range(TILE):
                        total[j] += block[j]
                    # insertion into the drop largest (descending): the displaced value moves on down
                    for i in range(drop):
                        for j in range(TILE):
                            kept, value = largest[i, j], block[j]
                            larger = value > kept
                            largest[i, j] = value if larger else kept
                            block[j] = kept if larger else value
                for j in range(TILE):
                    trimmed = total[j]
                    for i in range(drop):
                        trimmed -= largest[i, j]
                    out[q, t * TILE + j] = trimmed


def trimmed_distances(query: torch.Tensor, own: torch.Tensor, tiled: torch.Tensor, table: torch.Tensor,
                      first_tile: int, tiles: int, drop: int, method: str) -> torch.Tensor:
    """``[Q, tiles * TILE]`` trimmed distances of bank tiles ``first_tile ..`` (entries past the bank's
    end included: the caller cuts them). ``query [Q, L, bins]`` (plus eps for KL) and ``own [Q, L]``
    float32 as the torch path computes them."""
    out = np.empty((query.shape[0], tiles * TILE), np.float32)
    with _POOL:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        _scan_kernel(tiled.numpy(), first_tile, query.contiguous().numpy(), own.contiguous().numpy(),
                     table.numpy(), drop, method == "kl", out)
    return torch.from_numpy(out)


def retrieve_topk(query_hist: torch.Tensor, tiled: torch.Tensor, entries: int, area: int, k: int, l_ratio: float,
                  method: str):
    """The ``k`` nearest of the first ``entries`` entries of a ``tiled_counts`` bank: ``(distances [Q, k],
    indices [Q, k])`` ascending, ties to the lower index (as ``torch_ops.retrieval.retrieve_topk``)."""
    from ..torch_ops.retrieval import merge_topk, query_terms

    blocks = query_hist.shape[1]
    drop = blocks - int(blocks * l_ratio)
    query, own = query_terms(query_hist.float().cpu(), method)
    table = count_table(area, method)
    step = max(1, SCAN_ELEMENTS // (query.shape[0] * TILE))  # tiles per call
    best_d = best_i = None
    for first in range(0, tiled.shape[0], step):
        tiles = min(step, tiled.shape[0] - first)
        dist = trimmed_distances(query, own, tiled, table, first, tiles, drop, method)
        start = first * TILE
        best_d, best_i = merge_topk(best_d, best_i, dist[:, :min(entries - start, tiles * TILE)], start, k)
    return best_d, best_i
