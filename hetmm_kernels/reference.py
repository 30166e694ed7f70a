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
