"""Naive, obviously correct PyTorch versions of the ops: the ground truth.

Written for clarity, not speed: one query pixel at a time, exactly as
DESIGN.md section 1 defines the maps. Every other backend is tested against
these. Inputs are assumed valid (the public ops validate before dispatching).
Products are accumulated in float32; results are returned in the query's dtype.
"""

from __future__ import annotations

import torch

# The published CUDA kernel starts every running maximum at -1.
MATCH_FLOOR = -1.0


def forward_ATM(query: torch.Tensor, temp: torch.Tensor, patch: int) -> torch.Tensor:
    """``F[b,t,i,j] = max(-1, max_{|i2-i|<=d, |j2-j|<=d} <query[b,:,i,j], temp[t,:,i2,j2]>)``, d = patch // 2."""
    radius = patch // 2
    q, t = query.float(), temp.float()
    batch, _, height, width = q.shape
    out = torch.full((batch, t.shape[0], height, width), MATCH_FLOOR, device=q.device)
    for i in range(height):
        for j in range(width):
            window = t[:, :, max(0, i - radius): i + radius + 1, max(0, j - radius): j + radius + 1]
            sims = torch.einsum("bc,tcyx->btyx", q[:, :, i, j], window)
            out[:, :, i, j] = torch.maximum(out[:, :, i, j], sims.amax(dim=(2, 3)))
    return out.to(query.dtype)


def backward_ATM(query: torch.Tensor, temp: torch.Tensor, patch: int) -> torch.Tensor:
    """``R[b,t,i,j] = max(-1, max_{|i2-i|<=d, |j2-j|<=d} <query[b,:,i2,j2], temp[t,:,i,j]>)``, d = patch // 2."""
    radius = patch // 2
    q, t = query.float(), temp.float()
    batch, _, height, width = q.shape
    out = torch.full((batch, t.shape[0], height, width), MATCH_FLOOR, device=q.device)
    for i in range(height):
        for j in range(width):
            window = q[:, :, max(0, i - radius): i + radius + 1, max(0, j - radius): j + radius + 1]
            sims = torch.einsum("bcyx,tc->btyx", window, t[:, :, i, j])
            out[:, :, i, j] = torch.maximum(out[:, :, i, j], sims.amax(dim=(2, 3)))
    return out.to(query.dtype)


def mutual_match(query: torch.Tensor, temp: torch.Tensor, fore_patch: int, back_patch: int):
    """``(max_t forward_ATM, max_t backward_ATM)``, each ``[B, H, W]``, computed from the maps above."""
    fore = forward_ATM(query.float(), temp.float(), fore_patch).amax(dim=1)
    back = backward_ATM(query.float(), temp.float(), back_patch).amax(dim=1)
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
    feats_all = temp.float()
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
            out[: len(picked), :, i, j] = feats[picked]
    return out.to(temp.dtype)
