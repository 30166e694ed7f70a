"""Naive, obviously correct PyTorch versions of the ops: the ground truth.

Written for clarity, not speed: one query pixel at a time, exactly as
DESIGN.md section 1 defines the maps. Every other backend is tested against
these. Inputs are assumed valid (the public ops validate before dispatching).
Products are accumulated in float32 (float64 for float64 inputs); results are
returned in the query's dtype.
"""

from __future__ import annotations

import torch

# The published CUDA kernel starts every running maximum at -1.
MATCH_FLOOR = -1.0


def _accumulation(x: torch.Tensor) -> torch.Tensor:
    """float32 for half and single precision, float64 for double."""
    return x.double() if x.dtype == torch.float64 else x.float()


def forward_ATM(query: torch.Tensor, temp: torch.Tensor, patch: int) -> torch.Tensor:
    """``F[b,t,i,j] = max(-1, max_{|i2-i|<=d, |j2-j|<=d} <query[b,:,i,j], temp[t,:,i2,j2]>)``, d = patch // 2."""
    radius = patch // 2
    q, t = _accumulation(query), _accumulation(temp)
    batch, _, height, width = q.shape
    out = torch.full((batch, t.shape[0], height, width), MATCH_FLOOR, device=q.device, dtype=q.dtype)
    for i in range(height):
        for j in range(width):
            window = t[:, :, max(0, i - radius): i + radius + 1, max(0, j - radius): j + radius + 1]
            sims = torch.einsum("bc,tcyx->btyx", q[:, :, i, j], window)
            out[:, :, i, j] = torch.maximum(out[:, :, i, j], sims.amax(dim=(2, 3)))
    return out.to(query.dtype)


def forward_argmax(query: torch.Tensor, temp: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(forward_ATM, where)``: ``where[b,t,i,j]`` is the template pixel ``y2 * W + x2`` (int64) whose product
    with ``query[b,:,i,j]`` is the window's largest; ties go to the first in row-major order (smallest ``y2``,
    then ``x2``), as ``torch.argmax`` returns the first of equal maxima."""
    radius = patch // 2
    q, t = _accumulation(query), _accumulation(temp)
    batch, _, height, width = q.shape
    out = torch.full((batch, t.shape[0], height, width), MATCH_FLOOR, device=q.device, dtype=q.dtype)
    where = torch.zeros((batch, t.shape[0], height, width), device=q.device, dtype=torch.int64)
    for i in range(height):
        for j in range(width):
            y0, x0 = max(0, i - radius), max(0, j - radius)
            window = t[:, :, y0: i + radius + 1, x0: j + radius + 1]
            sims = torch.einsum("bc,tcyx->btyx", q[:, :, i, j], window).flatten(2)  # row-major window positions
            best, first = sims.max(dim=2).values, sims.argmax(dim=2)
            out[:, :, i, j] = torch.maximum(out[:, :, i, j], best)
            where[:, :, i, j] = (y0 + first // window.shape[3]) * width + x0 + first % window.shape[3]
    return out.to(query.dtype), where


def backward_ATM(query: torch.Tensor, temp: torch.Tensor, patch: int) -> torch.Tensor:
    """``R[b,t,i,j] = max(-1, max_{|i2-i|<=d, |j2-j|<=d} <query[b,:,i2,j2], temp[t,:,i,j]>)``, d = patch // 2."""
    radius = patch // 2
    q, t = _accumulation(query), _accumulation(temp)
    batch, _, height, width = q.shape
    out = torch.full((batch, t.shape[0], height, width), MATCH_FLOOR, device=q.device, dtype=q.dtype)
    for i in range(height):
        for j in range(width):
            window = q[:, :, max(0, i - radius): i + radius + 1, max(0, j - radius): j + radius + 1]
            sims = torch.einsum("bcyx,tc->btyx", window, t[:, :, i, j])
            out[:, :, i, j] = torch.maximum(out[:, :, i, j], sims.amax(dim=(2, 3)))
    return out.to(query.dtype)


def mutual_match(query: torch.Tensor, temp: torch.Tensor, fore_patch: int, back_patch: int):
    """``(max_t forward_ATM, max_t backward_ATM)``, each ``[B, H, W]``, computed from the maps above."""
    fore = forward_ATM(_accumulation(query), _accumulation(temp), fore_patch).amax(dim=1)
    back = backward_ATM(_accumulation(query), _accumulation(temp), back_patch).amax(dim=1)
    return fore.to(query.dtype), back.to(query.dtype)


def gaussian_blur(maps: torch.Tensor, sigma: float, k: int) -> torch.Tensor:
    """``[B, 1, H, W]`` maps blurred by a normalised ``k x k`` Gaussian, zero padding ``k // 2``.

    An even ``k`` yields one extra row and column, which are dropped (the map keeps its size).
    """
    offsets = torch.arange(k, dtype=torch.float32, device=maps.device) - (k - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * sigma * sigma))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]
    return torch.nn.functional.conv2d(maps, kernel, padding=k // 2)[..., : maps.shape[-2], : maps.shape[-1]]


def aggregate_maps(fores, backs, alphas, ldas, out_size, blur=None, image_score=None):
    """``sum_l lda_l * (alpha_l * up(1 - fore_l) + (1 - alpha_l) * up(1 - back_l))`` as ``[B, 1, H, W]``.

    ``up`` is bilinear upsampling with align_corners=True; ``blur`` is ``(sigma, k)`` or None;
    ``image_score`` is None, ``"max"`` or an int ``k`` (mean of a ``k x k`` max-pool, stride k).
    Returns ``(maps, scores)``, scores ``[B]`` or None.
    """
    total = 0
    for fore, back, alpha, lda in zip(fores, backs, alphas, ldas):
        up_fore = torch.nn.functional.interpolate(1 - fore.float()[:, None], size=out_size, mode="bilinear",
                                                  align_corners=True)
        up_back = torch.nn.functional.interpolate(1 - back.float()[:, None], size=out_size, mode="bilinear",
                                                  align_corners=True)
        total = total + lda * (alpha * up_fore + (1 - alpha) * up_back)
    if blur is not None:
        total = gaussian_blur(total, *blur)
    if image_score is None:
        return total, None
    if image_score == "max":
        return total, total.amax(dim=(1, 2, 3))
    k = min(int(image_score), total.shape[-2], total.shape[-1])
    return total, torch.nn.functional.max_pool2d(total, k).mean(dim=(1, 2, 3))


def PTS(temp: torch.Tensor, clus: torch.Tensor, tsize: int) -> torch.Tensor:
    """Pixel-level template selection: ``[tsize, C, H, W]`` picked from ``temp [N, C, H, W]``.

    At each pixel, with ``G`` the Gram matrix of the N features there:
    1. for each cluster of ``clus[:, i, j]`` (ids in order of first appearance, noise -1
       ignored), while fewer than ``tsize`` are picked: the member with the largest summed
       similarity to the cluster's members (first index on ties);
    2. if nothing was picked: the global centre (largest summed similarity to all N);
    3. then, while slots and candidates remain: the unpicked candidate with the smallest
       accumulated similarity to the picked set (first index on ties).
    Unfilled slots stay zero. Sums accumulate in float32; the result has temp's dtype.
    """
    count, channels, height, width = temp.shape
    out = torch.zeros(tsize, channels, height, width, device=temp.device)
    feats_all = _accumulation(temp)
    out = out.to(temp.dtype)
    for i in range(height):
        for j in range(width):
            feats = feats_all[:, :, i, j]
            labels = clus[:, i, j].tolist()
            gram = feats @ feats.t()
            picked = []
            clusters = []
            for label in labels:
                if label != -1 and label not in clusters:
                    clusters.append(label)
            for label in clusters:
                if len(picked) >= tsize:
                    break
                members = [k for k in range(count) if labels[k] == label]
                sums = [gram[m, members].sum().item() for m in members]
                picked.append(members[sums.index(max(sums))])
            if not picked:
                totals = gram.sum(dim=1).tolist()
                picked.append(totals.index(max(totals)))
            candidates = [k for k in range(count) if k not in picked]
            accumulated = {k: sum(gram[k, p].item() for p in picked) for k in candidates}
            while len(picked) < tsize and candidates:
                choose = min(candidates, key=lambda k: (accumulated[k], k))
                picked.append(choose)
                candidates.remove(choose)
                for k in candidates:
                    accumulated[k] += gram[k, choose].item()
            out[: len(picked), :, i, j] = temp[picked, :, i, j]  # copies of the templates, not recomputed
    return out


# ----------------------------------------------------------------------------- retrieval (CPR)

KL_EPS = 1e-8


def block_layout(height: int, width: int, S: int):
    """(block_h, block_w, pad_h, pad_w, blocks_h, blocks_w): ``nn.Unfold(block, stride=block,
    padding=block * S - size)`` as the published code cuts the code map."""
    block_h, block_w = -(-height // S), -(-width // S)
    pad_h, pad_w = block_h * S - height, block_w * S - width
    return (block_h, block_w, pad_h, pad_w,
            (height + 2 * pad_h - block_h) // block_h + 1, (width + 2 * pad_w - block_w) // block_w + 1)


def nearest_codes(features: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` index of the nearest centre (squared L2; the first on ties) of every pixel."""
    x = features.float()[:, None]  # [B, 1, C, H, W]
    c = centers.float()[None, :, :, None, None]  # [1, n, C, 1, 1]
    return ((x - c) ** 2).sum(dim=2).argmin(dim=1)


def block_histograms(features: torch.Tensor, centers: torch.Tensor, S: int = 5, return_codes: bool = False):
    """``[B, L, n + 1]`` normalised histograms of code ids + 1 per block (padding counts in bin 0)."""
    codes = nearest_codes(features, centers)
    batch, height, width = codes.shape
    bins = centers.shape[0] + 1
    block_h, block_w, pad_h, pad_w, blocks_h, blocks_w = block_layout(height, width, S)
    padded = torch.zeros(batch, height + 2 * pad_h, width + 2 * pad_w, dtype=torch.long, device=codes.device)
    padded[:, pad_h:pad_h + height, pad_w:pad_w + width] = codes + 1
    hist = torch.zeros(batch, blocks_h * blocks_w, bins, device=codes.device)
    for by in range(blocks_h):
        for bx in range(blocks_w):
            block = padded[:, by * block_h:(by + 1) * block_h, bx * block_w:(bx + 1) * block_w]
            for b in range(batch):
                hist[b, by * blocks_w + bx] = torch.bincount(block[b].reshape(-1), minlength=bins).float()
    hist /= block_h * block_w
    return (hist, codes) if return_codes else hist


def histogram_distances(query_hist: torch.Tensor, bank_hist: torch.Tensor, l_ratio: float = 0.8,
                        method: str = "kl") -> torch.Tensor:
    """``[Q, R]``: per block KL(q + eps || r + eps) (or L2), the smallest ``int(L * l_ratio)`` summed."""
    keep = int(query_hist.shape[1] * l_ratio)
    out = torch.empty(query_hist.shape[0], bank_hist.shape[0], device=query_hist.device)
    for q in range(query_hist.shape[0]):
        for r in range(bank_hist.shape[0]):
            p, t = query_hist[q].float(), bank_hist[r].float()
            if method == "kl":
                per_block = ((p + KL_EPS) * torch.log((p + KL_EPS) / (t + KL_EPS))).sum(dim=-1)
            else:
                per_block = torch.sqrt(((p - t) ** 2).sum(dim=-1))
            out[q, r] = per_block.sort().values[:keep].sum()
    return out


def retrieve_topk(query_hist, bank_hist, k: int, l_ratio: float = 0.8, method: str = "kl"):
    """The ``k`` nearest bank entries per query: ``(distances [Q, k], indices [Q, k])`` ascending,
    ties to the lower index."""
    dist = histogram_distances(query_hist, bank_hist, l_ratio, method)
    order = torch.sort(dist, dim=1, stable=True)  # stable: equal distances keep index order
    return order.values[:, :k], order.indices[:, :k]


def mutual_match_subset(query, temp, fore_patch, back_patch, indices):
    """``mutual_match`` with query ``b`` matched only against ``temp[indices[b]]``."""
    fores, backs = zip(*(mutual_match(query[b:b + 1], temp[indices[b]], fore_patch, back_patch)
                         for b in range(query.shape[0])))
    return torch.cat(fores), torch.cat(backs)


def global_match(query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``G[b,i,j] = max(-1, max_n <query[b,:,i,j], rows[n,:]>)``: forward matching without a window,
    against a set of template pixels ``rows [N, C]`` wherever they lie. ``[B, H, W]``, query's dtype."""
    q, r = _accumulation(query), _accumulation(rows)
    out = torch.full((q.shape[0], *q.shape[2:]), MATCH_FLOOR, device=q.device, dtype=q.dtype)
    for n in range(r.shape[0]):
        out = torch.maximum(out, torch.einsum("bchw,c->bhw", q, r[n]))
    return out.to(query.dtype)


def _as_int8_products(query: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, bias, dim: int = 1):
    """float64 query and templates as int8 products see them: the query rounded per pixel (``quantize_int8``),
    both sides dequantised (each product then exact), and a template's bias as one more channel (query: 1)."""
    from .quantized import dequantize, quantize_int8

    q = dequantize(*quantize_int8(query))
    t = dequantize(values, scales, dim)
    if bias is not None:
        q = torch.cat([q, torch.ones_like(q[:, :1])], 1)
        t = torch.cat([t, bias.double().unsqueeze(dim)], dim)
    return q, t


def int8_mutual_match(query, values, scales, bias, fore_patch, back_patch, indices=None):
    """``mutual_match`` of int8 products: the query and the templates ``values [T, C, H, W]`` (int8) x
    ``scales [T, H, W]`` each rounded per pixel, every product exact, plus ``bias [T, H, W]`` (or None) on every
    similarity of a template pixel; ``indices [B, K]``: query b against its templates only. float64 ``[B, H, W]``."""
    q, t = _as_int8_products(query, values, scales, bias)
    if indices is not None:
        return mutual_match_subset(q, t, fore_patch, back_patch, indices)
    return mutual_match(q, t, fore_patch, back_patch)


def int8_global_match(query, values, scales, bias):
    """``global_match`` of int8 products against rows ``values [N, C]`` x ``scales [N]`` (+ ``bias [N]``)."""
    q, rows = _as_int8_products(query, values, scales, bias, dim=-1)
    return global_match(q, rows)
