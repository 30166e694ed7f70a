"""The template bank: per-layer features of normal images, with the configuration that made them.

Persisted as one safetensors file (tensors ``layer1``..``layer3`` ``[N, C, h, w]``) whose
metadata holds the configuration and each template's source (its image file, when it came from one) as JSON;
extras (``extra/...``) hold the retrieval codebook and histograms, each template pixel's isolation
(``hetmm.scoring.template_isolation``) and each template's thumbnail. Saving writes a temporary file in the same
folder, fsyncs it and renames it over the target, so a crash never leaves a half-written bank.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

import hetmm_kernels as hk

from . import calibration
from .backbone import LAYERS
from .distributed import shard_range
from .magnitude import scales_problem
from .parameters import parse_params
from .scoring import coreset_rows, isolated_templates

FORMAT = "hetmm-bank/2"  # 2: each template's source and thumbnail; a bank of format 1 loads without them
READABLE = ("hetmm-bank/1", FORMAT)
# configuration entries that must agree for a bank to serve a detector
IDENTITY = ("backbone", "weights", "image_size", "layers", "neighbourhood", "magnitude_scales")
# what a bank saved before a key existed meant by it
IDENTITY_DEFAULTS = {"neighbourhood": 1}


class BankMismatch(ValueError):
    """A bank was made with another backbone, weights, image size or layers."""


EXTRA = "extra/"  # prefix of the non-template tensors in the file (codebook, histogram counts)
THUMBNAILS = "thumbnails"  # [N, 3, THUMBNAIL, THUMBNAIL] uint8: what each template looked like (explanations)
THUMBNAIL = 64
PER_TEMPLATE = ("histogram_counts", THUMBNAILS)  # extras with one row per template: they shard with the templates
ISOLATION = "isolation."  # + "<layer>.<forward window>": [N, h, w] per template pixel, also sharded with them
CORESET = "coreset."  # + "<layer>.<percent>": int64 flat indices over [N, h, w] (a shard keeps those of its templates)
MAX_ISOLATION = 2.0  # 1 - the cosine similarity of unit features


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, THUMBNAIL, THUMBNAIL]`` uint8 of images ``[N, 3, H, W]`` in [0, 1] (area-averaged)."""
    small = torch.nn.functional.interpolate(images.float(), size=(THUMBNAIL, THUMBNAIL), mode="bilinear",
                                            align_corners=False, antialias=True)
    return (small.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def _per_template(name: str) -> bool:
    return name in PER_TEMPLATE or name.startswith(ISOLATION)


class TemplateBank:
    """Templates ``{layer: [N, C, h, w]}`` plus ``config`` (backbone, weights, image size, layers, params),
    and ``extras``: other tensors that travel with them (the retrieval codebook and histograms).

    A shard (``shard``, or ``load(..., shard=)``) holds templates ``offset .. offset + len(bank)``
    of a bank of ``total``.
    """

    def __init__(self, features: dict, config: dict, extras: dict | None = None, offset: int = 0,
                 total: int | None = None, sources: list | None = None):
        counts = {name: t.shape[0] for name, t in features.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(f"every layer needs the same number of templates; got {counts}")
        self.features = {name: t.contiguous() for name, t in features.items()}
        self.config = dict(config)
        self.extras = dict(extras or {})
        # each template's image file (an absolute path) when it came from one, else None (tensors, PTS centres)
        self.sources = [None] * len(self) if sources is None else list(sources)
        if len(self.sources) != len(self):
            raise ValueError(f"sources: one per template ({len(self)}); got {len(self.sources)}")
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
        extras = {name: t[rows.start:rows.stop] if _per_template(name) else t for name, t in self.extras.items()}
        return TemplateBank(features, self.config, _coreset_shares(extras, features, rows), self.offset + rows.start,
                            self.total, self.sources[rows.start:rows.stop])

    def resident_bytes(self) -> int:
        """Bytes of the tensors this bank holds: features, extras and the layouts prepared for the kernels
        (tensors shared between them counted once)."""
        seen: set[int] = set()

        def count(value, depth: int = 0) -> int:
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                if storage.data_ptr() in seen:
                    return 0
                seen.add(storage.data_ptr())
                return storage.nbytes()
            if depth > 3:
                return 0
            if isinstance(value, dict):
                return sum(count(v, depth + 1) for v in value.values())
            if isinstance(value, (list, tuple)):
                return sum(count(v, depth + 1) for v in value)
            return count(vars(value), depth + 1) if hasattr(value, "__dict__") else 0

        return count(self.features) + count(self.extras) + count(self._prepared)

    def copy(self) -> "TemplateBank":
        """A bank sharing this one's tensors, whose changes (``add``, ``keep``) leave this one as it is."""
        return TemplateBank(dict(self.features), self.config, dict(self.extras), self.offset, self.total, self.sources)

    def __len__(self) -> int:
        return next(iter(self.features.values())).shape[0] if self.features else 0

    def add(self, features: dict, sources: list | None = None, thumbnails: torch.Tensor | None = None) -> None:
        """Hot update: append the templates of new normal images (no refit), with their sources and thumbnails
        (``thumbnail``) when known; the thumbnails are kept only while every template has one."""
        if self.is_shard:
            raise ValueError("add templates to the whole bank, then shard it: a shard cannot grow in place")
        if set(features) != set(self.features):
            raise ValueError(f"new templates have layers {sorted(features)}, the bank has {sorted(self.features)}")
        for name, new in features.items():
            old = self.features[name]
            if new.shape[1:] != old.shape[1:]:
                raise ValueError(f"{name}: new templates are {tuple(new.shape[1:])}, the bank holds {tuple(old.shape[1:])}")
            self.features[name] = torch.cat([old, new.to(old.device, old.dtype)]).contiguous()
        count = next(iter(features.values())).shape[0]
        self.sources += [None] * count if sources is None else list(sources)
        if THUMBNAILS in self.extras and thumbnails is not None:
            self.extras[THUMBNAILS] = torch.cat([self.extras[THUMBNAILS], thumbnails.cpu()])
        else:
            self.extras.pop(THUMBNAILS, None)
        self._templates_changed()

    def _templates_changed(self) -> None:
        self.total = len(self)
        self.version += 1
        self._prepared.clear()
        stale = calibration.NAMES + (calibration.F1_IMAGE_THRESHOLD,)
        for name in [n for n in self.extras if n.startswith((ISOLATION, CORESET)) or n in stale]:
            del self.extras[name]  # every template's leave-one-out, the coresets and the calibration change

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the templates ``rows`` (int64 indices, ascending), with their retrieval histograms; what
        depends on the whole set (isolation, coresets, calibration) must be computed again, as after ``add``."""
        if self.is_shard:
            raise ValueError("select templates in the whole bank, then shard it")
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.dim() != 1 or not len(rows) or not bool((rows[1:] > rows[:-1]).all()) or rows[-1] >= len(self) or rows[0] < 0:
            raise ValueError(f"rows must be ascending template indices in [0, {len(self)}); got {rows.tolist()[:8]}...")
        self.features = {name: t[rows.to(t.device)].contiguous() for name, t in self.features.items()}
        for name in PER_TEMPLATE:
            if name in self.extras:
                self.extras[name] = self.extras[name][rows]
        self.sources = [self.sources[i] for i in rows.tolist()]
        self._templates_changed()

    @property
    def calibration(self) -> "calibration.Calibration | None":
        """The normal scores the bank was calibrated with (``hetmm.calibration``), if it was."""
        return calibration.Calibration.from_extras(self.extras)

    def set_calibration(self, values: "calibration.Calibration | None") -> None:
        for name in calibration.NAMES:
            self.extras.pop(name, None)
        if values is not None:
            self.extras.update({name: t.float().cpu().contiguous() for name, t in values.extras().items()})

    def isolation(self, layer: str, fore: int) -> torch.Tensor | None:
        """``[N, h, w]``: the layer's isolation for the ``fore`` window, if computed (``set_isolation``)."""
        return self.extras.get(f"{ISOLATION}{layer}.{fore}")

    def set_isolation(self, layer: str, fore: int, values: torch.Tensor) -> None:
        expected = (len(self), *self.features[layer].shape[2:])
        if tuple(values.shape) != expected:
            raise ValueError(f"isolation of {layer}: expected {expected}, got {tuple(values.shape)}")
        self.extras[f"{ISOLATION}{layer}.{fore}"] = values.float().cpu().contiguous()
        # only the layouts that carry this layer's isolation are stale; its plain layout stays
        self._prepared = {key: value for key, value in self._prepared.items()
                          if key[0] not in (layer, ("coreset", layer)) or not key[4]}

    def coreset(self, layer: str, percent: float) -> torch.Tensor | None:
        """``[n]`` int64: the layer's coreset of ``percent`` (flat indices over ``[N, h, w]``), if selected."""
        return self.extras.get(f"{CORESET}{layer}.{percent:g}")

    def set_coreset(self, layer: str, percent: float, indices: torch.Tensor) -> None:
        pixels = len(self) * self.features[layer].shape[2] * self.features[layer].shape[3]
        if not _is_coreset(indices, pixels):
            raise ValueError(f"coreset of {layer}: expected int64 indices in [0, {pixels}); got {indices.dtype} "
                             f"{tuple(indices.shape)}")
        self.extras[f"{CORESET}{layer}.{percent:g}"] = indices.cpu().contiguous()
        self._prepared = {key: value for key, value in self._prepared.items() if key[0] != ("coreset", layer)}

    def coreset_rows(self, layer: str, device: torch.device, dtype: torch.dtype, percent: float, fore: int = 0,
                     isolation: float = 0.0) -> tuple:
        """``(rows [n, C], owners [n])``: the coreset's template pixels as ``prepared`` lays the layer out and
        the template of each (``set_coreset`` first; ``hetmm.scoring.coreset_rows``)."""
        key = (("coreset", layer), str(device), dtype, fore if isolation else 0, isolation, percent)
        if key not in self._prepared:
            indices = self.coreset(layer, percent)
            if indices is None:
                raise KeyError(f"the bank holds no {percent:g}% coreset of {layer}")
            if dtype == torch.int8:  # the rows' own features rounded to int8, their isolation as a bias
                rows, owners = coreset_rows(hk.prepare_templates(self.features[layer].to(device)), indices)
                bias = self._isolation_bias(layer, fore, isolation)
                bias = None if bias is None else bias.reshape(-1)[indices.to(bias.device)].to(device)
                self._prepared[key] = (hk.QuantizedRows(rows, bias), owners)
            else:
                self._prepared[key] = coreset_rows(self.prepared(layer, device, dtype, fore, isolation), indices)
        return self._prepared[key]

    def _isolation_bias(self, layer: str, fore: int, isolation: float) -> torch.Tensor | None:
        """``isolation`` times the layer's isolation for the ``fore`` window (``[N, h, w]``), or None without one."""
        if not isolation:
            return None
        values = self.isolation(layer, fore)
        if values is None:
            raise KeyError(f"the bank holds no isolation of {layer} for the {fore}x{fore} window")
        return isolation * values.float()

    def prepared(self, layer: str, device: torch.device, dtype: torch.dtype, fore: int = 0,
                 isolation: float = 0.0) -> "hk.PreparedTemplates | hk.QuantizedTemplates":
        """The layer's templates on ``device``/``dtype``, laid out once for the kernels; with an
        ``isolation`` weight, carrying the isolation for the ``fore`` window (``set_isolation`` first).
        ``torch.int8``: a ``QuantizedTemplates`` of the float32 features, the weighted isolation as its bias."""
        key = (layer, str(device), dtype, fore if isolation else 0, isolation)
        if key not in self._prepared:
            if dtype == torch.int8:
                bias = self._isolation_bias(layer, fore, isolation)
                self._prepared[key] = hk.QuantizedTemplates(self.features[layer].to(device, torch.float32),
                                                            None if bias is None else bias.to(device))
                return self._prepared[key]
            features = self.features[layer].to(device, dtype)
            if isolation:
                values = self.isolation(layer, fore)
                if values is None:
                    raise KeyError(f"the bank holds no isolation of {layer} for the {fore}x{fore} window")
                self._prepared[key] = isolated_templates(features, values, isolation)
            else:
                self._prepared[key] = hk.prepare_templates(features)
        return self._prepared[key]

    def check(self, expected: dict) -> None:
        """Raise ``BankMismatch`` unless the bank's identity matches ``expected``."""
        for key in IDENTITY:
            if key in expected and json.dumps(self.config.get(key, IDENTITY_DEFAULTS.get(key))) != json.dumps(expected[key]):
                raise BankMismatch(
                    f"the bank was made with {key}={self.config.get(key, IDENTITY_DEFAULTS.get(key))!r}, but this detector uses "
                    f"{key}={expected[key]!r}; refit the bank with the detector's configuration"
                )

    def save(self, path, dtype: torch.dtype | None = None) -> Path:
        """Write the bank atomically; ``dtype``: the features' dtype in the file (default: as held)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.is_shard:
            raise ValueError(f"this bank is a shard (templates {self.offset}..{self.offset + len(self)} of "
                             f"{self.total}); save the whole bank")
        tensors = {name: t.detach().cpu().to(dtype or t.dtype).contiguous() for name, t in self.features.items()}
        tensors.update({EXTRA + name: t.detach().cpu().contiguous() for name, t in self.extras.items()})
        metadata = {"format": FORMAT, "config": json.dumps(self.config), "checksum": checksum(tensors),
                    "sources": json.dumps(self.sources)}
        _remove_stale_temporaries(path)
        # the writer's pid in the name: a later save removes what a killed writer left behind
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a bank gets the mode any new file would
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path, expected: dict | None = None, shard: tuple[int, int] | None = None) -> "TemplateBank":
        """Read and validate a bank; ``shard=(rank, world)`` reads only that rank's rows of the templates.

        The file is opened once and everything is read from that one handle (a bank replaced while
        it is read gives the old file or the new one, never a mix). Everything is checked before the
        bank is returned: format, configuration keys, types and bounds, the layers the parameters use,
        shapes, dtypes, finite unit-bounded features and (whole banks) the tensors' checksum.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"bank: no file at {path}")
        try:
            metadata, tensors, total, rows = _read_bank_file(path, shard)
        except (BankInvalid, ShardError):
            raise
        except Exception as error:
            raise BankInvalid(f"bank: {path} is not a readable safetensors file ({error})") from None
        config = _checked_config(path, metadata)
        if shard is None and "checksum" in metadata and checksum(tensors) != metadata["checksum"]:
            raise BankInvalid(f"bank: {path}: its tensors do not match the checksum saved with them "
                              "(the file was corrupted or edited); refit the bank")
        extras = {k[len(EXTRA):]: tensors.pop(k) for k in list(tensors) if k.startswith(EXTRA)}
        _check_features(path, tensors, config)
        _check_isolation(path, extras, tensors)
        _check_coresets(path, extras, tensors, total)
        if shard is not None:
            extras = _coreset_shares(extras, tensors, rows)
        problem = calibration.check_extras(extras)
        if problem:
            raise BankInvalid(f"bank: {path}: {problem}; refit the bank")
        if config.get("retrieval_k") is not None and not {"codebook_centers", "histogram_counts"} <= set(extras):
            raise BankInvalid(f"bank: {path}: its configuration asks for retrieval (retrieval_k) but the file "
                              "holds no codebook and histograms; refit the bank")
        sources = _checked_sources(path, metadata, total)[rows.start:rows.stop]
        thumbnails = extras.get(THUMBNAILS)
        if thumbnails is not None and (thumbnails.dtype != torch.uint8 or thumbnails.dim() != 4
                                       or tuple(thumbnails.shape[:2]) != (len(rows), 3)):
            raise BankInvalid(f"bank: {path}: its thumbnails must be uint8 [{len(rows)}, 3, h, w]; got "
                              f"{thumbnails.dtype} {tuple(thumbnails.shape)}")
        bank = cls(tensors, config, extras, rows.start, total, sources)
        if expected:
            bank.check(expected)
        return bank


def _umask() -> int:
    """The process's umask, read without changing it (Linux), else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.<pid>.*.tmp`` files next to ``path`` whose writer process no longer exists."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, another user's


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _read_bank_file(path: Path, shard):
    """``(metadata, tensors, total, rows)`` from one open file handle.

    The safetensors format (an 8-byte header length, a JSON header, the tensors' bytes) is read
    here from a single memory map of one descriptor: safetensors' own ``safe_open`` reopens the
    file by name for each tensor, so a bank replaced meanwhile could mix two files.
    """
    import mmap
    import math

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{size} bytes, too short for a header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            length = int.from_bytes(view[:8], "little")
            if not 2 <= length <= size - 8:
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(bytes(view[8:8 + length]))
            metadata = header.pop("__metadata__", None) or {}
            if not isinstance(metadata, dict) or metadata.get("format") not in READABLE:
                raise BankInvalid(f"bank: {path} is not a hetmm template bank "
                                  f"(format {metadata.get('format') if isinstance(metadata, dict) else None!r})")
            layers = sorted(n for n in header if not n.startswith(EXTRA))
            total = int(header[layers[0]]["shape"][0]) if layers else 0
            rows = _shard_rows(total, *shard) if shard is not None else range(total)
            tensors = {}
            for name, info in header.items():
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                start, end = (int(o) for o in info["data_offsets"])
                itemsize = torch.empty(0, dtype=dtype).element_size()
                if not 0 <= start <= end <= size - 8 - length or end - start != math.prod(shape) * itemsize:
                    raise ValueError(f"tensor {name!r}: its offsets do not fit the file")
                first, count = 0, (shape[0] if shape else 1)
                if shape and (not name.startswith(EXTRA) or _per_template(name[len(EXTRA):])):
                    first, count = rows.start, len(rows)  # a shard reads only its rows
                    shape = [count, *shape[1:]]
                row_bytes = math.prod(shape[1:]) * itemsize if shape else itemsize
                offset = 8 + length + start + first * row_bytes
                data = bytearray(view[offset:offset + count * row_bytes])
                tensors[name] = torch.frombuffer(data, dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)
    return metadata, tensors, total, rows


class BankInvalid(ValueError):
    """A bank file that is not a complete, valid hetmm bank."""


# bounds on what a bank's configuration may ask of the machine that loads it
MAX_IMAGE_SIZE = 4096
UNIT_TOLERANCE = 1e-2  # features are L2-normalised (PTS centres average them: shorter, never longer)


def checksum(tensors: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _checked_config(path: Path, metadata: dict) -> dict:
    try:
        config = json.loads(metadata["config"])
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise BankInvalid(f"bank: {path}: its configuration is missing or not JSON ({error})") from None
    if not isinstance(config, dict):
        raise BankInvalid(f"bank: {path}: its configuration must be a JSON object; got {type(config).__name__}")
    required = {"backbone": str, "image_size": int, "params": str, "layers": list}
    for key, kind in required.items():
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise BankInvalid(f"bank: {path}: configuration key {key!r} must be a {kind.__name__}; "
                              f"got {config.get(key)!r}")
    for key in ("image_size", "out_size"):
        value = config.get(key, 256)
        if not isinstance(value, int) or isinstance(value, bool) or not 16 <= value <= MAX_IMAGE_SIZE:
            raise BankInvalid(f"bank: {path}: {key} must be a whole number from 16 to {MAX_IMAGE_SIZE}; got {value!r}")
    if not set(config["layers"]) <= set(LAYERS):
        raise BankInvalid(f"bank: {path}: layers must be among {list(LAYERS)}; got {config['layers']!r}")
    if config.get("weights") is not None and not isinstance(config["weights"], str):
        raise BankInvalid(f"bank: {path}: weights must be a string or null; got {config['weights']!r}")
    if config.get("retrieval_k") is not None and not (isinstance(config["retrieval_k"], int) and config["retrieval_k"] >= 1):
        raise BankInvalid(f"bank: {path}: retrieval_k must be a positive whole number or null; got {config['retrieval_k']!r}")
    try:
        params = parse_params(config["params"])
    except (TypeError, ValueError) as error:
        raise BankInvalid(f"bank: {path}: {error}") from None
    magnitude = sorted(layer for layer, p in params.active_layers.items() if p.magnitude)
    problem = scales_problem(config.get("magnitude_scales"), magnitude) if magnitude else None
    if problem:
        raise BankInvalid(f"bank: {path}: its parameters make {magnitude} magnitude-aware (m=), so magnitude_scales "
                          f"must give each a finite positive length: {problem}")
    return config


def _checked_sources(path: Path, metadata: dict, total: int) -> list:
    """Each template's source file (``None``: not from a file); a bank of format 1 has none."""
    if "sources" not in metadata:
        return [None] * total
    try:
        sources = json.loads(metadata["sources"])
    except (TypeError, json.JSONDecodeError) as error:
        raise BankInvalid(f"bank: {path}: its template sources are not JSON ({error})") from None
    if not isinstance(sources, list) or len(sources) != total or not all(s is None or isinstance(s, str)
                                                                         for s in sources):
        raise BankInvalid(f"bank: {path}: its template sources must be {total} file names or nulls")
    return sources


def _check_features(path: Path, features: dict, config: dict) -> None:
    strides = {name: 2 ** (2 + i) for i, name in enumerate(LAYERS)}  # every backbone taps strides 4, 8, 16
    for name, t in features.items():
        side = -(-config["image_size"] // strides.get(name, 1))
        if name in strides and t.dim() == 4 and tuple(t.shape[2:]) != (side, side):
            raise BankInvalid(f"bank: {path}: {name} is {t.shape[2]}x{t.shape[3]}, but {config['image_size']} px "
                              f"images give {side}x{side} at stride {strides[name]}")
    needed = set(parse_params(config["params"]).active_layers)
    if not needed <= set(features):
        raise BankInvalid(f"bank: {path}: its parameters use {sorted(needed)}, the file holds {sorted(features)}")
    for name, t in features.items():
        if not t.is_floating_point() or t.dim() != 4:
            raise BankInvalid(f"bank: {path}: {name} must be floating [N, C, h, w] features; got {t.dtype} {tuple(t.shape)}")
        if t.numel() == 0:
            continue
        if not torch.isfinite(t).all():
            raise BankInvalid(f"bank: {path}: {name} holds NaN or inf")
        norms = torch.linalg.vector_norm(t.double(), dim=1)  # float64: a scaled bank must not overflow to inf
        if norms.max() > 1 + UNIT_TOLERANCE or norms.max() == 0:
            raise BankInvalid(f"bank: {path}: {name} must hold L2-normalised features; norms run from "
                              f"{norms.min().item():.3g} to {norms.max().item():.3g}")


def _check_isolation(path: Path, extras: dict, features: dict) -> None:
    for name, values in extras.items():
        if not name.startswith(ISOLATION):
            continue
        layer, _, fore = name[len(ISOLATION):].partition(".")
        if layer not in features or not fore.isdigit():
            raise BankInvalid(f"bank: {path}: {name} names no layer of the bank and window ({sorted(features)})")
        expected = (features[layer].shape[0], *features[layer].shape[2:])
        if not values.is_floating_point() or tuple(values.shape) != expected:
            raise BankInvalid(f"bank: {path}: {name} must be floating {expected} (one value per template pixel); "
                              f"got {values.dtype} {tuple(values.shape)}")
        if values.numel() and not (torch.isfinite(values).all() and values.min() >= 0
                                   and values.max() <= MAX_ISOLATION + UNIT_TOLERANCE):
            raise BankInvalid(f"bank: {path}: {name} must hold dissimilarities in [0, {MAX_ISOLATION:g}]")


def _is_coreset(indices: torch.Tensor, pixels: int) -> bool:
    """Whether ``indices`` is a 1-D int64 tensor of template-pixel indices in ``[0, pixels)``."""
    return indices.dtype == torch.int64 and indices.dim() == 1 and (
        not indices.numel() or 0 <= indices.min() <= indices.max() < pixels)


def _coreset_shares(extras: dict, features: dict, rows: range) -> dict:
    """The extras with each coreset cut to the templates ``rows`` (renumbered from the first): merged by
    the maximum across ranks, the shards' global matches are the whole coreset's."""
    extras = dict(extras)
    for name in [n for n in extras if n.startswith(CORESET)]:
        layer = name[len(CORESET):].partition(".")[0]
        pixels = features[layer].shape[2] * features[layer].shape[3]
        indices = extras[name]
        extras[name] = indices[(indices >= rows.start * pixels) & (indices < rows.stop * pixels)] - rows.start * pixels
    return extras


def _check_coresets(path: Path, extras: dict, features: dict, total: int) -> None:
    for name, values in extras.items():
        if not name.startswith(CORESET):
            continue
        layer, _, percent = name[len(CORESET):].partition(".")
        if layer not in features:
            raise BankInvalid(f"bank: {path}: {name} names no layer of the bank ({sorted(features)})")
        pixels = total * features[layer].shape[2] * features[layer].shape[3]
        if not _is_coreset(values, pixels):
            raise BankInvalid(f"bank: {path}: {name} must hold int64 template-pixel indices in [0, {pixels}); "
                              f"got {values.dtype} {tuple(values.shape)}")


class ShardError(ValueError):
    """A bank that cannot be split over the ranks asked for."""


def _shard_rows(count: int, rank: int, world: int) -> range:
    if world > count:
        raise ShardError(f"a bank of {count} templates cannot be split over {world} ranks (one at least each)")
    return shard_range(count, rank, world)
