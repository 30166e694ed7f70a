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

import numpy as np
import torch

from . import POOL

try:
    import numba
except ImportError:  # the elementwise torch path serves without it
    numba = None

# Bank entries a tile holds side by side: the innermost loops run over a tile's lanes, which the
# compiler turns into vector instructions (16 float32 lanes a zmm register, 4 of them).
TILE = 64
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


def _vector_lookups() -> bool:
    """Whether the compiled code may use AVX-512 permutes: the host has them and numba compiles for the host."""
    if numba is None or numba.config.CPU_NAME is not None or numba.config.CPU_FEATURES is not None:
        return False
    import llvmlite.binding

    return bool(llvmlite.binding.get_host_cpu_features().get("avx512f", False))


# Queries whose accumulators stay in registers while a tile's block is scanned (4 x 4 zmm registers).
GROUP = 4


def _block_distances(table, used, codes, query, own, first, group, block, use_kl, out):  # pragma: no cover
    """``out[g, j]`` for ``g < group``: block ``block``'s distance between query ``first + g`` and lane ``j``
    of a tile (``codes``: the tile's ``[L, bins, TILE]`` counts, flat). KL: ``own[q, block] - sum_b
    q_b * table[count_b]``, L2: ``sqrt(sum_b (q_b - table[count_b])^2)``, bin by bin from 0, every product
    rounded before it is added (no fused multiply-add). Compiled code only: see the overload."""
    raise NotImplementedError("compiled code only")


if numba is not None:
    from llvmlite import ir
    from numba.core import cgutils
    from numba.extending import intrinsic, overload

    def _permuted_block(sub_tables: int):
        """``_block_distances`` on AVX-512, as an intrinsic: per bin, the tile's 64 counts are looked up 16
        at a time in the first ``32 * sub_tables`` table entries held in registers (``vpermi2ps`` picks
        among 32 entries; a count's bits above 5 choose the pair of registers), and one query, or a group
        of up to ``GROUP`` sharing each lookup, accumulates in registers: one store per query and block.
        The same floats, in the same order, as the scalar loop (4.4x as many lookups a cycle as scalar
        loads here, and no per-bin memory traffic)."""

        @intrinsic
        def block_distances(typingctx, table, codes, query, own, first, group, block, use_kl, out):
            def codegen(context, builder, signature, args):
                arrays = {i: context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 1, 2, 3, 8)}
                first_q, group_n, layer, kl_flag = args[4], args[5], args[6], args[7]
                _, blocks, bins = cgutils.unpack_tuple(builder, arrays[2].shape, 3)
                i32, i64 = ir.IntType(32), ir.IntType(64)
                floats, ints, bytes_ = (ir.VectorType(t, 16) for t in (ir.FloatType(), i32, ir.IntType(8)))
                permute = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(floats, [floats, ints, floats]), "llvm.x86.avx512.vpermi2var.ps.512")
                sqrt = cgutils.get_or_insert_function(builder.module, ir.FunctionType(floats, [floats]), "llvm.sqrt.v16f32")
                rows = builder.bitcast(arrays[0].data, floats.as_pointer())
                registers = [builder.load(builder.gep(rows, [ir.Constant(i64, i)]), align=4) for i in range(2 * sub_tables)]

                def splat(value):
                    one = builder.insert_element(ir.Constant(floats, ir.Undefined), value, ir.Constant(i32, 0))
                    return builder.shuffle_vector(one, ir.Constant(floats, ir.Undefined), ir.Constant(ints, [0] * 16))

                def lookup(offset):  # 16 counts at codes[offset] through the table
                    at = builder.bitcast(builder.gep(arrays[1].data, [offset]), bytes_.as_pointer())
                    index = builder.zext(builder.load(at, align=1), ints)
                    found = builder.call(permute, [registers[0], index, registers[1]])
                    pair = builder.lshr(index, ir.Constant(ints, [5] * 16))
                    for s in range(1, sub_tables):
                        here = builder.icmp_unsigned("==", pair, ir.Constant(ints, [s] * 16))
                        found = builder.select(here, builder.call(permute, [registers[2 * s], index,
                                                                            registers[2 * s + 1]]), found)
                    return found

                def emit(size: int, use_kl: bool):
                    # queries past the group read its last row (in bounds); their sums are not stored
                    last = builder.sub(builder.add(first_q, group_n), ir.Constant(i64, 1))
                    rows_q = [builder.select(builder.icmp_signed("<", builder.add(first_q, ir.Constant(i64, g)), last),
                                             builder.add(first_q, ir.Constant(i64, g)), last) for g in range(size)]
                    sums = [[cgutils.alloca_once_value(builder, ir.Constant(floats, None)) for _ in range(4)]
                            for _ in range(size)]
                    with cgutils.for_range(builder, bins) as loop:
                        base = builder.mul(builder.add(builder.mul(layer, bins), loop.index), ir.Constant(i64, 64))
                        values = [lookup(builder.add(base, ir.Constant(i64, 16 * c))) for c in range(4)]
                        for g in range(size):
                            at = builder.add(builder.mul(builder.add(builder.mul(rows_q[g], blocks), layer), bins),
                                             loop.index)
                            weight = splat(builder.load(builder.gep(arrays[2].data, [at])))
                            for c in range(4):
                                diff = values[c] if use_kl else builder.fsub(weight, values[c])
                                term = builder.fmul(weight if use_kl else diff, diff)
                                builder.store(builder.fadd(builder.load(sums[g][c]), term), sums[g][c])
                    out_rows = builder.bitcast(arrays[8].data, floats.as_pointer())
                    for g in range(size):
                        own_at = builder.add(builder.mul(rows_q[g], blocks), layer)
                        own_value = splat(builder.load(builder.gep(arrays[3].data, [own_at]))) if use_kl else None
                        for c in range(4):
                            total = builder.load(sums[g][c])
                            result = builder.fsub(own_value, total) if use_kl else builder.call(sqrt, [total])
                            builder.store(result, builder.gep(out_rows, [ir.Constant(i64, 4 * g + c)]), align=4)

                is_kl = builder.icmp_unsigned("!=", kl_flag, ir.Constant(kl_flag.type, 0))
                with builder.if_else(builder.icmp_signed("==", group_n, ir.Constant(i64, 1))) as (one, many):
                    for size, branch in ((1, one), (GROUP, many)):
                        with branch:
                            with builder.if_else(is_kl) as (kl, l2):
                                with kl:
                                    emit(size, True)
                                with l2:
                                    emit(size, False)
                return context.get_dummy_value()

            intp = numba.types.intp
            return numba.types.void(table, codes, query, own, intp, intp, intp, numba.types.boolean, out), codegen

        return block_distances

    _block_64, _block_256 = _permuted_block(2), _permuted_block(8)

    @numba.njit(cache=True, boundscheck=False, nogil=True)
    def _scalar_block_distances(table, codes, query, own, first, group, block, use_kl, out):  # pragma: no cover
        bins = query.shape[2]
        for g in range(group):
            q = first + g
            out[g, :] = 0
            for b in range(bins):
                x = query[q, block, b]
                base = (block * bins + b) * TILE
                if use_kl:
                    for j in range(TILE):
                        out[g, j] += x * table[codes[base + j]]
                else:
                    for j in range(TILE):
                        diff = x - table[codes[base + j]]
                        out[g, j] += diff * diff
            for j in range(TILE):
                out[g, j] = own[q, block] - out[g, j] if use_kl else np.sqrt(out[g, j])

    @overload(_block_distances)
    def _block_distances_overload(table, used, codes, query, own, first, group, block, use_kl, out):
        # chosen when the kernel compiles: the permutes on AVX-512 hosts for uint8 counts, scalar loads
        # otherwise. The permutes read 64 or 256 table entries (count_table has at least 256) and are
        # right for counts below that: the bank's counts are checked against its area when it is tiled.
        if not (_vector_lookups() and codes.dtype == numba.types.uint8 and TILE == 64):
            def scalar(table, used, codes, query, own, first, group, block, use_kl, out):
                _scalar_block_distances(table, codes, query, own, first, group, block, use_kl, out)
            return scalar

        def permuted(table, used, codes, query, own, first, group, block, use_kl, out):
            if table.shape[0] < 256 or used > 256:
                _scalar_block_distances(table, codes, query, own, first, group, block, use_kl, out)
            elif used <= 64:
                _block_64(table, codes, query, own, first, group, block, use_kl, out)
            else:
                _block_256(table, codes, query, own, first, group, block, use_kl, out)
        return permuted

    @numba.njit(parallel=True, cache=True, boundscheck=False, nogil=True)
    def _scan_kernel(tiled, first_tile, query, own, table, used, drop, use_kl, out):  # pragma: no cover
        tiles = out.shape[1] // TILE
        queries, blocks, bins = query.shape
        for t in numba.prange(tiles):
            codes = tiled[first_tile + t].reshape(blocks * bins * TILE)
            distances = np.empty((GROUP, TILE), np.float32)
            total = np.empty((GROUP, TILE), np.float32)
            largest = np.empty((GROUP, max(drop, 1), TILE), np.float32)
            for first in range(0, queries, GROUP):
                group = min(GROUP, queries - first)
                total[:] = 0
                largest[:] = -np.inf
                for l in range(blocks):
                    _block_distances(table, used, codes, query, own, first, group, l, use_kl, distances)
                    for g in range(group):
                        for j in range(TILE):
                            total[g, j] += distances[g, j]
                        # insertion into the drop largest (descending): the displaced value moves on down
                        for i in range(drop):
                            for j in range(TILE):
                                kept, value = largest[g, i, j], distances[g, j]
                                larger = value > kept
                                largest[g, i, j] = value if larger else kept
                                distances[g, j] = kept if larger else value
                for g in range(group):
                    for j in range(TILE):
                        trimmed = total[g, j]
                        for i in range(drop):
                            trimmed -= largest[g, i, j]
                        out[first + g, t * TILE + j] = trimmed


def trimmed_distances(query: torch.Tensor, own: torch.Tensor, tiled: torch.Tensor, table: torch.Tensor,
                      used: int, first_tile: int, tiles: int, drop: int, method: str) -> torch.Tensor:
    """``[Q, tiles * TILE]`` trimmed distances of bank tiles ``first_tile ..`` (entries past the bank's
    end included: the caller cuts them). ``query [Q, L, bins]`` (plus eps for KL) and ``own [Q, L]``
    float32 as the torch path computes them; ``used``: the table entries a count may index (area + 1)."""
    out = np.empty((query.shape[0], tiles * TILE), np.float32)
    with POOL:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        _scan_kernel(tiled.numpy(), first_tile, query.contiguous().numpy(), own.contiguous().numpy(),
                     table.numpy(), used, drop, method == "kl", out)
    return torch.from_numpy(out)


def retrieve_topk(query_hist: torch.Tensor, tiled: torch.Tensor, entries: int, area: int, k: int, l_ratio: float,
                  method: str):
    """The ``k`` nearest of the first ``entries`` entries of a ``tiled_counts`` bank: ``(distances [Q, k],
    indices [Q, k])`` ascending, ties to the lower index (as ``torch_ops.retrieval.retrieve_topk``)."""
    from ..torch_ops.retrieval import count_table, merge_topk, query_terms

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
