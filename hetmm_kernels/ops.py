"""The public ops: validate, pick the backend, run.

Signatures and semantics follow the published extension (``forward_ATM``,
``backward_ATM``, ``PTS``); ``mutual_match`` and ``aggregate_maps`` are the fused ops
the detector uses.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch

from . import reference
from .backend import resolve
from .quantized import QuantizedRows, QuantizedTemplates, dequantize, quantize_int8
from .templates import PreparedTemplates, prepare_templates
from .torch_ops import aggregate as torch_aggregate
from .torch_ops import atm as torch_atm
from .torch_ops import global_match as torch_global
from .torch_ops import pts as torch_pts
from .torch_ops import retrieval as torch_retrieval
from .validation import all_finite, check_feature_tensor, check_same_maps, check_window, checking_values

TemplatesLike = torch.Tensor | PreparedTemplates | QuantizedTemplates


def _checked(query, temp) -> PreparedTemplates:
    check_feature_tensor("query", query, allow_empty_batch=True)
    if not isinstance(temp, (torch.Tensor, PreparedTemplates)):
        raise TypeError(
            f"temp must be a torch.Tensor [T, C, H, W] or a PreparedTemplates; got {type(temp).__name__}"
        )
    bank = prepare_templates(temp)
    check_same_maps(query, bank.shape, bank.dtype, bank.device)
    return bank


def _check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be a floating torch.dtype or None; got {out_dtype!r}")


def _triton_atm():
    from .triton_ops import atm  # imported lazily: the CPU path must not need a Triton install that works

    return atm


def _torch_layout(bank: PreparedTemplates):
    return bank.layout("torch", torch_atm.template_groups)


def _triton_layout(bank: PreparedTemplates):
    return bank.layout("triton", _triton_atm().pixel_major)


def forward_ATM(query: torch.Tensor, temp: TemplatesLike, patch: int, *, backend: str | None = None,
                return_argmax: bool = False, pixels: torch.Tensor | None = None):
    """Forward template matching: ``[B, T, H, W]`` in the query's dtype.

    ``out[b,t,i,j]`` is the largest dot product between ``query[b,:,i,j]`` and the
    features of template ``t`` inside the ``patch x patch`` window centred on (i, j)
    (clipped at the borders; an even ``patch`` acts as ``patch + 1``), floored at -1.

    ``return_argmax``: ``(out, where)``, ``where [B, T, H, W]`` int64 the template pixel ``y2 * W + x2`` of that
    largest product (ties: the first in row-major order). For explanations (``hetmm``'s nearest templates); the
    maps alone take the fast path. With it, ``pixels`` (int64 ``[P]``, flat query pixels ``y * W + x``) asks for
    those pixels only: both results are then ``[B, T, P]``.

    >>> q = torch.nn.functional.normalize(torch.randn(2, 32, 8, 8), dim=1)
    >>> forward_ATM(q, q, 3).shape
    torch.Size([2, 2, 8, 8])
    >>> out, where = forward_ATM(q, q, 3, return_argmax=True)
    >>> bool((where[0, 0] == torch.arange(64).view(8, 8)).all())  # every pixel matches itself best
    True
    """
    patch = check_window("patch", patch)
    bank = _checked(query, temp)
    impl = resolve(query.device, backend, query.dtype)
    if return_argmax:
        return _forward_argmax(query, bank, patch, impl, _checked_pixels(pixels, query))
    if pixels is not None:
        raise ValueError("pixels selects query pixels of return_argmax=True; the maps alone cover every pixel")
    if query.shape[0] == 0:
        return query.new_empty((0, len(bank), *query.shape[2:]))
    if impl == "reference":
        return reference.forward_ATM(query, bank.temp, patch)
    if impl == "torch":
        return torch_atm.forward_ATM(query, _torch_layout(bank), patch).to(query.dtype)
    return _triton_atm().forward_ATM(query, _triton_layout(bank), patch)


def _checked_pixels(pixels, query: torch.Tensor) -> torch.Tensor | None:
    if pixels is None:
        return None
    area = query.shape[2] * query.shape[3]
    if (not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.int64 or pixels.dim() != 1
            or (pixels.numel() and not (0 <= int(pixels.min()) and int(pixels.max()) < area))):
        raise ValueError(f"pixels must be a 1-D int64 tensor of flat query pixels in [0, {area}); got "
                         f"{getattr(pixels, 'dtype', type(pixels).__name__)} {tuple(getattr(pixels, 'shape', ()))}")
    return pixels.to(query.device)


def _forward_argmax(query: torch.Tensor, bank: PreparedTemplates, patch: int, impl: str, pixels):
    if query.shape[0] == 0 or (pixels is not None and not len(pixels)):
        shape = (query.shape[0], len(bank), *(query.shape[2:] if pixels is None else (0,)))
        return query.new_empty(shape), torch.empty(shape, device=query.device, dtype=torch.int64)
    if impl == "torch":  # computes only the pixels asked for
        best, where = torch_atm.forward_argmax(query, bank.temp, patch, pixels)
        return best.to(query.dtype), where
    if impl == "reference":
        best, where = reference.forward_argmax(query, bank.temp, patch)
    else:
        from .triton_ops import window_argmax

        best, where = window_argmax.forward_argmax(query, _triton_layout(bank), patch)
    if pixels is not None:
        best, where = best.flatten(2)[:, :, pixels], where.flatten(2)[:, :, pixels]
    return best.to(query.dtype), where


def backward_ATM(query: torch.Tensor, temp: TemplatesLike, patch: int, *, backend: str | None = None) -> torch.Tensor:
    """Backward (reverse) template matching: ``[B, T, H, W]`` in the query's dtype.

    ``out[b,t,i,j]`` is the largest dot product between ``temp[t,:,i,j]`` and the
    query features inside the ``patch x patch`` window centred on (i, j), floored at -1.
    """
    patch = check_window("patch", patch)
    bank = _checked(query, temp)
    impl = resolve(query.device, backend, query.dtype)
    if query.shape[0] == 0:
        return query.new_empty((0, len(bank), *query.shape[2:]))
    if impl == "reference":
        return reference.backward_ATM(query, bank.temp, patch)
    if impl == "torch":
        return torch_atm.backward_ATM(query, _torch_layout(bank), patch).to(query.dtype)
    return _triton_atm().backward_ATM(query, _triton_layout(bank), patch)


def mutual_match(query: torch.Tensor, temp: TemplatesLike, fore_patch: int, back_patch: int, *,
                 indices: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Template mutual matching: ``(fore, back)``, each ``[B, H, W]`` in the query's dtype.

    ``fore = forward_ATM(query, temp, fore_patch).amax(1)`` and
    ``back = backward_ATM(query, temp, back_patch).amax(1)``, computed in one pass
    that never builds the ``[B, T, H, W]`` maps and computes each query-template
    product once for both directions.

    ``indices [B, K]`` (optional): query ``b`` is matched only against templates
    ``indices[b]`` (the K retrieved for it), without gathering a copy of the bank.
    ``out_dtype``: the maps' dtype (default the query's); ``torch.float32`` keeps the float32
    accumulated maxima of 16-bit products unrounded (the detector asks for it).

    ``temp`` a ``QuantizedTemplates``: int8 products (``hetmm_kernels.quantized``): the query is rounded per pixel
    as the templates were, every product is exact, each template pixel's bias is added; the maps are float32 by
    default. Compiled for CPUs with AVX512-VNNI; elsewhere the same similarities from the dequantised features.

    >>> q = torch.nn.functional.normalize(torch.randn(1, 32, 8, 8), dim=1)
    >>> fore, back = mutual_match(q, q, 5, 3)
    >>> bool(torch.allclose(fore, torch.ones(1, 8, 8), atol=1e-5))
    True
    """
    fore_patch = check_window("fore_patch", fore_patch)
    back_patch = check_window("back_patch", back_patch)
    if isinstance(temp, QuantizedTemplates):
        return _int8_mutual_match(query, temp, fore_patch, back_patch, indices, out_dtype, backend)
    bank = _checked(query, temp)
    if indices is not None:
        _check_indices(indices, query.shape[0], len(bank), query.device)
    _check_out_dtype(out_dtype)
    out_dtype = out_dtype or query.dtype
    impl = resolve(query.device, backend, query.dtype)
    if query.shape[0] == 0:
        empty = query.new_empty((0, *query.shape[2:]), dtype=out_dtype)
        return empty, empty.clone()
    if indices is not None:
        if impl == "reference":
            fore, back = reference.mutual_match_subset(query, bank.temp, fore_patch, back_patch, indices)
        elif impl == "torch":
            fore, back = torch_atm.mutual_match_subset(query, bank, fore_patch, back_patch, indices)
        else:
            fore, back = _triton_atm().mutual_match(query, _triton_layout(bank), fore_patch, back_patch,
                                                    indices=indices.long())
    elif impl == "reference":
        fore, back = reference.mutual_match(query, bank.temp, fore_patch, back_patch)
    elif impl == "torch":
        fore, back = torch_atm.mutual_match(query, bank, fore_patch, back_patch)
    else:
        fore, back = _triton_atm().mutual_match(query, _triton_layout(bank), fore_patch, back_patch)
    return fore.to(out_dtype), back.to(out_dtype)


def _cpu_int8():
    """The compiled int8 kernels when they run here (numba, AVX512-VNNI), else None."""
    from .cpu_ops import int8_match  # lazily: numba's import costs ~0.14 s

    return int8_match if int8_match.available() else None


def _dequantized_query(query: torch.Tensor, biased: bool) -> torch.Tensor:
    """float32 query rounded as the int8 products round it, with a channel of ones to meet a template bias."""
    q = dequantize(*quantize_int8(query)).float()
    return torch.cat([q, torch.ones_like(q[:, :1])], 1) if biased else q


def _dequantized_templates(bank: QuantizedTemplates) -> PreparedTemplates:
    """float32 templates as the int8 products see them, the bias as one more channel (built once per set)."""
    return bank.layout("dequantized", lambda b: prepare_templates(b.with_bias_channel()))


def _int8_mutual_match(query, bank: QuantizedTemplates, fore_patch: int, back_patch: int, indices, out_dtype, backend):
    check_feature_tensor("query", query, allow_empty_batch=True)
    check_same_maps(query, bank.shape, query.dtype, bank.device)
    if indices is not None:
        _check_indices(indices, query.shape[0], len(bank), query.device)
    _check_out_dtype(out_dtype)
    out_dtype = out_dtype or torch.float32
    impl = resolve(query.device, backend)
    if query.shape[0] == 0:
        empty = query.new_empty((0, *query.shape[2:]), dtype=out_dtype)
        return empty, empty.clone()
    compiled = _cpu_int8() if impl == "torch" and query.device.type == "cpu" else None
    if impl == "reference":
        fore, back = reference.int8_mutual_match(query, bank.values, bank.scales, bank.bias, fore_patch, back_patch,
                                                 indices)
    elif compiled is not None:
        height, width = query.shape[2:]
        layout = bank.layout("cpu-int8", lambda b: compiled.template_lanes(b.values, b.scales, b.bias))
        fore, back = compiled.mutual_match(query, layout, height, width, fore_patch // 2, back_patch // 2, indices)
        fore, back = fore.clamp_min_(reference.MATCH_FLOOR), back.clamp_min_(reference.MATCH_FLOOR)
    else:  # the same similarities from the dequantised features, through this backend's float32 kernels
        fore, back = mutual_match(_dequantized_query(query, bank.bias is not None), _dequantized_templates(bank),
                                  fore_patch, back_patch, indices=indices, out_dtype=torch.float32, backend=impl)
    return fore.to(out_dtype), back.to(out_dtype)


def _int8_global_match(query: torch.Tensor, rows: QuantizedRows, out_dtype, backend) -> torch.Tensor:
    if rows.shape[1] != query.shape[1] or rows.device != query.device:
        raise ValueError(f"rows must match the query's channels and device: rows are {tuple(rows.shape)} on "
                         f"{rows.device}, the query {tuple(query.shape)} on {query.device}")
    out_dtype = out_dtype or torch.float32
    impl = resolve(query.device, backend)
    if query.shape[0] == 0:
        return query.new_empty((0, *query.shape[2:]), dtype=out_dtype)
    compiled = _cpu_int8() if impl == "torch" and query.device.type == "cpu" else None
    if impl == "reference":
        best = reference.int8_global_match(query, rows.values, rows.scales, rows.bias)
    elif compiled is not None:
        layout = rows.layout("cpu-int8", lambda r: compiled.row_lanes(r.values, r.scales, r.bias))
        best = compiled.global_match(query, layout).clamp_min_(reference.MATCH_FLOOR)
    else:
        best = global_match(_dequantized_query(query, rows.bias is not None),
                            rows.layout("dequantized", QuantizedRows.with_bias_channel), out_dtype=torch.float32,
                            backend=impl)
    return best.to(out_dtype)


def global_match(query: torch.Tensor, rows: torch.Tensor, *, out_dtype: torch.dtype | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """Forward matching without a window: ``[B, H, W]``, each query pixel's largest dot product with
    any row of ``rows [N, C]`` (template pixels wherever they lie, e.g. a coreset), floored at -1.

    ``out_dtype`` as in ``mutual_match`` (default the query's).

    >>> q = torch.nn.functional.normalize(torch.randn(1, 8, 4, 4), dim=1)
    >>> rows = q.permute(0, 2, 3, 1).reshape(16, 8)
    >>> bool(torch.allclose(global_match(q, rows), torch.ones(1, 4, 4), atol=1e-5))
    True

    ``rows`` a ``QuantizedRows``: int8 products, as ``mutual_match`` with ``QuantizedTemplates`` (float32 maps).
    """
    check_feature_tensor("query", query, allow_empty_batch=True)
    if isinstance(rows, QuantizedRows):
        _check_out_dtype(out_dtype)
        return _int8_global_match(query, rows, out_dtype, backend)
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[0] < 1:
        raise ValueError(f"rows must be a tensor [N >= 1, C] of template pixels; got "
                         f"{tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__}")
    if rows.shape[1] != query.shape[1] or rows.dtype != query.dtype or rows.device != query.device:
        raise ValueError(f"rows must match the query's channels, dtype and device: rows are {tuple(rows.shape)} "
                         f"{rows.dtype} on {rows.device}, the query {tuple(query.shape)} {query.dtype} on {query.device}")
    if checking_values() and not all_finite(rows):
        raise ValueError("rows contains NaN or inf values; features must be finite")
    _check_out_dtype(out_dtype)
    out_dtype = out_dtype or query.dtype
    impl = resolve(query.device, backend, query.dtype)
    if query.shape[0] == 0:
        return query.new_empty((0, *query.shape[2:]), dtype=out_dtype)
    if impl == "reference":
        best = reference.global_match(query, rows)
    elif impl == "torch":
        best = torch_global.global_match(query, rows)
    else:
        from .triton_ops import global_match as triton_global  # lazily, as the other Triton ops

        best = triton_global.global_match(query, rows)
    return best.to(out_dtype)


def _check_indices(indices, batch: int, count: int, device) -> None:
    integer = isinstance(indices, torch.Tensor) and not (indices.is_floating_point() or indices.is_complex())
    if not integer or indices.dtype == torch.bool or indices.dim() != 2:
        raise TypeError("indices must be an integer tensor [B, K] of template indices")
    if indices.shape[0] != batch or indices.shape[1] < 1:
        raise ValueError(f"indices must be [B={batch}, K >= 1]; got {list(indices.shape)}")
    if indices.device != device:
        raise ValueError(f"indices must be on the query's device {device}; got {indices.device}")
    if checking_values() and (int(indices.min()) < 0 or int(indices.max()) >= count):
        raise ValueError(f"indices must lie in [0, {count}) (the template count)")


# ----------------------------------------------------------------------------- aggregation


class Aggregated(NamedTuple):
    maps: torch.Tensor  # [B, 1, H, W] float32
    scores: torch.Tensor | None  # [B] float32, when an image score was asked for


def _out_size(out_size) -> tuple[int, int]:
    """A positive int or (height, width) of integers (numpy and torch integers included)."""
    bad = ValueError(f"out_size must be a positive int or (height, width); got {out_size!r}")
    try:
        size = (out_size, out_size) if not hasattr(out_size, "__len__") else tuple(out_size)
        if len(size) != 2 or any(isinstance(s, bool) for s in size):
            raise bad
        size = tuple(operator.index(s) for s in size)
    except TypeError:
        raise bad from None
    if min(size) < 1:
        raise bad
    return size


def aggregate_maps(fores, backs, alphas, ldas, out_size, *, blur=None, image_score=None,
                   backend: str | None = None) -> Aggregated:
    """Fuse the per-layer maps into one anomaly map, optionally blurred, with an image score.

    ``maps = sum_l lda_l * (alpha_l * up(1 - fores[l]) + (1 - alpha_l) * up(1 - backs[l]))``
    with ``up`` bilinear (align_corners=True) to ``out_size``; ``fores[l]``, ``backs[l]`` are
    ``[B, h_l, w_l]`` similarities as ``mutual_match`` returns them. ``blur=(sigma, k)``
    applies a normalised ``k x k`` Gaussian with zero padding ``k // 2``. ``image_score`` is
    None, ``"max"`` or an int ``k`` (mean of a ``k x k`` max-pool with stride k).
    """
    fores, backs, alphas, ldas = list(fores), list(backs), list(alphas), list(ldas)
    if not fores or not (len(fores) == len(backs) == len(alphas) == len(ldas)):
        raise ValueError(
            f"fores, backs, alphas and ldas need one entry per layer (at least one); got lengths "
            f"{len(fores)}, {len(backs)}, {len(alphas)}, {len(ldas)}"
        )
    for l, (fore, back) in enumerate(zip(fores, backs)):
        for name, x in ((f"fores[{l}]", fore), (f"backs[{l}]", back)):
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
                raise TypeError(f"{name} must be a float tensor [B, h, w]; got "
                                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
            if x.shape[0] != fores[0].shape[0] or x.device != fores[0].device:
                raise ValueError(f"{name} must share the batch size and device of fores[0]")
            if checking_values() and not all_finite(x):
                raise ValueError(f"{name} contains NaN or inf values")
        if fore.shape != back.shape:
            raise ValueError(f"fores[{l}] and backs[{l}] must have the same shape; got {tuple(fore.shape)} and {tuple(back.shape)}")
    size = _out_size(out_size)
    if blur is not None:
        if len(blur) != 2 or not float(blur[0]) > 0 or int(blur[1]) != blur[1] or int(blur[1]) < 1:
            raise ValueError(f"blur must be None or (sigma > 0, kernel size k >= 1); got {blur!r}")
        blur = (float(blur[0]), int(blur[1]))
    if image_score not in (None, "max") and not (isinstance(image_score, int) and image_score >= 1):
        raise ValueError(f"image_score must be None, 'max' or a max-pool size k >= 1; got {image_score!r}")
    alphas, ldas = [float(a) for a in alphas], [float(w) for w in ldas]
    impl = resolve(fores[0].device, backend)
    if impl == "reference":
        return Aggregated(*reference.aggregate_maps(fores, backs, alphas, ldas, size, blur, image_score))
    if impl == "torch":
        return Aggregated(*torch_aggregate.aggregate_maps(fores, backs, alphas, ldas, size, blur, image_score))
    from .triton_ops import aggregate as triton_aggregate

    return Aggregated(*triton_aggregate.aggregate_maps([f.float().contiguous() for f in fores],
                                                       [b.float().contiguous() for b in backs],
                                                       alphas, ldas, size, blur, image_score))


# ----------------------------------------------------------------------------- PTS


def PTS(temp: torch.Tensor, clus: torch.Tensor, tsize: int, *, backend: str | None = None) -> torch.Tensor:
    """Pixel-level template selection, the published op: ``[tsize, C, H, W]`` in temp's dtype.

    ``clus [N, H, W]`` holds each template's cluster id at each pixel (-1 = noise). Per pixel:
    one centre per cluster (ids in order of first appearance), else the global centre, then
    hard-normal prototypes (least similar to the picked set); ties go to the first index and
    unfilled slots stay zero. See ``hetmm_kernels.reference.PTS`` for the exact rules.
    """
    check_feature_tensor("temp", temp)
    integer = isinstance(clus, torch.Tensor) and not (clus.is_floating_point() or clus.is_complex())
    if not integer or clus.dtype == torch.bool:
        raise TypeError(f"clus must be an integer tensor [N, H, W] of cluster ids; got "
                        f"{clus.dtype if isinstance(clus, torch.Tensor) else type(clus).__name__}")
    if clus.shape != (temp.shape[0], *temp.shape[2:]):
        raise ValueError(f"clus must be [N, H, W] = {[temp.shape[0], *temp.shape[2:]]} to match temp; "
                         f"got {list(clus.shape)}")
    if clus.device != temp.device:
        raise ValueError(f"clus and temp must be on the same device: clus on {clus.device}, temp on {temp.device}")
    if clus.numel() and int(clus.min()) < -1:
        raise ValueError("clus ids must be >= 0, or -1 for noise")
    if isinstance(tsize, bool) or not isinstance(tsize, int) or tsize < 1:
        raise ValueError(f"tsize must be a positive int; got {tsize!r}")
    clus = clus.long()
    impl = resolve(temp.device, backend, temp.dtype)
    if impl == "reference":
        return reference.PTS(temp, clus, tsize)
    if impl == "torch":
        return torch_pts.PTS(temp, clus, tsize)
    from .triton_ops import pts as triton_pts

    return triton_pts.PTS(temp, clus, tsize)


# ----------------------------------------------------------------------------- retrieval (CPR)


class HistogramBank:
    """Block histograms of R reference images stored compactly as integer counts.

    ``counts [R, L, bins]`` (uint8 while a block holds at most 255 pixels, else int16) and
    ``area`` (pixels per block): a histogram is ``counts / area``.
    """

    def __init__(self, counts: torch.Tensor, area: int):
        if not isinstance(counts, torch.Tensor) or counts.dim() != 3 or counts.is_floating_point():
            raise TypeError("counts must be an integer tensor [R, L, bins]")
        if counts.shape[0] == 0:
            raise ValueError("the histogram bank is empty: it needs at least one reference image")
        self.counts, self.area = counts, int(area)
        self._padded = None  # (counts, their padded layout), built on first Triton use
        self._tiled = None  # (counts, their tiled layout), built on first compiled CPU use

    @classmethod
    def from_histograms(cls, hist: torch.Tensor, area: int) -> "HistogramBank":
        """Compact normalised histograms ``[R, L, bins]`` whose entries are multiples of ``1 / area``."""
        _check_histograms("bank_hist", hist)
        scaled = hist.float() * area
        counts = scaled.round()
        if (scaled - counts).abs().max() > 1e-3:
            raise ValueError(f"bank_hist entries are not multiples of 1/area (area={area})")
        return cls(counts.to(torch.uint8 if area <= 255 else torch.int16), area)

    def histograms(self) -> torch.Tensor:
        return self.counts.float() / self.area

    def padded_counts(self) -> torch.Tensor:
        """The counts with each block's bins padded to a power of two (zeros), as the Triton top-K
        streams them (one aligned vector load a block): built once per bank, on its device."""
        from .triton_ops.retrieval import padded_counts

        if self._padded is None or self._padded[0] is not self.counts:
            self._padded = (self.counts, padded_counts(self.counts))
        return self._padded[1]

    def tiled_counts(self) -> torch.Tensor:
        """The counts in tiles of entries side by side (``cpu_ops.retrieval.tiled_counts``), as the
        compiled CPU scan streams them: built once per bank, on the host."""
        from .cpu_ops.retrieval import tiled_counts

        if self._tiled is None or self._tiled[0] is not self.counts:
            self._tiled = (self.counts, tiled_counts(self.counts, self.area))
        return self._tiled[1]

    def __len__(self) -> int:
        return self.counts.shape[0]


def _check_histograms(name: str, hist) -> None:
    if not isinstance(hist, torch.Tensor) or hist.dim() != 3 or not hist.is_floating_point():
        raise TypeError(f"{name} must be a float tensor [N, L, bins] of normalised block histograms")
    if hist.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not checking_values():
        return
    sums = hist.float().sum(dim=-1)
    if not all_finite(hist) or bool((hist < 0).any()) or bool(((sums - 1).abs() > 1e-3).any()):
        raise ValueError(f"{name} must hold normalised histograms (non-negative, each block summing to 1)")


def block_histograms(features: torch.Tensor, centers: torch.Tensor, S: int = 5, *, return_codes: bool = False,
                     backend: str | None = None):
    """CPR block histograms ``[B, L, n + 1]`` of nearest-centre codes (and the codes ``[B, H, W]``).

    Each pixel gets the id of its nearest centre (squared L2, the first centre on ties); the
    map of ids + 1 is cut into blocks of ``ceil(H / S) x ceil(W / S)`` pixels with
    ``block * S - size`` zero padding on both sides (as ``torch.nn.Unfold`` does), and each
    block becomes a histogram over the ``n + 1`` bins, normalised by the block area.
    """
    check_feature_tensor("features", features, allow_empty_batch=False)
    if not isinstance(centers, torch.Tensor) or centers.dim() != 2 or not centers.is_floating_point():
        raise TypeError("centers must be a float tensor [n, C]")
    if centers.shape[1] != features.shape[1] or centers.shape[0] < 1:
        raise ValueError(f"centers must be [n >= 1, C={features.shape[1]}]; got {list(centers.shape)}")
    if centers.device != features.device:
        raise ValueError("centers and features must be on the same device")
    if isinstance(S, bool) or not isinstance(S, int) or S < 1:
        raise ValueError(f"S must be a positive int; got {S!r}")
    impl = resolve(features.device, backend, features.dtype)
    if impl == "reference":
        return reference.block_histograms(features, centers, S, return_codes)
    if impl == "torch":
        return torch_retrieval.block_histograms(features, centers, S, return_codes)
    from .triton_ops import retrieval as triton_retrieval

    return triton_retrieval.block_histograms(features, centers, S, return_codes)


def retrieve_topk(query_hist: torch.Tensor, bank_hist, k: int, l_ratio: float = 0.8, method: str = "kl", *,
                  backend: str | None = None):
    """The ``k`` most similar bank images per query: ``(distances [Q, k], indices [Q, k])``.

    Per block KL(q + 1e-8 || r + 1e-8) (``method="kl"``) or the L2 distance (``"l2"``); per
    pair the smallest ``int(L * l_ratio)`` block distances are summed (robust to a few
    defective blocks); results ascend, ties go to the lower bank index. ``bank_hist`` is a
    float ``[R, L, bins]`` tensor or a compact ``HistogramBank``. ``k`` larger than the bank
    is an error.
    """
    _check_histograms("query_hist", query_hist)
    bank = bank_hist if isinstance(bank_hist, HistogramBank) else None
    if bank is None:
        _check_histograms("bank_hist", bank_hist)
    shape = (bank.counts if bank is not None else bank_hist).shape
    if shape[1:] != query_hist.shape[1:]:
        raise ValueError(f"query_hist is [Q, L, bins] = {list(query_hist.shape)} but the bank is {list(shape)}: "
                         "L and bins must match")
    if (bank.counts if bank is not None else bank_hist).device != query_hist.device:
        raise ValueError("query_hist and the bank must be on the same device")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= shape[0]:
        raise ValueError(f"k must be an int between 1 and the bank size {shape[0]}; got {k!r}")
    if method not in ("kl", "l2"):
        raise ValueError(f"method must be 'kl' or 'l2'; got {method!r}")
    if not 0 < l_ratio <= 1 or int(query_hist.shape[1] * l_ratio) < 1:
        raise ValueError(f"l_ratio must be in (0, 1] and keep at least one of the {query_hist.shape[1]} blocks")
    impl = resolve(query_hist.device, backend)
    if impl == "reference":
        hist = bank.histograms() if bank is not None else bank_hist
        return reference.retrieve_topk(query_hist, hist, k, l_ratio, method)
    # a compact bank streams integer counts; float histograms stream as they are (area 1)
    data, area = (bank.counts, bank.area) if bank is not None else (bank_hist, 1)
    if impl == "torch":
        if bank is not None and bank.counts.device.type == "cpu":
            from .cpu_ops import retrieval as cpu_retrieval  # here: numba's import costs ~0.14 s

            if cpu_retrieval.available():
                return cpu_retrieval.retrieve_topk(query_hist, bank.tiled_counts(), len(bank), area, k, l_ratio,
                                                   method)
        return torch_retrieval.retrieve_topk(query_hist, data, area, k, l_ratio, method)
    from .triton_ops import retrieval as triton_retrieval

    if bank is not None:
        data = bank.padded_counts()
    return triton_retrieval.retrieve_topk(query_hist, data, area, k, l_ratio, method)
