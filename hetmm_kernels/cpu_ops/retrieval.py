"""CPR's trimmed-KL top-K over a compact bank, compiled for the CPU (numba).

The elementwise torch path (``torch_ops.retrieval``) makes ~30 passes over ``[L, Q, chunk]`` planes
and takes a logarithm of every bank count on every call: 0.25 GB/s of the compact bank on 2 cores.
Here one compiled pass streams the bank once: the bank is laid out in tiles of ``TILE`` entries side
by side (``tiled_counts``: ``[tiles, L, bins, TILE]``, built once per bank), each tile's counts become
their logarithms through a table (a count is an integer up to a block's area; on AVX-512 hosts 16
counts at a time by register permutes, the table held in registers), and every lane (bank
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
    """numba is installed and compiles (``NUMBA_DISABLE_JIT=1`` runs Python, which the kernel's
    intrinsics cannot)."""
    return numba is not None and not numba.config.DISABLE_JIT


def tiled_counts(counts: torch.Tensor, area: int) -> torch.Tensor:
    """``[R, L, bins]`` integer counts as ``[ceil(R / TILE), L, bins, TILE]`` (zero past R)."""
    if counts.min() < 0 or counts.max() > area:  # the table lookups index with them
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


def _vector_lookups() -> bool:
    """Whether the compiled code may use AVX-512 permutes: the host has them and numba compiles for the host."""
    if numba is None or numba.config.CPU_NAME is not None or numba.config.CPU_FEATURES is not None:
        return False
    import llvmlite.binding

    return bool(llvmlite.binding.get_host_cpu_features().get("avx512f", False))


def _tile_values(table, used, codes, values, count):  # pragma: no cover - replaced inside compiled code
    """``values[:count] = table[codes[:count]]``, every code below ``used``: a tile's counts through the
    table (see the overload)."""
    raise NotImplementedError("compiled code only")


if numba is not None:
    from llvmlite import ir
    from numba.core import cgutils
    from numba.extending import intrinsic, overload

    def _permute_lookup(sub_tables: int):
        """An intrinsic ``(table, codes, values, count)``: 16 uint8 codes at a time looked up in the first
        ``32 * sub_tables`` entries of a float32 table held in registers (``vpermi2ps`` picks among 32
        entries; the code's bits above 5 choose the pair of registers). The same floats as scalar loads,
        4x as many a cycle here (scalar loads: 2.8 G lookups/s a core; this, 64 entries: 12.3)."""

        @intrinsic
        def lookup(typingctx, table, codes, values, count):
            def codegen(context, builder, signature, args):
                table_ptr, codes_ptr, values_ptr = (
                    context.make_array(ty)(context, builder, arg).data
                    for ty, arg in zip(signature.args[:3], args[:3]))
                floats, ints, bytes_ = (ir.VectorType(t, 16) for t in (ir.FloatType(), ir.IntType(32), ir.IntType(8)))
                permute = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(floats, [floats, ints, floats]), "llvm.x86.avx512.vpermi2var.ps.512")
                rows = builder.bitcast(table_ptr, floats.as_pointer())
                registers = [builder.load(builder.gep(rows, [ir.Constant(ir.IntType(64), i)]), align=4)
                             for i in range(2 * sub_tables)]
                steps = builder.udiv(args[3], ir.Constant(args[3].type, 16))
                with cgutils.for_range(builder, steps) as loop:
                    start = builder.mul(loop.index, ir.Constant(loop.index.type, 16))
                    raw = builder.load(builder.bitcast(builder.gep(codes_ptr, [start]), bytes_.as_pointer()), align=1)
                    index = builder.zext(raw, ints)
                    found = builder.call(permute, [registers[0], index, registers[1]])
                    pair = builder.lshr(index, ir.Constant(ints, [5] * 16))
                    for s in range(1, sub_tables):
                        here = builder.icmp_unsigned("==", pair, ir.Constant(ints, [s] * 16))
                        found = builder.select(here, builder.call(permute, [registers[2 * s], index,
                                                                            registers[2 * s + 1]]), found)
                    builder.store(found, builder.bitcast(builder.gep(values_ptr, [start]), floats.as_pointer()), align=4)
                return context.get_dummy_value()

            return numba.types.void(table, codes, values, numba.types.intp), codegen

        return lookup

    _lookup_64, _lookup_256 = _permute_lookup(2), _permute_lookup(8)

    @overload(_tile_values)
    def _tile_values_overload(table, used, codes, values, count):
        # chosen when the kernel compiles: the permutes on AVX-512 hosts for uint8 counts, scalar loads
        # otherwise. The permutes read 64 or 256 table entries (count_table has at least 256) and are
        # right for codes below that: the bank's counts are checked against its area when it is tiled.
        if _vector_lookups() and codes.dtype == numba.types.uint8:
            def permuted(table, used, codes, values, count):
                if count % 16 == 0 and table.shape[0] >= 256 and used <= 256:
                    if used <= 64:
                        _lookup_64(table, codes, values, count)
                    else:
                        _lookup_256(table, codes, values, count)
                else:
                    for i in range(count):
                        values[i] = table[codes[i]]
            return permuted

        def scalar(table, used, codes, values, count):
            for i in range(count):
                values[i] = table[codes[i]]
        return scalar

if numba is not None:
    @numba.njit(parallel=True, cache=True, boundscheck=False, nogil=True)
    def _scan_kernel(tiled, first_tile, query, own, table, used, drop, use_kl, out):  # pragma: no cover
        tiles = out.shape[1] // TILE
        queries, blocks, bins = query.shape
        size = blocks * bins * TILE
        for t in numba.prange(tiles):
            values = np.empty((blocks, bins, TILE), np.float32)  # the tile's counts through the table
            _tile_values(table, used, tiled[first_tile + t].reshape(size), values.reshape(size), size)
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
                      used: int, first_tile: int, tiles: int, drop: int, method: str) -> torch.Tensor:
    """``[Q, tiles * TILE]`` trimmed distances of bank tiles ``first_tile ..`` (entries past the bank's
    end included: the caller cuts them). ``query [Q, L, bins]`` (plus eps for KL) and ``own [Q, L]``
    float32 as the torch path computes them; ``used``: the table entries a count may index (area + 1)."""
    out = np.empty((query.shape[0], tiles * TILE), np.float32)
    with _POOL:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        _scan_kernel(tiled.numpy(), first_tile, query.contiguous().numpy(), own.contiguous().numpy(),
                     table.numpy(), used, drop, method == "kl", out)
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
        dist = trimmed_distances(query, own, tiled, table, area + 1, first, tiles, drop, method)
        start = first * TILE
        best_d, best_i = merge_topk(best_d, best_i, dist[:, :min(entries - start, tiles * TILE)], start, k)
    return best_d, best_i
