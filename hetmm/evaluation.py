"""Fit, predict and score one category of an MVTec-layout dataset."""

from __future__ import annotations

import time

import torch

from .data import ImageError, MVTecCategory, missing_masks_message
from .detector import HETMM
from .metrics import aupro, best_f1, image_auroc, pixel_auroc


def evaluate_category(detector: HETMM, data: MVTecCategory, fit: bool = True, group=None,
                      allow_missing_masks: bool = False, details: dict | None = None) -> dict | None:
    """Image AUROC, pixel AUROC and PRO (AUPRO to FPR 0.3) on ``data``'s test split, with timings.

    ``group`` (``hetmm.distributed.Group``): every rank fits the same bank and scores its share of
    the test images; the metrics are computed once, on rank 0, over all of them (``None`` elsewhere).
    A defect image without its mask is an error (found before any fitting), unless
    ``allow_missing_masks``: it then counts for the image AUROC only. With thresholds (a calibrated
    bank, or the detector's ``threshold``): the image threshold, the share of normal test images it
    flags and of defective ones it finds; always the F1-optimal image threshold and its F1. ``details``
    (a dict) receives the samples, the Prediction and the masks (for ``hetmm.report``).
    """
    from .distributed import predict_data_parallel

    missing = set(data.missing_masks(data.test))
    if missing and not allow_missing_masks:
        raise ImageError(missing_masks_message(sorted(missing)))
    start = time.perf_counter()
    if fit:
        detector.fit(data.train)
    fitted = time.perf_counter()
    samples = data.test
    paths = [s.path for s in samples]
    result = detector.predict(paths) if group is None else predict_data_parallel(detector, paths, group)
    predicted = time.perf_counter()
    if result is None:
        return None
    labels = [s.label for s in samples]
    masks = all_masks = data.load_masks(samples, detector.out_size, allow_missing=allow_missing_masks)
    with_mask = [s.label == 0 or s.mask not in missing for s in samples]
    metrics = dict(
        category=data.category,
        templates=len(detector.bank),
        test_images=len(samples),
        image_auroc=image_auroc(labels, result.pred_score),
        fit_seconds=fitted - start,
        predict_seconds=predicted - fitted,
    )
    if missing:
        metrics["masks_missing"] = len(missing)
        keep = torch.tensor(with_mask)
        masks, anomaly, pro = masks[keep], result.anomaly_map[keep], result.pro_map[keep]
    else:
        anomaly, pro = result.anomaly_map, result.pro_map
    if masks.any():
        metrics["pixel_auroc"] = pixel_auroc(masks, anomaly)
        metrics["pro"] = aupro(masks, pro)
    labelled = torch.tensor(labels)
    if result.image_threshold is not None:
        flagged = result.pred_label
        metrics.update(image_threshold=result.image_threshold, pixel_threshold=result.pixel_threshold,
                       normal_flagged=_share(flagged[labelled == 0]), defects_found=_share(flagged[labelled == 1]))
    if (labelled == 1).any():
        metrics["image_f1_threshold"], metrics["image_f1"] = best_f1(labels, result.pred_score)
    if details is not None:
        details.update(samples=samples, result=result, masks=all_masks)
    metrics["images_per_second"] = len(samples) / max(predicted - fitted, 1e-9)
    return metrics


def _share(flags: torch.Tensor) -> float | None:
    return float(flags.float().mean()) if len(flags) else None


def format_table(rows: list[dict]) -> str:
    """A plain-text metrics table."""
    header = f"{'category':<14}{'templates':>10}{'tests':>7}{'image AUROC':>13}{'pixel AUROC':>13}{'PRO':>8}{'img/s':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        pix = f"{r['pixel_auroc']:.3f}" if "pixel_auroc" in r else "-"
        pro = f"{r['pro']:.3f}" if "pro" in r else "-"
        lines.append(f"{r['category']:<14}{r['templates']:>10}{r['test_images']:>7}{r['image_auroc']:>13.3f}"
                     f"{pix:>13}{pro:>8}{r['images_per_second']:>8.1f}")
    return "\n".join(lines)
