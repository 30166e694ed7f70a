"""The public ATM ops: validate, pick the backend, run.

Signatures and semantics follow the published extension (``forward_ATM``,
``backward_ATM``); ``mutual_match`` is the fused op the detector uses.
"""

from __future__ import annotations

import torch

from . import reference
from .backend import resolve
from .templates import PreparedTemplates, prepare_templates
from .torch_ops import atm as torch_atm
from .validation import check_feature_tensor, check_same_maps, check_window

TemplatesLike = torch.Tensor | PreparedTemplates


def _checked(query, temp) -> PreparedTemplates:
    check_feature_tensor("query", query, allow_empty_batch=True)
    if not isinstance(temp, (torch.Tensor, PreparedTemplates)):
        raise TypeError(
            f"temp must be a torch.Tensor [T, C, H, W] or a PreparedTemplates; got {type(temp).__name__}"
        )
    bank = prepare_templates(temp)
    check_same_maps(query, bank.shape, bank.dtype, bank.device)
    return bank


def _triton_atm():
    from .triton_ops import atm  # imported lazily: the CPU path must not need a Triton install that works

    return atm


def _torch_layout(bank: PreparedTemplates):
    return bank.layout("torch", torch_atm.template_groups)


def _triton_layout(bank: PreparedTemplates):
    return bank.layout("triton", _triton_atm().pixel_major)


def forward_ATM(query: torch.Tensor, temp: TemplatesLike, patch: int, *, backend: str | None = None) -> torch.Tensor:
    """Forward template matching: ``[B, T, H, W]`` in the query's dtype.

    ``out[b,t,i,j]`` is the largest dot product between ``query[b,:,i,j]`` and the
    features of template ``t`` inside the ``patch x patch`` window centred on (i, j)
    (clipped at the borders; an even ``patch`` acts as ``patch + 1``), floored at -1.

    >>> q = torch.nn.functional.normalize(torch.randn(2, 32, 8, 8), dim=1)
    >>> forward_ATM(q, q, 3).shape
    torch.Size([2, 2, 8, 8])
    """
    patch = check_window("patch", patch)
    bank = _checked(query, temp)
    impl = resolve(query.device, backend)
    if query.shape[0] == 0:
        return query.new_empty((0, len(bank), *query.shape[2:]))
    if impl == "reference":
        return reference.forward_ATM(query, bank.temp, patch)
    if impl == "torch":
        return torch_atm.forward_ATM(query, _torch_layout(bank), patch).to(query.dtype)
    return _triton_atm().forward_ATM(query, _triton_layout(bank), patch)


def backward_ATM(query: torch.Tensor, temp: TemplatesLike, patch: int, *, backend: str | None = None) -> torch.Tensor:
    """Backward (reverse) template matching: ``[B, T, H, W]`` in the query's dtype.

    ``out[b,t,i,j]`` is the largest dot product between ``temp[t,:,i,j]`` and the
    query features inside the ``patch x patch`` window centred on (i, j), floored at -1.
    """
    patch = check_window("patch", patch)
    bank = _checked(query, temp)
    impl = resolve(query.device, backend)
    if query.shape[0] == 0:
        return query.new_empty((0, len(bank), *query.shape[2:]))
    if impl == "reference":
        return reference.backward_ATM(query, bank.temp, patch)
    if impl == "torch":
        return torch_atm.backward_ATM(query, _torch_layout(bank), patch).to(query.dtype)
    return _triton_atm().backward_ATM(query, _triton_layout(bank), patch)


def mutual_match(query: torch.Tensor, temp: TemplatesLike, fore_patch: int, back_patch: int, *,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Template mutual matching: ``(fore, back)``, each ``[B, H, W]`` in the query's dtype.

    ``fore = forward_ATM(query, temp, fore_patch).amax(1)`` and
    ``back = backward_ATM(query, temp, back_patch).amax(1)``, computed in one pass
    that never builds the ``[B, T, H, W]`` maps and computes each query-template
    product once for both directions.

    >>> q = torch.nn.functional.normalize(torch.randn(1, 32, 8, 8), dim=1)
    >>> fore, back = mutual_match(q, q, 5, 3)
    >>> bool(torch.allclose(fore, torch.ones(1, 8, 8), atol=1e-5))
    True
    """
    fore_patch = check_window("fore_patch", fore_patch)
    back_patch = check_window("back_patch", back_patch)
    bank = _checked(query, temp)
    impl = resolve(query.device, backend)
    if query.shape[0] == 0:
        empty = query.new_empty((0, *query.shape[2:]))
        return empty, empty.clone()
    if impl == "reference":
        return reference.mutual_match(query, bank.temp, fore_patch, back_patch)
    if impl == "torch":
        fore, back = torch_atm.mutual_match(query, _torch_layout(bank), fore_patch, back_patch)
    else:
        fore, back = _triton_atm().mutual_match(query, _triton_layout(bank), fore_patch, back_patch)
    return fore.to(query.dtype), back.to(query.dtype)
