"""The template bank: per-layer features of normal images, with the configuration that made them.

Persisted as one safetensors file (tensors ``layer1``..``layer3`` ``[N, C, h, w]``) whose
metadata holds the configuration as JSON. Saving writes a temporary file in the same
folder, fsyncs it and renames it over the target, so a crash never leaves a half-written bank.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

import hetmm_kernels as hk

FORMAT = "hetmm-bank/1"
# configuration entries that must agree for a bank to serve a detector
IDENTITY = ("backbone", "weights", "image_size", "layers")


class BankMismatch(ValueError):
    """A bank was made with another backbone, weights, image size or layers."""


EXTRA = "extra/"  # prefix of the non-template tensors in the file (codebook, histogram counts)


class TemplateBank:
    """Templates ``{layer: [N, C, h, w]}`` plus ``config`` (backbone, weights, image size, layers, params),
    and ``extras``: other tensors that travel with them (the retrieval codebook and histograms)."""

    def __init__(self, features: dict, config: dict, extras: dict | None = None):
        counts = {name: t.shape[0] for name, t in features.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(f"every layer needs the same number of templates; got {counts}")
        self.features = {name: t.contiguous() for name, t in features.items()}
        self.config = dict(config)
        self.extras = dict(extras or {})
        self._prepared: dict = {}

    def __len__(self) -> int:
        return next(iter(self.features.values())).shape[0] if self.features else 0

    def add(self, features: dict) -> None:
        """Hot update: append the templates of new normal images (no refit)."""
        if set(features) != set(self.features):
            raise ValueError(f"new templates have layers {sorted(features)}, the bank has {sorted(self.features)}")
        for name, new in features.items():
            old = self.features[name]
            if new.shape[1:] != old.shape[1:]:
                raise ValueError(f"{name}: new templates are {tuple(new.shape[1:])}, the bank holds {tuple(old.shape[1:])}")
            self.features[name] = torch.cat([old, new.to(old.device, old.dtype)]).contiguous()
        self._prepared.clear()

    def prepared(self, layer: str, device: torch.device, dtype: torch.dtype) -> hk.PreparedTemplates:
        """The layer's templates on ``device``/``dtype``, laid out once for the kernels."""
        key = (layer, str(device), dtype)
        if key not in self._prepared:
            self._prepared[key] = hk.prepare_templates(self.features[layer].to(device, dtype))
        return self._prepared[key]

    def check(self, expected: dict) -> None:
        """Raise ``BankMismatch`` unless the bank's identity matches ``expected``."""
        for key in IDENTITY:
            if key in expected and json.dumps(self.config.get(key)) != json.dumps(expected[key]):
                raise BankMismatch(
                    f"the bank was made with {key}={self.config.get(key)!r}, but this detector uses "
                    f"{key}={expected[key]!r}; refit the bank with the detector's configuration"
                )

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.features.items()}
        tensors.update({EXTRA + name: t.detach().cpu().contiguous() for name, t in self.extras.items()})
        metadata = {"format": FORMAT, "config": json.dumps(self.config)}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path, expected: dict | None = None) -> "TemplateBank":
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"bank: no file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            features = load_file(str(path))
        except Exception as error:
            raise ValueError(f"bank: {path} is not a readable safetensors file ({error})") from None
        if metadata.get("format") != FORMAT:
            raise ValueError(f"bank: {path} is not a hetmm template bank (format {metadata.get('format')!r})")
        extras = {k[len(EXTRA):]: features.pop(k) for k in list(features) if k.startswith(EXTRA)}
        bank = cls(features, json.loads(metadata["config"]), extras)
        if expected:
            bank.check(expected)
        return bank
