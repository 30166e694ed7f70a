"""Calibration: the scores normal images get, and the thresholds, normalised scores and regions they give.

At fit time every training image is scored against the bank without itself (leave-one-out: the
matching takes per-query template indices) or, for a PTS bank, against the PTS set of the other
folds (``HETMM.calibrate``). The bank keeps the normal image scores and a quantile table of the
normal pixel scores; a target false-alarm rate then gives the thresholds:

- images: the conformal quantile. With ``n`` normal scores sorted ``s_1 <= ... <= s_n`` and rank
  ``r = ceil((n + 1)(1 - fpr))``, a new normal image scores above ``s_r`` with probability at most
  ``fpr`` (exchangeability); below ``fpr = 1 / (n + 1)`` no threshold can promise that, and ``s_n``
  is used (``lowest_image_fpr``).
- pixels: the ``1 - fpr`` quantile of the normal pixel scores.

Leave-one-out scores are a little higher than a new normal image's against the whole bank (one
template fewer), so the thresholds err towards fewer false alarms, as long as no other training image
shows the same thing. Overlapping crops of one sheet or near-identical frames do: each would be scored
against its own twin, far lower than a new image ever is (on the demo textures 80-100% of unseen normal
images flagged at a 1% target). So each image is scored without the images it shares content with as
well (``calibration_neighbours``: ``shared_content`` of its last-layer pixels above ``DUPLICATE_SHARE``),
against the same number ``k`` of others for every image.

Leaving out twins is not enough where the training images come in groups that new images do not
belong to (crops of one part of a sheet, frames of one batch): an image scored against its own group's
look-alikes still scores lower than an image from elsewhere will (on the choose set 9% of unseen normal
images flagged at a 1% target on average, 85% on parquet). So from ``2 * CLUSTER_SIZE`` images on, the
images are clustered by their mean last-layer feature (k-means, about ``CLUSTER_SIZE`` images a cluster,
at least ``MIN_CLUSTERS`` clusters) and each is scored without its whole cluster (``calibration_groups``,
``outside_own_group``): as an image from another part of the category's variation would be. Where new
images are drawn exactly like the training images, this errs towards fewer false alarms than asked for, and
fewer defects found. (k-means on 40 / 1,000 descriptors: ~2 / ~110 ms.)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SCORES = "calibration.image_scores"  # [n] normal image scores, ascending
PIXEL_LEVELS = "calibration.pixel_levels"  # [Q] quantile levels in [0, 1], ascending
PIXEL_SCORES = "calibration.pixel_scores"  # [Q] the normal pixel scores at those levels
NAMES = (IMAGE_SCORES, PIXEL_LEVELS, PIXEL_SCORES)
F1_IMAGE_THRESHOLD = "calibration.f1_image_threshold"  # [1], from labelled validation images (optional)
DEFAULT_FPR = 0.01
MAX_PIXELS = 1 << 24  # normal pixel scores kept for the quantiles (every k-th beyond)
FOLDS = 5  # PTS banks: held-out folds
# Two images share content where this share of one's last-layer pixels find a match at least this similar
# anywhere in the other. Measured on the demo textures' overlapping crops (lite0, layer 3): pairs that overlap
# share 4-34% (median of each image's largest), while unseen crops of the same photographs share at most 0.8%
# with any training image; similar texture alone stays below the similarity.
DUPLICATE_SIMILARITY = 0.95
DUPLICATE_SHARE = 0.01
# Each image is scored against at least this share of its candidates, the least-sharing where too few share
# nothing (a uniform texture matches itself everywhere: brushed metal shares content with every image).
KEEP_AT_LEAST = 0.25
# Calibration clusters: about this many images each, from twice as many images on (fewer: leave-one-out).
# Measured on the choose set (lite0, 40 training images; clusters of 10 / 8 / 7 / 5 images): unseen normal
# images flagged at a 1% target 1.5 / 1.2 / 0.9 / 0.9% on average against 9.1% by leave-one-out, defects
# found 86.2 / 86.2 / 86.2 / 86.8% against 92.4%, a tie within one image a category; 8 finds the most of the
# demo's grass defects with no normal image flagged (50% against 35 / 35% at 10 / 7; at 5: 20% flagged).
CLUSTER_SIZE = 8
# With fewer images, a cluster of 8 is too much of the bank to leave out: on `hetmm demo`'s 16 training crops
# 2 clusters found 61% of the defects, 4 clusters 72% (leave-one-out 92%), no more normal images flagged.
MIN_CLUSTERS = 4


def pixel_levels() -> torch.Tensor:
    """Quantile levels dense in the upper tail: false-alarm rates from 1 down to 1e-6 (float32, distinct)."""
    tail = 1 - torch.logspace(0, -6, 601, dtype=torch.float64)
    return torch.cat([tail, torch.tensor([1.0], dtype=torch.float64)]).float().unique()


def _check_fpr(name: str, fpr: float) -> float:
    if not (isinstance(fpr, (int, float)) and 0 < fpr < 1):
        raise ValueError(f"{name} must be a false-alarm rate in (0, 1); got {fpr!r}")
    return float(fpr)


@dataclass(frozen=True)
class Calibration:
    """The normal scores a bank was calibrated with (see the module docstring)."""

    image_scores: torch.Tensor
    pixel_levels: torch.Tensor
    pixel_scores: torch.Tensor

    @classmethod
    def from_scores(cls, image_scores: torch.Tensor, pixel_maps: torch.Tensor) -> "Calibration":
        """From the leave-one-out ``image_scores [n]`` and ``pixel_maps [n, H, W]`` of normal images."""
        pixels = pixel_maps.reshape(-1).double()
        if pixels.numel() > MAX_PIXELS:
            pixels = pixels[:: math.ceil(pixels.numel() / MAX_PIXELS)]
        levels = pixel_levels()
        # 'higher': the quantile is an observed score at or above the level (fewer false alarms)
        scores = np.quantile(pixels.numpy(), levels.double().numpy(), method="higher")
        return cls(image_scores.double().sort().values.float(), levels, torch.from_numpy(scores).float())

    @classmethod
    def from_extras(cls, extras: dict) -> "Calibration | None":
        if not all(name in extras for name in NAMES):
            return None
        return cls(extras[IMAGE_SCORES], extras[PIXEL_LEVELS], extras[PIXEL_SCORES])

    def extras(self) -> dict:
        return {IMAGE_SCORES: self.image_scores, PIXEL_LEVELS: self.pixel_levels, PIXEL_SCORES: self.pixel_scores}

    @property
    def lowest_image_fpr(self) -> float:
        """The lowest false-alarm rate the image threshold can promise: ``1 / (n + 1)``."""
        return 1 / (len(self.image_scores) + 1)

    def image_threshold(self, fpr: float = DEFAULT_FPR) -> float:
        """Images scoring at or above it are anomalous; a normal image is, with probability <= max(fpr, 1/(n+1))."""
        fpr = _check_fpr("fpr", fpr)
        n = len(self.image_scores)
        rank = min(math.ceil((n + 1) * (1 - fpr) - 1e-9), n)
        # just above s_r: 'at or above the threshold' then means 'above s_r'
        return float(torch.nextafter(self.image_scores[rank - 1], torch.tensor(math.inf)))

    def pixel_threshold(self, fpr: float = DEFAULT_FPR) -> float:
        """Pixels scoring at or above it are anomalous; about ``fpr`` of normal pixels are."""
        fpr = _check_fpr("pixel_fpr", fpr)
        return float(np.interp(1 - fpr, self.pixel_levels.double().numpy(), self.pixel_scores.double().numpy()))



def shared_content(features: torch.Tensor, candidates: torch.Tensor,
                   similarity: float = DUPLICATE_SIMILARITY) -> torch.Tensor:
    """``[N, m]``: the share of image n's pixels (``features [N, C, h, w]``, one layer) whose best match
    anywhere in image ``candidates[n, j]`` is at least ``similarity`` in cosine, counting only pixels that at most
    half the candidates match so (what most images show, a plain background or the parts of aligned objects,
    is how the category looks, not a duplicate). A bfloat16 bank is compared in bfloat16 (2-3x the float32 rate
    on a CPU; a similarity moves by ~0.004, far from what separates the cases)."""
    dtype = torch.bfloat16 if features.dtype == torch.bfloat16 else torch.float32
    unit = torch.nn.functional.normalize(features.float(), dim=1).to(dtype)
    count, channels, height, width = unit.shape
    pixels = unit.permute(0, 2, 3, 1).reshape(count, height * width, channels)
    candidates = candidates.to(torch.long).cpu()
    shares = torch.empty(candidates.shape)
    for n in range(count):
        others = pixels[candidates[n].to(pixels.device)].reshape(-1, channels)
        best = (pixels[n] @ others.t()).view(height * width, candidates.shape[1], height * width).amax(-1)
        close = best >= similarity
        rare = close.sum(1, keepdim=True) <= candidates.shape[1] / 2
        shares[n] = (close & rare).float().mean(0).cpu()
    return shares


def calibration_neighbours(features: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``[N, k]``: the templates each image is scored against at calibration, from its ``candidates [N, m]``
    (the others, most similar first): those it shares no content with (``shared_content`` at most
    ``DUPLICATE_SHARE``), in their order, then the least-sharing. ``k`` is the fewest such clean candidates
    any image has, at least ``KEEP_AT_LEAST`` of ``m``, so every image meets as many templates."""
    count, options = candidates.shape
    shares = shared_content(features, candidates)
    clean = shares <= DUPLICATE_SHARE
    k = min(options, max(int(clean.sum(1).min()), math.ceil(options * KEEP_AT_LEAST), 1))
    order = torch.arange(options, dtype=torch.float32).expand(count, -1)
    key = torch.where(clean, order - options - 1, shares)  # clean ones first, in order; then by share
    return candidates.cpu().gather(1, key.argsort(dim=1, stable=True)[:, :k])


def calibration_groups(descriptors: torch.Tensor) -> torch.Tensor | None:
    """``[N]`` the calibration cluster of each image, from its descriptor ``[N, C]`` (k-means, ``max(MIN_CLUSTERS,
    N // CLUSTER_SIZE)`` clusters, seeded: the same images give the same clusters); ``None`` (leave-one-out) for
    fewer than ``2 * CLUSTER_SIZE`` images or where the images do not form two clusters."""
    count = descriptors.shape[0]
    if count < 2 * CLUSTER_SIZE:
        return None
    from sklearn.cluster import KMeans  # here: scikit-learn takes ~1 s to import

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identical images: fewer distinct clusters than asked, said below
        kmeans = KMeans(max(MIN_CLUSTERS, count // CLUSTER_SIZE), n_init=4, random_state=0)
        labels = kmeans.fit(descriptors.double().cpu().numpy()).labels_
    groups = torch.from_numpy(labels).long()
    return groups if groups.unique().numel() >= 2 else None


def outside_own_group(candidates: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """``[N, k]``: of each image's ``candidates [N, m]`` (in order), those outside its own group; ``k`` is the
    fewest any image has. Unchanged where ``groups`` is ``None`` or some image has no candidate outside."""
    if groups is None:
        return candidates
    candidates = candidates.to(torch.long).cpu()
    outside = groups[candidates] != groups[:, None]
    k = int(outside.sum(1).min())
    if k == 0:
        return candidates
    return candidates.gather(1, (~outside).to(torch.uint8).argsort(dim=1, stable=True)[:, :k])


def normalised(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x / (x + threshold)``: 0..1, 0.5 at the threshold, the order of the scores kept (never reversed,
    no clipping, so AUROC is unchanged up to neighbours float32 cannot tell apart after the squeeze; a
    min-max scale clipped at 1 would tie every clear defect)."""
    values = values.float().clamp_min(0)
    # 1 / (1 + t / x), not x / (x + t): each step rounds a monotone function of a monotone value, so the
    # float32 result never reverses two scores (x / (x + t) does, where x + t rounds up for the smaller x)
    return (max(float(threshold), 1e-12) / values).add_(1).reciprocal_()


def check_extras(extras: dict) -> str | None:
    """What is wrong with a bank's calibration extras (``None``: absent or sound)."""
    f1 = extras.get(F1_IMAGE_THRESHOLD)
    if f1 is not None and (f1.shape != (1,) or not f1.is_floating_point() or not torch.isfinite(f1).all()):
        return f"{F1_IMAGE_THRESHOLD} must be one finite float"
    present = [name for name in NAMES if name in extras]
    if not present:
        return None
    if len(present) != len(NAMES):
        return f"calibration is incomplete (has {present}, needs {list(NAMES)})"
    image, levels, scores = (extras[name] for name in NAMES)
    for name in NAMES:
        value = extras[name]
        if value.dim() != 1 or not value.is_floating_point() or not torch.isfinite(value).all() or len(value) < 1:
            return f"{name} must be a non-empty 1-D finite float tensor"
    if len(levels) != len(scores):
        return f"{PIXEL_LEVELS} and {PIXEL_SCORES} differ in length ({len(levels)} and {len(scores)})"
    if (image.diff() < 0).any() or (levels.diff() <= 0).any() or (scores.diff() < 0).any():
        return "calibration scores and levels must be sorted ascending"
    if levels[0] < 0 or levels[-1] > 1:
        return f"{PIXEL_LEVELS} must lie in [0, 1]"
    return None


class Regions(Sequence):
    """Per image, the connected regions of its mask (``find_regions``), found when first read: labelling
    costs ~0.5 ms an image, 4% of a CPU predict, and most callers read only the scores."""

    def __init__(self, masks: torch.Tensor, maps: torch.Tensor):
        self._masks, self._maps, self._found = masks, maps, {}

    def __len__(self) -> int:
        return len(self._masks)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # negative indices, and IndexError past the end
        if index not in self._found:
            self._found[index] = find_regions(self._masks[index], self._maps[index])
        return self._found[index]

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"Regions({len(self)} images)"


def find_regions(mask: torch.Tensor, scores: torch.Tensor) -> list[dict]:
    """Connected regions (8-connected) of one ``mask [H, W]``: box ``(x0, y0, x1, y1)`` (x1/y1 exclusive),
    area in pixels and peak score, largest first."""
    from scipy import ndimage

    labels, count = ndimage.label(mask.numpy(), structure=np.ones((3, 3), dtype=bool))
    if not count:
        return []
    values = scores.float().numpy()
    found = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[box] == index
        found.append(dict(box=(box[1].start, box[0].start, box[1].stop, box[0].stop), area=int(inside.sum()),
                          peak=float(values[box][inside].max())))
    return sorted(found, key=lambda r: (-r["area"], r["box"]))
