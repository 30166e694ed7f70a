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
IDENTITY = ("backbone", "weights", "image_size", "layers", "neighbourhood")
# what a bank saved before a key existed meant by it
IDENTITY_DEFAULTS = {"neighbourhood": 1}


class BankMismatch(ValueError):
    """A bank was made with another backbone, weights, image size or layers."""


EXTRA = "extra/"  # prefix of the non-template tensors in the file (codebook, histogram counts)
PER_TEMPLATE = ("histogram_counts",)  # extras with one row per template: they shard with the templates


class TemplateBank:
    """Templates ``{layer: [N, C, h, w]}`` plus ``config`` (backbone, weights, image size, layers, params),
    and ``extras``: other tensors that travel with them (the retrieval codebook and histograms).

    A shard (``shard``, or ``load(..., shard=)``) holds templates ``offset .. offset + len(bank)``
    of a bank of ``total``.
    """

    def __init__(self, features: dict, config: dict, extras: dict | None = None, offset: int = 0,
                 total: int | None = None):
        counts = {name: t.shape[0] for name, t in features.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(f"every layer needs the same number of templates; got {counts}")
        self.features = {name: t.contiguous() for name, t in features.items()}
        self.config = dict(config)
        self.extras = dict(extras or {})
        self.offset = int(offset)
        self.total = len(self) if total is None else int(total)
        self.version = 0  # grows with every change of the templates
        self._prepared: dict = {}

    @property
    def is_shard(self) -> bool:
        return self.offset != 0 or self.total != len(self)

    def shard(self, rank: int, world: int) -> "TemplateBank":
        """Rank ``rank``'s contiguous share of the templates (and their per-template extras)."""
        rows = _shard_rows(len(self), rank, world)
        features = {name: t[rows.start:rows.stop] for name, t in self.features.items()}
        extras = {name: t[rows.start:rows.stop] if name in PER_TEMPLATE else t for name, t in self.extras.items()}
        return TemplateBank(features, self.config, extras, self.offset + rows.start, self.total)

    def __len__(self) -> int:
        return next(iter(self.features.values())).shape[0] if self.features else 0

    def add(self, features: dict) -> None:
        """Hot update: append the templates of new normal images (no refit)."""
        if self.is_shard:
            raise ValueError("add templates to the whole bank, then shard it: a shard cannot grow in place")
        if set(features) != set(self.features):
            raise ValueError(f"new templates have layers {sorted(features)}, the bank has {sorted(self.features)}")
        for name, new in features.items():
            old = self.features[name]
            if new.shape[1:] != old.shape[1:]:
                raise ValueError(f"{name}: new templates are {tuple(new.shape[1:])}, the bank holds {tuple(old.shape[1:])}")
            self.features[name] = torch.cat([old, new.to(old.device, old.dtype)]).contiguous()
        self.total = len(self)
        self.version += 1
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
            if key in expected and json.dumps(self.config.get(key, IDENTITY_DEFAULTS.get(key))) != json.dumps(expected[key]):
                raise BankMismatch(
                    f"the bank was made with {key}={self.config.get(key, IDENTITY_DEFAULTS.get(key))!r}, but this detector uses "
                    f"{key}={expected[key]!r}; refit the bank with the detector's configuration"
                )

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.is_shard:
            raise ValueError(f"this bank is a shard (templates {self.offset}..{self.offset + len(self)} of "
                             f"{self.total}); save the whole bank")
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
    def load(cls, path, expected: dict | None = None, shard: tuple[int, int] | None = None) -> "TemplateBank":
        """Read a bank; ``shard=(rank, world)`` reads only that rank's rows of the templates."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"bank: no file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata, names = f.metadata() or {}, list(f.keys())
                layers = [n for n in names if not n.startswith(EXTRA)]
                total = f.get_slice(layers[0]).get_shape()[0] if layers else 0
        except Exception as error:
            raise ValueError(f"bank: {path} is not a readable safetensors file ({error})") from None
        if metadata.get("format") != FORMAT:
            raise ValueError(f"bank: {path} is not a hetmm template bank (format {metadata.get('format')!r})")
        rows = _shard_rows(total, *shard) if shard is not None else range(total)
        per_template = [n for n in names if not n.startswith(EXTRA) or n[len(EXTRA):] in PER_TEMPLATE]
        try:
            with safe_open(str(path), framework="pt") as f:
                # a shard's rows are read from the file alone: a rank never holds the whole bank
                tensors = {n: f.get_slice(n)[rows.start:rows.stop] if n in per_template else f.get_tensor(n)
                           for n in names}
        except Exception as error:
            raise ValueError(f"bank: {path} is not a readable safetensors file ({error})") from None
        extras = {k[len(EXTRA):]: tensors.pop(k) for k in list(tensors) if k.startswith(EXTRA)}
        bank = cls(tensors, json.loads(metadata["config"]), extras, rows.start, total)
        if expected:
            bank.check(expected)
        return bank


def _shard_rows(count: int, rank: int, world: int) -> range:
    from .distributed import shard_range

    if world > count:
        raise ValueError(f"a bank of {count} templates cannot be split over {world} ranks (one at least each)")
    return shard_range(count, rank, world)
