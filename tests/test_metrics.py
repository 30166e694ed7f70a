"""Metrics on hand-computed cases and against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from hetmm.metrics import aupro, image_auroc, pixel_auroc, pro_curve


def test_image_auroc_hand_case_and_sklearn():
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert image_auroc(labels, scores) == 0.75  # 3 of the 4 (normal, anomalous) pairs are ordered
    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 200), rng.random(200)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 16, 16)) > 0.8
    maps = rng.random((3, 16, 16)) + masks * 0.3
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_pro_hand_case():
    # one image, one 2-pixel region scoring 0.9 and 0.4; six normal pixels
    masks = np.zeros((1, 2, 4))
    masks[0, 0, :2] = 1
    maps = np.array([[[0.9, 0.4, 0.1, 0.2], [0.3, 0.5, 0.6, 0.0]]])
    fpr, pro = pro_curve(masks, maps)
    # thresholds 0.9, 0.6, 0.5, 0.4, ...: half the region is found before any false positive
    assert fpr[:4].tolist() == pytest.approx([0, 1 / 6, 2 / 6, 2 / 6])
    assert pro[:4].tolist() == [0.5, 0.5, 0.5, 1.0]
    # up to FPR 0.3 the PRO curve stays at 0.5
    assert aupro(masks, maps) == pytest.approx(0.5)


def test_pro_averages_regions_not_pixels():
    masks = np.zeros((1, 10, 10))
    masks[0, :4, :4] = 1  # a large region, found
    masks[0, 8, 8] = 1  # a one-pixel region, missed
    maps = masks * 1.0
    maps[0, 8, 8] = 0.0
    # threshold 1: PRO 0.5 (one of two regions) at FPR 0; threshold 0: PRO 1 at FPR 1.
    # The curve is linear in between: PRO(0.3) = 0.65, area to 0.3 = (0.5 + 0.65) / 2 * 0.3
    assert aupro(masks, maps) == pytest.approx((0.5 + 0.65) / 2, abs=1e-9)
    assert aupro(masks, masks * 1.0) == pytest.approx(1.0)


def test_metric_errors():
    with pytest.raises(ValueError, match="both normal"):
        image_auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least one anomalous region"):
        aupro(np.zeros((1, 4, 4)), np.random.rand(1, 4, 4))
