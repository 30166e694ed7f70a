"""Anomaly detection metrics: image AUROC, pixel AUROC, and PRO (AUPRO up to an FPR of 0.3)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def _numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def image_auroc(labels, scores) -> float:
    """AUROC of image scores against image labels (1 = anomalous)."""
    labels, scores = _numpy(labels).ravel(), _numpy(scores).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores must have the same length; got {labels.shape} and {scores.shape}")
    if len(np.unique(labels)) < 2:
        raise ValueError("image AUROC needs both normal (0) and anomalous (1) images")
    from sklearn.metrics import roc_auc_score  # here: scikit-learn takes ~1 s to import

    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks, maps) -> float:
    """AUROC over all pixels of anomaly maps ``[N, H, W]`` against ground-truth masks."""
    masks, maps = _numpy(masks).reshape(-1) > 0.5, _numpy(maps).reshape(-1)
    if masks.shape != maps.shape:
        raise ValueError("masks and maps must have the same number of pixels")
    if masks.all() or not masks.any():
        raise ValueError("pixel AUROC needs both normal and anomalous pixels")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(masks, maps))


def pro_curve(masks, maps, max_thresholds: int = 2000):
    """(FPR, PRO) at descending thresholds: PRO is the mean, over connected ground-truth
    regions of every image, of the fraction of the region at or above the threshold; FPR is
    the fraction of normal pixels at or above it. Thresholds are the distinct scores, or
    ``max_thresholds`` evenly spaced ones when there are more."""
    masks = _numpy(masks) > 0.5
    maps = _numpy(maps).astype(np.float64)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks and maps must both be [N, H, W]; got {masks.shape} and {maps.shape}")
    normal = np.sort(maps[~masks])
    if normal.size == 0:
        raise ValueError("PRO needs normal pixels")
    regions = []
    for mask, amap in zip(masks, maps):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))  # 8-connected regions
        regions += [np.sort(amap[labelled == i]) for i in range(1, count + 1)]
    if not regions:
        raise ValueError("PRO needs at least one anomalous region")
    thresholds = np.unique(maps)[::-1]
    if thresholds.size > max_thresholds:
        thresholds = np.linspace(maps.max(), maps.min(), max_thresholds)
    fpr = (normal.size - np.searchsorted(normal, thresholds, side="left")) / normal.size
    overlap = [(r.size - np.searchsorted(r, thresholds, side="left")) / r.size for r in regions]
    return fpr, np.mean(overlap, axis=0)


def aupro(masks, maps, max_fpr: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, max_fpr], divided by max_fpr (1.0 is perfect)."""
    fpr, pro = pro_curve(masks, maps)
    fpr = np.concatenate([[0.0], fpr])
    pro = np.concatenate([[0.0], pro])
    # cut the curve at max_fpr, interpolating the last point
    keep = fpr <= max_fpr
    cut_fpr, cut_pro = fpr[keep], pro[keep]
    if cut_fpr[-1] < max_fpr and keep.sum() < fpr.size:
        i = keep.sum()
        t = (max_fpr - fpr[i - 1]) / (fpr[i] - fpr[i - 1])
        cut_fpr = np.append(cut_fpr, max_fpr)
        cut_pro = np.append(cut_pro, pro[i - 1] + t * (pro[i] - pro[i - 1]))
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz
    return float(trapezoid(cut_pro, cut_fpr) / max_fpr)


def best_f1(labels, scores) -> tuple[float, float]:
    """``(threshold, F1)``: the threshold (``score >= threshold`` is anomalous) with the highest F1,
    as anomalib's adaptive threshold chooses it on labelled validation data."""
    from sklearn.metrics import precision_recall_curve

    labels, scores = _numpy(labels).ravel() > 0.5, _numpy(scores).ravel()
    if not labels.any():
        raise ValueError("the F1-optimal threshold needs anomalous examples")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])
