"""The HETMM detector: backbone features, a template bank, ATMM scoring."""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import hetmm_kernels as hk
from hetmm_kernels.validation import all_finite

from . import distributed
from .backbone import LAYERS, Backbone
from .bank import MAX_IMAGE_SIZE, THUMBNAILS, TemplateBank, thumbnails
from .calibration import (DEFAULT_FPR, F1_IMAGE_THRESHOLD, FOLDS, Calibration, Regions, calibration_groups,
                          calibration_neighbours, normalised, outside_own_group)
from .clustering import compress
from .retrieval import Codebook
from .data import MIN_SIDE, measured_prefetched, prefetched, read_image
from .explanation import explain_regions, explanation_layer
from .parameters import neighbourhood_for, params_for, parse_params
from .scoring import LayerMatches, template_coreset, template_isolation
from .magnitude import directions, rms_length, scales_problem
from .selection import DESCRIPTOR_LAYER, image_descriptors, spread, spread_images, unit_means


# precision -> (backbone dtype, matching dtype); products always accumulate in float32 (int32 for int8). int8:
# the features rounded to int8 per pixel and multiplied exactly (hetmm_kernels.quantized), the backbone in
# bfloat16 where the CPU computes it natively, else float32 (``backbone_dtype``).
PRECISIONS = {"fp32": (torch.float32, torch.float32), "fp16": (torch.float16, torch.float16),
              "bf16": (torch.bfloat16, torch.bfloat16), "bf16-backbone": (torch.bfloat16, torch.float32),
              "int8": (None, torch.int8)}
# HETMM_NO_BF16=1: behave as on a CPU without native bfloat16 (``auto``'s choice and int8's backbone), to measure
# and test that pairing on a CPU that has it.
NO_BF16_VARIABLE = "HETMM_NO_BF16"


class OptionsError(ValueError):
    """A detector option outside what it accepts (named in the message)."""


def native_bf16_cpu() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX) and ``HETMM_NO_BF16`` is not set;
    elsewhere bfloat16 is emulated, slowly."""
    if os.environ.get(NO_BF16_VARIABLE, "0") not in ("", "0"):
        return False
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def int8_cpu() -> bool:
    """True when the int8 matching is compiled for this CPU (numba, AVX512-VNNI: Intel Xeon since Cascade Lake,
    Core since Ice Lake, AMD since Zen 4); elsewhere it would run dequantised, slower than float32."""
    from hetmm_kernels.cpu_ops import int8_match

    return int8_match.available()


def resolve_precision(precision: str = "auto", half=False, device=torch.device("cpu")) -> str:
    """``fp32``, ``fp16``, ``bf16``, ``bf16-backbone`` or ``int8`` for a detector on ``device``.

    ``auto`` on a CPU: ``int8`` where the int8 matching is compiled (AVX512-VNNI), with the backbone in bfloat16
    where the CPU has it natively and float32 elsewhere (``backbone_dtype``); else ``bf16`` where bfloat16 is
    native; else float32. On GPUs ``auto`` is float32 (``fp16``/``bf16`` there are explicit). ``half`` is the older
    spelling (True = ``fp16``) and wins over ``auto``. float16 on a CPU is refused: no CPU has fast kernels for it.
    """
    if half not in (False, None, True, "fp16", "bf16"):
        raise OptionsError(f"half must be False, True (float16), 'fp16' or 'bf16'; got {half!r}")
    if precision not in ("auto", *PRECISIONS):
        raise OptionsError(f"precision must be 'auto', 'fp32', 'fp16', 'bf16', 'bf16-backbone' or 'int8'; "
                           f"got {precision!r}")
    legacy = {True: "fp16", "fp16": "fp16", "bf16": "bf16"}.get(half)
    if legacy and precision not in ("auto", legacy):
        raise OptionsError(f"half={half!r} and precision={precision!r} disagree; give one of them")
    device = torch.device(device)
    chosen = legacy or precision
    if chosen == "auto":
        if device.type != "cpu":
            return "fp32"
        return "int8" if int8_cpu() else "bf16" if native_bf16_cpu() else "fp32"
    if device.type == "cpu" and chosen == "fp16":  # (bf16-backbone is for CPUs; on a GPU it is what it says)
        raise OptionsError("precision='fp16' (half=True) has no fast CPU kernels; on a CPU use precision='bf16' "
                         "(native on AVX512-BF16/AMX cores) or 'fp32'")
    return chosen


def backbone_dtype(precision: str, device=torch.device("cpu")) -> torch.dtype:
    """The backbone's dtype for a resolved ``precision``: int8's is bfloat16 on a CPU with native bfloat16,
    float32 elsewhere."""
    dtype = PRECISIONS[precision][0]
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cpu" and native_bf16_cpu() else torch.float32
    return dtype


@dataclass
class Prediction:
    """Per-image results, named as anomalib names them.

    Labels, masks and regions come with a threshold: the detector's ``threshold`` (one number for
    images and pixels), else the calibrated ones at ``fpr`` / ``pixel_fpr`` when the bank is
    calibrated (``hetmm.calibration``).
    """

    pred_score: torch.Tensor  # [B] image anomaly scores
    anomaly_map: torch.Tensor  # [B, H, W] pixel anomaly map (post-processed for pixel AUROC)
    pro_map: torch.Tensor  # [B, H, W] the map post-processed for PRO
    pred_label: torch.Tensor | None = None  # [B] bool: pred_score >= image_threshold
    pred_mask: torch.Tensor | None = None  # [B, H, W] bool: anomaly_map >= pixel_threshold, empty where not pred_label
    # per image: regions of pred_mask (box, area, peak), largest first; lazy. With predict(explain=True), each
    # region of a flagged image also has "nearest": {"template", "source", "box", "similarity"} (hetmm.explanation)
    regions: Sequence | None = None
    norm_score: torch.Tensor | None = None  # [B] score / (score + image threshold): 0..1, 0.5 at the threshold
    norm_map: torch.Tensor | None = None  # [B, H, W] the same with the pixel threshold
    image_threshold: float | None = None
    pixel_threshold: float | None = None


def _source(item) -> str | None:
    """What a template remembers of where it came from: its file's absolute path (``None``: a tensor)."""
    return str(Path(item).resolve()) if isinstance(item, (str, Path)) else None


def _check_side(images: torch.Tensor) -> None:
    height, width = images.shape[-2:]
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"images are {width} x {height} pixels; the shorter side must be at least {MIN_SIDE}")


def _check_pixels(images: torch.Tensor) -> None:
    """Images are floats in [0, 1]: uint8 or 0..255 floats would be scored as if they were (silently wrong)."""
    if not images.is_floating_point():
        raise TypeError(f"images must be floats in [0, 1]; got {images.dtype} (divide uint8 images by 255)")
    low, high = torch.aminmax(images.detach().float())
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise ValueError("images contain NaN or inf")
    if low < -1e-3 or high > 1 + 1e-3:
        hint = " (they look like 0..255: divide by 255)" if high > 2 else ""
        raise ValueError(f"images must be floats in [0, 1]; got values from {low.item():.4g} to {high.item():.4g}{hint}")


@dataclasses.dataclass(frozen=True)
class DetectorOptions:
    """Everything a ``HETMM`` takes besides its backbone and weights, in one value to keep and pass on.

    category / params: the parameter string (the paper's for its MVTec AD categories, ``DEFAULT``
    otherwise); image_size / out_size: input and map size (16-4096); device; precision ("auto",
    "fp32", "fp16", "bf16", "bf16-backbone", "int8"; ``half`` is the older switch); batch_size; threshold
    (a number: labels and masks at it; "f1": the F1-optimal image threshold ``calibrate_f1`` stored, with
    the calibrated pixel threshold; None: the calibrated thresholds); fpr / pixel_fpr (the false-alarm
    rates the calibrated image / pixel thresholds aim at; pixel_fpr None: fpr); download (allow hub
    downloads); progress (bars); templates ("auto": every training image up to max_templates, beyond that
    the max_templates that spread farthest (``hetmm.selection``), so predict costs the same at any N; "all";
    or "pts") and tsize (PTS set size); retrieval_k / retrieval_layer (target before shooting);
    cuda_graph; neighbourhood (k x k feature averaging; None: by the parameter string); workers
    (threads decoding image files ahead of the model; None: ``default_workers(device)``, on a CPU chosen per
    call from the measured decoding and model costs; 0: none) and
    prefetch (batches decoded ahead).
    """

    category: str | None = None
    params: str | None = None
    image_size: int = 256
    out_size: int = 256
    device: object = None
    precision: str = "auto"
    half: object = False
    batch_size: int = 8
    threshold: float | str | None = None
    fpr: float = DEFAULT_FPR
    pixel_fpr: float | None = None
    download: bool = False
    progress: bool = False
    templates: str = "auto"
    tsize: int = 60
    max_templates: int = 40
    retrieval_k: int | None = None
    retrieval_layer: str = "layer2"
    cuda_graph: bool = False
    neighbourhood: int | None = None
    workers: int | None = None
    prefetch: int = 2


# The options a bank decides (from its configuration) when a detector is made from it; every other option of
# DetectorOptions is the caller's. A bank saved before a key existed meant OLDER_BANK_DEFAULTS by it.
BANK_OPTIONS = ("category", "params", "image_size", "out_size", "templates", "tsize", "max_templates",
                "retrieval_k", "retrieval_layer", "neighbourhood")
OLDER_BANK_DEFAULTS = {"templates": "all", "neighbourhood": 1}

# Beyond this many other templates, each template's isolation is measured against its most similar
# images only: the cost grows as N x 64, not N x N (N = 400: about 8x less).
ISOLATION_NEIGHBOURS = 64


def _most_similar_images(features: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k]``: for each image, the ``k`` others whose mean feature is closest in cosine (never itself)."""
    pooled = unit_means(features)
    similarity = pooled @ pooled.t()
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(k, dim=1).indices.cpu()


def _without_self(nearest: torch.Tensor, k: int) -> torch.Tensor:
    """``[T, k]``: each template's ``k + 1`` nearest less itself (or less the last, if ties left it out)."""
    own = nearest == torch.arange(nearest.shape[0])[:, None]
    own[:, -1] |= ~own.any(1)
    return nearest[~own].reshape(nearest.shape[0], k)


def default_workers(device: torch.device) -> int | None:
    """Decoding threads when none are asked for.

    On a GPU the host is otherwise idle: all cores but one (at most 8). On a CPU the decoding threads take
    cores from the model, and whether they pay depends on the files: None, chosen per call from the measured
    decoding and model costs (``hetmm.data.choose_workers``): none for 256 px PNGs on 2 cores, two for
    1024 px ones.
    """
    import os

    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return min(8, max(1, cores - 1))
    return None


class HETMM:
    """Training-free anomaly detector by template mutual matching.

    >>> det = HETMM(backbone="resnet18", weights=None, image_size=64, out_size=64)
    >>> det = det.fit(torch.rand(4, 3, 64, 64))
    >>> det.predict(torch.rand(2, 3, 64, 64)).anomaly_map.shape
    torch.Size([2, 64, 64])
    """

    def __init__(self, backbone: str = "wide_resnet101_2", weights="imagenet", options: "DetectorOptions | None" = None,
                 **overrides):
        """``options``: a ``DetectorOptions``; keyword arguments override its fields (``HETMM(..., image_size=64)``)."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(DetectorOptions)})
        if unknown:
            raise TypeError(f"HETMM got unknown option(s) {unknown}; the options are the fields of DetectorOptions: "
                            f"{[f.name for f in dataclasses.fields(DetectorOptions)]}")
        self.options = dataclasses.replace(options or DetectorOptions(), **overrides)
        # fields are read by name (never unpacked by position), so a new option is added in DetectorOptions only
        opts = self.options
        pixel_fpr = opts.fpr if opts.pixel_fpr is None else opts.pixel_fpr
        for name, rate in (("fpr", opts.fpr), ("pixel_fpr", pixel_fpr)):
            if not (isinstance(rate, (int, float)) and 0 < rate < 1):
                raise OptionsError(f"{name} must be a false-alarm rate in (0, 1); got {rate!r}")
        self.fpr, self.pixel_fpr = float(opts.fpr), float(pixel_fpr)
        if isinstance(opts.threshold, str) and opts.threshold != "f1":
            raise OptionsError(f"threshold must be a number, 'f1' or None; got {opts.threshold!r}")
        if (opts.workers is not None and int(opts.workers) < 0) or int(opts.prefetch) < 1:
            raise OptionsError(f"workers must be >= 0 and prefetch >= 1; got workers={opts.workers}, "
                               f"prefetch={opts.prefetch}")
        self.prefetch = int(opts.prefetch)
        for name, size in (("image_size", opts.image_size), ("out_size", opts.out_size)):
            if not 16 <= int(size) <= MAX_IMAGE_SIZE:
                raise OptionsError(f"{name} must be from 16 to {MAX_IMAGE_SIZE} pixels; got {size}")
        if int(opts.batch_size) < 1:
            raise OptionsError(f"batch_size must be at least 1; got {opts.batch_size}")
        if opts.templates not in ("auto", "all", "pts"):
            raise OptionsError(f"templates must be 'auto', 'all' or 'pts'; got {opts.templates!r}")
        if int(opts.tsize) < 1 or int(opts.max_templates) < 2:
            raise OptionsError(f"tsize must be at least 1 and max_templates at least 2; got tsize={opts.tsize}, "
                               f"max_templates={opts.max_templates}")
        self.templates, self.tsize, self.max_templates = opts.templates, int(opts.tsize), int(opts.max_templates)
        if opts.retrieval_k is not None and (int(opts.retrieval_k) < 1 or opts.templates == "pts"):
            raise OptionsError("retrieval_k must be a positive int, and retrieval needs templates='all' or 'auto' "
                               "(a PTS set mixes images per pixel: there are no whole images to retrieve)")
        if opts.retrieval_layer not in LAYERS:
            raise OptionsError(f"retrieval_layer must be one of {LAYERS}; got {opts.retrieval_layer!r}")
        self.retrieval_k = None if opts.retrieval_k is None else int(opts.retrieval_k)
        self.retrieval_layer = opts.retrieval_layer
        self.device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.workers = default_workers(self.device) if opts.workers is None else int(opts.workers)
        self.decoding = None  # the last measured choice of decoding threads: {decode_ms, compute_ms, workers}
        self._decode_choices: dict = {}  # _file_kind -> decoding threads, measured once per kind
        self.precision = resolve_precision(opts.precision, opts.half, self.device)
        self.params_string = opts.params or params_for(opts.category)
        self.params = parse_params(self.params_string)
        self.category = opts.category
        self.image_size, self.out_size = int(opts.image_size), int(opts.out_size)
        self.batch_size, self.threshold, self.progress = int(opts.batch_size), opts.threshold, opts.progress
        neighbourhood = opts.neighbourhood
        if neighbourhood is None:
            neighbourhood = neighbourhood_for(opts.category, opts.params)
        self.backbone = Backbone(backbone, weights, download=opts.download, neighbourhood=neighbourhood).to(self.device)
        self.backbone.set_precision(backbone_dtype(self.precision, self.device), self.feature_dtype)
        # magnitude-aware layers (``_m=``): their scale factor k; the RMS lengths s come from the first images extracted
        self.magnitude = {layer: p.magnitude for layer, p in self.params.active_layers.items() if p.magnitude}
        self.magnitude_scales: dict | None = None
        self.bank: TemplateBank | None = None
        self.group = None  # the process group of a sharded bank (see shard)
        self._retrieval_cache = None
        if opts.cuda_graph and self.device.type != "cuda":
            raise OptionsError(f"cuda_graph needs a CUDA device; this detector runs on {self.device}")
        self.cuda_graph = bool(opts.cuda_graph)
        self._graphs: dict = {}  # (batch size, bank, bank version) -> CapturedPredict

    # ------------------------------------------------------------------ configuration
    @property
    def config(self) -> dict:
        return dict(backbone=self.backbone.name, weights=self.backbone.weights, image_size=self.image_size,
                    layers=list(LAYERS), params=self.params_string, category=self.category, out_size=self.out_size,
                    templates=self.templates, tsize=self.tsize, max_templates=self.max_templates,
                    retrieval_k=self.retrieval_k,
                    retrieval_layer=self.retrieval_layer, neighbourhood=self.backbone.neighbourhood,
                    magnitude_scales=self.magnitude_scales)

    @property
    def matching_dtype(self) -> torch.dtype:
        """The dtype the matching multiplies in (accumulation float32; int32 for int8)."""
        return PRECISIONS[self.precision][1]

    @property
    def feature_dtype(self) -> torch.dtype:
        """The dtype of the backbone's features: the matching's, but float32 for int8 (rounded per pixel there)."""
        return torch.float32 if self.matching_dtype == torch.int8 else self.matching_dtype

    @property
    def half(self):
        """The precision in the older ``half=`` spelling: False, ``"fp16"`` or ``"bf16"``."""
        return {"fp16": "fp16", "bf16": "bf16"}.get(self.precision, False)

    # ------------------------------------------------------------------ features
    def _images(self, images) -> list:
        if isinstance(images, torch.Tensor):
            if images.dim() == 3:
                images = images[None]
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be [N, 3, H, W] floats in [0, 1]; got {tuple(images.shape)}")
            if images.shape[0] == 0:
                raise ValueError("images is empty")
            _check_side(images)
            _check_pixels(images)
            return list(images)
        items = list(images)
        if not items:
            raise ValueError("images is empty")
        for item in items:
            if isinstance(item, torch.Tensor):
                if item.dim() != 3 or item.shape[0] != 3:
                    raise ValueError(f"each image must be [3, H, W] floats in [0, 1]; got {tuple(item.shape)}")
                _check_side(item)
                _check_pixels(item)
            elif not isinstance(item, (str, Path)):
                raise TypeError(f"images must be a tensor or a list of tensors or file paths; got {type(item).__name__}")
        return items

    def _host_batch(self, items) -> torch.Tensor:
        """Decode and resize one batch on the host (in a decoding thread when there are file paths). The stack
        below starts an OpenMP team in a decoding thread, and that is kept on purpose: with more team threads
        than cores libgomp's waits sleep at once instead of spinning, which leaves the cores to the decoders
        (1024 px PNGs, 2 decoding threads: 59-60 images/s, 52.5 when the threads started no team)."""
        tensors = [read_image(x, self.image_size) if isinstance(x, (str, Path)) else x.float() for x in items]
        batch = torch.stack([t if t.shape[-2:] == (self.image_size,) * 2 else
                             F.interpolate(t[None], size=(self.image_size,) * 2, mode="bilinear",
                                           align_corners=False, antialias=True)[0] for t in tensors])
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()  # so the copy below can overlap the previous batch's work
        return batch

    def _file_kind(self, items) -> tuple:
        """What decides decoding's cost and the model's: the first file's suffix and size to a factor of two,
        the batch size and the image size."""
        first = next(Path(x) for x in items if isinstance(x, (str, Path)))
        try:
            size = first.stat().st_size.bit_length()
        except OSError:  # read_image will say what is wrong with it
            size = -1
        return first.suffix.lower(), size, self.batch_size, self.image_size

    def _batches(self, items, desc: str, progress: bool):
        """The batches of ``items`` on the device, in order; files decoded ahead by the worker threads."""
        chunks = range(0, len(items), self.batch_size)
        if progress and self.progress and len(chunks) > 1:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc=desc, unit="batch", leave=False)
        files = any(isinstance(x, (str, Path)) for x in items)
        batches = (items[i:i + self.batch_size] for i in chunks)
        if files and self.workers is None:  # threads chosen from the measured costs of a first batch
            kind = (desc, *self._file_kind(items))  # (extracting features costs less than predicting)
            if kind in self._decode_choices:  # measured before for files like these
                loads = prefetched(batches, self._host_batch, self._decode_choices[kind], self.prefetch)
            else:
                def report(decode, compute, workers):
                    self._decode_choices[kind] = workers
                    self.decoding = dict(decode_ms=decode * 1e3, compute_ms=compute * 1e3, workers=workers)

                loads = measured_prefetched(batches, self._host_batch, self.prefetch, report=report)
        else:
            loads = prefetched(batches, self._host_batch, self.workers if files else 0, self.prefetch)
        for batch in loads:
            yield batch.to(self.device, non_blocking=True)

    def extract(self, images, progress: bool = True) -> dict:
        """Per-layer unit features ``{layer: [N, C, h, w]}`` of images (tensor or file paths), batched."""
        return self._extract(self._images(images), progress)

    def _template_features(self, items: list) -> tuple:
        """``(features, sources, thumbnails)`` of images that become templates (``fit_features``' arguments)."""
        kept = []
        features = self._extract(items, kept_thumbnails=kept)
        return features, [_source(x) for x in items], torch.cat(kept)

    def _extract(self, items: list, progress: bool = True, kept_thumbnails: list | None = None) -> dict:
        """``extract`` of items ``_images`` has checked; each batch's ``thumbnails`` appended to
        ``kept_thumbnails`` when given."""
        parts = []
        for batch in self._batches(items, "features", progress):
            parts.append(self._features(batch))
            if kept_thumbnails is not None:
                kept_thumbnails.append(thumbnails(batch))
        return {layer: torch.cat([p[layer] for p in parts]) for layer in LAYERS}

    def _features(self, batch: torch.Tensor) -> dict:
        """The backbone's features of a batch; the first batch a magnitude-aware detector sees sets its scales."""
        if self.magnitude and self.magnitude_scales is None:
            raw = self.backbone(batch, normalize=False)
            self.set_magnitude_scales({layer: rms_length(raw[layer]) for layer in self.magnitude})
            return self.backbone.normalized(raw)
        return self.backbone(batch)

    def set_magnitude_scales(self, scales: dict | None) -> None:
        """The RMS feature length ``s`` of each magnitude-aware layer (``hetmm.magnitude``), as a bank stores it;
        ``None`` forgets them (the next extraction measures them again)."""
        if scales is not None:
            problem = scales_problem(scales, self.magnitude)
            if problem:
                raise ValueError(f"magnitude_scales: {problem}")
            scales = {layer: float(scales[layer]) for layer in sorted(self.magnitude)}
        self.magnitude_scales = scales
        self.backbone.lift = {} if scales is None else {layer: self.magnitude[layer] * s for layer, s in scales.items()}

    def _descriptor_features(self, features: dict) -> dict:
        """What ``image_descriptors`` reads of ``features``, as unit directions."""
        return {DESCRIPTOR_LAYER: self._directions(features[DESCRIPTOR_LAYER], DESCRIPTOR_LAYER)}

    def _directions(self, features: torch.Tensor, layer: str) -> torch.Tensor:
        """A layer's features as unit directions: a magnitude-aware layer's lift undone (image descriptors, shared
        content and the most similar images read directions, not lengths)."""
        return directions(features) if layer in self.magnitude else features

    # ------------------------------------------------------------------ templates
    def fit(self, images) -> "HETMM":
        """Build the template bank from normal images (all of them, the ones ``templates="auto"`` keeps, or
        their PTS tiny set)."""
        items = self._images(images)
        if self.templates == "auto" and len(items) > self.max_templates:
            # two passes: every image's descriptor only (memory flat in N), then the kept images' features
            descriptors = torch.cat([image_descriptors(self._descriptor_features(self._features(batch)))
                                     for batch in self._batches(items, "selection", True)])
            items = [items[i] for i in spread(descriptors, self.max_templates).tolist()]
        return self.fit_features(*self._template_features(items))

    def fit_features(self, features: dict, sources: list | None = None,
                     template_thumbnails: torch.Tensor | None = None) -> "HETMM":
        """``fit`` from features ``extract`` gave (``{layer: [N, C, h, w]}``), e.g. collected batch by batch; each
        image's ``sources`` (file name) and ``template_thumbnails`` (``hetmm.bank.thumbnails``) when known, which
        explanations show (``predict(explain=True)``)."""
        missing = [layer for layer in LAYERS if layer not in features]
        if missing:
            raise ValueError(f"features must hold every layer {list(LAYERS)} (as extract returns them); missing {missing}")
        if self.magnitude and self.magnitude_scales is None:
            raise ValueError(f"features: the parameters make {sorted(self.magnitude)} magnitude-aware (m=), whose "
                             "scale the detector measures on the first images it extracts: give fit_features what "
                             "this detector's extract returned")
        if self.templates == "auto":  # predict's cost stays that of max_templates, whatever the training set
            keep = spread_images(self._descriptor_features(features), self.max_templates)
            if len(keep) < len(features[LAYERS[0]]):  # before the float32 copy: only the kept images get one
                features = {k: features[k][keep.to(features[k].device)] for k in LAYERS}
                sources = None if sources is None else [sources[i] for i in keep.tolist()]
                template_thumbnails = None if template_thumbnails is None else template_thumbnails[keep.cpu()]
        features = {k: features[k].float() for k in LAYERS}
        if self.templates == "pts":  # the templates are cluster centres, no image's
            templates, sources, template_thumbnails = {k: compress(v, self.tsize) for k, v in features.items()}, None, None
        else:
            templates = features
        self.bank = TemplateBank({k: v.cpu() for k, v in templates.items()}, self.config, sources=sources)
        if template_thumbnails is not None:
            self.bank.extras[THUMBNAILS] = template_thumbnails.cpu()
        if self.retrieval_k is not None:
            codebook = Codebook.fit(templates[self.retrieval_layer])
            self.bank.extras.update({"codebook_centers": codebook.centers,
                                     "histogram_counts": codebook.bank(templates[self.retrieval_layer]).counts})
        self._ensure_isolation()
        self._ensure_coresets()
        self.bank.set_calibration(self.calibrate(features if self.templates == "pts" else None))
        return self

    # ------------------------------------------------------------------ calibration
    @property
    def calibration(self) -> Calibration | None:
        """The normal scores the bank was calibrated with (``None``: not calibrated)."""
        return None if self.bank is None else self.bank.calibration

    def calibrate(self, features: dict | None = None) -> Calibration | None:
        """Score normal images as new ones would be: the bank's templates each against the others
        (leave-one-out; with retrieval, against its K nearest; beyond 65, its 64 most similar), less its
        calibration cluster (from 16 images on: ``calibration_groups``) and those it shares content with
        (overlapping crops, near-identical frames: ``calibration_neighbours``), or,
        given the training ``features`` of a PTS bank, each fold against the PTS set of the other folds.
        ``None`` for fewer than two images.
        """
        bank = self._require_bank()
        if features is None:
            if bank.is_shard:
                raise RuntimeError("calibrate the whole bank, then shard it")
            if len(bank) < 2:
                return None
            last = self._directions(bank.features[LAYERS[-1]], LAYERS[-1])
            neighbours = self._neighbours()
            if neighbours is None:
                neighbours = _most_similar_images(last, len(bank) - 1)
            neighbours = outside_own_group(neighbours, calibration_groups(unit_means(last)))
            scores, maps = self._score_features(bank.features, calibration_neighbours(last, neighbours))
            return Calibration.from_scores(scores, maps)
        count = len(features[LAYERS[0]])
        if count < 2:
            return None
        folds = torch.arange(count) % min(FOLDS, count)
        parts = []
        for fold in range(int(folds.max()) + 1):
            held_out, rest = folds == fold, folds != fold
            helper = self.with_bank(TemplateBank({k: compress(v[rest], self.tsize).cpu() for k, v in features.items()},
                                                 self.config))
            helper._ensure_isolation()
            parts.append(helper._score_features({k: v[held_out] for k, v in features.items()}))
        return Calibration.from_scores(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    def with_bank(self, bank: TemplateBank) -> "HETMM":
        """A shallow copy of this detector (the same network and options) holding ``bank``, with nothing cached
        from this one's bank (retrieval histograms, captured graphs)."""
        helper = copy.copy(self)
        helper.bank, helper._retrieval_cache, helper._graphs = bank, None, {}
        return helper

    def calibrate_on(self, images) -> "HETMM":
        """Calibrate with held-out normal images (not in the bank), scored as any new image is.

        For training images that are not like the images to come (overlapping crops of one sheet,
        frames of one video): their leave-one-out scores are lower than a new image's, and the
        thresholds would raise more false alarms than asked for. ``add_templates`` calibrates by
        leave-one-out again: call this after it.
        """
        bank = self._require_bank()
        if bank.is_shard:
            raise RuntimeError("calibrate the whole bank, then shard it")
        scores, maps = self._score_features(self.extract(images, progress=False))
        bank.set_calibration(Calibration.from_scores(scores, maps))
        return self

    def calibrate_f1(self, images, labels) -> float:
        """Store the F1-optimal image threshold on labelled validation ``images`` (``labels``: 1 anomalous,
        0 normal), as anomalib's adaptive threshold; ``threshold="f1"`` then uses it. Returns it."""
        from .metrics import best_f1

        labels = torch.as_tensor(labels).flatten()
        if not ((labels == 0) | (labels == 1)).all() or not (labels == 1).any() or not (labels == 0).any():
            raise ValueError("labels must be 0 (normal) or 1 (anomalous), with at least one of each")
        scores = self._predict_raw(images).pred_score
        if len(scores) != len(labels):
            raise ValueError(f"{len(scores)} images but {len(labels)} labels")
        threshold, _ = best_f1(labels, scores)
        self.bank.extras[F1_IMAGE_THRESHOLD] = torch.tensor([threshold], dtype=torch.float32)
        return threshold

    def _score_features(self, features: dict, indices: torch.Tensor | None = None):
        """Image scores and pixel maps (host) of already-extracted features, in batches."""
        scores, maps = [], []
        starts = range(0, len(features[LAYERS[0]]), self.batch_size)
        if self.progress and len(starts) > 8:  # the leave-one-out calibration of a large bank takes a while
            from tqdm import tqdm

            starts = tqdm(starts, desc="calibration", unit="batch", leave=False)
        for start in starts:
            rows = slice(start, start + self.batch_size)
            score, anomaly, _ = self._score({k: v[rows] for k, v in features.items()},
                                            None if indices is None else indices[rows].to(self.device))
            scores.append(score.float().cpu())
            maps.append(anomaly.float().cpu())
        return torch.cat(scores), torch.cat(maps)

    def _neighbours(self) -> torch.Tensor | None:
        """``[N, k]``: the templates each template is compared with when left out (``None``: all others)."""
        bank = self._require_bank()
        if self.retrieval_k is not None and len(bank) > 1:
            codebook, histogram_bank = self._histogram_bank()
            own = codebook.histograms(bank.features[self.retrieval_layer].to(self.device, torch.float32))
            k = min(self.retrieval_k, len(bank) - 1)
            _, nearest = hk.retrieve_topk(own, histogram_bank, k + 1)
            return _without_self(nearest.cpu(), k)
        if len(bank) > ISOLATION_NEIGHBOURS + 1:
            return _most_similar_images(self._directions(bank.features[LAYERS[-1]], LAYERS[-1]), ISOLATION_NEIGHBOURS)
        return None

    def thresholds(self) -> tuple[float, float] | None:
        """``(image, pixel)`` thresholds in force: ``threshold`` for both, else the calibrated ones at
        ``fpr`` / ``pixel_fpr`` (``None``: neither). A bank saved before calibration existed is
        calibrated here, once, as fit would have."""
        if self.threshold is not None and self.threshold != "f1":
            return float(self.threshold), float(self.threshold)
        calibration = self.calibration
        if calibration is None and self.templates != "pts" and not self._require_bank().is_shard:
            calibration = self.calibrate()
            self.bank.set_calibration(calibration)
        if self.threshold == "f1":
            stored = self.bank.extras.get(F1_IMAGE_THRESHOLD)
            if stored is None or calibration is None:
                raise OptionsError("threshold='f1' needs a bank with an F1-optimal threshold and a calibration: "
                                   "call calibrate_f1(validation_images, labels) (hetmm fit --val DIR)")
            return float(stored[0]), calibration.pixel_threshold(self.pixel_fpr)
        if calibration is None:
            return None
        return calibration.image_threshold(self.fpr), calibration.pixel_threshold(self.pixel_fpr)

    def _decide(self, result: Prediction) -> Prediction:
        """Labels, masks, regions and normalised scores from the thresholds in force (see ``Prediction``)."""
        thresholds = self.thresholds()
        if thresholds is None:
            return result
        image_threshold, pixel_threshold = thresholds
        result.image_threshold, result.pixel_threshold = image_threshold, pixel_threshold
        result.pred_label = result.pred_score >= image_threshold
        # a verdict and its picture agree: an image judged normal shows no defect regions, whatever its pixels
        result.pred_mask = (result.anomaly_map >= pixel_threshold) & result.pred_label[:, None, None]
        result.regions = Regions(result.pred_mask, result.anomaly_map)
        result.norm_score = normalised(result.pred_score, image_threshold)
        result.norm_map = normalised(result.anomaly_map, pixel_threshold)
        return result

    def _ensure_isolation(self) -> None:
        """Compute (once per bank, and again after ``add_templates``) the isolation the parameters use.

        Each template is compared with all the others, or with the ``ISOLATION_NEIGHBOURS`` most
        similar images when there are more (with retrieval: with the K a query like it would be
        matched against), so this costs at most about one predict of the templates against 64.
        """
        bank = self._require_bank()
        missing = {layer: p for layer, p in self.params.active_layers.items()
                   if p.isolation and bank.isolation(layer, p.fore) is None}
        if not missing:
            return
        if bank.is_shard:
            raise RuntimeError(f"the bank is a shard and holds no isolation of {sorted(missing)}: it is computed over "
                               "the whole bank; save the fitted bank and load its shards from that file")
        neighbours = self._neighbours()
        for layer, p in missing.items():
            templates = bank.prepared(layer, self.device, self.matching_dtype)
            bank.set_isolation(layer, p.fore, template_isolation(templates, p.fore, neighbours))

    def _ensure_coresets(self) -> None:
        """Select (once per bank, and again after ``add_templates``) the coresets the parameters use, from
        the float32 features on the device (a greedy step per coreset pixel: ~1 s for 4,096 of 40,960)."""
        bank = self._require_bank()
        missing = [(layer, p.coreset) for layer, p in self.params.active_layers.items()
                   if p.coreset and bank.coreset(layer, p.coreset) is None]
        if missing and bank.is_shard:
            raise RuntimeError(f"the bank is a shard and holds no coreset of {[layer for layer, _ in missing]}: it is "
                               "selected over the whole bank; save the fitted bank and load its shards from that file")
        for layer, percent in missing:
            bank.set_coreset(layer, percent, template_coreset(bank.features[layer].to(self.device), percent,
                                                              progress=self.progress))

    def _histogram_bank(self):
        """The codebook and the compact histogram bank of the templates on the device (retrieval only).

        Kept on the device between calls: no host-to-device copy per batch (a CUDA graph forbids them).
        """
        extras = self._require_bank().extras
        counts, centers = extras["histogram_counts"], extras["codebook_centers"]
        cached = self._retrieval_cache
        if cached is None or cached[0] is not counts or cached[1] is not centers:
            codebook = Codebook(centers.to(self.device))
            height, width = self.bank.features[self.retrieval_layer].shape[2:]
            cached = (counts, centers, codebook, hk.HistogramBank(counts.to(self.device), codebook.area(height, width)))
            self._retrieval_cache = cached
        return cached[2], cached[3]

    def add_templates(self, images) -> "HETMM":
        """Hot update: insert new normal images into the bank without refitting."""
        self._require_bank()
        features, sources, template_thumbnails = self._template_features(self._images(images))
        features = {k: v.float().cpu() for k, v in features.items()}
        self.bank.add(features, sources, template_thumbnails)
        if self.retrieval_k is not None:  # the new images join the retrieval bank too
            codebook, _ = self._histogram_bank()
            new = codebook.bank(features[self.retrieval_layer]).counts
            self.bank.extras["histogram_counts"] = torch.cat([self.bank.extras["histogram_counts"], new])
        if self.templates == "auto" and len(self.bank) > self.max_templates:  # the cost stays bounded: choose again
            self.bank.keep(spread_images(self._descriptor_features(self.bank.features), self.max_templates))
        self._ensure_isolation()
        self._ensure_coresets()
        if self.templates == "pts":
            warnings.warn("templates added to a PTS bank: its calibration (held-out folds of the training images) "
                          "was dropped; refit the bank to calibrate it again", stacklevel=2)
        else:  # every image's leave-one-out score changes with new templates
            self.bank.set_calibration(self.calibrate())
        return self

    def shard(self, group) -> "HETMM":
        """Keep only this rank's share of the templates; matches are then merged across ``group``.

        ``group``: a ``hetmm.distributed.Group`` (from ``hetmm.distributed.setup()`` under torchrun).
        Every rank must then predict the same images; the results are identical to the whole bank's.
        """
        self.bank = self._require_bank().shard(group.rank, group.world)
        self.group = group
        return self

    def save(self, path) -> Path:
        """Write the bank atomically. A detector matching in 16 bits stores its features in that dtype: half the
        bytes, and the same predictions (the matching rounds them to it anyway)."""
        dtype = self.feature_dtype
        return self._require_bank().save(path, dtype if dtype in (torch.bfloat16, torch.float16) else None)

    @classmethod
    def load(cls, path, *, shard=None, **options) -> "HETMM":
        """A detector from a saved bank, with the bank's backbone, image size and parameters; ``options`` as
        ``from_bank`` takes them. ``shard``: a ``hetmm.distributed.Group``; each rank then reads only its share of
        the templates (see ``shard``).
        """
        bank = TemplateBank.load(path, shard=None if shard is None else (shard.rank, shard.world))
        return cls.from_bank(bank, shard=shard, **options)

    @classmethod
    def from_bank(cls, bank: TemplateBank, *, weights=None, shard=None, **options) -> "HETMM":
        """A detector holding a bank already read (``TemplateBank.load``), with the bank's backbone, image size and
        parameters (``BANK_OPTIONS``, from its configuration); ``options``: any other ``DetectorOptions`` field.
        ``weights`` defaults to the ones the bank was made with."""
        decided = sorted(set(options) & set(BANK_OPTIONS))
        if decided:
            raise TypeError(f"{decided} are the bank's (saved with it, as it was fitted): refit to change them")
        cfg = bank.config
        saved = {**OLDER_BANK_DEFAULTS, **{key: cfg[key] for key in BANK_OPTIONS if key in cfg}}
        det = cls(cfg["backbone"], cfg["weights"] if weights is None else weights, **saved, **options)
        det.set_magnitude_scales(cfg.get("magnitude_scales"))
        bank.check(det.config if weights is None else {k: v for k, v in det.config.items() if k != "weights"})
        det.bank, det.group = bank, shard
        return det

    def _require_bank(self) -> TemplateBank:
        if self.bank is None:
            raise RuntimeError("the detector has no templates: call fit(normal_images) or HETMM.load(bank_path) first")
        return self.bank

    # ------------------------------------------------------------------ scoring
    def match(self, features: dict, indices: torch.Tensor | None = None) -> LayerMatches:
        """Per-layer matches of extracted query features against the bank (``indices [B, K]``: each
        query against those templates only; otherwise all, or the retrieved K)."""
        bank = self._require_bank()
        dtype = self.matching_dtype
        self._ensure_isolation()
        self._ensure_coresets()
        templates = {layer: bank.prepared(layer, self.device, dtype, p.fore, p.isolation)
                     for layer, p in self.params.active_layers.items()}
        coresets = {layer: bank.coreset_rows(layer, self.device, dtype, p.coreset, p.fore, p.isolation)
                    for layer, p in self.params.active_layers.items() if p.coreset}
        query = {layer: features[layer].to(self.device, self.feature_dtype) for layer in self.params.active_layers}
        if bank.is_shard and self.group is None:
            raise RuntimeError("the bank is a shard: give the detector its process group (HETMM.shard / load(shard=))")
        absent = None
        if indices is not None:
            if bank.is_shard:
                raise RuntimeError("indices name templates of the whole bank; this bank is a shard")
        elif self.retrieval_k is not None:  # target before shooting: only the K nearest images
            codebook, histogram_bank = self._histogram_bank()
            k = min(self.retrieval_k, bank.total)
            query_hist = codebook.histograms(features[self.retrieval_layer].to(self.device))
            if bank.is_shard:
                _, nearest = distributed.sharded_topk(query_hist, histogram_bank, k, bank.offset, bank.total, self.group)
                indices, absent = distributed.local_subsets(nearest, bank.offset, len(bank))
            else:
                _, indices = hk.retrieve_topk(query_hist, histogram_bank, k)
        matches = LayerMatches(query, templates, self.params, indices, coresets)
        if bank.is_shard:
            distributed.merge_matches(matches, absent, self.group)
        return matches

    def _forward(self, images: torch.Tensor, keep: tuple | None = None):
        """The GPU part of predict for one batch on the device: ``(scores, anomaly maps, PRO maps)``;
        ``keep=(layer, list)``: the batch's features at ``layer`` appended to the list (explanations)."""
        features = self.backbone(images)
        if keep is not None:
            keep[1].append(features[keep[0]])
        return self._score(features)

    def _score(self, features: dict, indices: torch.Tensor | None = None):
        """``(scores, anomaly maps, PRO maps)`` of extracted features (see ``match`` for ``indices``)."""
        matches = self.match(features, indices)
        size = (self.out_size, self.out_size)
        scores = matches.image_scores(size, self.params.image)
        anomaly = matches.aggregate(size, self.params.pixel).maps[:, 0]
        pro = anomaly if self.params.pro == self.params.pixel else matches.aggregate(size, self.params.pro).maps[:, 0]
        return scores, anomaly, pro

    def _run(self, batch: torch.Tensor, keep: tuple | None = None):
        """One batch's device part: no value of a device tensor is read back (the images and the bank
        were checked where they came in; ``_copy_out`` checks the results), so nothing waits on the GPU.
        ``keep``: as ``_forward``'s (a batch whose features are kept runs eagerly, not from a CUDA graph)."""
        if keep is not None or not self.cuda_graph or self.group is not None:
            with hk.trusted_values():
                return self._forward(batch, keep)
        from .pipeline import CapturedPredict

        # a graph holds the addresses of the bank's tensors: a new or grown bank needs a new capture
        key = (self.batch_size, id(self.bank), self.bank.version)
        if key not in self._graphs:
            self._graphs = {key: CapturedPredict(self, self.batch_size)}
        return self._graphs[key](batch)

    def predict(self, images, explain: bool = False) -> Prediction:
        """Image scores and anomaly maps for images (tensor ``[N, 3, H, W]`` in [0, 1], or file paths),
        with labels, masks and regions when a threshold is in force (see ``Prediction``).

        ``explain``: every region of a flagged image also gets ``"nearest"``, the normal template that matched it
        best, with the place in it and the similarity (``hetmm.explanation``); the matching is the same, the
        explanation costs one extra window search at one layer for each flagged image."""
        if not explain:
            return self._decide(self._predict_raw(images))
        bank = self._require_bank()
        if bank.is_shard:
            raise RuntimeError("explanations name templates of the whole bank; this bank is a shard")
        layer = explanation_layer(self.params)
        kept = []
        result = self._decide(self._predict_raw(images, keep=(layer, kept)))
        if result.pred_label is not None:
            explain_regions(result, torch.cat(kept), bank.prepared(layer, self.device, torch.float32).temp,
                            self.params.active_layers[layer].fore, bank.sources)
        return result

    def _predict_raw(self, images, keep: tuple | None = None) -> Prediction:
        """Image scores and anomaly maps for images (tensor ``[N, 3, H, W]`` in [0, 1], or file paths);
        ``keep=(layer, list)``: each batch's features at ``layer`` appended to the list (explanations)."""
        self._require_bank()
        items = self._images(images)
        scores, anomaly, pro = [], [], []
        for batch in self._batches(items, "predict", True):
            for kept, out in zip((scores, anomaly, pro), self._copy_out(*self._run(batch, keep))):
                kept.append(out)
        return Prediction(torch.cat(scores), torch.cat(anomaly), torch.cat(pro))

    @staticmethod
    def _copy_out(scores: torch.Tensor, anomaly: torch.Tensor, pro: torch.Tensor):
        """The batch's results on the host in one copy (the batch's one read of the device), checked there."""
        if scores.device.type == "cpu":
            host = (scores, anomaly, pro)
        else:
            maps = [anomaly] if pro is anomaly else [anomaly, pro]
            packed = torch.cat([scores.float()[:, None]] + [m.float().flatten(1) for m in maps], 1).cpu()
            size = anomaly[0].numel()
            host_maps = [packed[:, 1 + i * size:1 + (i + 1) * size].view_as(anomaly) for i in range(len(maps))]
            host = (packed[:, 0], host_maps[0], host_maps[-1])
        checked = host if pro is not anomaly else host[:2]  # (the PRO map is often the pixel map itself)
        if not all(all_finite(t) for t in checked):  # what the ops' value checks would have caught
            raise FloatingPointError("predict produced NaN or inf scores (non-finite images, features or bank; "
                                     "with precision='fp16', values beyond its range)")
        return host
