"""Calibration: leave-one-out normal scores, thresholds at a false-alarm rate, normalised scores, regions.

Every quantity is checked against an explicit construction: leave-one-out scores against a detector
fitted on the other images, PTS folds against a PTS detector fitted on the other folds, thresholds
against the conformal rank / the empirical pixel quantile, regions against a flood fill. Scores in
float32, tolerance 1e-5 (the same products in another order).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import hetmm
from hetmm import calibration
from hetmm.bank import BankInvalid
from hetmm.calibration import (IMAGE_SCORES, Calibration, calibration_neighbours, find_regions, normalised,
                               shared_content)
from hetmm.demo import TEXTURES, build_dataset
from hetmm.parameters import DEFAULT
from helpers import random_images, tiny_detector

# leave-one-out keeps the whole bank's isolation and coreset (selecting them again per image would cost N
# banks; a query meets only the other images' coreset pixels, tests/test_coreset.py), so the explicit check
# "fit on the others" equals it exactly only without either
WITHOUT_ISOLATION = DEFAULT.replace("_i=1", "").replace("_c=10", "")


_detector = tiny_detector


_images = random_images


def _scored_against(det) -> torch.Tensor:
    """``[N, k]``: the templates calibration scores each of ``det``'s bank images against."""
    from hetmm.detector import _most_similar_images

    last = det.bank.features["layer3"]
    return calibration_neighbours(last, _most_similar_images(last, len(det.bank) - 1))


@pytest.mark.parametrize("count", [2, 5])
def test_leave_one_out_scores_equal_a_bank_of_the_images_it_names(count):
    images = _images(count, 1)
    det = _detector(params=WITHOUT_ISOLATION).fit(images)
    neighbours = _scored_against(det)
    assert not (neighbours == torch.arange(count)[:, None]).any()  # never itself
    explicit = [_detector(params=WITHOUT_ISOLATION).fit(images[neighbours[i]]).predict(images[i:i + 1]).pred_score[0]
                for i in range(count)]
    torch.testing.assert_close(det.calibration.image_scores, torch.stack(explicit).sort().values, rtol=0, atol=1e-5)


def test_shared_content_is_the_share_of_pixels_matched_near_exactly():
    # image 1 is image 0 moved 3 pixels right (3 of 8 columns new), image 2 unrelated: cosine ~0 to both
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 8, 11, generator=generator)
    features = torch.stack([base[:, :, :8], base[:, :, 3:], torch.randn(64, 8, 8, generator=generator)])
    candidates = torch.tensor([[1, 2], [0, 2], [0, 1]])
    shares = shared_content(features, candidates)
    torch.testing.assert_close(shares, torch.tensor([[5 / 8, 0.0], [5 / 8, 0.0], [0.0, 0.0]]))


def test_calibration_leaves_out_the_images_an_image_shares_content_with():
    # six disjoint crops of the demo photographs (real weights), each twice: leave-one-out would score each
    # against its twin (score 0); the twins are left out, and each is scored against the others
    images = torch.cat([_crops(texture, rows, 1, 0) for texture in TEXTURES for rows in ((0, 176), (336, 512))])
    twins = torch.cat([images, images])
    det = hetmm.HETMM("tf_efficientnet_lite0", image_size=128, out_size=128).fit(twins)
    last = det.bank.features["layer3"]
    from hetmm.detector import _most_similar_images

    neighbours = calibration_neighbours(last, _most_similar_images(last, 11))
    own = torch.arange(12)
    assert not ((neighbours == own[:, None]) | (neighbours == ((own + 6) % 12)[:, None])).any()
    assert neighbours.shape == (12, 10)  # the ten others share nothing with it
    assert det.calibration.image_scores.min() > 0.01


def test_every_image_keeps_a_quarter_of_its_candidates_when_all_share_content(monkeypatch):
    # every candidate shares some content (a uniform texture matching itself everywhere): each image is still
    # scored against a quarter of its candidates, the least-sharing ones
    candidates = torch.stack([torch.cat([torch.arange(i), torch.arange(i + 1, 9)]) for i in range(9)])
    shares = 0.02 + torch.rand(9, 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(calibration, "shared_content", lambda features, candidates: shares)
    neighbours = calibration_neighbours(torch.zeros(9, 1, 1, 1), candidates)
    expected = candidates.gather(1, shares.argsort(dim=1)[:, :2])
    assert torch.equal(neighbours, expected)


def test_content_every_image_shows_is_not_a_duplicate():
    # one image nine times: each pixel is matched by every other copy, which is how the category looks
    images = _images(1, 4).repeat(9, 1, 1, 1)
    features = _detector().fit(images).bank.features["layer3"]
    candidates = torch.stack([torch.cat([torch.arange(i), torch.arange(i + 1, 9)]) for i in range(9)])
    assert shared_content(features, candidates).max() == 0
    assert calibration_neighbours(features, candidates).shape == (9, 8)


def test_leave_one_out_pixel_quantiles_are_those_of_the_maps():
    images = _images(4, 2)
    det = _detector(params=WITHOUT_ISOLATION).fit(images)
    neighbours = _scored_against(det)
    maps = torch.cat([_detector(params=WITHOUT_ISOLATION).fit(images[neighbours[i]])
                      .predict(images[i:i + 1]).anomaly_map for i in range(4)]).flatten().double().numpy()
    cal = det.calibration
    for fpr in (0.5, 0.1, 0.01, 1e-3):
        expected = np.quantile(maps, 1 - fpr, method="higher")
        assert cal.pixel_threshold(fpr) == pytest.approx(expected, abs=2e-5)
        assert (maps >= cal.pixel_threshold(fpr)).mean() <= fpr + 1 / maps.size + 1e-3


def test_with_isolation_the_leave_one_out_is_still_without_the_image():
    images = torch.cat([_images(3, 3), _images(1, 3)])  # image 3 is a copy of image 0
    det = _detector().fit(images)
    # with itself in the bank a copy scores 0; left out, images 0 and 3 still find each other
    assert det.predict(images[:1]).pred_score[0] < 1e-5
    assert (det.calibration.image_scores > 0).sum() >= 2


def test_pts_folds_equal_pts_banks_of_the_other_folds():
    images = _images(7, 4)
    det = _detector(templates="pts", tsize=3).fit(images)
    folds = torch.arange(7) % 5
    explicit = []
    for fold in range(5):
        rest, held = images[folds != fold], images[folds == fold]
        explicit.append(_detector(templates="pts", tsize=3).fit(rest).predict(held).pred_score)
    torch.testing.assert_close(det.calibration.image_scores, torch.cat(explicit).sort().values, rtol=0, atol=1e-5)


def test_one_image_gives_no_calibration_and_no_labels():
    det = _detector().fit(_images(1, 5))
    assert det.calibration is None
    result = det.predict(_images(2, 6))
    assert result.pred_label is None and result.regions is None and result.norm_score is None


@pytest.mark.parametrize("n", [1, 9, 40, 199])
@pytest.mark.parametrize("fpr", [0.5, 0.1, 0.01])
def test_the_image_threshold_is_the_conformal_rank(n, fpr):
    scores = torch.randperm(n).float() / n
    cal = Calibration.from_scores(scores, torch.zeros(1, 4, 4))
    # the smallest rank r with (n + 1 - r) / (n + 1) <= fpr, or n when none is
    rank = next((r for r in range(1, n + 1) if (n + 1 - r) / (n + 1) <= fpr + 1e-12), n)
    threshold = cal.image_threshold(fpr)
    assert threshold > cal.image_scores[rank - 1] and threshold == pytest.approx(float(cal.image_scores[rank - 1]))
    assert int((cal.image_scores >= threshold).sum()) == n - rank
    assert cal.lowest_image_fpr == 1 / (n + 1)


def test_normalised_scores_are_half_at_the_threshold_and_keep_the_order():
    values = torch.tensor([2.5, 0.0, 7.5, 1e6, -1.0, 1.0])
    torch.testing.assert_close(normalised(values, 2.5), torch.tensor([0.5, 0.0, 0.75, 1e6 / (1e6 + 2.5), 0.0, 1 / 3.5]))
    # float32 cannot resolve every pair of neighbours after the squeeze (x / (x + t) has slope t / (x + t)^2 < 1),
    # so the order is kept weakly: never reversed, ties only where the exact values round alike (a few ulps)
    ascending = torch.cat([torch.rand(100_000, generator=torch.Generator().manual_seed(0)), torch.logspace(-30, 30, 10_001)]).sort().values
    squeezed = normalised(ascending, 0.3)
    assert (squeezed.diff() >= 0).all()
    exact = ascending.double() / (ascending.double() + 0.3)
    torch.testing.assert_close(squeezed.double(), exact, rtol=2 ** -21, atol=0)


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, float("nan")])
def test_false_alarm_rates_are_checked(bad):
    with pytest.raises(ValueError, match="fpr"):
        _detector(fpr=bad)
    with pytest.raises(ValueError, match="pixel_fpr"):
        _detector(pixel_fpr=bad)
    cal = Calibration.from_scores(torch.rand(5), torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match="fpr"):
        cal.image_threshold(bad)


def _flood_regions(mask: np.ndarray, scores: np.ndarray) -> list[dict]:
    """8-connected components by breadth-first search (the reference for find_regions)."""
    seen, found = np.zeros_like(mask), []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        queue, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while queue:
            y, x = queue.pop()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        queue.append((v, u))
        ys, xs = zip(*pixels)
        found.append(dict(box=(min(xs), min(ys), max(xs) + 1, max(ys) + 1), area=len(pixels),
                          peak=float(max(scores[p] for p in pixels))))
    return sorted(found, key=lambda r: (-r["area"], r["box"]))


@pytest.mark.parametrize("seed", range(4))
def test_regions_equal_a_flood_fill(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(23, 31, generator=generator)
    mask = scores > 0.8
    assert find_regions(mask, scores) == _flood_regions(mask.numpy(), scores.numpy())
    assert find_regions(torch.zeros(5, 5, dtype=torch.bool), torch.zeros(5, 5)) == []


def test_predict_decides_with_the_calibrated_thresholds():
    det = _detector(fpr=0.2, pixel_fpr=0.05).fit(_images(6, 7))
    result = det.predict(_images(3, 8))
    cal = det.calibration
    assert result.image_threshold == cal.image_threshold(0.2) and result.pixel_threshold == cal.pixel_threshold(0.05)
    assert torch.equal(result.pred_label, result.pred_score >= result.image_threshold)
    flagged = result.pred_label[:, None, None]
    assert torch.equal(result.pred_mask, (result.anomaly_map >= result.pixel_threshold) & flagged)
    for mask, scores, regions, label in zip(result.pred_mask, result.anomaly_map, result.regions, result.pred_label):
        assert regions == find_regions(mask, scores) and sum(r["area"] for r in regions) == int(mask.sum())
        assert label or not regions  # an image judged normal carries no regions
    torch.testing.assert_close(result.norm_score, normalised(result.pred_score, result.image_threshold))
    # an explicit threshold wins, for images and pixels alike
    det.threshold = 0.0
    fixed = det.predict(_images(3, 8))
    assert fixed.pred_label.all() and fixed.pred_mask.all() and fixed.image_threshold == 0.0


def test_an_image_judged_normal_carries_no_regions():
    """A lenient pixel threshold beside a strict image one: pixels of normal-judged images pass the pixel
    threshold, yet their masks stay empty (the verdict and its picture agree); flagged images keep theirs."""
    det = _detector(fpr=0.01, pixel_fpr=0.3).fit(_images(6, 7))
    result = det.predict(torch.cat([_images(3, 8), _images(1, 8) * 0.2 + 0.8]))
    hot = result.anomaly_map >= result.pixel_threshold
    normal = ~result.pred_label
    assert normal.any() and hot[normal].any(), "the case needs normal images with pixels above the threshold"
    assert not result.pred_mask[normal].any() and all(not result.regions[i] for i in torch.nonzero(normal).flatten())
    assert torch.equal(result.pred_mask[~normal], hot[~normal])


def test_calibration_is_saved_checked_and_recomputed_for_older_banks(tmp_path):
    det = _detector().fit(_images(4, 9))
    path = det.save(tmp_path / "bank.safetensors")
    loaded = hetmm.HETMM.load(path, precision="fp32")
    assert torch.equal(loaded.calibration.image_scores, det.calibration.image_scores)
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    # an older bank (no calibration, checksum of what it holds): calibrated on first predict, as fit would have
    older = {k: v for k, v in tensors.items() if "calibration." not in k}
    from hetmm.bank import checksum

    save_file(older, tmp_path / "older.safetensors", metadata={**metadata, "checksum": checksum(older)})
    old = hetmm.HETMM.load(tmp_path / "older.safetensors", precision="fp32")
    assert old.calibration is None
    assert old.predict(_images(1, 10)).pred_label is not None
    torch.testing.assert_close(old.calibration.image_scores, det.calibration.image_scores, rtol=0, atol=1e-6)
    # unsorted calibration scores are refused (the checksum recomputed, as an editor would)
    edited = dict(tensors)
    edited["extra/" + IMAGE_SCORES] = edited["extra/" + IMAGE_SCORES].flip(0).contiguous()
    save_file(edited, tmp_path / "edited.safetensors", metadata={**metadata, "checksum": checksum(edited)})
    with pytest.raises(BankInvalid, match="sorted"):
        hetmm.HETMM.load(tmp_path / "edited.safetensors")


def test_add_templates_recalibrates_as_a_fresh_fit():
    first, more = _images(3, 11), _images(2, 12)
    grown = _detector().fit(first).add_templates(more)
    fresh = _detector().fit(torch.cat([first, more]))
    torch.testing.assert_close(grown.calibration.image_scores, fresh.calibration.image_scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(grown.calibration.pixel_scores, fresh.calibration.pixel_scores, rtol=0, atol=1e-5)


def _crops(texture: str, rows: tuple[int, int], count: int, seed: int) -> torch.Tensor:
    """Normal crops of a demo photograph from ``rows``, as the demo's training images are drawn."""
    from hetmm.demo import _crop, _texture

    rng, image = np.random.default_rng(seed), _texture(texture)
    grey = [np.round(np.clip(_crop(image, rng, rows), 0, 1) * 255) / 255 for _ in range(count)]  # as saved
    return torch.from_numpy(np.stack(grey)).float()[:, None].repeat(1, 3, 1, 1)


FPR = 0.1


def _tolerance(total: int) -> float:
    return FPR + 2.5 * math.sqrt(FPR * (1 - FPR) / total)


def test_the_false_alarm_rate_on_held_out_normal_images():
    """The demo textures with real weights, several seeds: normal images never seen, drawn as the
    training images are (exchangeable with them). A new normal image exceeds the conformal threshold
    with probability <= 10% (leave-one-out errs low); allowed: 10% + 2.5 binomial standard deviations
    of the 3 textures x 3 seeds x 16 images."""
    from hetmm.demo import SPLIT_ROW

    flagged = total = 0
    for seed in range(3):
        for texture in TEXTURES:
            det = hetmm.HETMM("tf_efficientnet_lite0", image_size=128, out_size=128, fpr=FPR)
            det.fit(_crops(texture, (0, SPLIT_ROW), 16, seed))
            result = det.predict(_crops(texture, (0, SPLIT_ROW), 16, 100 + seed))
            flagged, total = flagged + int(result.pred_label.sum()), total + 16
    assert flagged / total <= _tolerance(total), f"{flagged} of {total} normal images flagged"


def test_calibration_where_new_images_come_from_elsewhere(monkeypatch):
    """Training crops from the top of each photograph overlap one another, new ones come from the bottom.
    Scored each without its own cluster (fit's calibration from 16 images on), or calibrated on other bottom
    crops (``calibrate_on``), the thresholds flag at most the tolerance above 10% of the new ones; scored
    against its own cluster's look-alikes (leave-one-out, clusters turned off), more than twice as many."""
    from hetmm.demo import SPLIT_ROW

    flagged = {"clusters": 0, "leave-one-out": 0, "held-out": 0}
    total = 0
    for seed in range(2):
        for texture in TEXTURES:
            bottom = (SPLIT_ROW, _texture_height(texture))
            det = hetmm.HETMM("tf_efficientnet_lite0", image_size=128, out_size=128, fpr=FPR)
            det.fit(_crops(texture, (0, SPLIT_ROW), 16, seed))
            new = _crops(texture, bottom, 16, 200 + seed)
            flagged["clusters"] += int(det.predict(new).pred_label.sum())
            with monkeypatch.context() as patch:
                patch.setattr(calibration, "CLUSTER_SIZE", 10**6)
                det.bank.set_calibration(det.calibrate())
            flagged["leave-one-out"] += int(det.predict(new).pred_label.sum())
            det.calibrate_on(_crops(texture, bottom, 24, 300 + seed))
            flagged["held-out"] += int(det.predict(new).pred_label.sum())
            total += 16
    assert flagged["clusters"] / total <= _tolerance(total), flagged
    assert flagged["held-out"] / total <= _tolerance(total), flagged
    assert flagged["leave-one-out"] > 2 * max(flagged["clusters"], flagged["held-out"]), flagged


def test_calibration_groups_leave_out_whole_clusters():
    """Four tight groups of images: k-means finds them, and each image is scored against images of other
    groups only, in its candidates' order, the same number for every image."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1)
    truth = torch.arange(32) % 4
    descriptors = centres[truth] + 0.01 * torch.randn(32, 16, generator=generator)
    groups = calibration.calibration_groups(descriptors)
    assert groups is not None and groups.unique().numel() == 4
    assert all(len(set(groups[truth == g].tolist())) == 1 for g in range(4))  # the same partition
    candidates = torch.stack([torch.roll(torch.arange(32), -i - 1)[:31] for i in range(32)])  # every other image
    kept = calibration.outside_own_group(candidates, groups)
    assert kept.shape == (32, 24)
    assert (groups[kept] != groups[:, None]).all()
    for i in range(32):  # in the candidates' order
        order = [int(c) for c in candidates[i] if groups[c] != groups[i]]
        assert kept[i].tolist() == order[:24]


def test_few_or_alike_images_are_scored_leave_one_out():
    assert calibration.calibration_groups(torch.randn(2 * calibration.CLUSTER_SIZE - 1, 8)) is None
    assert calibration.calibration_groups(torch.ones(40, 8)) is None  # one cluster: nothing to leave out
    candidates = torch.arange(6).roll(1).view(1, 6).repeat(6, 1)
    assert torch.equal(calibration.outside_own_group(candidates, None), candidates)
    assert torch.equal(calibration.outside_own_group(candidates, torch.zeros(6, dtype=torch.long)), candidates)


def _texture_height(texture: str) -> int:
    from hetmm.demo import _texture

    return _texture(texture).shape[0]


def test_the_f1_threshold_from_labelled_validation_images(tmp_path):
    det = _detector().fit(_images(4, 13))
    images = torch.cat([_images(3, 14), _images(3, 15).mul(0.2)])  # dark ones: far from the templates
    labels = [0, 0, 0, 1, 1, 1]
    threshold = det.calibrate_f1(images, labels)
    from hetmm.metrics import best_f1

    assert threshold == pytest.approx(best_f1(labels, det.predict(images).pred_score)[0])
    det.threshold = "f1"
    result = det.predict(images)
    assert result.image_threshold == pytest.approx(threshold)
    assert result.pixel_threshold == det.calibration.pixel_threshold(det.pixel_fpr)
    loaded = hetmm.HETMM.load(det.save(tmp_path / "bank.safetensors"), threshold="f1", precision="fp32")
    assert loaded.predict(images).image_threshold == pytest.approx(threshold)
    loaded.add_templates(_images(1, 16))  # new templates, new scores: the F1 threshold is gone
    with pytest.raises(ValueError, match="calibrate_f1"):
        loaded.predict(images)
    with pytest.raises(ValueError, match="one of each"):
        det.calibrate_f1(images, [0] * 6)
    with pytest.raises(ValueError, match="threshold must be"):
        _detector(threshold="best")


def test_fit_val_and_predict_threshold_f1_on_the_command_line(tmp_path, capsys):
    from hetmm.cli import main

    root = build_dataset(tmp_path / "data", n_train=4, n_good=2, n_defective=2)
    bank = tmp_path / "bank.safetensors"
    assert main(["fit", "--data", str(root), "--category", "brick", "--backbone", "tf_efficientnet_lite0",
                 "--image-size", "64", "--out-size", "64", "--out", str(bank), "--val", str(root / "brick" / "test")]) == 0
    assert "F1-optimal image threshold on 4 validation images (2 anomalous)" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["predict", "--bank", str(bank), str(root / "brick" / "test" / "good"), "--out", str(out),
                 "--threshold", "f1"]) == 0
    with pytest.raises(SystemExit):  # argparse: "expected a number or 'f1'"
        main(["predict", "--bank", str(bank), str(root / "brick" / "test" / "good"), "--out", str(out),
              "--threshold", "best"])
    assert "expected a number or 'f1'" in capsys.readouterr().err


def test_regions_are_found_when_read():
    det = _detector(fpr=0.3, pixel_fpr=0.05).fit(_images(4, 17))
    result = det.predict(_images(3, 18))
    assert not result.regions._found  # nothing labelled until asked
    assert result.regions[-1] == find_regions(result.pred_mask[2], result.anomaly_map[2])
    assert result.regions[1:] == [result.regions[1], result.regions[2]] and len(result.regions) == 3
    with pytest.raises(IndexError):
        result.regions[3]
