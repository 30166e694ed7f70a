"""Int8 template matching compiled for CPUs with AVX512-VNNI (numba, the products as ``vpdpbusd``).

The lanes of a vector register run over *templates*: for one template pixel ``p`` and one query pixel, 16
templates' similarities are accumulated at once (``lanes [P, KB, TP]``: the ``T`` templates' int8 features at
``p``, four channels to an int32, padded to ``TP`` lanes), so every product computed is one the result needs:
only the pairs inside the window are visited (the float path multiplies whole tile unions, a fraction
``k^2 / U`` of them useful). The products never leave the registers: the window's maxima over templates are
taken there, then folded into the forward map of the query pixel and the backward map of the template pixel.
Up to ``GROUP`` consecutive query pixels share every template load, up to four template vectors at a time
(fewer for larger groups: every accumulator stays in a register); lanes are padded to a multiple of 8, a last
half vector running on 256-bit registers.

``vpdpbusd`` multiplies unsigned by signed bytes: the query is stored with 128 added (``u = q + 128``), and
every template pixel's accumulator starts from ``-128 * sum(t)`` so that the sum is exactly ``sum(q * t)``.
Then ``similarity = sum * s_t * s_q + bias`` per lane in float32, padding lanes at ``-inf``.

Rows (``global_match``: every query pixel against a set of template pixels wherever they lie) use the same
micro-kernel with all rows as the lanes of one "pixel".
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import numpy as np
import torch

from . import POOL

try:
    import numba
except ImportError:  # the dequantised torch path serves without it
    numba = None

LANES = 16  # 32-bit lanes of a 512-bit register
HALF = 8  # lanes are padded to a multiple of this: a last half vector runs on 256-bit registers (40 templates:
# 2.5 vectors, not 3; 256-bit VNNI costs half a 512-bit one on Zen 4)
GROUP = 6  # at most this many query pixels share each template load (measured best on lite0 layers: 5-6)
OFFSET = 128  # added to the query's int8 values (vpdpbusd's unsigned operand)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """numba compiles here, for this host, and the host multiplies bytes with AVX512-VNNI (asked once: the
    question costs ~0.2 ms, each op asks it)."""
    if numba is None or numba.config.DISABLE_JIT:
        return False
    if numba.config.CPU_NAME is not None or numba.config.CPU_FEATURES is not None:
        return False  # compiling for another CPU (e.g. a portable cache): the host's VNNI may not be there
    import llvmlite.binding

    features = llvmlite.binding.get_host_cpu_features()
    return all(features.get(name, False) for name in ("avx512f", "avx512bw", "avx512vnni"))


class Lanes(NamedTuple):
    """A set of int8 vectors laid out for the micro-kernel, per "pixel" (template pixel, or one for rows)."""

    lanes: np.ndarray  # int32 [P, KB, TP]: four channels' bytes to an int32, TP lanes (templates) per row
    corr: np.ndarray  # int32 [P, TP]: -OFFSET * sum of each vector's values (the query's offset taken back)
    scale: np.ndarray  # float32 [P, TP]: each vector's scale (0 on padding)
    bias: np.ndarray  # float32 [P, TP]: added to each similarity (-inf on padding)
    count: int  # vectors per pixel before padding (T)


def channel_words(channels: int) -> int:
    """int32 words per vector: four channels to a word, zero-padded."""
    return -(-channels // 4)


def pack_lanes(values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> Lanes:
    """``values int8 [P, T, C]``, ``scales [P, T]``, ``bias [P, T]`` (or None) -> ``Lanes`` (host memory)."""
    pixels, count, channels = values.shape
    words, padded = channel_words(channels), -(-count // HALF) * HALF
    data = torch.zeros(pixels, padded, words * 4, dtype=torch.int8)
    data[:, :count, :channels] = values.cpu()
    lanes = data.view(pixels, padded, words, 4).permute(0, 2, 1, 3).contiguous().view(torch.int32)
    corr = -OFFSET * data.sum(2, dtype=torch.int32)
    scale = torch.zeros(pixels, padded)
    scale[:, :count] = scales.cpu().float()
    shift = torch.full((pixels, padded), float("-inf"))
    shift[:, :count] = 0 if bias is None else bias.cpu().float()
    return Lanes(lanes.view(pixels, words, padded).numpy(), corr.contiguous().numpy(), scale.numpy(),
                 shift.numpy(), count)


def template_lanes(values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> Lanes:
    """Templates ``values [T, C, H, W]`` (``scales``/``bias`` ``[T, H, W]``) as one row of lanes per pixel."""
    count, channels, height, width = values.shape
    per_pixel = values.permute(2, 3, 0, 1).reshape(height * width, count, channels)
    flat = lambda x: None if x is None else x.permute(1, 2, 0).reshape(height * width, count)  # noqa: E731
    return pack_lanes(per_pixel, flat(scales), flat(bias))


def row_lanes(values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> Lanes:
    """Rows ``values [N, C]`` (``scales``/``bias`` ``[N]``) as the lanes of a single pixel."""
    return pack_lanes(values[None], scales[None], None if bias is None else bias[None])


if numba is not None:
    from llvmlite import ir
    from numba.core import cgutils
    from numba.extending import intrinsic

    def _lanes_max(group: int):
        """The micro-kernel for ``group`` consecutive query pixels, as an intrinsic: for ``g < group``,
        ``out[g] = max over lanes l of scale[row, l] * qscale[first + g] * dot(lanes[row, :, l], query[first + g])
        + bias[row, l] + mask[image, l]`` (the mask: 0, or -inf on the lanes of templates the image may not use;
        one add per vector a call, so unmasked calls pass a row of zeros). Accumulators, template vectors and running maxima
        stay in registers (``group * width`` accumulators for ``width`` template vectors a pass: at most 25 of the
        32 vector registers); one store per query pixel."""
        width_max = 4 if group <= 4 else 3 if group <= 6 else 2

        def build(typingctx, lanes, corr, scale, bias, row, query, first, qscale, out, mask, image):
            def codegen(context, builder, signature, args):
                names = ("lanes", "corr", "scale", "bias", "row", "query", "first", "qscale", "out", "mask", "image")
                a = dict(zip(names, args))
                arrays = {n: context.make_array(signature.args[i])(context, builder, args[i])
                          for i, n in enumerate(names) if isinstance(signature.args[i], numba.types.Array)}
                i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
                const = lambda v: ir.Constant(i64, v)  # noqa: E731
                # per width (lanes): int32, float32 and byte vectors, and the VNNI / FMA intrinsics
                kinds = {}
                for lanes_n in (LANES, HALF):
                    vint, vflt = ir.VectorType(i32, lanes_n), ir.VectorType(f32, lanes_n)
                    vbyte = ir.VectorType(ir.IntType(8), 4 * lanes_n)
                    bits = 32 * lanes_n
                    kinds[lanes_n] = dict(
                        int=vint, float=vflt, byte=vbyte,
                        dot=cgutils.get_or_insert_function(builder.module, ir.FunctionType(vint, [vint, vbyte, vbyte]),
                                                           f"llvm.x86.avx512.vpdpbusd.{bits}"),
                        fma=cgutils.get_or_insert_function(builder.module, ir.FunctionType(vflt, [vflt, vflt, vflt]),
                                                           f"llvm.fma.v{lanes_n}f32"))
                vflt = kinds[LANES]["float"]
                _, words, padded = cgutils.unpack_tuple(builder, arrays["lanes"].shape, 3)
                full = builder.udiv(padded, const(LANES))  # whole vectors; then a half one if padded % 16 == 8
                slots = builder.udiv(builder.add(padded, const(HALF)), const(LANES))  # vectors, a half one counted

                def vload(name, offset, kind):
                    at = builder.gep(arrays[name].data, [offset])
                    return builder.load(builder.bitcast(at, kind.as_pointer()), align=4)

                def splat(value, kind):
                    one = builder.insert_element(ir.Constant(kind, ir.Undefined), value, ir.Constant(i32, 0))
                    index = ir.Constant(ir.VectorType(i32, kind.count), [0] * kind.count)
                    return builder.shuffle_vector(one, ir.Constant(kind, ir.Undefined), index)

                def larger(x, y):  # vmaxps (no NaN reaches here: the inputs were checked finite)
                    return builder.select(builder.fcmp_ordered(">", x, y), x, y)

                def horizontal_max(x):
                    for step in (8, 4, 2, 1):
                        swapped = builder.shuffle_vector(x, ir.Constant(vflt, ir.Undefined),
                                                         ir.Constant(ir.VectorType(i32, LANES),
                                                                     [l ^ step for l in range(LANES)]))
                        x = larger(x, swapped)
                    return builder.extract_element(x, ir.Constant(i32, 0))

                def widened(x):  # a half vector's values twice over: the maximum is the same
                    return builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(i32, LANES), list(range(HALF)) * 2))

                qrow = [builder.add(a["first"], const(g)) for g in range(group)]
                qbase = [builder.mul(r, words) for r in qrow]
                qscale = [builder.load(builder.gep(arrays["qscale"].data, [r])) for r in qrow]
                mask_base = builder.mul(a["image"], padded)
                best = [cgutils.alloca_once_value(builder, ir.Constant(vflt, [float("-inf")] * LANES))
                        for _ in range(group)]
                row_lane0 = builder.mul(a["row"], padded)  # corr / scale / bias [row, 0]
                row_word0 = builder.mul(builder.mul(a["row"], words), padded)  # lanes [row, 0, 0]

                def emit(first, width, half):
                    """One pass over the words for ``width`` whole vectors from vector ``first`` and, with ``half``,
                    the half vector after them."""
                    shapes = [LANES] * width + [HALF] * half
                    accs = [[cgutils.alloca_once(builder, kinds[n]["int"]) for n in shapes] for _ in range(group)]
                    lane0 = [builder.mul(builder.add(first, const(v)), const(LANES)) for v in range(len(shapes))]
                    for v, n in enumerate(shapes):
                        start = vload("corr", builder.add(row_lane0, lane0[v]), kinds[n]["int"])
                        for g in range(group):
                            builder.store(start, accs[g][v])
                    with cgutils.for_range(builder, words) as loop:
                        base = builder.add(row_word0, builder.mul(loop.index, padded))
                        temps = [builder.bitcast(vload("lanes", builder.add(base, lane0[v]), kinds[n]["int"]),
                                                 kinds[n]["byte"]) for v, n in enumerate(shapes)]
                        for g in range(group):
                            word = builder.load(builder.gep(arrays["query"].data, [builder.add(qbase[g], loop.index)]))
                            q = {n: builder.bitcast(splat(word, kinds[n]["int"]), kinds[n]["byte"]) for n in set(shapes)}
                            for v, n in enumerate(shapes):
                                total = builder.call(kinds[n]["dot"], [builder.load(accs[g][v]), q[n], temps[v]])
                                builder.store(total, accs[g][v])
                    for v, n in enumerate(shapes):
                        at = builder.add(row_lane0, lane0[v])
                        scale_v, bias_v = vload("scale", at, kinds[n]["float"]), vload("bias", at, kinds[n]["float"])
                        bias_v = builder.fadd(bias_v, vload("mask", builder.add(mask_base, lane0[v]), kinds[n]["float"]))
                        for g in range(group):
                            factor = builder.fmul(scale_v, splat(qscale[g], kinds[n]["float"]))
                            x = builder.call(kinds[n]["fma"], [builder.sitofp(builder.load(accs[g][v]), kinds[n]["float"]),
                                                               factor, bias_v])
                            builder.store(larger(builder.load(best[g]), x if n == LANES else widened(x)), best[g])

                with cgutils.for_range_slice(builder, const(0), slots, const(width_max)) as (first, _):
                    left, whole = builder.sub(slots, first), builder.sub(full, first)

                    def chain(width):
                        """``width`` slots this pass (the remainder's when fewer are left): whole vectors only, or
                        ``width - 1`` of them and the half vector."""
                        def this_pass():
                            with builder.if_else(builder.icmp_signed(">=", whole, const(width))) as (wholes, last):
                                with wholes:
                                    emit(first, width, 0)
                                with last:
                                    emit(first, width - 1, 1)
                        if width == 1:
                            this_pass()
                            return
                        with builder.if_else(builder.icmp_signed(">=", left, const(width))) as (wide, narrow):
                            with wide:
                                this_pass()
                            with narrow:
                                chain(width - 1)

                    chain(width_max)
                for g in range(group):
                    builder.store(horizontal_max(builder.load(best[g])), builder.gep(arrays["out"].data, [const(g)]))
                return context.get_dummy_value()

            intp = numba.types.intp
            return numba.types.void(lanes, corr, scale, bias, intp, query, intp, qscale, out, mask, intp), codegen

        return intrinsic(build)

    GROUPS = tuple(range(1, GROUP + 1))
    _KERNELS = {g: _lanes_max(g) for g in GROUPS}

    def _dispatcher():
        """``run(..., first, count, ...)``: the micro-kernel for ``count`` (1 .. GROUP) consecutive query pixels."""
        lines = ["def run(lanes, corr, scale, bias, row, query, first, count, qscale, out, mask, image):"]
        for g in GROUPS:
            lines.append(f"    {'if' if g == 1 else 'elif'} count == {g}:")
            lines.append(f"        k_{g}(lanes, corr, scale, bias, row, query, first, qscale, out, mask, image)")
        namespace = {f"k_{g}": _KERNELS[g] for g in GROUPS}
        exec("\n".join(lines), namespace)  # an if-chain over compile-time group sizes
        return numba.njit(inline="always", boundscheck=False)(namespace["run"])

    _run = _dispatcher()

    @numba.njit(cache=True, boundscheck=False, nogil=True)
    def _quantize_rows(x, out, scales):  # pragma: no cover - compiled
        """``x [N, C]`` float32 -> ``out [N, 4 * words]`` uint8 (``q + OFFSET``, padding OFFSET), ``scales [N]``:
        ``hetmm_kernels.quantized.quantize_int8``, value for value (float32 division, round half to even). One
        thread: a few microseconds a thousand pixels, less than waking the pool (four calls a predict)."""
        levels = np.float32(127.0)
        for n in range(x.shape[0]):
            peak = np.float32(0.0)
            for c in range(x.shape[1]):
                peak = max(peak, abs(x[n, c]))
            scale = peak / levels
            scales[n] = scale
            for c in range(x.shape[1]):
                value = np.rint(x[n, c] / scale) if scale > 0 else np.float32(0.0)
                out[n, c] = np.uint8(np.int32(value) + OFFSET)
            for c in range(x.shape[1], out.shape[1]):
                out[n, c] = OFFSET

    @numba.njit(parallel=True, cache=True, boundscheck=False, nogil=True)
    def _window_kernel(lanes, corr, scale, bias, query, qscale, mask, batch, height, width, fore_radius,
                       back_radius, group, fore_parts, back):  # pragma: no cover - compiled
        """Every (template pixel, query pixel) pair within ``max(fore_radius, back_radius)`` (Chebyshev, inside the
        map), for every image: ``fore_parts[t, b*HW + q]`` the largest similarity of query pixel q over the template
        pixels thread t visited within ``fore_radius`` (merged by the caller), ``back[b*HW + p]`` template pixel p's
        largest over the query pixels within ``back_radius``. A window row's query pixels are consecutive: up to
        GROUP of them per micro-kernel call. One task per template row, handed out as threads come free (the
        caller sets a chunk size of 1)."""
        reach = max(fore_radius, back_radius)
        pixels = height * width
        for i in numba.prange(height):
            out = np.empty(GROUP, np.float32)
            fore = fore_parts[numba.get_thread_id()]
            i0, i1 = max(0, i - reach), min(height - 1, i + reach)
            for j in range(width):
                j0, j1 = max(0, j - reach), min(width - 1, j + reach)
                p = i * width + j
                for b in range(batch):
                    best_back = -np.inf
                    for qi in range(i0, i1 + 1):
                        near_row = abs(qi - i)
                        start = b * pixels + qi * width
                        # the row's run of query pixels in near-equal parts of at most GROUP
                        parts = -(-(j1 + 1 - j0) // group)
                        for part in range(parts):
                            q0 = j0 + part * (j1 + 1 - j0) // parts
                            count = j0 + (part + 1) * (j1 + 1 - j0) // parts - q0
                            _run(lanes, corr, scale, bias, p, query, start + q0, count, qscale, out, mask,
                                 b if mask.shape[0] > 1 else 0)
                            for g in range(count):
                                x = out[g]
                                distance = max(near_row, abs(q0 + g - j))
                                if distance <= fore_radius and x > fore[start + q0 + g]:
                                    fore[start + q0 + g] = x
                                if distance <= back_radius and x > best_back:
                                    best_back = x
                    back[b * pixels + p] = best_back

    @numba.njit(parallel=True, cache=True, boundscheck=False, nogil=True)
    def _rows_kernel(lanes, corr, scale, bias, query, qscale, mask, pixels, best):  # pragma: no cover
        """``best[q]``: query pixel q's largest similarity over every lane (row) of ``lanes[0]``, plus its image's row
        of ``mask`` (``q // pixels``; one row of zeros for every image when unmasked). GROUP pixels of one image a call."""
        images = query.shape[0] // pixels
        runs = -(-pixels // GROUP)
        for task in numba.prange(images * runs):
            out = np.empty(GROUP, np.float32)
            b = task // runs
            first = b * pixels + (task % runs) * GROUP
            count = min(GROUP, (b + 1) * pixels - first)
            _run(lanes, corr, scale, bias, 0, query, first, count, qscale, out, mask, b if mask.shape[0] > 1 else 0)
            for g in range(count):
                best[first + g] = out[g]


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


ROWS_CHUNK = 8  # tasks (GROUP query pixels each) a thread takes at a time in the rows kernel


@contextlib.contextmanager
def _dynamic(threads: int, chunk: int = 1):
    """numba's pool at ``threads``, its parallel loops handing out ``chunk`` iterations at a time as threads come
    free: a core slowed by another process (or rows near the borders, which cost less) no longer holds the other
    waiting at the end of a statically split loop."""
    numba.set_num_threads(threads)
    previous = numba.set_parallel_chunksize(chunk)
    try:
        yield
    finally:
        numba.set_parallel_chunksize(previous)


def quantized_query(query: torch.Tensor, words: int) -> tuple[np.ndarray, np.ndarray]:
    """``query [B, C, H, W]`` float -> (``[B*H*W, words]`` int32 words of ``q + OFFSET`` bytes, ``scales [B*H*W]``),
    pixels in (b, i, j) order."""
    batch, channels, height, width = query.shape
    rows = query.permute(0, 2, 3, 1).reshape(-1, channels).float().contiguous().numpy()  # free for channels-last
    packed = np.empty((rows.shape[0], 4 * words), np.uint8)
    scales = np.empty(rows.shape[0], np.float32)
    _quantize_rows(rows, packed, scales)
    return packed.view(np.int32), scales


def lane_mask(indices: torch.Tensor | None, padded: int, owners: torch.Tensor | None = None) -> np.ndarray:
    """``[B, padded]`` float32: 0 on the lanes a query may use, -inf elsewhere (``indices [B, K]``: its templates;
    ``owners``: the template each lane belongs to, for rows; lanes are templates otherwise). ``[1, padded]`` zeros
    without indices (unused)."""
    if indices is None:
        return np.zeros((1, padded), np.float32)
    indices = indices.cpu().long()
    lanes = torch.arange(padded) if owners is None else torch.cat(
        [owners.cpu().long(), torch.full((padded - len(owners),), -1, dtype=torch.long)])
    allowed = (lanes[None, :, None] == indices[:, None, :]).any(-1)
    return torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf")).numpy()


def mutual_match(query: torch.Tensor, layout: Lanes, height: int, width: int, fore_radius: int, back_radius: int,
                 indices: torch.Tensor | None = None, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fore, back)`` float32 ``[B, H, W]`` of ``query [B, C, H, W]`` against template lanes (``template_lanes``),
    floored at -1 by the caller. ``indices [B, K]``: query b against templates ``indices[b]`` only."""
    if not 1 <= group <= GROUP:
        raise ValueError(f"group must be 1 to {GROUP} (query pixels per micro-kernel call); got {group}")
    batch = query.shape[0]
    packed, scales = quantized_query(query, layout.lanes.shape[1])
    threads = _threads()
    fore_parts = np.full((threads, batch * height * width), -np.inf, np.float32)
    back = np.empty(batch * height * width, np.float32)
    mask = lane_mask(indices, layout.lanes.shape[2])
    with POOL, _dynamic(threads):
        _window_kernel(layout.lanes, layout.corr, layout.scale, layout.bias, packed, scales, mask, batch, height, width,
                       fore_radius, back_radius, group, fore_parts, back)
    fore = torch.from_numpy(fore_parts).amax(0) if threads > 1 else torch.from_numpy(fore_parts[0])
    return fore.view(batch, height, width), torch.from_numpy(back).view(batch, height, width)


def global_match(query: torch.Tensor, layout: Lanes, indices: torch.Tensor | None = None,
                 owners: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, H, W]`` float32: each query pixel's largest similarity to the rows of ``layout`` (``row_lanes``);
    ``indices [B, K]`` with ``owners [N]``: only the rows of query b's templates."""
    batch, _, height, width = query.shape
    packed, scales = quantized_query(query, layout.lanes.shape[1])
    best = np.empty(packed.shape[0], np.float32)
    mask = lane_mask(indices, layout.lanes.shape[2], owners)
    with POOL, _dynamic(_threads(), ROWS_CHUNK):
        _rows_kernel(layout.lanes, layout.corr, layout.scale, layout.bias, packed, scales, mask, height * width, best)
    return torch.from_numpy(best).view(batch, height, width)
