"""A template set validated once and laid out for the kernels once.

Templates do not change between fit and predict, so every layout a backend
wants (channels-last copies, float32 groups for the CPU path) is built on first
use and kept. Any op that takes ``temp`` also takes a ``PreparedTemplates``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .validation import check_feature_tensor


class PreparedTemplates:
    """Templates ``[T, C, H, W]``, checked once, with per-backend layouts cached.

    >>> bank = PreparedTemplates(torch.nn.functional.normalize(torch.randn(60, 64, 16, 16), dim=1))
    >>> bank.shape
    torch.Size([60, 64, 16, 16])
    """

    def __init__(self, temp: torch.Tensor):
        check_feature_tensor("temp", temp)
        self.temp = temp
        self._layouts: dict = {}

    @property
    def shape(self) -> torch.Size:
        return self.temp.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.temp.dtype

    @property
    def device(self) -> torch.device:
        return self.temp.device

    def __len__(self) -> int:
        return self.temp.shape[0]

    def layout(self, key: str, build: Callable[[torch.Tensor], object]):
        """The layout named ``key``, built from the raw templates by ``build`` on first use."""
        if key not in self._layouts:
            self._layouts[key] = build(self.temp)
        return self._layouts[key]

    def __repr__(self) -> str:
        return f"PreparedTemplates(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


def prepare_templates(temp) -> PreparedTemplates:
    """Validate ``temp`` once and return it wrapped for repeated matching (a no-op on a prepared set)."""
    return temp if isinstance(temp, PreparedTemplates) else PreparedTemplates(temp)
