"""Which training images become templates when there are more than a bank should match against.

``templates="auto"`` keeps every training image up to ``max_templates`` of them; beyond that it keeps the
``max_templates`` that spread farthest over the training set, so that predict costs the same at 1,000
training images as at 40: greedy k-centre on whole images (each image described by its mean layer-3
feature, unit length, compared by cosine), from the image least like the mean, then each next one the image
least like every one kept so far. Chosen by measurement (docs/detector.md): on four choose-set categories
at 100, 320 and 1,000 training images it kept image AUROC, pixel AUROC and PRO closer to a 40-image bank's
than greedy facility location (representatives of the dense regions) or a random subset did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DESCRIPTOR_LAYER = "layer3"  # the deepest tap: what an image shows, least moved by where it was cropped


def unit_means(features: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` float64 unit vectors on the host: each image's mean feature over its pixels (``[N, C, h, w]``)."""
    return F.normalize(features.double().mean(dim=(2, 3)), dim=1).cpu()


def image_descriptors(features: dict) -> torch.Tensor:
    """``[N, C]`` float64 unit vectors: each image's mean feature of ``DESCRIPTOR_LAYER`` (a batch's at a time,
    if need be: each row depends on its own image only)."""
    return unit_means(features[DESCRIPTOR_LAYER])


def spread_images(features: dict, count: int) -> torch.Tensor:
    """``spread`` of the images' ``image_descriptors``."""
    return spread(image_descriptors(features), count)


def spread(descriptors: torch.Tensor, count: int) -> torch.Tensor:
    """``[count]`` int64, ascending: the images greedy k-centre keeps (see above) among ``descriptors [N, C]``
    (unit rows); all of them when there are no more than ``count``. Cost: ``count`` passes over N descriptors
    (N = 1,000: milliseconds). The same images whatever their order, but for exact ties (the lower index wins).
    """
    if count < 1:
        raise ValueError(f"count must be at least 1; got {count}")
    descriptors = descriptors.double()
    total = descriptors.shape[0]
    if total <= count:
        return torch.arange(total)
    chosen = [int((descriptors @ descriptors.mean(0)).argmin())]
    nearest = torch.full((total,), -2.0, dtype=torch.float64)  # each image's similarity to its closest kept one
    for _ in range(count - 1):
        nearest = torch.maximum(nearest, descriptors @ descriptors[chosen[-1]])
        nearest[chosen[-1]] = 2.0  # above any cosine: a kept image is never kept twice (duplicates included)
        chosen.append(int(nearest.argmin()))
    return torch.tensor(sorted(chosen))
